"""Iterative finetuning (paper Algorithm 1) against a hand-written reference, and distillation + finetuning end to end.

The end-to-end test runs the real entry points on the toy task of ``tests/test_reader_train.py`` (a marker word
followed by the answer in one passage per key, distractors sharing the key) with one-layer tiny models: a reader
teacher (``train.reader``) and a shared-encoder retriever (``train.retriever``) are trained first, then
``train.distill`` and ``train.finetune``.
Their end-to-end accuracy uses a fresh index of all 160 passages and is measured on the training questions: a tiny
retriever trained for a unit test's budget does not reliably generalise its key matching to the 8 unseen dev keys,
and 8 questions are too coarse a measure.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rnr_jax import distill, qa_model, reader
from rnr_jax import reader_data as rd
from rnr_jax.config import load_config
from rnr_jax.training.optim import make_optimizer
from rnr_jax.training.step import TrainState
from test_distill import compiled, random_batch, tiny_model
from test_reader_train import build_toy_prepared
from train import distill as distill_stage
from train import finetune as finetune_stage
from train import reader as reader_stage
from train import retriever as retriever_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ---- Algorithm 1 ----------------------------------------------------------------------


def reference_step(model, params, opt_state, batch, tx, temperature):
  """Algorithm 1 written out: two sequential updates with jax.grad and optax (no dropout).

  Returns the parameters and optimiser states after the step, with one AdamW state used by both updates
  (``"shared"``: its state after both) and with one state per update (``"separate"``: both states), and the loss
  of joint finetuning at ``params`` (``"joint"``: reader loss + retrieval NLL).
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
    return reader.reader_loss(start.reshape(num_q, m, length), end.reshape(num_q, m, length), rank.reshape(num_q, m),
                              valid, batch["span_starts"], batch["span_ends"], batch["span_mask"],
                              batch["passage_mask"])[0]

  mask = batch["passage_mask"]

  def log_softmax(x):
    return jax.nn.log_softmax(jnp.where(mask, x, -1e9), axis=-1)

  def retrieval_loss(p, target):
    l_hat = scores(p)
    log_pt, log_ps = log_softmax(target / temperature), log_softmax(l_hat / temperature)
    recon = jnp.sum(jnp.where(mask, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), -1).mean()
    nll = -log_softmax(l_hat)[:, 0].mean()
    return recon + nll

  target = scores(params)  # (1)
  updates, after_read = tx.update(jax.grad(read_loss)(params), opt_state, params)  # (2)
  theta_hat = optax.apply_updates(params, updates)
  grads = jax.grad(retrieval_loss)(theta_hat, target)  # (3)-(5)
  shared_updates, shared = tx.update(grads, after_read, theta_hat)  # (6), the state of update (2) advancing
  separate_updates, separate = tx.update(grads, opt_state, theta_hat)  # (6), a state of its own
  return {"shared": (optax.apply_updates(theta_hat, shared_updates), shared),
          "separate": (optax.apply_updates(theta_hat, separate_updates), {"read": after_read, "retrieval": separate}),
          "joint": read_loss(params) - log_softmax(target)[:, 0].mean()}


def test_iterative_step_equals_reference_algorithm_1_and_joint_loss():
  model, batch = tiny_model(), random_batch(seed=2)
  params = model.init(jax.random.key(0), {k: batch[k] for k in ENCODER_INPUTS})["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=0.01))
  temperature = 3.0
  reference = compiled(lambda p: reference_step(model, p, tx.init(p), batch, tx, temperature), params)(params)
  for optimizer_states, grad_accum in (("shared", 1), ("separate", 2)):
    # grad_accum=2: two micro-batches of one question each, the mean of their gradients is the full batch's.
    step = distill.make_iterative_step(model, tx, normalize=False, scale=1.0, temperature=temperature,
                                       optimizer_states=optimizer_states, grad_accum=grad_accum)
    args = (distill.init_iterative_state(params, tx, optimizer_states), batch, jax.random.key(5))
    state, metrics = compiled(step, *args)(*args)
    want_params, want_opt = reference[optimizer_states]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), state.params, want_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), state.opt_state, want_opt)
    assert int(state.step) == 1 and float(metrics["recon_loss"]) >= 0
    assert float(metrics["loss"]) > float(metrics["read_loss"]) > 0
  joint = distill.make_joint_loss(model, normalize=False, scale=1.0)
  args = (params, batch, jax.random.key(5))
  assert float(compiled(joint, *args)(*args)[0]) == pytest.approx(float(reference["joint"]), rel=1e-5)
  # The two readings differ: a shared AdamW state has advanced twice when the second update is made.
  assert int(optax.tree_utils.tree_get(reference["shared"][1], "count")) == 2
  shared, separate = reference["shared"][0]["qa_outputs"], reference["separate"][0]["qa_outputs"]
  assert not np.allclose(shared["kernel"], separate["kernel"])


# ---- end to end -----------------------------------------------------------------------


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


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


