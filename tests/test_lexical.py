"""Hybrid retrieval (``rnr_jax.lexical``): the fusion against a hand-written reference, and BM25 over a system's
own token-ID passages, kept current under knowledge edits."""

import jax
import numpy as np
import pytest

from rnr_jax import knowledge, lexical, qa_model
from rnr_jax.data import TokenCorpus
from rnr_jax.index import DenseIndex
from rnr_jax.qa_system import InferenceSettings, QASystem
from rnr_jax.retrieval import encode_passages
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training.mesh import data_mesh


def _reference_fuse(d_ids, d_sc, l_ids, l_sc, weight, k):
  """Per question, in plain Python: union (dense order, then new lexical ids), min-filled scores, stable sort."""
  out = []
  for q in range(len(d_ids)):
    dense = [(int(i), float(s)) for i, s in zip(d_ids[q], d_sc[q]) if i >= 0]
    lex = [(int(i), float(s)) for i, s in zip(l_ids[q], l_sc[q]) if i >= 0]
    d_min = min((s for _, s in dense), default=0.0)
    l_min = min((s for _, s in lex), default=0.0)
    union = [i for i, _ in dense] + [i for i, _ in lex if i not in dict(dense)]
    total = {i: dict(dense).get(i, d_min) + weight * dict(lex).get(i, l_min) for i in union}
    ranked = sorted(union, key=lambda i: (-total[i], union.index(i)))[:k]
    out.append([(i, total[i]) for i in ranked])
  return out


@pytest.mark.parametrize("weight", [0.0, 0.05, 1.0, 100.0])
def test_fuse_matches_reference(weight):
  rng = np.random.default_rng(int(weight * 100))
  q, n, k = 6, 8, 5
  d_ids = np.stack([rng.choice(20, n, replace=False) for _ in range(q)])
  l_ids = np.stack([rng.choice(20, n, replace=False) for _ in range(q)])
  d_sc = -np.sort(-rng.normal(size=(q, n)), axis=1).astype(np.float32)
  l_sc = -np.sort(-rng.uniform(0, 10, size=(q, n)), axis=1).astype(np.float32)
  l_ids[0, -3:] = -1  # empty lexical slots (a question with few matching words)
  ids, scores = lexical.fuse(d_ids, d_sc, l_ids, l_sc, weight, k)
  for row, want in enumerate(_reference_fuse(d_ids, d_sc, l_ids, l_sc, weight, k)):
    assert ids[row].tolist() == [i for i, _ in want]
    np.testing.assert_allclose(scores[row], [s for _, s in want], rtol=1e-6)
  if weight == 0.0:  # weight 0 keeps the dense order
    np.testing.assert_array_equal(ids, d_ids[:, :k])


def test_fuse_pads_and_checks_shapes():
  ids, scores = lexical.fuse(np.array([[3, -1]]), np.array([[0.5, 0.0]]), np.array([[-1, -1]]),
                             np.array([[0.0, 0.0]]), 0.1, 3)
  assert ids.tolist() == [[3, -1, -1]] and scores[0, 0] == pytest.approx(0.5) and np.isneginf(scores[0, 1:]).all()
  with pytest.raises(ValueError, match="differ in shape"):
    lexical.fuse(np.zeros((2, 3), int), np.zeros((2, 2)), np.zeros((2, 3), int), np.zeros((2, 3)), 0.1, 2)
  with pytest.raises(ValueError, match="questions"):
    lexical.fuse(np.zeros((2, 3), int), np.zeros((2, 3)), np.zeros((1, 3), int), np.zeros((1, 3)), 0.1, 2)


