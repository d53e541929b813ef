"""Real all-MiniLM-L6-v2 weights in our Flax BERT retrieve real gold passages.

For 50 nq_dev questions, the gold paragraph must score above the median of 100
random corpus paragraphs for at least 90% of the questions (mean pooling over
the sequence, full 384-d, cosine: how MiniLM was pretrained).
"""

import json
import os

import jax
import numpy as np
import pytest

from rnr_jax import retrieval, tokenization
from rnr_jax.specs import RetrieverSpec
from rnr_jax.training.mesh import data_mesh

DATA = os.environ.get("RNR_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_minilm_gold_passage_beats_random_median():
  if not os.path.exists(os.path.join(DATA, "nq_dev.jsonl")):
    pytest.skip(f"no shared data at {DATA}")
  try:
    path = tokenization.default_tokenizer_path()
  except ImportError as e:
    pytest.skip(str(e))
  from rnr_jax.models.hf import load_hf_encoder

  rng = np.random.default_rng(0)
  questions = _read_jsonl(os.path.join(DATA, "nq_dev.jsonl"))
  questions = [questions[i] for i in rng.choice(len(questions), 50, replace=False)]
  corpus = {d["id"]: d for d in _read_jsonl(os.path.join(DATA, "corpus.jsonl"))}
  ids = list(corpus)
  random_ids = [ids[i] for i in rng.choice(len(ids), 100, replace=False)]
  passages = [corpus[q["gold_pid"]] for q in questions] + [corpus[i] for i in random_ids]

  config, encoder = load_hf_encoder(path)
  buckets = tokenization.DEFAULT_BUCKETS
  spec = RetrieverSpec(encoder=config.to_hf_dict(), shared=True, pooling="mean", retrieval_dim=0, normalize=True,
                       passage_token_type=1, tokenizer_fingerprint="", question_len=64, passage_len=256,
                       buckets=buckets)
  question_fn, passage_fn = spec.embed_fns()
  params, mesh = {"encoder": encoder}, data_mesh(jax.devices()[:1])
  tok = tokenization.Tokenizer.from_pretrained(path)
  records = tok.passage_token_ids([p["title"] for p in passages], [p["text"] for p in passages])
  p_vecs = retrieval.encode_corpus(retrieval.BatchEncoder(passage_fn, mesh, 32), params, tok, records, max_len=256,
                                   buckets=buckets).vectors
  q_vecs = retrieval.encode_questions(retrieval.BatchEncoder(question_fn, mesh, 32), params, tok,
                                      [q["question"] for q in questions], max_len=64, buckets=buckets)
  np.testing.assert_allclose(np.linalg.norm(p_vecs, axis=1), 1.0, rtol=1e-5)  # cosine scores
  scores = q_vecs @ p_vecs.T  # [50, 150]
  gold = scores[np.arange(50), np.arange(50)]
  random_median = np.median(scores[:, 50:], axis=1)
  frac = float(np.mean(gold > random_median))
  print(f"gold above random median: {frac:.2f}")
  assert frac >= 0.9
