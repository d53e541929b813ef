"""The reader teacher (DPR reader with a passage ranker; paper §2.2.3, appendix A.2).

  python -m train.reader --config configs/reader.py --workdir W
  python -m train.reader --config configs/reader.py:tiny --workdir W   # seconds-long smoke run
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.reader = ml_collections.ConfigDict()
  c.reader.train_splits = ("nq_train",)
  c.reader.max_train_questions = 0  # per split; 0 = all
  c.reader.eval_split = "nq_dev"
  # Ranked candidates file (.npz, {split: int32 [Q, k] passage ids}, see rnr_jax.reader_data) of a
  # retriever: training negatives and the open-setting passages. "" = the prepared BM25 candidates.
  c.reader.candidates = ""
  c.reader.num_negatives = 30  # answer-free passages kept per question from a candidates file
  # Positives: "gold_article" (the gold document's answer-holding passages, DPR's gold-page positives, when the
  # question has them) or "any" (every retrieved passage holding an answer string, after them).
  c.reader.positives = "gold_article"
  c.reader.m = 24  # passages per question: the positive, then m - 1 negatives
  c.reader.max_spans = 10  # answer occurrences in the positive used as targets
  # > 0: batches of questions with similar row lengths, sorted within runs of this many batches (fewer padded
  # tokens; rnr_jax.training.loop.EpochIterator); 0: random batches.
  c.reader.group_batches = 0
  c.reader.eval_passages = (1, 10, 20, 50)  # open setting: read the top-n retrieved passages
  c.reader.eval_questions = 0  # first N dev questions; 0 = all
  c.reader.eval_batch_size = 8  # questions per evaluation forward pass
  c.reader.answer_rule = "dpr"  # "dpr" (best span of the top-ranked passage) or "weighted" (appendix A.3)
  c.reader.select_metric = "em_open"  # em_gold_alone, em_gold_ranked, em_open@n or em_open (best over n)

  common.schedule(c, lr=1e-5, warmup_steps=0, batch_size=16, num_steps=20000, every=2000)

  if common.is_tiny(arg):
    common.make_tiny(c)
    c.reader.m = 4
    c.reader.eval_passages = (1, 4)
    c.reader.eval_questions = 16
  return c
