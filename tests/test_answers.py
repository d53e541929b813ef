"""Answer choice and display text (``rnr_jax.answers``): n-best spans with probabilities, clean detokenization."""

import numpy as np
import pytest

from rnr_jax import answers
from rnr_jax.answers import Detokenizer
from rnr_jax.tokenization import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def detokenize(tokenizer):
  return Detokenizer(tokenizer.vocab(), (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id))


@pytest.mark.parametrize("text, want", [
    ("``Love Is in the Air'' (song)", '"love is in the air" (song)'),
    ("John's band didn't win -- in 1956, 1972; 150,782 SEK", "john's band didn't win--in 1956, 1972; 150,782 sek"),
    ("3.5% at 10:30. Skłodowska-Curie won US$3 [1] a/b", "3.5% at 10:30. skłodowska-curie won us $3 [1] a/b"),
    ('the "first oil shock", followed', 'the "first oil shock", followed'),
])
def test_detokenized_text_has_no_wordpiece_artefacts(tokenizer, detokenize, text, want):
  ids = tokenizer.encode_texts([text])[0]
  got, offsets = detokenize(np.concatenate([[tokenizer.cls_id], ids, [tokenizer.sep_id]]))
  assert got == want
  assert tokenizer.decode(ids) != want  # the plain WordPiece decoding has the artefacts
  # Every token's range covers its own characters, in order, so answers cut by token are exact substrings.
  inner = offsets[1:-1]
  assert (inner[:, 0] <= inner[:, 1]).all() and (np.diff(inner[:, 0]) >= 0).all() and offsets[0, 0] == offsets[0, 1]
  for (start, end), token in zip(inner, ids):
    piece = tokenizer.decode([token]).lstrip("#")
    assert got[start:end] in (piece, '"', "")


def _logits(seed, m=4, length=24):
  rng = np.random.default_rng(seed)
  valid = np.zeros((m, length), bool)
  valid[:, 6:20] = True
  valid[m - 1] = False  # an empty padding passage
  return rng.normal(size=(m, length)), rng.normal(size=(m, length)), rng.normal(size=m), valid, rng.normal(size=m)


@pytest.mark.parametrize("rule", ["dpr", "weighted", "fused"])
def test_nbest_first_is_the_rule_answer_and_probabilities_are_normalised(rule):
  for seed in range(10):
    start, end, rank, valid, retrieval = _logits(seed)
    kwargs = dict(max_answer_len=3, rule=rule, passage_score_weight=0.5, retrieval_scores=retrieval)
    spans = answers.nbest(start, end, rank, valid, **kwargs)
    if rule == "dpr":  # DPR's answer: the best span of the passage the ranker puts first
      top = int(np.argmax(np.where(valid.any(1), rank, -np.inf)))
      assert spans[0][:3] == (top, *answers.top_spans(start[top], end[top], valid[top], 3, 1)[0][:2])
    else:  # the best of every candidate under the rule's score
      assert spans[0][3] == max(c[3] for c in spans)
    probs = np.asarray([c[4] for c in spans])
    assert len(spans) == 3 * 5 and np.isclose(probs.sum(), 1.0) and (probs > 0).all()
    assert {c[0] for c in spans} == {0, 1, 2} and all(valid[p, s] and valid[p, e] for p, s, e, _, _ in spans)
    if rule != "dpr":  # ordered by the rule's score, whose softmax the probabilities are
      assert [c[3] for c in spans] == sorted((c[3] for c in spans), reverse=True)
      assert np.all(np.diff(probs) <= 1e-12)
  # A sharper reader is more confident: probabilities compare across questions.
  start, end, rank, valid, retrieval = _logits(0)
  sharp = start.copy()
  sharp[0, 8] = 30.0
  end[0, 8] = 30.0
  assert answers.nbest(sharp, end, rank, valid, max_answer_len=3, rule="fused", retrieval_scores=retrieval)[0][4] > 0.99


def test_merge_answers_sums_duplicates_in_rule_order():
  merged = answers.merge_answers(["Paris", "the Paris", "Lyon", "paris.", "Nice"], [0.4, 0.2, 0.15, 0.1, 0.05], 2)
  assert merged == [(0, pytest.approx(0.7)), (2, pytest.approx(0.15))]
  assert answers.merge_answers([], [], 3) == []
