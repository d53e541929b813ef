"""Distillation pieces (``rnr_jax.distill``): KD losses, the teacher cache, the candidate pool and batches.

The end-to-end distillation run on a toy task is in ``tests/test_finetune.py`` (it feeds finetuning).
"""

import json
import os
import types

import jax
import ml_collections
import numpy as np
import pytest

from configs import distill as distill_config
from rnr_jax import distill, qa_model, reader
from rnr_jax import reader_data as rd
from rnr_jax.data import PreparedData
from rnr_jax.models import config_from_hf_dict
from rnr_jax.qa_system import SystemSpec
from rnr_jax.tokenization import Tokenizer
from test_reader_train import NUM_TRAIN, build_toy_prepared
from train import distill as distill_train

TINY_BERT = dict(model_type="bert", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                 layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)


def tiny_model() -> qa_model.RetrieverReader:
  """A one-layer random-init retriever-reader (milliseconds per step)."""
  return qa_model.RetrieverReader(config_from_hf_dict(TINY_BERT), retrieval_dim=8)


def compiled(fn, *args):
  """``jax.jit(fn)`` compiled for ``args`` without XLA's backend optimisations (half the compile time)."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def random_batch(seed: int = 0, num_q: int = 2, m: int = 3, length: int = 12, q_len: int = 6, p_len: int = 8
                 ) -> dict[str, np.ndarray]:
  """A unified batch (rnr_jax.distill's module docstring) of random tokens; question 1's last passage is padding."""
  rng = np.random.default_rng(seed)
  rows = num_q * m

  def inputs(n, length, real):
    ids = rng.integers(1, TINY_BERT["vocab_size"], (n, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.asarray(real)[:, None]).astype(np.int32)
    types = np.ones_like(ids) * (np.arange(length)[None, :] >= 4) * mask
    return ids * mask, mask, types.astype(np.int32)

  lengths = rng.integers(8, length + 1, rows)
  batch = dict(zip(("input_ids", "attention_mask", "token_type_ids"), inputs(rows, length, lengths)))
  batch["text_start"] = np.full(rows, 4, np.int32)
  batch["text_end"] = (lengths - 1).astype(np.int32)
  batch["passage_mask"] = np.ones((num_q, m), bool)
  batch["passage_mask"][1, -1] = False
  batch["text_end"][m * 2 - 1] = 4  # the padding passage has no text
  batch.update({f"q_{k}": v for k, v in zip(("input_ids", "attention_mask", "token_type_ids"),
                                            inputs(num_q, q_len, rng.integers(3, q_len + 1, num_q)))})
  batch["q_token_type_ids"] = np.zeros_like(batch["q_token_type_ids"])
  batch.update({f"p_{k}": v for k, v in zip(("input_ids", "attention_mask", "token_type_ids"),
                                            inputs(rows, p_len, rng.integers(3, p_len + 1, rows)))})
  batch["span_starts"] = np.array([[5, 6], [4, 4]], np.int32)
  batch["span_ends"] = np.array([[5, 7], [6, 4]], np.int32)
  batch["span_mask"] = np.array([[True, True], [True, False]])
  return batch


# ---- losses ---------------------------------------------------------------------------


def _kl_numpy(teacher, student, temperature, mask):
  """Mean over rows with a True entry of KL(softmax(t/T) || softmax(s/T)) over the masked entries."""
  width = teacher.shape[-1]
  values = []
  for t, s, k in zip(teacher.reshape(-1, width), student.reshape(-1, width), mask.reshape(-1, width)):
    if not k.any():
      continue
    t, s = t[k].astype(np.float64) / temperature, s[k].astype(np.float64) / temperature
    log_pt = t - t.max() - np.log(np.exp(t - t.max()).sum())
    log_ps = s - s.max() - np.log(np.exp(s - s.max()).sum())
    values.append(float((np.exp(log_pt) * (log_pt - log_ps)).sum()))
  return float(np.mean(values))


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
  want = {"start_kl": _kl_numpy(t_start, start, temperature, rows), "end_kl": _kl_numpy(t_end, end, temperature, rows),
          "rank_kl": _kl_numpy(t_rank, rank, temperature, passage_mask),
          "retrieval_loss": _kl_numpy(t_rank, scores, temperature, passage_mask)}
  for name, value in want.items():
    assert float(parts[name]) == pytest.approx(value, rel=1e-5), name
  assert float(loss) == pytest.approx(sum(want.values()), rel=1e-5)
  assert want["start_kl"] != pytest.approx(_kl_numpy(t_start, start, 1.0, rows), rel=1e-2)  # τ matters
  # read_weight scales L_read only; the reported parts stay unweighted.
  weighted, weighted_parts = distill.distill_loss(start, end, rank, valid, passage_mask, t_start, t_end, t_rank,
                                                  scores, temperature=temperature, retrieval_loss="kd",
                                                  read_weight=temperature ** 2)
  read = want["start_kl"] + want["end_kl"] + want["rank_kl"]
  assert float(weighted) == pytest.approx(temperature ** 2 * read + want["retrieval_loss"], rel=1e-5)
  assert float(weighted_parts["read_loss"]) == pytest.approx(read, rel=1e-5)

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
  params = model.init(jax.random.key(0), {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
  params = params["params"]
  other = model.init(jax.random.key(1), {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
  other = other["params"]

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
  params = model.init(jax.random.key(0), {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})

  def outputs(params):
    embed = lambda prefix: model.apply(params, {k: batch[prefix + k] for k in ("input_ids", "attention_mask",
                                                                            "token_type_ids")}, method="embed")
    return (distill.retrieval_scores(model, params["params"], batch, None, normalize=False, scale=1.0),
            distill.retrieval_scores(model, params["params"], batch, None, normalize=True, scale=20.0),
            embed("q_"), embed("p_").reshape(2, 3, -1))

  scores, cosine, q, p = compiled(outputs, params)(params)
  np.testing.assert_allclose(scores, np.einsum("bd,bmd->bm", q, p), rtol=1e-5, atol=1e-5)
  qn, pn = q / np.linalg.norm(q, axis=-1, keepdims=True), p / np.linalg.norm(p, axis=-1, keepdims=True)
  np.testing.assert_allclose(cosine, 20 * np.einsum("bd,bmd->bm", qn, pn), rtol=1e-5, atol=1e-5)


def _log_softmax(x, mask):
  x = np.where(mask, x.astype(np.float64), -np.inf)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_in_batch_retrieval_loss_and_retriever_teacher_kd():
  """In-batch NLL ranks each positive among every real passage of the batch; the teacher-retriever KL over them is
  zero when the teacher's scores are the student's and matches a numpy reference otherwise."""
  model, batch = tiny_model(), random_batch(seed=2)
  params = model.init(jax.random.key(0), {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
  params = params["params"]
  mask = batch["passage_mask"]
  num_q, m = mask.shape

  def outputs(params, batch):
    q, p = distill.retrieval_vectors(model, params, batch, None)
    everything = distill.score_in_batch(q, p, normalize=True, scale=20.0)
    return (q, p, everything, distill.own_scores(everything, m), *distill.in_batch_nll(everything, mask),
            distill.retrieval_scores(model, params, batch, None, normalize=True, scale=20.0))

  q, p, everything, own, nll, accuracy, scores = compiled(outputs, params, batch)(params, batch)
  np.testing.assert_allclose(own, scores, rtol=1e-5, atol=1e-5)  # the diagonal blocks are the own-m scores
  flat = mask.reshape(1, -1)
  log_p = _log_softmax(np.asarray(everything), flat)
  positives = np.arange(num_q) * m
  assert float(nll) == pytest.approx(-log_p[np.arange(num_q), positives].mean(), rel=1e-5)
  want_acc = np.mean(np.argmax(np.where(flat, everything, -np.inf), -1) == positives)
  assert float(accuracy) == pytest.approx(want_acc)

  def parts(params, batch, in_batch, read_weight=1.0):
    loss_fn = distill.make_distill_loss(model, normalize=True, scale=20.0, temperature=3.0, retrieval_loss="nll",
                                        in_batch=in_batch, retriever_teacher_weight=0.5,
                                        retriever_teacher_temperature=2.0, retriever_teacher_scale=20.0,
                                        read_weight=read_weight)
    return loss_fn(params, batch, jax.random.key(0))

  teacher_out = distill.read_outputs(model, params, batch, None)
  base = {**batch, "t_start": teacher_out[0], "t_end": teacher_out[1], "t_rank": teacher_out[2]}
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  other = np.random.default_rng(0).normal(size=p.shape).astype(np.float32)
  for in_batch in (True, False):
    run = compiled(lambda params, batch: parts(params, batch, in_batch), params,
                   {**base, "t_q": unit(q), "t_p": unit(p)})
    # Dropout is off in the tiny model, so the student's vectors equal the ones above.
    loss, aux = run(params, {**base, "t_q": unit(q), "t_p": unit(p)})
    assert abs(float(aux["retriever_kd"])) < 1e-5
    loss_other, aux_other = run(params, {**base, "t_q": unit(q), "t_p": unit(other)})
    teacher = 20.0 * unit(q) @ unit(other).T
    if in_batch:
      want = _kl_numpy(teacher, np.asarray(everything), 2.0, np.broadcast_to(flat, teacher.shape)) * 4.0
      assert float(aux["retrieval_loss"]) == pytest.approx(float(nll), rel=1e-5)
      assert "in_batch_acc" in aux
    else:
      blocks = teacher.reshape(num_q, num_q, m)[np.arange(num_q), np.arange(num_q)]
      want = _kl_numpy(blocks, np.asarray(scores), 2.0, mask) * 4.0
    assert float(aux_other["retriever_kd"]) == pytest.approx(want, rel=1e-4)
    assert float(loss_other) - float(loss) == pytest.approx(0.5 * want, rel=1e-4, abs=1e-5)

  # read_weight reaches L_read through make_distill_loss: a teacher other than the student makes it non-zero.
  shifted = {**base, "t_q": unit(q), "t_p": unit(p), "t_start": base["t_start"][..., ::-1],
             "t_end": base["t_end"][..., ::-1], "t_rank": base["t_rank"][..., ::-1]}
  (loss_1, aux_1), (loss_3, _) = (compiled(lambda params, batch: parts(params, batch, True, w), params, shifted)(
      params, shifted) for w in (1.0, 3.0))
  assert float(aux_1["read_loss"]) > 1e-3
  assert float(loss_3) - float(loss_1) == pytest.approx(2.0 * float(aux_1["read_loss"]), rel=1e-4)

  # embed_weight adds that weight x the mean 1 - cos to the teacher retriever's vectors over the questions and the
  # real passages: zero for the student's own vectors (padding rows' zero teacher vectors do not count).
  def embedded(params, batch):
    return distill.make_distill_loss(model, normalize=True, scale=20.0, temperature=3.0, retrieval_loss="nll",
                                     in_batch=True, embed_weight=0.75)(params, batch, jax.random.key(0))

  flat_mask = mask.reshape(-1)
  assert not flat_mask.all()  # the batch has padding passages
  own_p = np.where(flat_mask[:, None], unit(p), 0.0)
  run = compiled(embedded, params, {**base, "t_q": unit(q), "t_p": own_p})
  (loss_own, aux_own), (loss_other, aux_other) = (run(params, {**base, "t_q": unit(q), "t_p": t_p})
                                                  for t_p in (own_p, other * flat_mask[:, None]))
  assert abs(float(aux_own["embed_loss"])) < 1e-5
  cos_other = np.sum(unit(p) * unit(other), -1)
  want = np.concatenate([np.zeros(num_q), (1.0 - cos_other)[flat_mask]]).sum() / (num_q + flat_mask.sum())
  assert float(aux_other["embed_loss"]) == pytest.approx(want, rel=1e-4)
  assert float(loss_other) - float(loss_own) == pytest.approx(0.75 * want, rel=1e-4)
  narrow = {**base, "t_q": unit(q)[:, :-1], "t_p": own_p[:, :-1]}
  with pytest.raises(ValueError, match="embed_weight.*retrieval_dim"):
    jax.eval_shape(embedded, params, narrow)

  # label_weight adds that weight x train.reader's hard-label loss on the batch's span targets.
  def labelled(params, batch):
    loss_fn = distill.make_distill_loss(model, normalize=True, scale=20.0, temperature=3.0, retrieval_loss="nll",
                                        in_batch=True, label_weight=0.25)
    return loss_fn(params, batch, jax.random.key(0)), reader.reader_loss(
        *distill.read_outputs(model, params, batch, None), batch["span_starts"], batch["span_ends"],
        batch["span_mask"], batch["passage_mask"])[0]
  (loss_l, aux_l), want_label = compiled(labelled, params, shifted)(params, shifted)
  plain, _ = compiled(lambda params, batch: distill.make_distill_loss(
      model, normalize=True, scale=20.0, temperature=3.0, retrieval_loss="nll", in_batch=True)(
          params, batch, jax.random.key(0)), params, shifted)(params, shifted)
  assert float(want_label) > 0.1  # random heads: far from the targets
  assert float(aux_l["label_loss"]) == pytest.approx(float(want_label), rel=1e-5)
  assert float(loss_l) - float(plain) == pytest.approx(0.25 * float(want_label), rel=1e-4)


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
    return distill.TeacherCache.open_or_build(root, k, pids, width, inputs, teacher, questions_per_call=2)

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
  fresh = distill.TeacherCache.open_or_build(str(tmp_path / "fresh"), {**key, "data": "d2"}, pids, width, inputs,
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
  spec = rd.ReaderSpec(encoder=dict(TINY_BERT, vocab_size=30522), pooling="cls", retrieval_dim=8,
                       tokenizer_fingerprint=data.manifest["settings"]["tokenizer"], question_len=32, reader_len=96,
                       max_answer_len=10, buckets=(32, 64, 96))
  return SystemSpec.unified_model(spec, passage_len=64, passage_token_type=1)


def test_pool_batches_with_teacher_cache_and_resume(toy_prepared, tmp_path):
  data = PreparedData.load(toy_prepared)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  system = _system(data)
  # J_read from a ranked candidates file: BM25 top 6 (each key's 4 passages, then other keys').
  ranked = str(tmp_path / "ranked.npz")
  rd.save_ranked(ranked, {"toy_train": rd.ranked_pids(data, "toy_train", None)[:, :8]})
  pool_cfg = ml_collections.ConfigDict(dict(train_splits=("toy_train",), max_train_questions=0, candidates=ranked,
                                            retriever="", k1=6, encode_batch_size=8))
  workdir = str(tmp_path / "run")
  pool = distill.load_pool(pool_cfg, data, tokenizer, workdir, mesh=None)
  assert len(pool) == NUM_TRAIN and pool.step == 0
  with np.load(os.path.join(workdir, "pool", "0.npz")) as f:
    assert f["toy_train"].shape == (NUM_TRAIN, 6)
  with open(os.path.join(workdir, "pool", "0.json"), encoding="utf-8") as f:
    assert json.load(f)["source"] == "candidates"

  teacher = CountingTeacher()
  caches = []

  def teacher_cache(pids, inputs):
    caches.append(distill.TeacherCache.open_or_build(os.path.join(workdir, "teacher_cache"), {"teacher": "t"}, pids,
                                                     system.reader.reader_len, inputs, teacher, 8))
    return caches[-1]

  def batches(pool=pool):
    return distill.UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=4, batch_size=8, seed=3, samples=2,
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
  assert state["pool_step"] == 0
  resumed = batches()
  resumed.restore(state)
  for want in first[2:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert teacher.calls == 2 * NUM_TRAIN // 8

  # With span targets (distill.label_weight): the same rows and teacher logits, plus each positive's answer spans.
  spanned = distill.UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=4, batch_size=8, seed=3,
                                   samples=2, teacher_cache=teacher_cache, max_spans=3)
  for want in first[:2]:
    got = next(spanned)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
    assert got["span_starts"].shape == (8, 3) and got["span_mask"][:, 0].all()  # every positive holds its answer
    assert (got["span_starts"] <= got["span_ends"]).all()
  assert teacher.calls == 2 * NUM_TRAIN // 8  # they reopened the same cache
  caches.pop()

  # A refresh (here with a fake index ranking every key's distractors first) saves pool <step>, names it in the
  # data position and makes the teacher read the new samples.
  class ReversedIndex:
    def search(self, params, step, questions, k):
      assert params == "params" and step == 7 and len(questions) == NUM_TRAIN
      return rd.ranked_pids(data, "toy_train", ranked)[:, :k][:, ::-1].copy()

  distill.PoolRefresher(pool, it, ReversedIndex())(types.SimpleNamespace(params="params"), 7)
  assert it.state()["pool_step"] == 7 and pool.step == 7 and pool.has(7, {"source": "refresh", "step": 7, "k1": 6})
  batch = next(it)
  assert teacher.calls == 4 * NUM_TRAIN // 8 and len(caches) == 4  # opened by three iterators, then rebuilt
  assert len(os.listdir(os.path.join(workdir, "teacher_cache"))) == 1  # the stale cache is gone
  assert batch["t_rank"].shape == (8, 4)
  # A restarted run's pool (step 0) becomes pool 7 again when the data position is restored.
  restarted = distill.load_pool(pool_cfg, data, tokenizer, workdir, mesh=None)
  resumed = batches(restarted)
  resumed.restore(it.state())
  assert restarted.step == 7
  for q in range(NUM_TRAIN):
    np.testing.assert_array_equal(restarted.splits[0].negatives[q], pool.splits[0].negatives[q])


def test_batches_carry_the_retriever_teachers_vectors(toy_prepared, tmp_path):
  data = PreparedData.load(toy_prepared)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  system = _system(data)
  pool_cfg = ml_collections.ConfigDict(dict(train_splits=("toy_train",), max_train_questions=0, candidates="",
                                            retriever="", k1=6, encode_batch_size=8))
  pool = distill.load_pool(pool_cfg, data, tokenizer, str(tmp_path / "run"), mesh=None)
  it = distill.UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=4, batch_size=8, seed=3)
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
  r = system.retriever
  encoded = tokenizer.questions(it.questions, r.question_len, r.buckets).as_dict()
  tokens = [tuple(ids[mask > 0].tolist()) for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
  for row in range(8):
    ids = tuple(batch["q_input_ids"][row][batch["q_attention_mask"][row] > 0].tolist())
    np.testing.assert_array_equal(batch["t_q"][row], q_vectors[tokens.index(ids)])
  # t_p row j is the vector of the passage in p_input_ids row j (its token record is in that row).
  corpus = data.token_corpus()
  for row in range(32):
    pid = int(np.flatnonzero((p_vectors == batch["t_p"][row]).all(1))[0])
    ids = batch["p_input_ids"][row][batch["p_attention_mask"][row] > 0]
    assert set(np.asarray(corpus[pid]).tolist()) <= set(ids.tolist())


def test_top_exports_keep_the_best_evaluations(tmp_path):
  top = distill.TopExports(str(tmp_path / "top"), keep=2, select="em")
  params = {"w": np.zeros(3, np.float32)}

  def update(step, em):
    return top.update(step, {"w": params["w"] + step}, {"metrics": {"em": em}, "note": "x"})

  assert update(10, 0.2) and update(20, 0.5)
  assert not update(30, 0.1)  # worse than both kept
  assert update(40, 0.3) and top.steps() == {20: 0.5, 40: 0.3}  # 10 dropped
  assert not update(50, 0.3)  # ties keep the earlier step
  export = rd.ParamsExport(str(tmp_path / "top" / "step_40"))
  np.testing.assert_array_equal(export.restore({"w": jax.ShapeDtypeStruct((3,), np.float32)})["w"], [40] * 3)
  assert export.latest_info()["note"] == "x"
  export.close()
  assert update(40, 0.9) and top.steps() == {20: 0.5, 40: 0.9}  # a re-evaluated step replaces its export
  # A run resumed from step 30: the exports of later steps are dropped.
  assert update(35, 0.1) and top.steps() == {20: 0.5, 35: 0.1}
  assert sorted(os.listdir(tmp_path / "top")) == ["step_20", "step_35"]


def test_cached_fresh_index_vectors_are_reused_only_for_the_same_params_and_passages(tmp_path):
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  vectors = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
  pids = np.array([3, 5, 8, 9])
  cache = str(tmp_path / "index")
  assert distill.load_cached_vectors(cache, params, pids) is None  # nothing kept yet
  distill.save_cached_vectors(cache, vectors, params, pids)
  np.testing.assert_array_equal(distill.load_cached_vectors(cache, params, pids), vectors)
  assert distill.load_cached_vectors(cache, {"w": params["w"] + 1e-3}, pids) is None  # other parameters
  assert distill.load_cached_vectors(cache, params, pids[:-1]) is None  # other passages
  os.remove(os.path.join(cache, distill.VECTORS_KEY_FILE))  # an interrupted save: vectors without their key
  assert distill.load_cached_vectors(cache, params, pids) is None


def test_distill_refuses_bad_loss_weights_before_writing(tmp_path):
  """Negative weights, and embedding matching without the teacher retriever it matches, fail naming the field."""
  for field, value, match in (("embed_weight", 1.0, "embed_weight.*retriever_teacher"),
                              ("embed_weight", -1.0, "embed_weight must be >= 0"),
                              ("label_weight", -1.0, "label_weight must be >= 0")):
    config = distill_config.get_config()
    config.distill.teacher = str(tmp_path / "teacher")
    config.distill[field] = value
    with pytest.raises(ValueError, match=match):
      distill_train.train_and_evaluate(config, str(tmp_path / field))
    assert not os.path.exists(tmp_path / field)