def test_distill_then_finetune_learn_toy_task(toy_run):
  root, prepared = toy_run
  # One input length for questions and passages: their embeddings share one compiled function.
  common = [f"prepared_dir={prepared}", "tokens.buckets=(64,)", "tokens.question_len=64",
            "pool.train_splits=('toy_train',)", "eval.split=toy_train", "eval.questions=32", "eval.batch_size=8",
            "train.log_every=5"]

  # Distillation: J_read = BM25 top 4 (each key's passages, the teacher's training distribution).
  teacher, retriever = os.path.join(root, "teacher", "best"), os.path.join(root, "retriever", "best")
  workdir = os.path.join(root, "distill")
  config = load_config(os.path.join(ROOT, "configs/distill.py:tiny"), common + [
      f"distill.teacher={teacher}", f"unified.init_retriever={retriever}", "pool.k1=4", "optim.lr=3e-3",
      "train.num_steps=40", "train.eval_every=20", "train.ckpt_every=40"])
  distill_stage.train_and_evaluate(config, workdir)
  logs = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert logs[-1]["read_loss"] < 0.4 * logs[0]["read_loss"] and logs[-1]["rank_acc"] == 1.0, logs
  evals = _read_jsonl(os.path.join(workdir, "eval.jsonl"))
  assert [e["step"] for e in evals] == [20, 40]
  best = max(evals, key=lambda e: e["em_open_mean"])
  # Chance: a random passage holds the answer 5/160 of the time; a random-init reader's EM is ~0.
  assert best["em_open"] >= 0.25 and best["top4"] >= 0.5, evals
  system, scale, _, info = distill.load_unified(os.path.join(workdir, "best"))
  assert info["metrics"]["em_open_mean"] == best["em_open_mean"] and info["step"] == best["step"]
  assert system.unified and system.retriever.pooling == "mean" and scale == config.unified.scale
  assert sorted(os.listdir(os.path.join(workdir, "top"))) == ["step_20", "step_40"]  # eval.keep_best = 2
  caches = os.listdir(os.path.join(workdir, "teacher_cache"))
  assert len(caches) == 1 and os.path.exists(os.path.join(workdir, "teacher_cache", caches[0], "done.json"))

  # The teacher is in no checkpoint: the saved state is the student's TrainState, leaf for leaf.
  model = system.reader.build()
  student = jax.eval_shape(lambda: TrainState.create(
      model.init(jax.random.key(0), {k: np.ones((1, 4), np.int32) for k in ENCODER_INPUTS})["params"],
      make_optimizer(config.optim, config.train.num_steps)[0]))
  saved = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", "40", "state")).item_metadata.tree
  assert len(jax.tree.leaves(saved)) == len(jax.tree.leaves(student))
  assert set(saved) == {"step", "params", "opt_state"} and set(saved["params"]) == set(student.params)

  # Finetuning (Algorithm 1) from the distilled student, J_read = the retriever's top 8 (other keys' marker
  # passages among the negatives): the retrieval update must learn to match the key. At step 15 J_read is
  # rebuilt from the student's own top 8 (index refresh).
  workdir = os.path.join(root, "finetune")
  config = load_config(os.path.join(ROOT, "configs/finetune.py:tiny"), common + [
      f"finetune.init={os.path.join(root, 'distill', 'best')}", f"pool.retriever={retriever}", "pool.k1=8",
      "pool.refresh_every=15", "optim.lr=1e-3", "train.num_steps=30", "train.eval_every=30", "train.ckpt_every=30"])
  finetune_stage.train_and_evaluate(config, workdir)
  logs = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  first, last = logs[0], logs[-1]
  assert last["step"] == 30 and last["loss"] < 0.8 * first["loss"] and last["read_loss"] < 0.75 * first["read_loss"]
  assert first["lr"] == 0 and {"recon_loss", "retrieval_nll", "read_grad_norm", "retrieval_grad_norm"} <= set(last)
  final = _read_jsonl(os.path.join(workdir, "eval.jsonl"))[-1]
  assert final["em_open"] >= 0.45 and final["top1"] >= 0.45 and final["top4"] >= 0.75, final
  assert final["top1"] > best["top1"]  # the retrieval update learnt to tell the keys apart
  with np.load(os.path.join(workdir, "pool", "0.npz")) as f:
    assert f["toy_train"].shape == (32, 8)
  with open(os.path.join(workdir, "pool", "0.json"), encoding="utf-8") as f:
    assert json.load(f)["source"] == "retriever"
  with open(os.path.join(workdir, "pool", "15.json"), encoding="utf-8") as f:
    assert json.load(f) == {"source": "refresh", "step": 15, "k1": 8}
  assert sorted(os.listdir(os.path.join(workdir, "pool"))) == ["0.json", "0.npz", "15.json", "15.npz"]
  _, _, params, info = distill.load_unified(os.path.join(workdir, "best"))
  assert info["step"] == 30 and set(params) == {"encoder", "qa_outputs", "qa_classifier"}
  assert rd.load_reader(os.path.join(workdir, "best"))[0] == system.reader  # served like any exported reader


def test_student_from_the_teacher_reader_starts_where_the_teacher_is(toy_run):
  """``model.init=<reader export>`` (student retriever) + ``unified.init_heads`` (distillation): the student's
  encoder and heads are the teacher's, so the KD reading loss starts at zero (it does not with fresh heads)."""
  root, prepared = toy_run
  teacher = os.path.join(root, "teacher", "best")
  encoder_config, encoder, heads = rd.load_reader_encoder(teacher)
  _, _, teacher_params, _ = rd.load_reader(teacher)
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
  for name, extra in (("teacher_heads", [f"unified.init_heads={teacher}"]), ("fresh_heads", [])):
    workdir = os.path.join(root, f"distill_{name}")
    distill_stage.train_and_evaluate(load_config(os.path.join(ROOT, "configs/distill.py:tiny"), common + extra + [
        "pool.train_splits=('toy_train',)", "eval.split=toy_train", "eval.questions=8", "eval.batch_size=8",
        f"distill.teacher={teacher}", f"unified.init_retriever={os.path.join(root, 'from_teacher', 'best')}",
        "pool.k1=4", "train.num_steps=1", "train.eval_every=1", "train.ckpt_every=1", "train.log_every=1"]),
        workdir)
    first_read_loss[name] = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r][0][
        "read_loss"]
  assert first_read_loss["teacher_heads"] < 1e-4 < 0.1 < first_read_loss["fresh_heads"], first_read_loss
