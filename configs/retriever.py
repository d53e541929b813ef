"""Retriever training (paper §2.2.2, appendix A.2): DPR bi-encoder, by default the paper's shared encoder.

  python -m train.retriever --config configs/retriever.py --workdir W
  python -m train.retriever --config configs/retriever.py:tiny --workdir W   # seconds: random-init tiny BERT

Appendix A.2 (after DPR): lr 2e-5, gradient clipping at norm 2.0, linear warmup
(1237 steps there, for 128-question batches over 40+ epochs), passages of 256
tokens, one positive and one BM25 hard negative per question plus in-batch
negatives, [CLS] pooling truncated to the first 128 dims. The batch (16) and
step counts are CPU-sized; every evaluation encodes the whole corpus, so keep
``train.eval_every`` large on real data.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """``arg``: "" for the paper-like setting, "tiny" for a seconds-long random-init run."""
  c = common.base_config()
  r = c.retriever = ml_collections.ConfigDict()
  r.shared = True  # one encoder (paper §2.2.2); False = DPR's question and passage encoders
  r.passage_token_type = 1  # token type of passage inputs (questions: 0); 0 = how MiniLM/DPR encode passages
  # L2-normalised vectors (cosine, as all-MiniLM-L6-v2 was trained; its raw inner products retrieve poorly)
  # or the paper's raw inner product; with normalize, training logits are scale x cosine.
  r.normalize = False
  r.scale = 20.0
  r.hard_negatives = 1  # BM25 hard negatives per question, from the prepared candidates
  r.train_splits = ("nq_train", "squadshifts_train")  # prepared splits to train on
  r.max_train_questions = 0  # keep the first N trainable questions of each split; 0 = all
  # Evaluation splits: every evaluation encodes the corpus and exports the best parameters by select_metric.
  r.eval_splits = ("nq_dev", "squadshifts_dev")
  r.max_eval_questions = 0  # first N questions of each eval split; 0 = all
  r.eval_ks = (1, 5, 20, 100)
  r.select_metric = "mean/top20"  # '<split>/top<k>' or 'mean/top<k>': which eval picks the exported best
  r.subset = ""  # passage filter subset (train.filter's subset.npz) to evaluate over; "" = the whole corpus
  # Keep the passage vectors of the best evaluation in W/embeddings (the infer.encode layout), so the index
  # stage need not encode the corpus again.
  r.save_embeddings = False
  r.encode_batch_size = 64  # evaluation encoding batch (a multiple of the device count)
  r.init_checkpoint = ""  # start from another run's parameters (workdir or checkpoint path)
  if common.is_tiny(arg):
    common.make_tiny(c)
    r.encode_batch_size = 16
  return c
