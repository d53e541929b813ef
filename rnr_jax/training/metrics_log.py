"""Training metrics from process 0: a log line (loss, examples/s, input vs compute time, ETA), ``metrics.jsonl``,
TensorBoard event files and, when asked, Weights & Biases, with the run's hyperparameters. A non-finite loss stops
the run before its state can be checkpointed. Paths go through ``etils.epath``: a workdir may be ``gs://...``."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from etils import epath

from rnr_jax.io import atomic_write_text


def write_text(path: epath.PathLike, text: str) -> None:
  """Replaces a file: atomically on a local disk (temporary sibling, rename); a bucket's upload is atomic itself."""
  if "://" not in os.fspath(path):
    return atomic_write_text(path, text)
  epath.Path(path).write_text(text)


def hparams_of(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
  """A config's fields as ``{"optim.lr": 2e-5, ...}``; values other than bool, number and string as strings."""
  flat = {}
  for key, value in (config.to_dict() if hasattr(config, "to_dict") else config).items():
    flat.update(hparams_of(value, f"{prefix}{key}.") if isinstance(value, Mapping) else
                {prefix + key: value if isinstance(value, (bool, int, float, str)) else str(value)})
  return flat


class JsonlWriter:
  """``{"step": s, ...}`` lines, the file rewritten whole on every write (a bucket has no append); a resumed run first
  drops the lines of steps after its checkpoint, so the file never shows a step twice."""

  def __init__(self, path: str, start_step: int):
    self.path, lines = path, epath.Path(path).read_text().splitlines(True) if epath.Path(path).exists() else []
    self._lines = [line for line in lines if line.strip() and json.loads(line)["step"] <= start_step]

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._lines.append(json.dumps({"step": step, **scalars}) + "\n")
    write_text(self.path, "".join(self._lines))

  write_hparams = flush = close = lambda *_: None  # config.json holds the hyperparameters


class TensorBoardWriter:
  """Event files in ``logdir`` by tensorboard's own writer (no TensorFlow). That writer appends to its file, which a
  bucket cannot: for a URI it writes a local temporary directory, whose files each flush uploads whole."""

  def __init__(self, logdir: str, start_step: int):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=import-outside-toplevel
    self._logdir, self._local = logdir, tempfile.mkdtemp(prefix="tensorboard.") if "://" in logdir else None
    self._pb, self._summary = event_pb2, summary_pb2.Summary
    self._writer = EventFileWriter(self._local or logdir)
    # A reader drops the points of steps >= this marker's from earlier files: a resumed run shows each step once.
    self._add(start_step + 1, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

  def _add(self, step: int, **fields: Any) -> None:
    self._writer.add_event(self._pb.Event(wall_time=time.time(), step=step, **fields))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._add(step, summary=self._summary(value=[self._summary.Value(tag=k, simple_value=v)
                                                 for k, v in scalars.items()]))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=import-outside-toplevel
    self._add(0, summary=summary_v2.hparams_pb(hparams))

  def flush(self) -> None:
    self._writer.flush()
    if self._local is not None:
      epath.Path(self._logdir).mkdir(parents=True, exist_ok=True)
      for name in os.listdir(self._local):
        epath.Path(self._logdir, name).write_bytes(epath.Path(self._local, name).read_bytes())

  def close(self) -> None:
    self.flush()
    self._writer.close()
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)


class WandbWriter:
  """A Weights & Biases run of ``project``, one per workdir (a resumed run continues it)."""

  def __init__(self, project: str, workdir: str):
    import wandb  # pylint: disable=import-outside-toplevel
    self._run = wandb.init(project=project, name=os.path.basename(workdir.rstrip("/")), resume="allow",
                           id=hashlib.sha256(workdir.encode()).hexdigest()[:16])
    self.flush, self.close = lambda: None, self._run.finish

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._run.config.update(hparams, allow_val_change=True)


class MetricsLogger:
  """Logs metrics from process 0 to ``metrics.jsonl`` (and ``eval.jsonl``), TensorBoard, W&B and a log line,
  with per-step timings ``data_s``, ``compute_s``, ``examples_per_s`` (``first_steps_s`` after a (re)start)."""

  def __init__(self, workdir: str, config: Any, *, start_step: int = 0):
    train_cfg = config.train
    self._total_steps, self._batch_size = int(train_cfg.num_steps), int(train_cfg.batch_size)
    self._last_step, self._last_time, self._last_finite_step = start_step, time.monotonic(), start_step
    self._first_log, self.data_seconds, self._eval_seconds = True, 0.0, 0.0
    self.writers, self._evals = [], None
    if jax.process_index() == 0:
      self._evals = JsonlWriter(os.path.join(workdir, "eval.jsonl"), start_step)
      self.writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl"), start_step))
      if train_cfg.get("tensorboard", True):
        self.writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard"), start_step))
      if train_cfg.get("wandb"):
        self.writers.append(WandbWriter(train_cfg.wandb, workdir))
      for writer in self.writers if start_step == 0 else ():
        writer.write_hparams(hparams_of(config))

  def _write(self, step: int, values: Mapping[str, float], line: str) -> None:
    for writer in self.writers:
      writer.write_scalars(step, values)
    if self.writers:
      logging.info("%s", line)

  def log_train(self, step: int, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Logs and returns the step's metrics; FloatingPointError (nothing saved) if loss or param norm is not finite."""
    values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    if bad := [k for k in ("loss", "param_norm") if k in values and not math.isfinite(values[k])]:
      raise FloatingPointError(
          f"Non-finite {' and '.join(bad)} ({', '.join(f'{k}={values[k]}' for k in bad)}) at step {step} (last finite "
          f"at step {self._last_finite_step}); stopping without saving this state, the last checkpoint is kept.")
    self._last_finite_step, now, steps = step, time.monotonic(), max(step - self._last_step, 1)
    seconds = now - self._last_time - self._eval_seconds
    line = f"step {step}/{self._total_steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items())
    if self._first_log:
      values["first_steps_s"], self._first_log = seconds, False
      line += f" | first steps with compilation {seconds:.1f} s"
    else:
      step_s, data_s = seconds / steps, self.data_seconds / steps
      values.update(examples_per_s=self._batch_size / max(step_s, 1e-9), data_s=data_s, compute_s=step_s - data_s)
      line += (f" | {values['examples_per_s']:.4g} examples/s; a step: {1e3 * data_s:.0f} ms input, "
               f"{1e3 * (step_s - data_s):.0f} ms compute | ETA "
               f"{datetime.timedelta(seconds=round((self._total_steps - step) * step_s))}")
    self._last_step, self._last_time, self.data_seconds, self._eval_seconds = step, now, 0.0, 0.0
    self._write(step, values, line)
    return values

  def log_eval(self, step: int, metrics: Mapping[str, Any], best: bool = False) -> dict[str, float]:
    """Logs evaluation metrics (host scalars) and whether they are the best so far."""
    if self._evals is not None:
      self._evals.write_scalars(step, {**metrics, "best": best})
    values = {f"eval/{k}": float(v) for k, v in metrics.items()}
    self._eval_seconds += values.get("eval/eval_s", 0.0)  # not training time
    self._write(step, values, f"eval step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return values

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()
