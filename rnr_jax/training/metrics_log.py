"""Training logs: a line (or a progress bar on a terminal) and ``metrics.jsonl``, from process 0; a non-finite loss
stops the run before the loop can checkpoint the bad state."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import tqdm
from absl import logging

from rnr_jax.io import atomic_write_text


def _format(metrics: Mapping[str, float]) -> str:
  return " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class MetricsLogger:
  """Logs every few steps: loss, lr, grad norm, examples/s, ETA (plus any other metric).

  The JSONL file has one object per log step: ``{"step": s, "loss": ..., ...}``; evaluation metrics are prefixed
  ``eval/``. A resumed run first drops the lines of steps after its checkpoint, so the file never shows a step twice.
  """

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int, start_step: int = 0,
               filename: str = "metrics.jsonl"):
    self.path = os.path.join(workdir, filename)
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._is_writer = jax.process_index() == 0
    self._last_step = start_step
    self._last_time = time.monotonic()
    self._first_log = True
    self._last_finite_step = start_step
    self._bar = None
    if self._is_writer:
      self._drop_lines_after(start_step)
      if sys.stdout.isatty():
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                              file=sys.stdout, dynamic_ncols=True)

  def _drop_lines_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(self.path, "".join(lines))

  def _write(self, step: int, metrics: Mapping[str, float], line: str) -> None:
    if not self._is_writer:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
      f.flush()
    if self._bar is not None:
      self._bar.write(line)
    else:
      logging.info("%s", line)

  def log_train(self, step: int, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Fetches the step's metrics, checks the loss, logs them; returns the host values.

    Raises:
      FloatingPointError: the loss (or the parameter norm, i.e. the state just
        computed) is NaN or infinite. Nothing of this step is saved.
    """
    values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    bad = [k for k in ("loss", "param_norm") if k in values and not math.isfinite(values[k])]
    if bad:
      raise FloatingPointError(
          f"Non-finite {' and '.join(bad)} ({', '.join(f'{k}={values[k]}' for k in bad)}) at "
          f"step {step} (last finite at step {self._last_finite_step}); stopping without "
          "saving this state, the last checkpoint is kept.")
    self._last_finite_step = step

    now = time.monotonic()
    seconds, steps = now - self._last_time, step - self._last_step
    self._last_step, self._last_time = step, now
    line = f"step {step}/{self._total_steps}"
    if self._first_log:
      # The first window after a (re)start includes compilation: no throughput.
      values["first_steps_s"] = seconds
      self._first_log = False
      line += f" | {_format(values)}"
    else:
      values["examples_per_s"] = steps * self._batch_size / max(seconds, 1e-9)
      eta = datetime.timedelta(seconds=round((self._total_steps - step) * seconds / max(steps, 1)))
      line += f" | {_format(values)} | ETA {eta}"
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
    self._write(step, values, line)
    return values

  def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logs evaluation metrics (host or device scalars) under ``eval/``."""
    values = {f"eval/{k}": float(v) for k, v in jax.device_get(dict(metrics)).items()}
    self._write(step, values, f"eval step {step} | {_format(values)}")
    return values

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def append_eval(path: str, step: int, record: Mapping[str, Any]) -> None:
  """Adds a line to an ``eval.jsonl``, first dropping lines of this or later steps (left by a resumed run)."""
  if jax.process_index() != 0:
    return
  lines = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip() and json.loads(line)["step"] < step]
  lines.append(json.dumps({"step": step, **record}) + "\n")
  atomic_write_text(path, "".join(lines))
