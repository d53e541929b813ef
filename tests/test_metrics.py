"""EM / F1, DPR has_answer and retrieval accuracy against hand-worked cases."""

import numpy as np
import pytest

from rnr_jax import metrics as M


@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   Apple, a pear ", "apple pear"),
    ("Theatre the", "theatre"),  # only whole-word articles go
    ("U.S.A.", "usa"),
])
def test_normalize_answer(text, expected):
  assert M.normalize_answer(text) == expected


def test_exact_match():
  assert M.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
  assert M.exact_match("an apple", ["apple"]) == 1.0
  assert M.exact_match("apples", ["apple"]) == 0.0
  assert M.exact_match("Paris", ["London", "paris."]) == 1.0  # max over answers
  assert M.exact_match("Paris", []) == 0.0
  for prediction in ("", "the", "a"):  # an empty gold answer is ignored, not matched by an empty prediction
    assert M.exact_match(prediction, [""]) == M.exact_match(prediction, ["the", "Paris"]) == 0.0
    assert M.f1_score(prediction, [""]) == 0.0


def test_f1():
  # pred [cat, sat] vs gold [cat, sat, on, mat]: precision 1, recall 1/2.
  assert M.f1_score("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)
  assert M.f1_score("the cat sat", ["dog", "cat sat on mat", "a cat sat"]) == 1.0
  assert M.f1_score("red red blue", ["red blue green"]) == pytest.approx(2 / 3)  # counts are clipped
  assert M.f1_score("nothing", ["something else"]) == 0.0
  assert M.f1_score("the", ["a"]) == 0.0  # an answer empty after normalisation matches nothing
  assert M.f1_score("", ["cat"]) == 0.0


def test_dpr_tokenize():
  assert M.dpr_tokenize("Hello, World's 2nd-best!") == ["hello", ",", "world", "'", "s", "2nd", "-", "best", "!"]
  # NFD: the accent becomes a combining mark inside the token.
  assert M.dpr_tokenize("Café") == M.dpr_tokenize("Cafe\u0301") == ["cafe\u0301"]


@pytest.mark.parametrize("answers,text,expected", [
    (["Café"], "We met at the Cafe\u0301 du Monde.", True),  # composed vs decomposed accent
    (["Cafe\u0301"], "We met at the Café du Monde.", True),
    (["Cafe"], "We met at the Café du Monde.", False),  # the accent is kept
    (["art"], "a smart move", False),  # inside a word is no match
    (["art"], "modern art museum", True),
    (["May 18, 2018"], "released on May 18 , 2018 worldwide", True),  # spacing of punctuation
    (["PARIS"], "the capital is paris", True),  # uncased
    (["Linda Davis"], "duet with Linda  Davis\nin 1993", True),  # any whitespace between tokens
    (["Davis Linda"], "duet with Linda Davis", False),  # order matters
    (["nope", "1993"], "duet with Linda Davis in 1993", True),  # any answer
    ([""], "anything", False),  # an empty answer matches nothing
    ([], "anything", False),
])
def test_has_answer(answers, text, expected):
  assert M.has_answer(answers, text) is expected


def test_answer_matcher_tokenizes_each_passage_once():
  texts = ["the capital of France is Paris", "Berlin is in Germany", "Rome, Italy"]
  calls = []

  def get(pid):
    calls.append(pid)
    return texts[pid]

  m = M.AnswerMatcher(get)
  assert m.flags(["Paris", "Rome"], [0, 1, 2]).tolist() == [True, False, True]
  assert m.flags(["germany"], np.array([[1, 0], [2, 1]])).tolist() == [[True, False], [False, True]]
  assert m.has_answer(["Italy"], 2)
  assert sorted(calls) == [0, 1, 2] and len(m) == 3
  assert not m.flags([""], [0, 1]).any()


def test_top_k_accuracy():
  hits = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]], bool)
  acc = M.top_k_accuracy(hits, ks=(1, 2, 3, 100))
  assert acc == {1: 0.25, 2: 0.5, 3: 0.75, 100: 0.75}  # k beyond the depth = the whole list
  assert M.top_k_accuracy(np.zeros((0, 5), bool), ks=(1,)) == {1: 0.0}
  with pytest.raises(ValueError):
    M.top_k_accuracy(hits, ks=(0,))


def test_answer_top_k_accuracy_and_gold_recall():
  texts = ["x", "the answer is 42", "nothing", "42 again"]
  m = M.AnswerMatcher(texts.__getitem__)
  ranked = [[0, 1, 2], [2, 0, 3]]
  assert M.answer_top_k_accuracy(ranked, [["42"], ["42"]], m, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}
  assert M.gold_recall_at_k(ranked, [[1], []], ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 0.5}
  with pytest.raises(ValueError):
    M.gold_recall_at_k(ranked, [[1]])
