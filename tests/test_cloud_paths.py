"""A training workdir on a bucket (``gs://``): a stand-in bucket, kept in a local directory, takes every write and read
of the loop (config, metrics, evaluations, TensorBoard, the best export, Orbax checkpoints, the profiler trace).

The stand-in is an fsspec filesystem registered for ``gs``/``gcs``, which etils.epath uses for ``gs://`` when
TensorFlow is absent; it refuses renames and appends to make sure that nothing relies on them (a bucket has neither).
Orbax's TensorStore writes arrays through its own GCS driver, not fsspec: it is pointed at the same directory, and
Orbax's question to Cloud Storage's API (is the bucket hierarchical?) is answered no."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

import toy_model
from rnr_jax import exports
from rnr_jax.training import loop, step as step_lib

pytest.importorskip("tensorboard")  # the loop writes TensorBoard events


class StandInBucket(DirFileSystem):
  """``gs://<bucket>/<key>`` kept as ``<root>/<bucket>/<key>``; no rename, no append (as on an object store)."""

  protocol = ("gs", "gcs")
  root = ""
  cachable = False  # a fresh root per test

  def __init__(self, *args, **kwargs):  # epath passes finalize_on_close=True, gcsfs's option
    del args, kwargs
    super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

  def mv(self, *args, **kwargs):
    raise AssertionError(f"a bucket has no rename: mv{args}")

  def open(self, path, mode="rb", *args, **kwargs):
    assert "a" not in mode, f"a bucket has no append: open({path!r}, {mode!r})"
    return super().open(path, mode, *args, **kwargs)


