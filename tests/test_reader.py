"""Reader targets, losses and answer selection against brute-force references."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from rnr_jax import answers, distill, reader


def test_find_answer_spans_all_occurrences_inside_text_only():
  ids = np.array([101, 7, 8, 102, 5, 102, 7, 8, 9, 7, 8, 102])
  # text region is positions 6..10; the (7, 8) at positions 1-2 is in the question.
  spans = reader.find_answer_spans(ids, 6, 11, [np.array([7, 8]), np.array([9]), np.array([1, 2, 3])], max_answer_len=3)
  assert spans == [(6, 7), (8, 8), (9, 10)]
  assert reader.find_answer_spans(ids, 6, 11, [np.array([7, 8, 9, 7])], max_answer_len=3) == []


def test_span_mml_loss_matches_brute_force():
  rng = np.random.default_rng(0)
  s, e = rng.normal(size=(2, 12)), rng.normal(size=(2, 12))
  valid = np.zeros((2, 12), bool)
  valid[:, 3:11] = True
  starts = np.array([[4, 6, 0], [5, 0, 0]])
  ends = np.array([[5, 8, 0], [5, 0, 0]])
  mask = np.array([[True, True, False], [True, False, False]])
  got = distill.span_mml_loss(jnp.asarray(s), jnp.asarray(e), valid, starts, ends, mask)
  for r in range(2):
    ps = np.exp(s[r, 3:11]) / np.exp(s[r, 3:11]).sum()
    pe = np.exp(e[r, 3:11]) / np.exp(e[r, 3:11]).sum()
    total = sum(ps[a - 3] * pe[b - 3] for a, b, m in zip(starts[r], ends[r], mask[r]) if m)
    np.testing.assert_allclose(got[r], -np.log(total), rtol=1e-5)
  none = distill.span_mml_loss(jnp.asarray(s), jnp.asarray(e), valid, starts, ends, np.zeros_like(mask))
  np.testing.assert_array_equal(np.asarray(none), 0.0)


def test_reader_loss_ranking_part_is_cross_entropy_of_positive():
  rng = np.random.default_rng(1)
  b, m, length = 2, 3, 10
  rank = rng.normal(size=(b, m))
  zeros = np.zeros((b, m, length))
  valid = np.ones((b, m, length), bool)
  loss, parts = distill.read_loss(zeros, zeros, rank, valid, np.zeros((b, 1), int), np.zeros((b, 1), int),
                                   np.zeros((b, 1), bool))
  ref = np.mean([-(rank[i, 0] - np.log(np.exp(rank[i]).sum())) for i in range(b)])
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert parts["span_loss"] == 0


def _brute_top(s, e, valid, max_len):
  best = None
  for a, b in itertools.product(range(len(s)), repeat=2):
    if valid[a] and valid[b] and a <= b < a + max_len:
      if best is None or s[a] + e[b] > best[2]:
        best = (a, b, s[a] + e[b])
  return best


def test_top_spans_best_equals_brute_force_and_no_overlap():
  rng = np.random.default_rng(2)
  for _ in range(20):
    s, e = rng.normal(size=30), rng.normal(size=30)
    valid = np.zeros(30, bool)
    valid[5:27] = True
    spans = answers.top_spans(s, e, valid, 4, top_k=5)
    a, b, sc = _brute_top(s, e, valid, 4)
    assert spans[0][:2] == (a, b) and np.isclose(spans[0][2], sc)
    for (s1, e1, _), (s2, e2, _) in itertools.combinations(spans, 2):
      assert e1 < s2 or e2 < s1
    assert all(5 <= x <= y < 27 and y - x < 4 for x, y, _ in spans)


def _log_softmax(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x)))


def _select(*args, **kwargs):
  """``(passage, start, end, score)`` of the first of the n-best answers."""
  return answers.nbest(*args, **{"max_answer_len": 10, "rule": "dpr", **kwargs})[0][:4]


def test_answer_rules():
  length = 8
  valid = np.zeros((2, length), bool)
  valid[:, 2:7] = True
  start = np.full((2, length), -5.0)
  end = np.full((2, length), -5.0)
  start[0, 2:7], end[0, 2:7] = 1.0, 1.0  # passage 0: no confident span
  start[0, 3], end[0, 3] = 1.1, 1.1  # (its best span by logits, DPR's choice)
  start[1, 4], end[1, 5] = 9.0, 9.0  # passage 1: one confident span
  rank = np.array([2.0, 1.5])  # the ranker prefers passage 0
  assert _select(start, end, rank, valid, max_answer_len=3, rule="dpr")[:3] == (0, 3, 3)
  w = _select(start, end, rank, valid, max_answer_len=3, rule="weighted", passage_score_weight=0.5)
  assert w[:3] == (1, 4, 5)
  # lambda = 1 ranks by passage only, so the answer comes from passage 0.
  assert _select(start, end, rank, valid, max_answer_len=3, rule="weighted", passage_score_weight=1.0)[0] == 0
  # fused: span logits + log Prank + log Pret. Against a hand computation for three retrieval settings.
  for retrieval, scale in (([0.9, 0.1], 20.0), ([0.1, 0.9], 20.0), ([0.5, 0.49], 1.0)):
    passage = _log_softmax(rank) + _log_softmax(scale * np.asarray(retrieval))
    # Each passage's best span by logits: passage 0 (3, 3) at 2.2, passage 1 (4, 5) at 18.
    want = max([(2.2 + passage[0], 0, 3, 3), (18.0 + passage[1], 1, 4, 5)])
    f = _select(start, end, rank, valid, max_answer_len=3, rule="fused", retrieval_scores=retrieval,
                retrieval_scale=scale)
    assert f[:3] == want[1:] and f[3] == pytest.approx(want[0])
  # A retrieval margin of 0.8 at scale 20 (16 nats) outweighs passage 1's span margin: passage 0 is chosen.
  assert _select(start, end, rank, valid, max_answer_len=3, rule="fused", retrieval_scores=[0.9, 0.1])[0] == 0
  with pytest.raises(ValueError, match="retrieval scores"):
    _select(start, end, rank, valid, rule="fused")
  with pytest.raises(ValueError, match="rule"):
    _select(start, end, rank, valid, rule="bogus")


def test_extend_to_words():
  vocab = {"[CLS]": 0, "foo": 1, "##bar": 2, "##baz": 3, "x": 4}
  table = reader.continuation_table(vocab)
  ids = np.array([0, 4, 1, 2, 3, 4])
  assert reader.extend_to_words(ids, 3, 3, 1, 6, table) == (2, 4)
  assert reader.extend_to_words(ids, 1, 1, 1, 6, table) == (1, 1)
