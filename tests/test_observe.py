"""What a user watching a run sees: TensorBoard events and hyperparameters, W&B, profiler traces, quiet stage logs,
configs found from any directory, the compilation cache, and the loop's files on a stand-in bucket (``gs://``)."""

import json
import logging
import os
import re
import subprocess
import sys
import time
import types

import fsspec
import fsspec.registry  # noqa: F401  (the module, which fsspec's own `registry` attribute hides)
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.plugins.hparams import plugin_data_pb2

import configs
import toy_model
from rnr_jax.training import loop, metrics_log
from rnr_jax.training import step as step_lib
from test_resume import toy_data
from toy_model import Interrupted, StopAt
from test_retriever import write_toy_data
from train import OWN_CODE, OwnInfoOnly, _PackageConfigParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scalars(logdir):
  """``{tag: {step: value}}`` of every scalar TensorBoard shows for ``logdir``; fails if a step appears twice."""
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["scalars"]:
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), f"{tag} shows a step twice"
    out[tag] = {e.step: e.value for e in events}
  return out


def hparams(logdir):
  """The hyperparameters recorded by the TensorBoard hparams plugin under ``logdir``."""
  found = {}
  for name in sorted(os.listdir(logdir)):
    for event in event_file_loader.EventFileLoader(os.path.join(logdir, name)).Load():
      for value in event.summary.value:
        if value.tag == "_hparams_/session_start_info":
          info = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
          for key, v in info.hparams.items():
            found[key] = getattr(v, v.WhichOneof("kind"))
  return found


def toy_run(workdir, config, data=None):
  init_fn, loss_fn = toy_model.regressor_fns()
  return loop.train_loop(config, workdir=str(workdir), init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
                         data=data or toy_data(config), evaluator=toy_model.regressor_evaluator())


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
  config = toy_model.toy_config(num_steps=8, ckpt_every=4, eval_every=4, log_every=1, async_ckpt=False)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  toy_run(straight, config)
  with pytest.raises(Interrupted):
    toy_run(resumed, config, StopAt(toy_data(config), at=7))  # steps 5 and 6 logged, checkpoint at 4
  toy_run(resumed, config)

  expected, got = scalars(straight / "tensorboard"), scalars(resumed / "tensorboard")
  assert sorted(expected["loss"]) == list(range(1, 9)) and sorted(expected["eval/mse"]) == [4, 8]
  assert {"grad_norm", "lr", "max_err", "examples_per_s", "data_s", "compute_s"} <= expected.keys()
  for tag in ("loss", "grad_norm", "eval/mse"):
    assert got[tag] == pytest.approx(expected[tag], rel=1e-6), tag
  # The JSONL files agree with TensorBoard, one line per step and kind.
  lines = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert {r["step"]: r["loss"] for r in lines if "loss" in r} == pytest.approx(expected["loss"], rel=1e-6)
  assert [r["step"] for r in lines if "eval/mse" in r] == [4, 8]
  assert [json.loads(line)["step"] for line in (resumed / "eval.jsonl").read_text().splitlines()] == [4, 8]
  # The hyperparameters: the config's fields, flattened, written once by the fresh run.
  recorded = hparams(resumed / "tensorboard")
  assert recorded["optim.lr"] == pytest.approx(0.01) and recorded["train.batch_size"] == 16
  assert recorded["mesh.axes"] == "('data', 'fsdp')"


def test_hparams_of_flattens_a_config():
  config = toy_model.toy_config()
  flat = metrics_log.hparams_of(config)
  assert flat["train.num_steps"] == 12 and flat["optim.schedule"] == "linear" and flat["train.async_ckpt"] is True
  assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
  assert metrics_log.hparams_of({"a": {"b": None, "c": (1, 2)}}) == {"a.b": "None", "a.c": "(1, 2)"}


def test_wandb_is_imported_only_when_asked_and_gets_the_same_scalars(tmp_path, monkeypatch):
  calls = []

  class Run:
    config = types.SimpleNamespace(update=lambda values, **_: calls.append(("config", dict(values))))

    def log(self, values, step):
      calls.append(("log", step, dict(values)))

    def finish(self):
      calls.append(("finish",))

  fake = types.ModuleType("wandb")
  fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = toy_model.toy_config(num_steps=4, log_every=2, eval_every=4, tensorboard=False)
  toy_run(tmp_path / "plain", config)
  assert not calls
  config.train.wandb = "rnr"
  toy_run(tmp_path / "run", config)
  assert calls[0][0] == "init" and calls[0][1]["project"] == "rnr" and calls[0][1]["resume"] == "allow"
  assert calls[1][0] == "config" and calls[1][1]["train.wandb"] == "rnr"
  assert [c[1] for c in calls if c[0] == "log" and "loss" in c[2]] == [1, 2, 4]
  assert [c[1] for c in calls if c[0] == "log" and "eval/mse" in c[2]] == [4]
  assert calls[-1] == ("finish",)
  assert not (tmp_path / "run" / "tensorboard").exists()


