"""The passage filter: sets, oversampling, hit ratio, top-n selection, and ``train.filter`` on a toy task.

Toy task: the reader test's corpus (``test_reader_train.write_toy_data``). The
BM25 top-1 passage of every training question is its marker passage (``zebra``
+ answer), so ``J+train`` = the training marker passages; ``J+val`` = the dev
marker passages; every other passage lacks the marker. A filter that learns
"has the marker" reaches a hit ratio of 1.
"""

import json
import math
import os

import numpy as np
import pytest
from test_reader_train import DISTRACTORS, NUM_DEV, NUM_TRAIN, build_toy_prepared

from rnr_jax import exports
from rnr_jax import passage_filter as pf
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData, TokenCorpus
from rnr_jax.tokenization import Tokenizer
from train import filter as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_retrieval_frequency_counts_each_question_once():
  ranked = [np.array([[3, 1, 4], [3, 3, -1], [5, 2, 1]]), np.array([[1, 0, 0]])]
  assert pf.retrieval_frequency(ranked, top_k=2, num_passages=6).tolist() == [1, 2, 1, 2, 0, 1]
  # 3 counts once for the row [3, 3, -1], and -1 (no passage) not at all.
  assert pf.retrieval_frequency(ranked, top_k=3, num_passages=6).tolist() == [1, 3, 1, 2, 1, 1]


def test_smoothed_frequency_oversampling_proportions():
  freq = np.array([1, 10, 100, 2, 4])
  np.testing.assert_allclose(pf.smoothed_frequency(freq, 10), [1, 2, 3, 1 + math.log10(2), 1 + math.log10(4)])
  np.testing.assert_allclose(pf.smoothed_frequency(freq, 2), np.log2(freq) + 1)
  with pytest.raises(ValueError, match=">= 1"):
    pf.smoothed_frequency(np.array([0, 1]))
  pids = np.array([10, 11, 12, 13, 14])
  weights = pf.smoothed_frequency(freq, 10)
  rng = np.random.default_rng(0)
  counts = np.zeros(len(pids))
  epochs = 2000
  for _ in range(epochs):
    pool = pf.oversampled_pool(pids, weights, rng)
    per = np.bincount(pool - 10, minlength=len(pids))
    assert (per >= np.floor(weights)).all() and (per <= np.ceil(weights)).all()  # every positive, every epoch
    counts += per
  np.testing.assert_allclose(counts / epochs, weights, atol=0.03)  # E[copies] = log_b(freq) + 1

  # Whole training pairs: positives in those proportions, each with a negative from the training negatives.
  sets = pf.FilterSets(pids, weights, np.array([0, 1, 2]), np.array([20]), np.array([21]))
  pos, neg = pf.training_pairs(sets, rng)
  assert len(pos) == len(neg) and set(neg.tolist()) <= {0, 1, 2} and set(pos.tolist()) == set(pids.tolist())


def test_hit_ratio_on_hand_made_scores():
  assert pf.hit_ratio(np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3])) == 1.0
  assert pf.hit_ratio(np.array([0.9, 0.1]), np.array([0.5, 0.2, 0.3])) == 0.5
  assert pf.hit_ratio(np.array([0.1, 0.2]), np.array([0.5, 0.6, 0.3])) == 0.0
  # Top-|J+val| = top-3 of {p: .9, .4, .35, n: .5, .3}: .9, .5, .4 -> 2 of 3 positives.
  assert pf.hit_ratio(np.array([0.9, 0.4, 0.35]), np.array([0.5, 0.3])) == pytest.approx(2 / 3)
  assert pf.hit_ratio(np.zeros(3), np.zeros(5)) == 0.0  # ties go against the positives


def test_make_filter_sets_disjoint():
  freq = np.zeros(100, np.int64)
  freq[[1, 2, 3, 50]] = [1, 5, 20, 1]
  sets = pf.make_filter_sets(100, freq, np.array([3, 60, 61]), 30, 10.0, np.random.default_rng(0))
  assert sets.train_positives.tolist() == [1, 2, 3, 50]
  np.testing.assert_allclose(sets.weights, np.log10([1, 5, 20, 1]) + 1)
  assert sets.val_positives.tolist() == [3, 60, 61] and len(sets.val_negatives) == 30
  taken = set(sets.train_positives.tolist()) | set(sets.val_positives.tolist())
  assert not taken & set(sets.val_negatives.tolist())
  assert not (taken | set(sets.val_negatives.tolist())) & set(sets.train_negatives.tolist())
  assert len(sets.train_negatives) == 100 - 6 - 30
  with pytest.raises(ValueError, match="no training negatives"):
    pf.make_filter_sets(10, np.ones(10, np.int64), np.array([0]), 3, 10.0, np.random.default_rng(0))