def use_stand_in(root: pathlib.Path, setattr_=setattr, setitem=lambda d, k, v: d.__setitem__(k, v)) -> None:
  """Sends ``gs://`` (epath through fsspec, Orbax's TensorStore) to the stand-in bucket kept in ``root``."""
  setattr_(StandInBucket, "root", str(root))
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  for protocol in StandInBucket.protocol:  # in the writable registry, so that a test's end undoes it
    setitem(registry, protocol, StandInBucket)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one filesystem per scheme
  setattr_(gcs_utils, "get_kvstore_for_gcs", lambda path: {
      "driver": "file", "path": str(root / path.removeprefix("gs://"))})
  # Orbax asks Cloud Storage's API whether a bucket is hierarchical; the stand-in is a flat one.
  setattr_(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The stand-in's local directory; ``gs://test-bucket/...`` lands in ``<it>/test-bucket/...``."""
  root = tmp_path / "bucket"
  root.mkdir()
  use_stand_in(root, monkeypatch.setattr, monkeypatch.setitem)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _run(workdir, kill_at=None, **overrides):
  """A 10-step toy run with evaluations and a best export, started (or resumed) in ``workdir``, killed on getting
  batch ``kill_at``; returns its final params."""
  config = toy_model.toy_config(num_steps=10, ckpt_every=4, eval_every=3, log_every=2, async_ckpt=False, **overrides)
  init_fn, loss_fn = toy_model.regressor_fns()
  workdir = loop.start_run(config, workdir)
  best = exports.BestExport(workdir, {"toy": "regressor"}, "score")
  evaluate = toy_model.regressor_evaluator()
  data = toy_model.array_batches(toy_model.regression_data(100), config.train.batch_size, seed=config.train.seed)
  try:
    state = loop.train_loop(
        config, workdir=workdir, init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
        data=data if kill_at is None else toy_model.StopAt(data, kill_at), best=best,
        evaluator=lambda params, step: {"score": -evaluate(params, step)["mse"]})
  finally:
    best.close()
  return jax.device_get(state.params)


def _jsonl(path):
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def test_workdir_in_a_bucket_resumes_like_an_uninterrupted_local_run(bucket, tmp_path):
  straight = _run(str(tmp_path / "local"))
  remote = "gs://test-bucket/runs/toy"
  # Stopped during step 7: checkpoint 4 saved, evaluations of steps 3 and 6 logged.
  with pytest.raises(toy_model.Interrupted):
    _run(remote, kill_at=7, profile_steps=(2, 3))
  assert [p.name for p in epath.Path(remote, "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
  resumed = _run(remote)  # from step 4: steps 5 and 6, and step 6's evaluation, again

  # The same parameters as the uninterrupted local run, bit for bit.
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Everything went to the bucket; nothing into a local directory named after the URI.
  files = {p.relative_to(bucket / "test-bucket/runs/toy").as_posix() for p in bucket.rglob("*") if p.is_file()}
  assert {"config.json", "metrics.jsonl", "eval.jsonl"} <= files
  assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
  assert any(f.startswith("profile/") for f in files)
  assert any(f.startswith("best/") for f in files)
  assert not list(tmp_path.glob("gs:*")) and not list(pathlib.Path.cwd().glob("gs:*"))

  # The logs read back from the bucket: the local run's lines (train and eval/ lines of a step), timings aside, the
  # killed run's lines after its checkpoint dropped; the restart also logs its first step, 5.
  untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
  for name, extra in (("metrics.jsonl", [5]), ("eval.jsonl", [])):
    cloud = untimed(_jsonl(f"{remote}/{name}"))
    assert [r for r in cloud if r["step"] not in extra] == untimed(_jsonl(tmp_path / "local" / name)), name
    assert [r["step"] for r in cloud] == sorted(r["step"] for r in cloud)
    assert [r["step"] for r in cloud if r["step"] in extra] == extra
  assert json.loads(epath.Path(remote, "config.json").read_text())["train"]["num_steps"] == 10

  # The best export reads back from the bucket, as the local run's.
  local_info = exports.read_info(str(tmp_path / "local" / "best"))
  cloud_info = exports.read_info(f"{remote}/best")
  assert cloud_info["step"] == local_info["step"] and cloud_info["bests"] == local_info["bests"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
      jax.devices()[0])), straight)
  export = exports.Export(f"{remote}/best")
  try:
    local_export = exports.Export(str(tmp_path / "local" / "best"))
    try:
      for a, b in zip(jax.tree.leaves(local_export.restore(abstract)), jax.tree.leaves(export.restore(abstract))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
      local_export.close()
  finally:
    export.close()


# A stage program run from "/" with the stand-in bucket: its runner registers the stand-in, SIGKILLs the process when
# it asks for batch KILL_AT (0: never), then runs the stage module as ``python -m`` would.
RUNNER = """
import os, pathlib, runpy, signal, sys
sys.path.insert(0, {tests!r})
import test_cloud_paths
from rnr_jax.training import loop
test_cloud_paths.use_stand_in(pathlib.Path({root!r}))
kill_at, fetched, real_next = int(os.environ["KILL_AT"]), [0], loop.EpochIterator.__next__
def next_or_die(self):
  fetched[0] += 1
  if fetched[0] == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return real_next(self)
loop.EpochIterator.__next__ = next_or_die
sys.argv = ["train.reader", *sys.argv[1:]]
runpy.run_module("train.reader", run_name="__main__", alter_sys=True)
"""


def test_a_stage_run_from_the_root_directory_on_a_bucket_resumes_after_a_kill(bucket, tmp_path):
  from test_reader_train import build_toy_prepared  # pylint: disable=import-outside-toplevel

  prepared = build_toy_prepared(str(tmp_path))
  runner = tmp_path / "runner.py"
  runner.write_text(RUNNER.format(tests=os.path.dirname(os.path.abspath(__file__)), root=str(bucket)))
  remote = "gs://test-bucket/runs/reader"
  # The default-style relative config path resolves from the installed package, not from the working directory.
  args = [sys.executable, str(runner), "--config", "configs/reader.py:tiny", "--workdir", remote,
          f"--config.prepared_dir={prepared}", "--config.reader.train_splits=('toy_train',)",
          "--config.reader.eval_split=toy_dev", "--config.train.num_steps=8", "--config.train.ckpt_every=2",
          "--config.train.eval_every=4"]
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}

  killed = subprocess.run(args, cwd="/", env={**env, "KILL_AT": "6"}, capture_output=True, text=True, timeout=600)
  assert killed.returncode == -9, killed.stderr[-3000:]
  saved = sorted(int(p.name) for p in epath.Path(remote, "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < 8
  finished = subprocess.run(args, cwd="/", env={**env, "KILL_AT": "0"}, capture_output=True, text=True, timeout=600)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert f"Starting at step {max(saved)} from" in finished.stderr
  logged = [r["step"] for r in _jsonl(f"{remote}/metrics.jsonl")]
  assert logged[-1] == 8 and [r["step"] for r in _jsonl(f"{remote}/eval.jsonl")][-1] == 8
  assert exports.read_info(f"{remote}/best")["step"] in (4, 8)
  assert not list(pathlib.Path("/").glob("gs:*")) and not list(tmp_path.glob("gs:*"))

  # Without a local prepared directory the stage says what to do instead of writing a local "gs:" directory.
  no_data = subprocess.run([a for a in args if not a.startswith("--config.prepared_dir")], cwd="/",
                           env={**env, "KILL_AT": "0"}, capture_output=True, text=True, timeout=600)
  assert no_data.returncode != 0 and "pass --config.prepared_dir" in no_data.stderr