def test_profile_steps_write_a_trace(tmp_path):
  config = toy_model.toy_config(num_steps=4, eval_every=100, profile_steps=(2, 3))
  toy_run(tmp_path, config)
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files if f.endswith(".xplane.pb")]
  assert traces, "no profiler trace written"


class BucketStandIn(LocalFileSystem):
  """``gs://<path>`` kept in the local directory ``root``: a bucket for code that reaches storage through fsspec."""
  protocol = ("gs", "gcs")
  root = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix):]).rstrip("/")
    return super()._strip_protocol(path)


def test_loop_files_go_to_a_bucket_and_a_resume_drops_later_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(BucketStandIn, "root", str(tmp_path))
  for protocol in BucketStandIn.protocol:
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, BucketStandIn)  # pylint: disable=W0212
  config = toy_model.toy_config(num_steps=6)
  workdir = loop.start_run(config, "gs://bucket/run")
  assert workdir == "gs://bucket/run"
  assert json.loads((tmp_path / "bucket/run/config.json").read_text())["train"]["num_steps"] == 6

  def log(start_step, steps):
    logger = metrics_log.MetricsLogger(workdir, config, start_step=start_step)
    for step in steps:
      logger.log_train(step, {"loss": np.float32(step / 10)})
      logger.log_eval(step, {"mse": step / 100}, best=step == 2)
    logger.close()

  log(0, [1, 2, 3, 4])
  # TensorBoard reads event files in name order, which starts with their creation second and then a per-process
  # counter that does not sort as a number: a resumed run starts in a later second.
  time.sleep(1.1)
  log(2, [3, 4, 5])  # a resume from the checkpoint of step 2
  lines = [json.loads(line) for line in (tmp_path / "bucket/run/metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], "loss" in r) for r in lines] == [(s, k) for s in range(1, 6) for k in (True, False)]
  evals = [json.loads(line) for line in (tmp_path / "bucket/run/eval.jsonl").read_text().splitlines()]
  assert [(e["step"], e["best"]) for e in evals] == [(1, False), (2, True), (3, False), (4, False), (5, False)]
  assert scalars(tmp_path / "bucket/run/tensorboard")["loss"] == pytest.approx({s: s / 10 for s in range(1, 6)})


def test_library_info_lines_are_filtered_but_ours_and_warnings_pass():
  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "message", (), None)

  own = os.path.join(ROOT, "rnr_jax", "training", "loop.py")
  library = os.path.join(os.path.dirname(fsspec.__file__), "spec.py")
  keep = OwnInfoOnly().filter
  assert own.startswith(OWN_CODE) and not library.startswith(OWN_CODE)
  assert keep(record(own, logging.INFO)) and keep(record(library, logging.WARNING))
  assert not keep(record(library, logging.INFO)) and not keep(record(library, logging.DEBUG))


def test_config_paths_resolve_to_the_installed_package_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = os.path.join(configs.DIR, "retriever.py")
  assert configs.resolve("configs/retriever.py:tiny") == packaged + ":tiny"
  assert configs.resolve("retriever.py") == packaged
  assert _PackageConfigParser("config").parse("configs/retriever.py:tiny").train.num_steps == 20
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "retriever.py").write_text("")
  assert configs.resolve("configs/retriever.py") == "configs/retriever.py"  # a file that exists wins
  assert configs.resolve("elsewhere/retriever.py") == "elsewhere/retriever.py"  # only bare or configs/ names
  with pytest.raises(ValueError, match="no config file"):
    _PackageConfigParser("config").parse("configs/nonexistent.py")


def own_module_names():
  return {name for package in ("rnr_jax", "train", "infer", "configs", "bench")
          for _, _, files in os.walk(os.path.join(ROOT, package)) for name in files if name.endswith(".py")}


def test_a_stage_from_the_root_directory_logs_quietly_and_writes_tensorboard(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  write_toy_data(str(data))
  workdir, cache = tmp_path / "run", tmp_path / "compile_cache"
  cmd = [sys.executable, "-m", "train.retriever", "--config", "configs/retriever.py:tiny", "--workdir", str(workdir),
         "--compile_cache", str(cache), f"--config.data_dir={data}", "--config.retriever.train_splits=('toy_train',)",
         "--config.retriever.eval_splits=('toy_dev',)", "--config.retriever.select_metric=toy_dev/top1"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]

  log = (proc.stdout + proc.stderr).splitlines()
  sources = [m.group(1) for m in (re.match(r"I\d{4} [\d:.]+ +\d+ (\S+):\d+\]", line) for line in log) if m]
  library = [s for s in sources if s not in own_module_names()]
  assert len(sources) >= 8 and len(library) <= 0.05 * len(log), library
  assert any(re.search(r"step 20/20 .* examples/s; a step: \d+ ms input, \d+ ms compute \| ETA", line)
             for line in log)
  shown = scalars(workdir / "tensorboard")
  assert sorted(shown["loss"]) == [1, 5, 10, 15, 20] and sorted(shown["eval/toy_dev/top1"]) == [10, 20]
  assert hparams(workdir / "tensorboard")["model.hf_config.hidden_size"] == 32
  assert os.listdir(cache), "nothing in the compilation cache"
