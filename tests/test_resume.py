"""Checkpointing and resuming: SIGKILL mid-run, NaN stop, corrupt checkpoints, resume order, eval log and best
export."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import toy_model
from rnr_jax import exports, io
from rnr_jax.training import checkpoint, loop, mesh as mesh_lib, optim, step as step_lib

TOY_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_train.py")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_trees_equal(a, b):
  """Bitwise equality of two pytrees of arrays."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
  def launch(workdir):
    cmd = [sys.executable, TOY_TRAIN, "--workdir", str(workdir), "--steps", "12",
           "--fetch_delay", "0.2"]
    with open(workdir.with_suffix(".log"), "ab") as log:  # the child keeps its own handle
      return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

  straight, killed = tmp_path / "straight", tmp_path / "killed"
  reference = launch(straight)  # uninterrupted, runs alongside
  victim = launch(killed)
  deadline = time.monotonic() + 120
  while not (killed / "checkpoints" / "4").is_dir():  # orbax renames a checkpoint when committed
    assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint was committed"
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait(timeout=60) == -signal.SIGKILL
  assert not (killed / "final_params.npz").exists()  # it really stopped midway

  restarted = launch(killed)
  assert restarted.wait(timeout=120) == 0, killed.with_suffix(".log").read_text()
  assert reference.wait(timeout=120) == 0, straight.with_suffix(".log").read_text()
  resumed_at = re.search(r"Starting at step (\d+) from checkpoint", killed.with_suffix(".log").read_text())
  assert resumed_at and int(resumed_at.group(1)) in (4, 8)

  with np.load(straight / "final_params.npz") as a, np.load(killed / "final_params.npz") as b:
    assert sorted(a) == sorted(b)
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # The resumed run saw the same batches and keys: equal logged metrics, each step once
  # (the restarted run also logs its first step).
  by_step = lambda workdir: {m["step"]: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731 (timings)
                             for m in read_metrics(workdir)}
  steps = [m["step"] for m in read_metrics(killed)]
  assert steps == sorted(set([1, 4, 8, 12, int(resumed_at.group(1)) + 1]))
  reference_metrics, resumed_metrics = by_step(straight), by_step(killed)
  assert {s: resumed_metrics[s] for s in reference_metrics} == reference_metrics


class PoisonAt:
  """Wraps an iterator; the ``at``-th batch gets NaN targets."""

  def __init__(self, inner, at):
    self.inner, self.at, self.calls = inner, at, 0

  def __next__(self):
    batch, self.calls = next(self.inner), self.calls + 1
    if self.calls == self.at:
      batch = {**batch, "target": np.full_like(batch["target"], np.nan)}
    return batch

  def state(self):
    return self.inner.state()

  def restore(self, state):
    self.inner.restore(state)


def read_best(workdir, init_fn):
  """``(model item, parameters on device 0)`` of ``workdir/best``."""
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  export = exports.Export(str(workdir / "best"))
  try:
    return export.latest_info(), export.restore(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract))
  finally:
    export.close()


def toy_data(config, num=160):
  return toy_model.array_batches(toy_model.regression_data(num), config.train.batch_size, seed=config.train.seed)


