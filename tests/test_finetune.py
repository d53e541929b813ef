"""Iterative finetuning (paper Algorithm 1) against a hand-written reference, and distillation + finetuning end to end.

The end-to-end tests run the real entry points on the toy task of ``tests/test_reader_train.py`` (a marker word
followed by the answer in one passage per key, distractors sharing the key) with one-layer tiny models: a reader
teacher (``train.reader``) and a shared-encoder retriever (``train.retriever``) are trained first, then
``train.distill`` and ``train.finetune``.
Their end-to-end accuracy uses a fresh index of all 160 passages and is measured on the training questions: a tiny
retriever trained for a unit test's budget does not reliably generalise its key matching to the 8 unseen dev keys,
and 8 questions are too coarse a measure.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import finetune as finetune_config
from rnr_jax import distill, exports, iterative, qa_model
from rnr_jax.config import load_config
from rnr_jax.training import optim
from rnr_jax.training.step import TrainState
from test_reader_train import build_toy_prepared
from train import distill as distill_stage
from train import finetune as finetune_stage
from train import reader as reader_stage
from train import retriever as retriever_stage
from unified_fixtures import ENCODER_INPUTS, compiled, random_batch, tiny_model, tiny_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- Algorithm 1 ----------------------------------------------------------------------


def reference_step(model, params, opt_state, batch, tx, temperature):
  """Algorithm 1 written out: two sequential updates with jax.grad and optax (no dropout), one AdamW state used by
  both (it advances twice per step).

  Returns the parameters and the optimiser state after the step, and the step's losses: the reader loss at the
  step's parameters, ``L_recon`` and ``L_nll`` after the reader update.
  """
  def scores(p):
    q = model.apply({"params": p}, {k: batch[f"q_{k}"] for k in ENCODER_INPUTS}, method="embed")
    ps = model.apply({"params": p}, {k: batch[f"p_{k}"] for k in ENCODER_INPUTS}, method="embed")
    return jnp.einsum("bd,bmd->bm", q, ps.reshape(q.shape[0], -1, q.shape[1]))

  def read_loss(p):
    start, end, rank = model.apply({"params": p}, {k: batch[k] for k in ENCODER_INPUTS}, method="read")
    num_q, m = batch["passage_mask"].shape
    length = batch["input_ids"].shape[1]
    pos = np.arange(length)[None, :]
    valid = ((pos >= batch["text_start"][:, None]) & (pos < batch["text_end"][:, None])).reshape(num_q, m, length)
    return distill.read_loss(start.reshape(num_q, m, length), end.reshape(num_q, m, length), rank.reshape(num_q, m),
                              valid, batch["span_starts"], batch["span_ends"], batch["span_mask"],
                              batch["passage_mask"])[0]

  mask = batch["passage_mask"]

  def log_softmax(x):
    return jax.nn.log_softmax(jnp.where(mask, x, -1e9), axis=-1)

  def retrieval_parts(p, target):
    l_hat = scores(p)
    log_pt, log_ps = log_softmax(target / temperature), log_softmax(l_hat / temperature)
    recon = jnp.sum(jnp.where(mask, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), -1).mean()
    nll = -log_softmax(l_hat)[:, 0].mean()
    return recon, nll

  target = scores(params)  # (1)
  updates, opt_state = tx.update(jax.grad(read_loss)(params), opt_state, params)  # (2)
  theta_hat = optax.apply_updates(params, updates)
  grads = jax.grad(lambda p: sum(retrieval_parts(p, target)))(theta_hat)  # (3)-(5)
  updates, opt_state = tx.update(grads, opt_state, theta_hat)  # (6), the state of update (2) advancing
  recon, nll = retrieval_parts(theta_hat, target)
  return optax.apply_updates(theta_hat, updates), opt_state, {"read_loss": read_loss(params), "recon_loss": recon,
                                                              "retrieval_nll": nll}


def test_iterative_step_equals_reference_algorithm_1():
  """Two steps of ``iterative_step`` equal two of the reference: one AdamW state advancing twice per step, on a
  schedule of twice the steps with the warmup doubled; with grad_accum 2 (two micro-batches of one question each)
  too."""
  model = tiny_model()
  batches = [random_batch(seed=2), random_batch(seed=3)]
  params = tiny_params(model, batches[0])
  lr, temperature = 1e-2, 3.0
  config = finetune_config.get_config("tiny")
  config.optim.update(lr=lr, eps=1e-3, weight_decay=0.01, clip_norm=1.0, warmup_steps=1, schedule="linear")
  config.train.num_steps = 3
  config.finetune.temperature = temperature

  def schedule(count):  # 6 updates, 2 of warmup
    return lr * jnp.minimum(1.0, count / 2) * jnp.minimum(1.0, jnp.maximum(0.0, (6 - count) / 4))

  decayed = lambda p: optim.regex_mask(optim.NO_DECAY_REGEX, p, match=False)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.01, mask=decayed))

  reference = compiled(lambda p, s, b: reference_step(model, p, s, b, tx, temperature), params, tx.init(params),
                       batches[0])
  want_params, want_opt, want_losses = params, tx.init(params), []
  for batch in batches:
    want_params, want_opt, losses = reference(want_params, want_opt, batch)
    want_losses.append(losses)
  counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(want_opt, "count")]
  assert counts and set(counts) == {4}  # two updates per step
  for grad_accum in (1, 2):
    config.optim.grad_accum = grad_accum
    step = iterative.iterative_step(config, model, normalize=False, scale=1.0)
    state = step.init_state(params)
    update = compiled(step.update, state, batches[0], jax.random.key(5))
    for k, batch in enumerate(batches):
      state, metrics = update(state, batch, jax.random.key(5))
      assert float(metrics["lr"]) == pytest.approx(float(schedule(2 * k)))  # the reader update's rate
      for name, value in want_losses[k].items():
        assert float(metrics[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), (grad_accum, k, name)
      assert float(metrics["loss"]) == pytest.approx(
          float(metrics["read_loss"] + metrics["recon_loss"] + metrics["retrieval_nll"]), rel=1e-5)
      assert float(metrics["loss"]) > float(metrics["read_loss"]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), state.params, want_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), state.opt_state, want_opt)
    assert int(state.step) == 2
  # Step 2's reader update moved θ̂ away from the target's θ: L_recon > 0 (step 1's ran at a learning rate of 0).
  assert float(want_losses[0]["recon_loss"]) < 1e-6 < float(want_losses[1]["recon_loss"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), want_params, params)
  assert max(jax.tree.leaves(moved)) > 1e-3


# ---- end to end -----------------------------------------------------------------------


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _untimed(record):
  """A log record without its timings (``*_s``, ``examples_per_s``) and evaluation's best flag."""
  return {k: v for k, v in record.items() if not k.endswith("_s") and k != "best"}