PASSAGES = [("Saxophone", "The saxophone is a woodwind instrument invented by Adolphe Sax in the 1840s."),
            ("Oxford", "Oxford is a city in England, home of the oldest university in the English-speaking world."),
            ("Lipid", "Lipids are fatty molecules such as waxes, sterols and triglycerides."),
            ("Subroutine", "A subroutine is a sequence of program instructions packaged as a unit."),
            ("Neuroscience", "Neuroscience studies the nervous system, the brain and the neurons in it.")]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
  """A random-init unified system over five real-looking passages (its dense retrieval is arbitrary)."""
  tokenizer = Tokenizer.from_pretrained()
  directory = str(tmp_path_factory.mktemp("lexical_corpus"))
  records = tokenizer.passage_token_ids([t for t, _ in PASSAGES], [x for _, x in PASSAGES])
  TokenCorpus.write(directory, records, tokenizer.vocab_size)
  encoder = dict(model_type="bert", vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=128, type_vocab_size=2,
                 hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 pad_token_id=0)
  spec = SystemSpec.unified_model(ReaderSpec(encoder=encoder, pooling="cls", retrieval_dim=8,
                                             tokenizer_fingerprint="test", question_len=16, reader_len=64,
                                             max_answer_len=10, buckets=(32, 64)), passage_len=64)
  params = qa_model.init_params(spec.reader.build(), jax.random.key(0))
  corpus = TokenCorpus.load(directory)
  mesh = data_mesh(jax.devices()[:1])
  vectors = encode_passages(spec, params, tokenizer, [corpus[i] for i in range(len(corpus))], mesh)
  return QASystem.from_parts(spec, params, DenseIndex.build(vectors, "exact", num_eval_queries=0), corpus,
                             tokenizer, settings=InferenceSettings(top_k=3, read_passages=1), mesh=mesh)


def test_bm25_of_the_token_id_corpus_finds_word_matches(system):
  questions = ["who invented the saxophone", "what are triglycerides", "what does neuroscience study"]
  ids, _ = system.lexical_index().search(questions, 2)
  assert ids[:, 0].tolist() == [0, 2, 4]
  # A weight that dwarfs the dense scores ranks by BM25; weight 0 is the dense index alone.
  fused, _ = system.search(questions, 3, lexical_weight=100.0)
  assert fused[:, 0].tolist() == [0, 2, 4]
  dense, dense_scores = system.search(questions, 3, lexical_weight=0.0)
  want, want_scores = system.index.search(system.embed_questions(questions), 3)
  np.testing.assert_array_equal(dense, want)
  np.testing.assert_array_equal(dense_scores, want_scores)
  # predict retrieves the same way, with the system's setting as default.
  assert system.predict(questions, lexical_weight=100.0).passage_ids[:, 0].tolist() == [0, 2, 4]
  with pytest.raises(ValueError, match="lexical_weight"):
    system.search(questions, 3, lexical_weight=-1.0)


def test_lexical_index_follows_knowledge_edits(system):
  question = "what is a zorblaxian quasicrystal"
  before = system.lexical_index()
  [added] = knowledge.add_passages(system, [knowledge.Passage("Zorblax", "A zorblaxian quasicrystal hums.")])
  ids, _ = system.search([question], 3, lexical_weight=100.0)
  assert ids[0, 0] == added and system.lexical_index() is not before and len(system.lexical_index()) == 6
  knowledge.remove_passages(system, [added])
  ids, _ = system.search([question], 3, lexical_weight=100.0)
  assert added not in ids[0] and len(system.lexical_index()) == 5


def test_settings_round_trip_and_validation():
  s = InferenceSettings(lexical_weight=0.06, lexical_candidates=50)
  assert InferenceSettings.from_json(s.to_json()) == s
  assert InferenceSettings.from_json({"top_k": 5}).lexical_weight == 0.0  # bundles written before hybrid retrieval
  for bad in ({"lexical_weight": -0.1}, {"lexical_weight": float("nan")}, {"lexical_candidates": 0}):
    with pytest.raises(ValueError, match="lexical"):
      InferenceSettings(**bad)
  with pytest.raises(ValueError, match="retrieval_scale"):
    InferenceSettings(rule="fused", retrieval_scale=0.0)