@pytest.mark.parametrize("log_every,detected_at", [(1, 7), (100, 10)])
def test_nan_loss_stops_run_and_last_good_checkpoint_resumes(tmp_path, log_every, detected_at):
  # ckpt_every=5: step 5 is saved; the NaN batch is step 7. With log_every=100 the
  # loss is first fetched at the checkpoint step 10, which must then not be saved.
  config = toy_model.toy_config(num_steps=12, ckpt_every=5, log_every=log_every, eval_every=100)
  init_fn, loss_fn = toy_model.regressor_fns()
  with pytest.raises(FloatingPointError, match=f"at step {detected_at} "):
    loop.train_loop(config, workdir=str(tmp_path), init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
                    data=PoisonAt(toy_data(config), at=7))
  assert checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=5).all_steps() == [5]
  # The kept checkpoint restores through the normal resume path (nothing left to train).
  config.train.num_steps = 5
  state = loop.train_loop(config, workdir=str(tmp_path), init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
                          data=toy_data(config))
  assert int(state.step) == 5
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_corrupt_newest_checkpoint_resumes_from_previous(tmp_path, caplog):
  config = toy_model.toy_config(num_steps=6, ckpt_every=2, keep_ckpts=3, async_ckpt=False)
  init_fn, loss_fn = toy_model.regressor_fns()
  run = lambda: loop.train_loop(config, workdir=str(tmp_path), init_fn=init_fn,  # noqa: E731
                                step=step_lib.adamw_step(config, loss_fn), data=toy_data(config))
  final = jax.device_get(run().params)
  ckpt_dir = tmp_path / "checkpoints"
  (ckpt_dir / "6" / "state" / "_METADATA").write_text("")  # truncate a file of the newest one

  with caplog.at_level(logging.WARNING):
    resumed = jax.device_get(run().params)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"{ckpt_dir / '6'} is unreadable" in w for w in warnings), warnings
  assert any("Deleting unreadable checkpoint" in w for w in warnings), warnings
  # Steps 5 and 6 were replayed from step 4 with the same data and keys.
  assert_trees_equal(resumed, final)

  # When no checkpoint restores (here: every one damaged) the run stops instead of
  # silently starting over.
  for step in (2, 4, 6):
    (ckpt_dir / str(step) / "state" / "_METADATA").write_text("")
  with pytest.raises(RuntimeError, match="No checkpoint .* could be restored"):
    run()


def test_resume_keeps_eval_log_and_best_export_of_an_uninterrupted_run(tmp_path):
  # The selection metric by step. The run stops after step 7's evaluation, whose export (the best) is newer than
  # the checkpoint of step 4; the resumed run evaluates steps 5 to 7 again, and step 5 must lose to step 2.
  scores = {1: 0.2, 2: 0.5, 3: 0.1, 4: 0.3, 5: 0.4, 6: 0.45, 7: 0.9, 8: 0.6}
  config = toy_model.toy_config(num_steps=8, ckpt_every=4, eval_every=1, log_every=1, async_ckpt=False)
  init_fn, loss_fn = toy_model.regressor_fns()
  heldout = toy_model.regressor_evaluator()

  def run(workdir, data):
    best = exports.BestExport(str(workdir), {"toy": "regressor"}, "score")
    try:
      loop.train_loop(config, workdir=str(workdir), init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
                      data=data, evaluator=lambda params, step: {**heldout(params, step), "score": scores[step]},
                      best=best)
    finally:
      best.close()

  def evals(workdir):
    with open(workdir / "eval.jsonl", encoding="utf-8") as f:
      return [{k: v for k, v in json.loads(line).items() if k != "eval_s"} for line in f]

  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  run(straight, toy_data(config))
  with pytest.raises(toy_model.Interrupted):
    run(resumed, toy_model.StopAt(toy_data(config), at=8))  # after step 7's evaluation and export
  assert [e["step"] for e in evals(resumed)] == list(range(1, 8))
  assert exports.read_info(str(resumed / "best"))["step"] == 7
  run(resumed, toy_data(config))  # resumes from step 4

  # eval.jsonl: each step once, the same metrics and the same choice of the best as without the interruption.
  assert [e["step"] for e in evals(straight) if e["best"]] == [1, 2, 7]
  assert evals(resumed) == evals(straight)
  assert [m["step"] for m in read_metrics(resumed) if "eval/score" in m] == list(range(1, 9))
  # The best export: step 7's parameters and metrics, as in the uninterrupted run.
  exported = {}
  for workdir in (straight, resumed):
    info, params = read_best(workdir, init_fn)
    info["metrics"].pop("eval_s")
    exported[workdir] = info, params
    assert info["step"] == 7 and info["metrics"] == {"mse": evals(straight)[6]["mse"], "score": 0.9}
  assert exported[resumed][0] == exported[straight][0]
  assert_trees_equal(exported[resumed][1], exported[straight][1])


