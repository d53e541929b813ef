"""Corpus encoding (``rnr_jax.retrieval``, ``rnr_jax.embeddings``, ``python -m infer.encode``): resumable chunks,
sharding, search."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from infer import encode as encode_cli
from rnr_jax import embeddings, exports, qa_model, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.config import load_config
from rnr_jax.data.prepared import PrepareSettings, prepare
from train.sources import data_dir_sources
from rnr_jax.metrics import AnswerMatcher, answer_top_k_accuracy
from rnr_jax.data import PreparedData
from rnr_jax.specs import RetrieverSpec
from rnr_jax.training.mesh import data_mesh
from test_retriever import NUM_DOCS, write_toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = (32, 64, 96)


@pytest.fixture(scope="module")
def model():
  """A random-init tiny retriever: ``(spec, params)``."""
  config = load_config(os.path.join(ROOT, "configs/retriever.py:tiny"), ["model.pooling=mean"])
  spec = RetrieverSpec.from_config(config, exports.initial_encoder(config.model)[0], "")
  return spec, qa_model.init_params(spec.build(), jax.random.key(0))


@pytest.fixture(scope="module")
def records():
  """100 passages of 1 to 80 random word-piece ids (some longer than the 64-token limit)."""
  rng = np.random.default_rng(0)
  return [rng.integers(1000, 20000, size=int(n)).astype(np.int32) for n in rng.integers(1, 80, size=100)]


class CrashingRecords:
  """Records that fail from index ``crash_at`` on, like a run killed midway."""

  def __init__(self, records, crash_at):
    self._records, self._crash_at = records, crash_at

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    if i >= self._crash_at:
      raise RuntimeError("killed")
    return self._records[i]


def _encode(spec, params, records, mesh, **kwargs):
  encoder = retrieval.BatchEncoder(spec.embed_fns()[1], mesh, 16)
  return retrieval.encode_corpus(encoder, params, tk.Tokenizer.from_pretrained(), records, max_len=64,
                                 buckets=BUCKETS, **kwargs)


def test_encode_corpus_resumes_from_finished_chunks(model, records, tmp_path):
  spec, params = model
  mesh = data_mesh()
  reference = _encode(spec, params, records, mesh)
  assert reference.vectors.shape == (100, 16) and reference.chunks_reused == 0

  chunks = str(tmp_path / "chunks")
  with pytest.raises(RuntimeError, match="killed"):
    _encode(spec, params, CrashingRecords(records, 50), mesh, chunk_dir=chunks, chunk_size=16, key={"model": "a"})
  assert sorted(f for f in os.listdir(chunks) if f.endswith(".npy")) == ["00000.npy", "00001.npy", "00002.npy"]

  resumed = _encode(spec, params, records, mesh, chunk_dir=chunks, chunk_size=16, key={"model": "a"})
  assert resumed.chunks_reused == 3
  np.testing.assert_allclose(resumed.vectors, reference.vectors, rtol=0, atol=1e-6)
  again = _encode(spec, params, CrashingRecords(records, 0), mesh, chunk_dir=chunks, chunk_size=16,
                  key={"model": "a"})  # every chunk finished: no record is read
  assert again.chunks_reused == 7
  np.testing.assert_array_equal(again.vectors, resumed.vectors)
  with pytest.raises(ValueError, match="other embeddings"):
    _encode(spec, params, records, mesh, chunk_dir=chunks, chunk_size=16, key={"model": "b"})


def test_sharded_encoding_equals_single_device(model, records):
  spec, params = model
  assert jax.device_count() == 8
  sharded = _encode(spec, params, records, data_mesh()).vectors
  single = _encode(spec, params, records, data_mesh(jax.devices()[:1])).vectors
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)

  tokenizer = tk.Tokenizer.from_pretrained()
  questions = ["who wrote the iliad", "what is the capital of france", "when did the war end"] * 7
  q = [retrieval.encode_questions(retrieval.BatchEncoder(spec.embed_fns()[0], mesh, 16), params, tokenizer,
                                  questions, max_len=32, buckets=BUCKETS)
       for mesh in (data_mesh(), data_mesh(jax.devices()[:1]))]
  np.testing.assert_allclose(q[0], q[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(q[0][0], q[0][3], rtol=1e-6, atol=1e-6)  # same question, another batch row

  with pytest.raises(ValueError, match="divisible"):
    retrieval.BatchEncoder(spec.embed_fns()[1], data_mesh(), 12)


def test_search_exact_and_answer_accuracy():
  rng = np.random.default_rng(1)
  p, q = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(np.float32)
  ids, scores = retrieval.search_exact(q, p, 5)
  full = q @ p.T
  np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :5])
  np.testing.assert_allclose(scores, np.take_along_axis(full, ids, 1), rtol=1e-6)
  assert retrieval.search_exact(q, p, 100)[0].shape == (7, 50)  # k beyond the corpus: all of it

  texts = ["paris is in france", "berlin is in germany", "rome is in italy"]
  passages = np.eye(3, dtype=np.float32)
  questions = np.array([[1, 0.5, 0], [0, 0.2, 1], [0.9, 1, 0]], np.float32)  # ranks: 0>1>2, 2>1>0, 1>0>2
  acc = retrieval.evaluate_retrieval(questions, passages, [["paris"], ["germany"], ["italy"]],
                                     AnswerMatcher(lambda pid: texts[pid]), ks=(1, 2, 3))
  assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top3": 1.0}


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory):
  """The toy corpus and questions of test_retriever, prepared (read-only for the tests)."""
  data = tmp_path_factory.mktemp("toy_data")
  write_toy_data(str(data))
  prepared = str(tmp_path_factory.mktemp("toy") / "prepared")
  prepare(*data_dir_sources(str(data)), prepared, PrepareSettings(compress=()), echo=lambda s: None)
  return prepared


def test_hybrid_evaluation_goes_from_dense_to_bm25_with_the_weight(toy_prepared):
  """Weight 0 ranks as the dense search alone, a huge weight as BM25 alone; in between both count."""
  data = PreparedData.load(toy_prepared)
  questions = data.questions("toy_dev")
  texts, answers, matcher = [x.question for x in questions], [x.answers for x in questions], data.matcher()
  rng = np.random.default_rng(0)
  passages = rng.normal(size=(data.num_passages, 8)).astype(np.float32)
  q = rng.normal(size=(len(questions), 8)).astype(np.float32)
  ks = (1, 5)

  dense = retrieval.evaluate_retrieval(q, passages, answers, matcher, ks)
  assert retrieval.evaluate_hybrid(q, passages, texts, data.bm25(), 0.0, answers, matcher, ks) == dense
  bm25_ids, _ = data.bm25().search(texts, 5)
  bm25_only = {f"top{k}": v for k, v in answer_top_k_accuracy(bm25_ids, answers, matcher, ks).items()}
  assert bm25_only["top1"] > dense["top1"] + 0.5  # the toy questions share their code word with the passage
  assert retrieval.evaluate_hybrid(q, passages, texts, data.bm25(), 1e6, answers, matcher, ks) == bm25_only
  # A question whose dense vector points at a passage: at a small weight dense decides, at a large one BM25.
  q_aimed = passages[(np.arange(len(questions)) + 1) % data.num_passages] * 100  # a wrong passage, by far
  wrong = retrieval.evaluate_hybrid(q_aimed, passages, texts, data.bm25(), 1e-3, answers, matcher, (1,))
  right = retrieval.evaluate_hybrid(q_aimed, passages, texts, data.bm25(), 1e5, answers, matcher, (1,))
  assert wrong["top1"] < 0.2 and right["top1"] == bm25_only["top1"]
  with pytest.raises(ValueError, match="BM25 index holds"):
    retrieval.evaluate_hybrid(q, passages[:-1], texts, data.bm25(), 0.1, answers, matcher, ks)


def test_encode_cli_writes_embeddings_for_the_index(toy_prepared, tmp_path):
  prepared = toy_prepared
  out = str(tmp_path / "emb")
  cmd = [sys.executable, "-m", "infer.encode", "--config", "configs/retriever.py:tiny", "--prepared", prepared,
         "--out", out, "--batch_size", "16", "--chunk_size", "20", "--eval_splits", "toy_dev",
         "--lexical_weight", "0.5"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["dim"] == 16 and set(summary["eval"]["toy_dev"]) == {"top1", "top5", "top20", "top100"}
  with open(os.path.join(out, "eval_lexical.json"), encoding="utf-8") as f:
    hybrid = json.load(f)
  assert hybrid == summary["eval_lexical"] and hybrid["lexical_weight"] == 0.5
  assert set(hybrid["splits"]["toy_dev"]) == {"top1", "top5", "top20", "top100"}

  vectors, info = embeddings.load(out)
  assert vectors.shape == (NUM_DOCS, 16) and vectors.dtype == np.float32
  assert info["pooling"] == "cls" and info["dim"] == 16 and len(info["model_fingerprint"]) == 64
  assert not os.path.exists(os.path.join(out, embeddings.CHUNKS_DIR))

  # The same model and corpus again: the finished output is reused, not recomputed.
  config = load_config(os.path.join(ROOT, "configs/retriever.py:tiny"))
  mesh = data_mesh()
  spec, params, fingerprint = encode_cli.resolve_model(None, None, config, "", mesh)
  assert fingerprint == info["model_fingerprint"]
  mtime = os.path.getmtime(os.path.join(out, embeddings.EMBEDDINGS_FILE))
  again = embeddings.encode_prepared(out=out, prepared=prepared, spec=spec, params=params, fingerprint=fingerprint,
                                     mesh=mesh, batch_size=16, chunk_size=20)
  assert again["model_fingerprint"] == fingerprint
  assert os.path.getmtime(os.path.join(out, embeddings.EMBEDDINGS_FILE)) == mtime


def test_sharded_encode_merged_equals_unsharded_bitwise(toy_prepared, tmp_path):
  """Two hosts' contiguous shards (``infer.encode --shard 0/2``, ``1/2``), joined by ``--merge``, give the very file
  an unsharded encoding writes; chunk boundaries differ between the runs, so the bytes do not depend on them."""
  config = load_config(os.path.join(ROOT, "configs/retriever.py:tiny"))
  mesh = data_mesh()
  spec, params, fingerprint = encode_cli.resolve_model(None, None, config, "", mesh)
  kwargs = dict(prepared=toy_prepared, spec=spec, params=params, fingerprint=fingerprint, mesh=mesh, batch_size=16)
  whole = str(tmp_path / "whole")
  embeddings.encode_prepared(out=whole, chunk_size=7, **kwargs)
  sharded = str(tmp_path / "sharded")
  for i in range(2):
    rows = embeddings.shard_rows(NUM_DOCS, i, 2)
    info = embeddings.encode_prepared(out=sharded, shard=(i, 2), chunk_size=5, **kwargs)
    assert info["rows"] == [rows.start, rows.stop] and len(rows) >= NUM_DOCS // 2
  assert not os.path.exists(os.path.join(sharded, embeddings.EMBEDDINGS_FILE))
  proc = subprocess.run([sys.executable, "-m", "infer.encode", "--out", sharded, "--merge"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, info_a = embeddings.load(whole)
  b, info_b = embeddings.load(sharded)
  assert a.shape == (NUM_DOCS, 16) and a.tobytes() == b.tobytes()
  for key in ("model_fingerprint", "corpus_sha256", "dim", "num_passages", "pooling", "passage_len"):
    assert info_a[key] == info_b[key]
  assert info_b["shards"] == 2 and not os.path.exists(os.path.join(sharded, embeddings.SHARDS_DIR))
  # A shard of another model is refused at merge time, and so is a missing shard.
  embeddings.encode_prepared(out=str(tmp_path / "mixed"), shard=(0, 2), **kwargs)
  other = qa_model.init_params(spec.build(), jax.random.key(1))
  embeddings.encode_prepared(out=str(tmp_path / "mixed"), shard=(1, 2), **{**kwargs, "params": other,
                                                                           "fingerprint": "other"})
  with pytest.raises(ValueError, match="another model or corpus than shard 0"):
    embeddings.merge_shards(str(tmp_path / "mixed"))
  with pytest.raises(FileNotFoundError, match="shard 1 of 2 is missing"):
    embeddings.encode_prepared(out=str(tmp_path / "half"), shard=(0, 2), **kwargs)
    embeddings.merge_shards(str(tmp_path / "half"))