def test_select_top_by_count_fraction_and_bytes(tmp_path):
  scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
  assert pf.select_top(scores, 2).tolist() == [1, 3]
  assert pf.select_top(scores, 10).tolist() == [1, 3, 2, 4, 0]
  assert pf.select_top(scores, 0.6).tolist() == [1, 3, 2]
  with pytest.raises(ValueError, match="integer"):
    pf.select_top(scores, 2.5)
  with pytest.raises(ValueError, match="keep must be > 0"):
    pf.select_top(scores, 0)

  tok = Tokenizer.from_pretrained()
  records = [np.arange(n, dtype=np.int32) + 1000 for n in (5, 40, 10, 20, 7)]
  corpus = TokenCorpus.write(tmp_path / "corpus", records, tok.vocab_size)
  sizes = pf.record_bytes(corpus)
  assert sizes.tolist() == [2 * n + 8 for n in (5, 40, 10, 20, 7)]  # uint16 ids + one int64 offset
  # Best first: 1 (88 B), 3 (48 B), 2 (28 B), 4 (22 B), 0 (18 B); cumulative 88, 136, 164, 186, 204.
  assert pf.select_top(scores, 0, keep_bytes=164, sizes=sizes).tolist() == [1, 3, 2]
  assert pf.select_top(scores, 0.2, keep_bytes=185, sizes=sizes).tolist() == [1, 3, 2]  # keep_bytes wins
  assert pf.select_top(scores, 0, keep_bytes=87, sizes=sizes).tolist() == []

  pf.save_subset(tmp_path / "subset.npz", np.array([1, 3]), scores[[1, 3]], 5)
  pids, kept_scores, total = pf.load_subset(tmp_path / "subset.npz")
  assert pids.tolist() == [1, 3] and kept_scores.tolist() == pytest.approx([0.9, 0.7]) and total == 5


def test_pair_batch_layout(tmp_path):
  tok = Tokenizer.from_pretrained()
  records = tok.passage_token_ids(["a", "b", "c", "d"], ["one two", "three", "four five six", "seven"])
  corpus = TokenCorpus.write(tmp_path / "corpus", records, tok.vocab_size)
  batch = pf.pair_batch(tok, corpus, np.array([0, 2]), np.array([1, 3]), max_len=32, buckets=(16, 32))
  assert batch["input_ids"].shape == (4, 16) and batch["labels"].tolist() == [[1, 0], [1, 0]]
  assert batch["input_ids"][2, 1:1 + len(records[2])].tolist() == records[2].tolist()  # row 2 = pair 1's positive
  assert (batch["token_type_ids"][batch["attention_mask"] > 0] == 1).all()


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory):
  return build_toy_prepared(str(tmp_path_factory.mktemp("toy_filter")))


def test_filter_learns_toy_task(toy_prepared, tmp_path):
  config = load_config(os.path.join(ROOT, "configs/filter.py:tiny"), [
      f"prepared_dir={toy_prepared}", "filter.positive_splits=('toy_train',)", "filter.val_split=toy_dev",
      "filter.top_k=1", "filter.keep=40", "optim.lr=5e-3", "train.num_steps=0", "filter.epochs=6",
      "train.eval_every=8", "train.log_every=4", "train.ckpt_every=100"])
  kept = trainer.train_and_evaluate(config, str(tmp_path))

  data = PreparedData.load(toy_prepared)
  marker = {q * (1 + DISTRACTORS) for q in range(NUM_TRAIN + NUM_DEV)}  # the marker passages' ids
  evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl", encoding="utf-8")]
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")
            if "loss" in json.loads(line)]
  assert [e["step"] for e in evals] == [8, 16, 24]  # 6 epochs of 32 positives, 8 pairs per step
  assert losses[-1] < 0.65 * losses[0]
  assert max(e["hit_val"] for e in evals) == 1.0, evals
  assert set(kept.tolist()) == marker
  pids, scores, total = pf.load_subset(tmp_path / "subset.npz")
  assert pids.tolist() == kept.tolist() and total == data.num_passages and (np.diff(scores) <= 0).all()
  all_scores = np.load(tmp_path / "passage_scores.npy")
  assert all_scores.shape == (data.num_passages,) and np.array_equal(all_scores[pids], scores)
  summary = json.loads((tmp_path / "subset.json").read_text())
  assert summary["kept"] == 40 and summary["hit_val"] == 1.0
  # The subset comes from the best export: the first evaluation reaching the best hit ratio, flagged in eval.jsonl.
  best = next(e for e in evals if e["hit_val"] == 1.0)
  assert [e["step"] for e in evals if e["best"]][-1] == best["step"]
  info = exports.read_info(str(tmp_path / "best"))
  assert info["step"] == summary["best_step"] == best["step"] and info["select_metric"] == "hit_val"
  assert info["filter"]["passage_len"] == config.tokens.passage_len and info["metrics"]["hit_val"] == 1.0
