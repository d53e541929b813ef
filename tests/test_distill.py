"""Distillation pieces: the unified outputs and KD losses (``rnr_jax.distill``), the teacher cache
(``rnr_jax.teacher``), the candidate pool and its batches (``rnr_jax.pool``), the best exports and cached fresh-index
vectors.

The end-to-end distillation run on a toy task is in ``tests/test_finetune.py`` (it feeds finetuning).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import distill as distill_config
from configs import finetune as finetune_config
from rnr_jax import distill, embeddings, exports
from rnr_jax import reader_data as rd
from rnr_jax.data import PreparedData
from rnr_jax.pool import UnifiedBatches, load_pool
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.teacher import TeacherCache
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training import losses
from rnr_jax.training.step import accumulate
from test_reader_train import NUM_TRAIN, build_toy_prepared
from train import distill as distill_stage
from train import finetune as finetune_stage
from unified_fixtures import (ENCODER_INPUTS, TINY_BERT, compiled, kl_numpy, log_softmax_numpy, random_batch,
                              tiny_model, tiny_params)

# ---- losses ---------------------------------------------------------------------------


def test_distill_loss_matches_numpy_kl_with_temperature():
  rng = np.random.default_rng(0)
  num_q, m, length = 3, 4, 10
  start, end, t_start, t_end = (rng.normal(size=(num_q, m, length)) * 3 for _ in range(4))
  rank, t_rank, scores = (rng.normal(size=(num_q, m)) * 3 for _ in range(3))
  valid = np.zeros((num_q, m, length), bool)
  valid[..., 2:8] = True
  valid[0, 1] = False  # a passage without text
  passage_mask = np.ones((num_q, m), bool)
  passage_mask[2, 2:] = False
  temperature = 3.0
  loss, parts = distill.distill_loss(start, end, rank, valid, passage_mask, t_start.reshape(-1, length),
                                     t_end.reshape(-1, length), t_rank, scores, temperature=temperature,
                                     retrieval_loss="kd")
  rows = valid & passage_mask[..., None]
  want = {"start_kl": kl_numpy(t_start, start, temperature, rows), "end_kl": kl_numpy(t_end, end, temperature, rows),
          "rank_kl": kl_numpy(t_rank, rank, temperature, passage_mask),
          "retrieval_loss": kl_numpy(t_rank, scores, temperature, passage_mask)}
  for name, value in want.items():
    assert float(parts[name]) == pytest.approx(value, rel=1e-5), name
  assert float(loss) == pytest.approx(sum(want.values()), rel=1e-5)
  assert float(parts["read_loss"]) == pytest.approx(want["start_kl"] + want["end_kl"] + want["rank_kl"], rel=1e-5)
  assert want["start_kl"] != pytest.approx(kl_numpy(t_start, start, 1.0, rows), rel=1e-2)  # τ matters

  _, parts = distill.distill_loss(start, end, rank, valid, passage_mask, t_start, t_end, t_rank, scores,
                                  temperature=temperature, retrieval_loss="nll")
  lp = np.where(passage_mask, scores, -np.inf)
  nll = -(lp[:, 0] - np.log(np.exp(lp - lp.max(1, keepdims=True)).sum(1)) - lp.max(1))
  assert float(parts["retrieval_loss"]) == pytest.approx(nll.mean(), rel=1e-5)
  with pytest.raises(ValueError, match="retrieval_loss"):
    distill.distill_loss(start, end, rank, valid, passage_mask, t_start, t_end, t_rank, scores, temperature=1.0,
                         retrieval_loss="mse")


def test_kd_losses_zero_for_the_teacher_itself_and_positive_otherwise():
  model, batch = tiny_model(), random_batch()
  params, other = tiny_params(model, batch, 0), tiny_params(model, batch, 1)

  def parts(student, teacher):
    t_start, t_end, t_rank, _ = distill.read_outputs(model, teacher, batch, None)
    start, end, rank, valid = distill.read_outputs(model, student, batch, None)
    scores = distill.retrieval_scores(model, student, batch, None, normalize=False, scale=1.0)
    kd = distill.distill_loss(start, end, rank, valid, batch["passage_mask"], t_start, t_end, t_rank, scores,
                              temperature=3.0, retrieval_loss="kd")[1]
    # L_ret's teacher is the ranker: zero when the retrieval scores are the teacher's ranking.
    ret = distill.distill_loss(start, end, rank, valid, batch["passage_mask"], t_start, t_end, t_rank, t_rank,
                               temperature=3.0, retrieval_loss="kd")[1]["retrieval_loss"]
    return kd, ret

  parts = compiled(parts, params, params)
  same, same_ret = parts(params, params)
  for name in ("start_kl", "end_kl", "rank_kl"):
    assert abs(float(same[name])) < 1e-6, (name, same[name])
  assert abs(float(same_ret)) < 1e-6
  different, _ = parts(other, params)
  for name in ("start_kl", "end_kl", "rank_kl", "retrieval_loss"):
    assert float(different[name]) > 1e-6, (name, different[name])  # random-init heads: small but positive


def test_retrieval_scores_equal_separate_encodings():
  """Questions and passages embedded in one padded call score as when embedded apart (q . p, or scaled cosine)."""
  model, batch = tiny_model(), random_batch(seed=1)
  params = {"params": tiny_params(model, batch)}

  def outputs(params):
    embed = lambda prefix: model.apply(params, {k: batch[prefix + k] for k in ENCODER_INPUTS}, method="embed")
    return (distill.retrieval_scores(model, params["params"], batch, None, normalize=False, scale=1.0),
            distill.retrieval_scores(model, params["params"], batch, None, normalize=True, scale=20.0),
            embed("q_"), embed("p_").reshape(2, 3, -1))

  scores, cosine, q, p = compiled(outputs, params)(params)
  np.testing.assert_allclose(scores, np.einsum("bd,bmd->bm", q, p), rtol=1e-5, atol=1e-5)
  qn, pn = q / np.linalg.norm(q, axis=-1, keepdims=True), p / np.linalg.norm(p, axis=-1, keepdims=True)
  np.testing.assert_allclose(cosine, 20 * np.einsum("bd,bmd->bm", qn, pn), rtol=1e-5, atol=1e-5)


def test_in_batch_retrieval_loss_and_retriever_teacher_kd():
  """In-batch NLL ranks each positive among every real passage of the batch; the teacher-retriever KL (at
  temperature 1) over them is zero when the teacher's scores are the student's and matches a numpy reference
  otherwise, and the loss adds it with its weight."""
  model, batch = tiny_model(), random_batch(seed=2)
  params = tiny_params(model, batch)
  mask = batch["passage_mask"]
  num_q, m = mask.shape

  def outputs(params, batch):
    q, p = distill.retrieval_vectors(model, params, batch, None)
    everything = distill.score(q, p, normalize=True, scale=20.0)
    return (q, p, everything, distill.own_scores(everything, m),
            *losses.in_batch_nll(everything, mask.reshape(1, num_q * m)),
            distill.retrieval_scores(model, params, batch, None, normalize=True, scale=20.0))

  q, p, everything, own, nll, accuracy, scores = compiled(outputs, params, batch)(params, batch)
  q, p, everything, scores = (np.asarray(x) for x in (q, p, everything, scores))
  np.testing.assert_allclose(own, scores, rtol=1e-5, atol=1e-5)  # the diagonal blocks are the own-m scores
  flat = mask.reshape(1, -1)
  log_p = log_softmax_numpy(everything, flat)
  positives = np.arange(num_q) * m
  assert float(nll) == pytest.approx(-log_p[np.arange(num_q), positives].mean(), rel=1e-5)
  want_acc = np.mean(np.argmax(np.where(flat, everything, -np.inf), -1) == positives)
  assert float(accuracy) == pytest.approx(want_acc)

  def parts(params, batch, in_batch, teacher_scale):
    loss_fn = distill.make_distill_loss(model, normalize=True, scale=20.0, temperature=3.0, retrieval_loss="nll",
                                        in_batch=in_batch, retriever_teacher_weight=0.5,
                                        retriever_teacher_scale=teacher_scale)
    return loss_fn(params, batch, jax.random.key(0))

  teacher_out = distill.read_outputs(model, params, batch, None)
  base = {**batch, "t_start": teacher_out[0], "t_end": teacher_out[1], "t_rank": teacher_out[2]}
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  other = np.random.default_rng(0).normal(size=p.shape).astype(np.float32)
  for in_batch in (True, False):
    run = compiled(lambda params, batch: parts(params, batch, in_batch, 20.0), params,
                   {**base, "t_q": unit(q), "t_p": unit(p)})
    # Dropout is off in the tiny model, so the student's vectors equal the ones above.
    loss, aux = run(params, {**base, "t_q": unit(q), "t_p": unit(p)})
    assert abs(float(aux["retriever_kd"])) < 1e-5
    loss_other, aux_other = run(params, {**base, "t_q": unit(q), "t_p": unit(other)})
    teacher = 20.0 * unit(q) @ unit(other).T
    if in_batch:
      want = kl_numpy(teacher, everything, 1.0, np.broadcast_to(flat, teacher.shape))
      at_tau = kl_numpy(teacher, everything, 3.0, np.broadcast_to(flat, teacher.shape))
      assert float(aux["retrieval_loss"]) == pytest.approx(float(nll), rel=1e-5)
      assert "in_batch_acc" in aux
    else:
      blocks = teacher.reshape(num_q, num_q, m)[np.arange(num_q), np.arange(num_q)]
      want = kl_numpy(blocks, scores, 1.0, mask)
      at_tau = kl_numpy(blocks, scores, 3.0, mask)
      assert float(aux["retrieval_loss"]) == pytest.approx(float(distill.retrieval_nll(scores, mask)), rel=1e-5)
    assert float(aux_other["retriever_kd"]) == pytest.approx(want, rel=1e-4)
    assert want != pytest.approx(at_tau, rel=1e-2)  # the distillation τ does not reach this KL
    assert float(loss_other) - float(loss) == pytest.approx(0.5 * want, rel=1e-4, abs=1e-5)
    # The total: L_read (zero: the teacher is the student) + the retrieval loss + weight x the teacher KL.
    assert abs(float(aux_other["read_loss"])) < 1e-5
    assert float(loss_other) == pytest.approx(float(aux_other["read_loss"]) + float(aux_other["retrieval_loss"])
                                              + 0.5 * want, rel=1e-5)

  # retriever_teacher_scale=None: the teacher's scores are the raw inner products t_q . t_p.
  raw = {**base, "t_q": q, "t_p": other}
  _, aux_raw = compiled(lambda params, batch: parts(params, batch, True, None), params, raw)(params, raw)
  want = kl_numpy(q @ other.T, everything, 1.0, np.broadcast_to(flat, everything.shape))
  assert float(aux_raw["retriever_kd"]) == pytest.approx(want, rel=1e-4)


def test_accumulate_gives_the_full_batch_gradients():
  """Two micro-batches of one question each: the mean of their gradients is the full batch's (the losses are means
  over questions), outputs are stacked, and micro-batch i sees extra[i] and fold_in(rng, i)."""
  model, batch = tiny_model(), random_batch(seed=4)
  params = tiny_params(model, batch)
  rng = jax.random.key(3)

  def both(params, batch):
    def fn(micro, r, extra):
      loss, grads = jax.value_and_grad(lambda p: distill.reader_loss(model, p, micro, None)[0])(params)
      return grads, (loss, extra, jax.random.uniform(r), micro["span_starts"])

    full = jax.grad(lambda p: distill.reader_loss(model, p, batch, None)[0])(params)
    return (full, accumulate(fn, params, batch, rng, 1, jnp.array([7.0])),
            accumulate(fn, params, batch, rng, 2, jnp.array([7.0, 8.0])))

  full, (grads_1, out_1), (grads_2, out_2) = compiled(both, params, batch)(params, batch)
  loss_1, extra_1, u_1, _ = out_1
  loss_2, extra_2, u_2, spans_2 = out_2
  assert loss_1.shape == (1,) and loss_2.shape == (2,)
  assert float(loss_2.mean()) == pytest.approx(float(loss_1[0]), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), grads_1, full)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_2, full)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(full)) > 1e-3  # gradients are not trivially zero
  np.testing.assert_array_equal(extra_1, [7.0])
  np.testing.assert_array_equal(extra_2, [7.0, 8.0])
  assert float(u_1[0]) == float(jax.random.uniform(rng))
  np.testing.assert_array_equal(u_2, [float(jax.random.uniform(jax.random.fold_in(rng, i))) for i in range(2)])
  np.testing.assert_array_equal(spans_2[:, 0], batch["span_starts"])  # micro-batch i holds question i


# ---- teacher cache --------------------------------------------------------------------


class CountingTeacher:
  """A fake teacher whose logits are a function of the input ids; counts its calls."""

  def __init__(self, fail_after: int | None = None):
    self.calls = 0
    self._fail_after = fail_after

  def __call__(self, batch):
    if self._fail_after is not None and self.calls >= self._fail_after:
      raise RuntimeError("teacher killed")
    self.calls += 1
    ids = batch["input_ids"].astype(np.float32)
    return ids / 7.0, -ids / 5.0, ids.sum(1) / 100.0


def fake_inputs(lengths):
  """``inputs(examples, pids)``: rows of example-dependent lengths whose ids encode (example, passage id)."""
  def inputs(examples, pids):
    n, m = pids.shape
    length = max(lengths[i] for i in examples)
    ids = np.zeros((n * m, length), np.int32)
    for r, (i, pid) in enumerate(zip(np.repeat(examples, m), pids.reshape(-1))):
      ids[r, : lengths[i]] = 1000 * (i + 1) + pid + np.arange(lengths[i])
    return {"input_ids": ids}
  return inputs


def test_teacher_cache_written_once_reused_and_invalidated(tmp_path):
  samples, num, m, width = 2, 5, 3, 6
  pids = np.arange(samples * num * m, dtype=np.int32).reshape(samples, num, m)
  lengths = [4, 6, 5, 8, 3]  # rows longer than the width (8 > 6) keep their first 6 positions
  inputs = fake_inputs(lengths)
  root = str(tmp_path / "cache")
  key = {"teacher": "abc", "data": "d1"}

  def build(teacher, k=key):
    return TeacherCache.open_or_build(root, k, pids, width, inputs, teacher, questions_per_call=2)

  teacher = CountingTeacher()
  cache = build(teacher)
  assert teacher.calls == 5  # 10 (sample, example) pairs, 2 per call
  assert os.path.exists(os.path.join(cache.directory, "done.json"))
  np.testing.assert_array_equal(cache.pids, pids)
  for s in range(samples):
    examples = np.array([3, 0])
    got = cache.lookup(s, examples, length=7)
    ref = inputs(examples, pids[s, examples])
    want_start, want_end, want_rank = CountingTeacher()(ref)
    want_start = np.pad(want_start[:, :width], ((0, 0), (0, 1)))  # kept width 6, padded to 7
    np.testing.assert_allclose(got["t_start"], want_start.astype(np.float16))
    np.testing.assert_allclose(got["t_end"][:, :width], want_end[:, :width].astype(np.float16))
    np.testing.assert_allclose(got["t_rank"], want_rank.reshape(2, m).astype(np.float16))
    assert got["t_start"].dtype == np.float16 and got["t_start"].shape == (2 * m, 7)
    assert cache.lookup(s, examples, length=4)["t_end"].shape == (2 * m, 4)

  # Reused: the second run does not call the teacher.
  again = CountingTeacher()
  assert build(again).directory == cache.directory and again.calls == 0

  # Another teacher (fingerprint) or other samples: a new cache, the old one deleted once it is complete.
  changed = CountingTeacher()
  other = build(changed, {**key, "teacher": "xyz"})
  assert changed.calls == 5 and other.directory != cache.directory
  assert os.listdir(root) == [os.path.basename(other.directory)]
  resampled = CountingTeacher()
  pids = pids[:, :, ::-1].copy()
  assert build(resampled, {**key, "teacher": "xyz"}).directory != other.directory and resampled.calls == 5

  # An interrupted build continues where it stopped.
  with pytest.raises(RuntimeError, match="killed"):
    build(CountingTeacher(fail_after=2), {**key, "data": "d2"})
  rest = CountingTeacher()
  resumed = build(rest, {**key, "data": "d2"})
  assert rest.calls == 3
  fresh = TeacherCache.open_or_build(str(tmp_path / "fresh"), {**key, "data": "d2"}, pids, width, inputs,
                                             CountingTeacher(), questions_per_call=3)
  for s in range(samples):
    for name in ("t_start", "t_end", "t_rank"):
      np.testing.assert_array_equal(resumed.lookup(s, np.arange(num), 9)[name],
                                    fresh.lookup(s, np.arange(num), 9)[name])


# ---- pool and batches -----------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory):
  return build_toy_prepared(str(tmp_path_factory.mktemp("toy_distill")))


def _system(data) -> SystemSpec:
  spec = ReaderSpec(encoder=dict(TINY_BERT, vocab_size=30522), pooling="cls", retrieval_dim=8,
                    tokenizer_fingerprint=data.manifest["settings"]["tokenizer"], question_len=32, reader_len=96,
                    max_answer_len=10, buckets=(32, 64, 96))
  return SystemSpec.unified_model(spec, passage_len=64, passage_token_type=1)


def _pool_config(candidates: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(train_splits=("toy_train",), max_train_questions=0, candidates=candidates,
                                        retriever="", k1=6, encode_batch_size=8,
                                        positives="gold_article"))


def _examples_of(batch, it, system, tokenizer):
  """The pool example of each question row of a batch, found by its question tokens."""
  r = system.retriever
  encoded = tokenizer.questions(it.questions, r.question_len, r.buckets).as_dict()
  tokens = [tuple(ids[mask > 0].tolist()) for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
  return np.array([tokens.index(tuple(ids[mask > 0].tolist()))
                   for ids, mask in zip(batch["q_input_ids"], batch["q_attention_mask"])])


def test_pool_batches_with_teacher_cache_and_resume(toy_prepared, tmp_path):
  data = PreparedData.load(toy_prepared)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  system = _system(data)
  # J_read from a ranked candidates file: BM25 top 6 (each key's 4 passages, then other keys').
  ranked = str(tmp_path / "ranked.npz")
  rd.save_ranked(ranked, {"toy_train": rd.ranked_pids(data, "toy_train", None)[:, :8]})
  pool_cfg = _pool_config(ranked)
  workdir = str(tmp_path / "run")
  pool = load_pool(pool_cfg, data, tokenizer, workdir, mesh=None)
  assert len(pool) == NUM_TRAIN
  with np.load(os.path.join(workdir, "pool.npz")) as f:
    assert f["toy_train"].shape == (NUM_TRAIN, 6)
  with open(os.path.join(workdir, "pool.json"), encoding="utf-8") as f:
    assert json.load(f)["source"] == "candidates"

  teacher = CountingTeacher()
  caches = []

  def teacher_cache(pids, inputs):
    caches.append(TeacherCache.open_or_build(os.path.join(workdir, "teacher_cache"), {"teacher": "t"}, pids,
                                             system.reader.reader_len, inputs, teacher, 8))
    return caches[-1]

  def batches(pool=pool):
    return UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=4, batch_size=8, seed=3, samples=2,
                          teacher_cache=teacher_cache)

  it = batches()
  first = [next(it) for _ in range(5)]  # 4 batches per epoch: the fifth is epoch 1, sample 1
  assert teacher.calls == 2 * NUM_TRAIN // 8 and len(caches) == 1
  matcher = data.matcher()
  questions = data.questions("toy_train")
  for b in first:
    assert b["input_ids"].shape[0] == 32 and b["p_input_ids"].shape[0] == 32 and b["q_input_ids"].shape[0] == 8
    assert b["t_start"].shape == b["input_ids"].shape and b["t_start"].dtype == np.float16
    assert b["t_rank"].shape == (8, 4) and b["passage_mask"].all()
    assert (b["p_token_type_ids"][b["p_attention_mask"] > 0] == 1).all() and (b["q_token_type_ids"] == 0).all()
    assert "span_starts" not in b  # distillation needs no span targets
    # The rows' teacher logits are the (fake) teacher's on exactly these rows.
    np.testing.assert_allclose(b["t_start"], (b["input_ids"] / 7.0).astype(np.float16))
  # Epoch 0 reads sample 0 of every example, epoch 1 sample 1 (the teacher's rank logits tell them apart).
  cache = caches[0]
  seen = {tuple(r) for b in first[:4] for r in b["t_rank"].tolist()}
  assert seen == {tuple(r) for r in np.asarray(cache.lookup(0, np.arange(len(pool)), 8)["t_rank"]).tolist()}
  later = {tuple(r) for r in first[4]["t_rank"].tolist()}
  assert later <= {tuple(r) for r in np.asarray(cache.lookup(1, np.arange(len(pool)), 8)["t_rank"]).tolist()}
  pids0 = np.asarray(cache.pids)
  assert not np.array_equal(pids0[0], pids0[1])  # two samples differ
  for s in range(2):
    for i in range(len(pool)):
      _, q = pool.examples[i]
      hits = matcher.flags(questions[q].answers, pids0[s, i])
      assert hits.tolist() == [True, False, False, False], (s, i)
      assert set(pids0[s, i].tolist()) <= set(rd.ranked_pids(data, "toy_train", ranked)[q, :6].tolist())

  # Resuming from the state after batch 2 replays batches 3-5; the cache is reused.
  it = batches()
  for _ in range(2):
    next(it)
  state = it.state()
  assert state == {"seed": 3, "epoch": 0, "index": 2}
  resumed = batches()
  resumed.restore(state)
  for want in first[2:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert teacher.calls == 2 * NUM_TRAIN // 8 and len(caches) == 3

  # A restarted run finds the saved pool (same key): not rewritten, the same negatives.
  written = os.stat(os.path.join(workdir, "pool.npz")).st_mtime_ns
  restarted = load_pool(pool_cfg, data, tokenizer, workdir, mesh=None)
  assert os.stat(os.path.join(workdir, "pool.npz")).st_mtime_ns == written
  np.testing.assert_array_equal(restarted.examples, pool.examples)
  for q in range(NUM_TRAIN):
    np.testing.assert_array_equal(restarted.splits[0].negatives[q], pool.splits[0].negatives[q])


def test_batches_without_a_teacher_draw_each_epoch_afresh_with_span_targets_and_resume(toy_prepared, tmp_path):
  """Finetuning's batches: example i in epoch e reads the pool's sample e, with the answer spans of its positive."""
  data = PreparedData.load(toy_prepared)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  system = _system(data)
  pool = load_pool(_pool_config(), data, tokenizer, str(tmp_path / "run"), mesh=None)  # BM25 candidates

  def batches():
    return UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=4, batch_size=8, seed=3, max_spans=3)

  it = batches()
  first = [next(it) for _ in range(5)]  # 4 batches per epoch: the fifth is epoch 1
  questions = data.questions("toy_train")
  matcher = data.matcher()
  drawn = {}
  for b, batch in enumerate(first):
    epoch = b // 4
    examples = _examples_of(batch, it, system, tokenizer)
    pids = np.stack([pool.sample(int(i), epoch, 4, 3) for i in examples])
    drawn.update({(epoch, int(i)): tuple(row) for i, row in zip(examples, pids.tolist())})
    want = it.reader_inputs(examples, pids, spans=True)
    for k in want:
      np.testing.assert_array_equal(batch[k], want[k], err_msg=k)
    assert not any(k.startswith("t_") for k in batch)
    assert batch["span_starts"].shape == (8, 3) and batch["span_mask"][:, 0].all()  # every positive holds its answer
    for row, i in enumerate(examples):
      _, q = pool.examples[i]
      assert matcher.flags(questions[q].answers, pids[row]).tolist() == [True, False, False, False]
      answers = {tuple(a.tolist()) for a in pool.question(int(i))[2]}
      for s, e, keep in zip(batch["span_starts"][row], batch["span_ends"][row], batch["span_mask"][row]):
        if keep:
          assert tuple(batch["input_ids"][row * 4, s : e + 1].tolist()) in answers
  assert len({k[1] for k in drawn}) == NUM_TRAIN  # epoch 0 visits every example once
  assert any(drawn[1, i] != drawn[0, i] for (e, i) in drawn if e == 1)  # epoch 1 draws a new sample

  # Resuming from the state after batch 2 replays batches 3-5.
  it = batches()
  for _ in range(2):
    next(it)
  resumed = batches()
  resumed.restore(it.state())
  for want in first[2:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_batches_carry_the_retriever_teachers_vectors(toy_prepared, tmp_path):
  data = PreparedData.load(toy_prepared)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  system = _system(data)
  pool = load_pool(_pool_config(), data, tokenizer, str(tmp_path / "run"), mesh=None)
  it = UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=4, batch_size=8, seed=3)
  assert len(it.questions) == len(pool) and it.questions[1] == pool.question(1)[0]
  rng = np.random.default_rng(0)
  q_vectors = rng.normal(size=(len(pool), 5)).astype(np.float32)
  p_vectors = rng.normal(size=(data.num_passages, 5)).astype(np.float32)
  with pytest.raises(ValueError, match="teacher question vectors"):
    it.set_retriever_teacher(q_vectors[:-1], p_vectors)
  with pytest.raises(ValueError, match="width"):
    it.set_retriever_teacher(q_vectors, p_vectors[:, :4])
  it.set_retriever_teacher(q_vectors, p_vectors)
  batch = next(it)
  assert batch["t_q"].shape == (8, 5) and batch["t_p"].shape == (32, 5)
  # t_q row r is the vector of the pool question whose tokens are in q_input_ids row r.
  np.testing.assert_array_equal(batch["t_q"], q_vectors[_examples_of(batch, it, system, tokenizer)])
  # t_p row j is the vector of the passage in p_input_ids row j (its token record is in that row).
  corpus = data.token_corpus()
  for row in range(32):
    pid = int(np.flatnonzero((p_vectors == batch["t_p"][row]).all(1))[0])
    ids = batch["p_input_ids"][row][batch["p_attention_mask"][row] > 0]
    assert set(np.asarray(corpus[pid]).tolist()) <= set(ids.tolist())


# ---- exports and cached vectors -------------------------------------------------------


def test_best_export_keeps_the_best_evaluation(tmp_path):
  best = exports.BestExport(str(tmp_path), {"note": "x"}, "em")
  params = {"w": np.zeros(3, np.float32)}

  def offer(step, em):
    return best.offer(step, {"w": params["w"] + step}, {"em": em})

  def restored():
    export = exports.Export(str(tmp_path / "best"))
    try:
      return export.restore({"w": jax.ShapeDtypeStruct((3,), np.float32)})["w"], export.latest_info()
    finally:
      export.close()

  assert offer(10, 0.2) and offer(20, 0.5)
  assert not offer(30, 0.1) and not offer(40, 0.5)  # worse, and a tie: the earlier step stays
  w, info = restored()
  np.testing.assert_array_equal(w, [20] * 3)
  assert info["note"] == "x" and info["select_metric"] == "em"
  assert info["step"] == 20 and info["metrics"] == {"em": 0.5}
  with pytest.raises(KeyError, match="no metric 'em'"):
    best.offer(50, params, {"f1": 1.0})
  best.close()


def test_cached_fresh_index_vectors_are_reused_only_for_the_same_params_and_passages(tmp_path):
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  vectors = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
  pids = np.array([3, 5, 8, 9])
  cache = str(tmp_path / "index")
  assert embeddings.load_fresh(cache, params, pids) is None  # nothing kept yet
  embeddings.save(cache, vectors, embeddings.fresh_key(params, pids))
  np.testing.assert_array_equal(embeddings.load_fresh(cache, params, pids), vectors)
  assert embeddings.load_fresh(cache, {"w": params["w"] + 1e-3}, pids) is None  # other parameters
  assert embeddings.load_fresh(cache, params, pids[:-1]) is None  # other passages
  os.remove(os.path.join(cache, embeddings.META_FILE))  # an interrupted save: vectors without their meta
  assert embeddings.load_fresh(cache, params, pids) is None


def test_unified_stages_refuse_a_missing_model_before_writing(tmp_path):
  for stage, config, match in ((distill_stage, distill_config.get_config("tiny"), "distill.teacher"),
                               (finetune_stage, finetune_config.get_config("tiny"), "finetune.init")):
    workdir = tmp_path / match
    with pytest.raises(ValueError, match=match):
      stage.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
