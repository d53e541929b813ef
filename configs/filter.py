"""The passage filter (paper §2.1, appendix A.1).

  python -m train.filter --config configs/filter.py --workdir W
  python -m train.filter --config configs/filter.py:tiny --workdir W   # seconds-long smoke run
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.filter = ml_collections.ConfigDict()
  # J+train: the passages retrieved in the top-k for the questions of these splits.
  c.filter.positive_splits = ("nq_train",)
  c.filter.top_k = 2
  # Ranked candidates file (.npz, {split: int32 [Q, k] passage ids}, see rnr_jax.reader_data);
  # "" = the prepared BM25 candidates.
  c.filter.candidates = ""
  c.filter.log_base = 10.0  # smoothed frequency log_b(freq) + 1 (10 in the paper, 2 oversamples more)
  # J+val: each question's best-ranked retrieved answer passage; J-val: this many sampled negatives.
  c.filter.val_split = "nq_dev"  # the pipeline sets its held-out split here when prepare.holdout > 0
  c.filter.val_negatives = 9107
  # Steps: train.num_steps, or when it is 0 this many epochs of oversampled positives.
  c.filter.epochs = 1.0
  c.filter.score_batch_size = 64  # passages per scoring forward pass
  # Subset size: exactly one of keep (>= 1: a count, < 1: a fraction of the corpus) and
  # keep_bytes (budget for the kept passages in the token-ID corpus).
  c.filter.keep = 0.25
  c.filter.keep_bytes = 0

  # Batches of half positives, half negatives; num_steps 0: filter.epochs epochs.
  common.schedule(c, lr=1e-5, warmup_steps=1000, batch_size=18, num_steps=0, every=2000)

  if common.is_tiny(arg):
    common.make_tiny(c)
    c.filter.val_negatives = 64
    c.filter.score_batch_size = 16
    c.train.batch_size = 16
    c.train.num_steps = 20
  return c