def test_eval_at_start_evaluates_the_starting_parameters_once(tmp_path):
  # A learning curve starts at step 0: the parameters before any update, evaluated once even when the run resumes.
  config = toy_model.toy_config(num_steps=8, ckpt_every=4, eval_every=4, async_ckpt=False, eval_at_start=True)
  init_fn, loss_fn = toy_model.regressor_fns()
  heldout = toy_model.regressor_evaluator()
  seen = []

  def run(data):
    best = exports.BestExport(str(tmp_path), {"toy": "regressor"}, "score")
    try:
      loop.train_loop(config, workdir=str(tmp_path), init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
                      data=data, best=best,
                      evaluator=lambda params, step: seen.append((step, heldout(params, step)["mse"])) or
                      {"score": -heldout(params, step)["mse"]})
    finally:
      best.close()

  with pytest.raises(toy_model.Interrupted):
    run(toy_model.StopAt(toy_data(config), at=6))  # killed after step 4's checkpoint
  run(toy_data(config))  # resumes at step 4: no second evaluation of step 0
  assert [s for s, _ in seen] == [0, 4, 8]
  initial = init_fn(jax.random.split(loop.make_key(config.train))[0])  # as train_loop draws the init key
  assert seen[0][1] == pytest.approx(heldout(initial, 0)["mse"])
  assert seen[1][1] != seen[0][1]  # step 4 evaluates other parameters


def test_eval_every_zero_never_evaluates_and_exports_the_last_step(tmp_path):
  # A stage whose evaluation costs more than it tells (the pipeline's distillation with eval_distilled=False) still
  # hands its final parameters to the next stage.
  config = toy_model.toy_config(num_steps=6, ckpt_every=3, eval_every=0, async_ckpt=False)
  init_fn, loss_fn = toy_model.regressor_fns()
  called = []
  best = exports.BestExport(str(tmp_path), {"toy": "regressor"}, "score")
  try:
    state = loop.train_loop(config, workdir=str(tmp_path), init_fn=init_fn, step=step_lib.adamw_step(config, loss_fn),
                            data=toy_data(config), best=best, evaluator=lambda params, step: called.append(step) or {})
  finally:
    best.close()
  assert called == [] and not (tmp_path / "eval.jsonl").exists()
  info, params = read_best(tmp_path, init_fn)
  assert info["step"] == 6 and info["toy"] == "regressor" and info["metrics"] == {}
  assert_trees_equal(params, jax.device_get(state.params))


def test_resume_order_own_checkpoint_then_init_checkpoint_then_pretrained(tmp_path):
  config = toy_model.toy_config(num_steps=4)
  init_fn, loss_fn = toy_model.regressor_fns()
  other = loop.train_loop(config, workdir=str(tmp_path / "other"), init_fn=init_fn,
                          step=step_lib.adamw_step(config, loss_fn), data=toy_data(config))

  mesh = mesh_lib.make_mesh(config.mesh)
  optimizer, _ = optim.make_optimizer(config.optim, 10)
  new_state = lambda params: step_lib.TrainState.create(params, optimizer)  # noqa: E731
  abstract = jax.eval_shape(lambda r: new_state(init_fn(r)), jax.random.key(0))
  shardings = mesh_lib.param_shardings(abstract, mesh, config.mesh.rules)
  init_params = jax.jit(lambda: init_fn(jax.random.key(0)), out_shardings=shardings.params)
  pretrained = lambda p: jax.tree.map(lambda x: np.ones(x.shape, x.dtype), p)  # noqa: E731

  def start(workdir, **kwargs):
    ckpt = checkpoint.Checkpointer(workdir, save_every=1, async_save=False)
    return checkpoint.restore_or_initialize(
        ckpt, mesh_lib.with_shardings(abstract, shardings), rng=jax.random.key(1),
        init_params=init_params,
        create_state=jax.jit(new_state, out_shardings=shardings), **kwargs)

  # (4) random init; (3) pretrained weights, placed with the rules' shardings.
  assert start(tmp_path / "a").source == "random initialisation"
  restored = start(tmp_path / "a", load_pretrained=pretrained)
  assert restored.source == "pretrained weights" and restored.data_state is None
  assert np.all(np.asarray(restored.state.params["hidden"]["kernel"]) == 1)
  assert restored.state.params["hidden"]["kernel"].sharding == shardings.params["hidden"]["kernel"]
  # (2) an init checkpoint wins over pretrained weights: its parameters, step 0, fresh optimiser.
  restored = start(tmp_path / "a", init_checkpoint=str(tmp_path / "other"), load_pretrained=pretrained)
  assert restored.source.startswith("parameters of")
  assert int(restored.state.step) == 0
  assert_trees_equal(restored.state.params, other.params)
  # (1) the run's own checkpoint wins over everything, with its rng and data position.
  ckpt = checkpoint.Checkpointer(tmp_path / "a", save_every=1, async_save=False)
  ckpt.save(3, restored.state, jax.random.key(7), {"seed": 0, "epoch": 1, "index": 2})
  ckpt.close()
  resumed = start(tmp_path / "a", init_checkpoint=str(tmp_path / "other"), load_pretrained=pretrained)
  assert resumed.source.endswith(os.path.join("a", "3"))
  assert resumed.data_state == {"seed": 0, "epoch": 1, "index": 2}
  np.testing.assert_array_equal(jax.random.key_data(resumed.rng), jax.random.key_data(jax.random.key(7)))