def _common(prepared):
  # One input length for questions and passages: their embeddings share one compiled function.
  return [f"prepared_dir={prepared}", "tokens.buckets=(64,)", "tokens.question_len=64",
          "pool.train_splits=('toy_train',)", "eval.split=toy_train", "eval.questions=32", "eval.batch_size=8",
          "train.log_every=5"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """The toy prepared directory, a trained reader teacher and a trained shared-encoder retriever."""
  root = str(tmp_path_factory.mktemp("toy_unified"))
  prepared = build_toy_prepared(root)
  common = [f"prepared_dir={prepared}", "model.num_layers=1", "tokens.buckets=(64,)", "train.log_every=20"]
  reader_stage.train_and_evaluate(load_config(os.path.join(ROOT, "configs/reader.py:tiny"), common + [
      "reader.train_splits=('toy_train',)", "reader.eval_split=toy_dev", "reader.eval_passages=(1, 4)",
      "optim.lr=3e-3", "train.num_steps=60", "train.eval_every=60", "train.ckpt_every=60"]),
      os.path.join(root, "teacher"))
  retriever_stage.train_and_evaluate(load_config(os.path.join(ROOT, "configs/retriever.py:tiny"), common + [
      "retriever.train_splits=('toy_train',)", "retriever.eval_splits=('toy_dev',)", "retriever.eval_ks=(1, 4)",
      "retriever.select_metric=toy_dev/top4", "model.pooling=mean", "optim.lr=5e-3", "train.num_steps=80",
      "train.eval_every=80", "train.ckpt_every=80"]), os.path.join(root, "retriever"))
  return root, prepared


@pytest.fixture(scope="module")
def distilled(toy_run):
  """Distillation with J_read = BM25 top 4 (each key's passages, the teacher's training distribution):
  ``(workdir, config, final state)``; checkpoints at steps 20 and 40."""
  root, prepared = toy_run
  teacher, retriever = os.path.join(root, "teacher", "best"), os.path.join(root, "retriever", "best")
  workdir = os.path.join(root, "distill")
  config = load_config(os.path.join(ROOT, "configs/distill.py:tiny"), _common(prepared) + [
      f"distill.teacher={teacher}", f"unified.init_retriever={retriever}", "pool.k1=4", "optim.lr=3e-3",
      "train.num_steps=40", "train.eval_every=20", "train.ckpt_every=20"])
  state = distill_stage.train_and_evaluate(config, workdir)
  return workdir, config, jax.device_get(state)


@pytest.fixture(scope="module")
def finetuned(toy_run, distilled):
  """Finetuning (Algorithm 1) from the distilled student, J_read = the retriever's top 8 (other keys' marker
  passages among the negatives): ``(workdir, config, final state)``; checkpoints at steps 15 and 30."""
  root, prepared = toy_run
  workdir = os.path.join(root, "finetune")
  config = load_config(os.path.join(ROOT, "configs/finetune.py:tiny"), _common(prepared) + [
      f"finetune.init={os.path.join(distilled[0], 'best')}",
      f"pool.retriever={os.path.join(root, 'retriever', 'best')}", "pool.k1=8", "optim.lr=1e-3",
      "train.num_steps=30", "train.eval_every=30", "train.ckpt_every=15"])
  state = finetune_stage.train_and_evaluate(config, workdir)
  return workdir, config, jax.device_get(state)


def test_distill_learns_toy_task(distilled):
  workdir, config, _ = distilled
  logs = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert logs[-1]["read_loss"] < 0.4 * logs[0]["read_loss"] and logs[-1]["rank_acc"] == 1.0, logs
  evals = _read_jsonl(os.path.join(workdir, "eval.jsonl"))
  assert [e["step"] for e in evals] == [20, 40]
  best = max(evals, key=lambda e: e["em_open_mean"])
  # Chance: a random passage holds the answer 5/160 of the time; a random-init reader's EM is ~0.
  assert best["em_open"] >= 0.25 and best["top4"] >= 0.5, evals
  system, scale, _ = exports.load_unified(os.path.join(workdir, "best"))
  info = exports.read_info(os.path.join(workdir, "best"))
  assert info["metrics"]["em_open_mean"] == best["em_open_mean"] and info["step"] == best["step"]
  assert system.unified and system.retriever.pooling == "mean" and scale == config.unified.scale
  caches = os.listdir(os.path.join(workdir, "teacher_cache"))
  assert len(caches) == 1 and os.path.exists(os.path.join(workdir, "teacher_cache", caches[0], "done.json"))

  # The teacher is in no checkpoint: the saved state is the student's TrainState, leaf for leaf.
  model = system.reader.build()
  student = jax.eval_shape(lambda: TrainState.create(
      model.init(jax.random.key(0), {k: np.ones((1, 4), np.int32) for k in ENCODER_INPUTS})["params"],
      optim.make_optimizer(config.optim, config.train.num_steps)[0]))
  saved = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", "40", "state")).item_metadata.tree
  assert len(jax.tree.leaves(saved)) == len(jax.tree.leaves(student))
  assert set(saved) == {"step", "params", "opt_state"} and set(saved["params"]) == set(student.params)


def test_finetune_learns_toy_task(distilled, finetuned):
  """The retrieval update must learn to match the key: J_read holds other keys' marker passages."""
  workdir, _, _ = finetuned
  logs = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  first, last = logs[0], logs[-1]
  assert last["step"] == 30 and last["loss"] < 0.8 * first["loss"] and last["read_loss"] < 0.75 * first["read_loss"]
  assert first["lr"] == 0 and {"recon_loss", "retrieval_nll", "read_grad_norm", "retrieval_grad_norm"} <= set(last)
  final = _read_jsonl(os.path.join(workdir, "eval.jsonl"))[-1]
  assert final["em_open"] >= 0.45 and final["top1"] >= 0.45 and final["top4"] >= 0.75, final
  distill_best = max(_read_jsonl(os.path.join(distilled[0], "eval.jsonl")), key=lambda e: e["em_open_mean"])
  assert final["top1"] > distill_best["top1"]  # the retrieval update learnt to tell the keys apart
  with np.load(os.path.join(workdir, "pool.npz")) as f:
    assert f["toy_train"].shape == (32, 8)
  with open(os.path.join(workdir, "pool.json"), encoding="utf-8") as f:
    assert json.load(f)["source"] == "retriever"
  system, _, params = exports.load_unified(os.path.join(workdir, "best"))
  assert exports.read_info(os.path.join(workdir, "best"))["step"] == 30
  assert set(params) == {"encoder", "qa_outputs", "qa_classifier"}
  assert exports.load_reader(os.path.join(workdir, "best"))[0] == system.reader  # served like any exported reader
  assert system == exports.load_unified(os.path.join(distilled[0], "best"))[0]  # the student's settings


def test_resumed_runs_equal_uninterrupted_ones(distilled, finetuned):
  """Each stage rerun from its middle checkpoint (a copy of its workdir without the last one) ends with the same
  state, logs and evaluation; the teacher's cache and the pool are reused."""
  for (workdir, config, state), stage, middle in ((distilled, distill_stage, 20), (finetuned, finetune_stage, 15)):
    last = int(config.train.num_steps)
    copy = workdir + "_resumed"
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", str(last)))
    kept = {name: os.stat(os.path.join(copy, name)).st_mtime_ns for name in ("pool.npz", "teacher_cache")
            if os.path.exists(os.path.join(copy, name))}
    caches = sorted(os.listdir(os.path.join(copy, "teacher_cache"))) if "teacher_cache" in kept else None
    resumed = jax.device_get(stage.train_and_evaluate(config, copy))
    assert int(resumed.step) == last
    jax.tree.map(np.testing.assert_array_equal, resumed.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, state.opt_state)
    # Keyed by step and kind (training or evaluation line).
    logs, again = ({(r["step"], "loss" in r): _untimed(r) for r in _read_jsonl(os.path.join(w, "metrics.jsonl"))}
                   for w in (workdir, copy))
    later = [k for k in logs if k[0] > middle]
    assert (last, False) in later and {k: again[k] for k in later} == {k: logs[k] for k in later}
    assert again.keys() - logs.keys() == {(middle + 1, True)}  # the resumed run logs its first step
    evals = {e["step"]: _untimed(e) for e in _read_jsonl(os.path.join(workdir, "eval.jsonl"))}
    assert {e["step"]: _untimed(e) for e in _read_jsonl(os.path.join(copy, "eval.jsonl"))} == evals
    for name, mtime in kept.items():
      assert os.stat(os.path.join(copy, name)).st_mtime_ns == mtime, name
    if caches is not None:
      assert sorted(os.listdir(os.path.join(copy, "teacher_cache"))) == caches


def test_student_from_the_teacher_reader_starts_where_the_teacher_is(toy_run):
  """``model.init=<reader export>``: the student's encoder and heads are the teacher's, so the KD reading loss
  starts at zero; it does not with fresh heads on the teacher's encoder (``unified.init_retriever`` of a retriever
  started from the teacher)."""
  root, prepared = toy_run
  teacher = os.path.join(root, "teacher", "best")
  encoder_config, encoder, heads = exports.reader_encoder(teacher)
  _, teacher_params, _ = exports.load_reader(teacher)
  assert encoder_config.num_hidden_layers == 1 and set(heads) == set(qa_model.HEAD_NAMES)
  jax.tree.map(np.testing.assert_array_equal, encoder, jax.device_get(teacher_params["encoder"]))
  # A retriever whose encoder starts from the teacher's (lr 0: it stays there).
  common = [f"prepared_dir={prepared}", "tokens.buckets=(64,)", "tokens.question_len=64", "model.dropout=0.0",
            "optim.warmup_steps=0"]
  retriever_stage.train_and_evaluate(load_config(os.path.join(ROOT, "configs/retriever.py:tiny"), common + [
      f"model.init={teacher}", "retriever.train_splits=('toy_train',)", "retriever.eval_splits=('toy_dev',)",
      "retriever.eval_ks=(1,)", "retriever.select_metric=toy_dev/top1", "model.pooling=mean", "optim.lr=0.0",
      "train.num_steps=1", "train.eval_every=1", "train.ckpt_every=1"]), os.path.join(root, "from_teacher"))
  first_read_loss = {}
  for name, extra in (("teacher_reader", [f"model.init={teacher}"]),
                      ("fresh_heads", [f"unified.init_retriever={os.path.join(root, 'from_teacher', 'best')}"])):
    workdir = os.path.join(root, f"distill_{name}")
    distill_stage.train_and_evaluate(load_config(os.path.join(ROOT, "configs/distill.py:tiny"), common + extra + [
        "pool.train_splits=('toy_train',)", "eval.split=toy_train", "eval.questions=8", "eval.batch_size=8",
        f"distill.teacher={teacher}", "pool.k1=4", "train.num_steps=1", "train.eval_every=1", "train.ckpt_every=1",
        "train.log_every=1"]), workdir)
    first_read_loss[name] = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r][0][
        "read_loss"]
  assert first_read_loss["teacher_reader"] < 1e-4 < 0.1 < first_read_loss["fresh_heads"], first_read_loss