def test_epoch_iterator_resume_replays_batches():
  arrays = {"x": np.arange(50)}
  it = toy_model.array_batches(arrays, 8, seed=3)  # 6 batches per epoch, 2 dropped
  first = [next(it)["x"] for _ in range(4)]
  saved = it.state()
  rest = [next(it)["x"] for _ in range(10)]  # crosses into epochs 1 and 2
  again = toy_model.array_batches(arrays, 8, seed=3)
  again.restore(saved)
  for a, b in zip(rest, [next(again)["x"] for _ in range(10)]):
    np.testing.assert_array_equal(a, b)
  assert len(np.unique(np.concatenate(first + rest[:2]))) == 48  # one epoch: no repeats
  assert not np.array_equal(np.concatenate(rest[2:8]), np.concatenate(first + rest[:2]))
  # Two processes split each global batch in halves.
  halves = [toy_model.array_batches(arrays, 8, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  fresh = toy_model.array_batches(arrays, 8, seed=3)
  for _ in range(7):
    np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), next(fresh)["x"])


def test_atomic_writes_for_resume(tmp_path):
  path = tmp_path / "sub" / "meta.json"
  io.atomic_write_json(path, {"a": 1})
  io.atomic_write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  io.atomic_write_text(tmp_path / "t.txt", "héllo")
  assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"

  target = tmp_path / "index"
  with io.atomic_dir(target) as tmp:
    (tmp_path / tmp / "v.npy").write_bytes(b"old")
  with pytest.raises(ZeroDivisionError):
    with io.atomic_dir(target) as tmp:
      (tmp_path / tmp / "v.npy").write_bytes(b"half")
      1 / 0
  assert (target / "v.npy").read_bytes() == b"old"  # a failed write leaves the old directory
  with io.atomic_dir(target) as tmp:
    (tmp_path / tmp / "w.npy").write_bytes(b"new")
  assert sorted(os.listdir(target)) == ["w.npy"]
  assert sorted(os.listdir(tmp_path)) == ["index", "sub", "t.txt"]  # no temporaries left behind


def test_epoch_iterator_groups_by_size():
  sizes = np.random.default_rng(0).integers(10, 200, 64)
  arrays = {"x": np.arange(64)}

  def grouped(**kw):
    return loop.EpochIterator(lambda idx: {k: v[idx] for k, v in arrays.items()}, 64, 4, seed=3,
                              sizes=lambda epoch: sizes, group_batches=4, **kw)

  def padded(batches):  # tokens when every batch pads to its longest example
    return sum(4 * sizes[b["x"]].max() for b in batches)

  it, plain = grouped(), toy_model.array_batches(arrays, 4, seed=3)
  epoch = [next(it) for _ in range(16)]
  assert sorted(np.concatenate([b["x"] for b in epoch]).tolist()) == list(range(64))  # each example once
  assert padded(epoch) < 0.85 * padded([next(plain) for _ in range(16)])
  saved = it.state()
  rest = [next(it)["x"] for _ in range(20)]  # into epoch 2, ordered differently
  assert not np.array_equal(np.concatenate(rest[:16]), np.concatenate([b["x"] for b in epoch]))
  again = grouped()
  again.restore(saved)
  for a, b in zip(rest, [next(again)["x"] for _ in range(20)]):
    np.testing.assert_array_equal(a, b)
  halves, fresh = [grouped(process_index=p, process_count=2) for p in range(2)], grouped()
  for _ in range(20):
    np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), next(fresh)["x"])
  with pytest.raises(ValueError, match="group_batches"):
    loop.EpochIterator(lambda idx: idx, 64, 4, seed=0, sizes=lambda epoch: sizes)
