"""Distilling the reader teacher into the unified retriever-reader (paper §2.2.3, appendix A.2).

  python -m train.distill --config configs/distill.py --workdir W --config.distill.teacher=READER/best \
      --config.unified.init_retriever=RETRIEVER/best --config.pool.retriever=RETRIEVER/best
  python -m train.distill --config configs/distill.py:tiny --workdir W ...   # seconds: random-init tiny BERT

Appendix A.2: J_read = the top k1 = 200 passages of the teacher's retriever, m = 24 passages per question, lr 1e-5,
clipping at norm 2.0, no warmup, reader inputs of 350 tokens, batch 16, τ = 3, evaluation every 2000 steps and the
checkpoint of the best mean EM over m' in {1, 10, 20, 30, 40, 50} read passages. :func:`pool_config` and
:func:`eval_config` are shared with ``configs/finetune.py``.
"""

import ml_collections

from configs import common


def pool_config() -> ml_collections.ConfigDict:
  """The candidate pool J_read of the training questions."""
  p = ml_collections.ConfigDict()
  p.train_splits = ("nq_train",)
  p.max_train_questions = 0  # first N trainable questions of each split; 0 = all
  # Where J_read comes from (one of): a ranked candidates file (.npz, {split: int32 [Q, k]}, rnr_jax.reader_data),
  # an exported retriever (its top k1 over the whole corpus, computed once into W/pool.npz), or, with both
  # empty, the prepared BM25 candidates.
  p.candidates = ""
  p.retriever = ""
  p.k1 = 200  # passages per question in J_read
  p.positives = "gold_article"  # as reader.positives (configs/reader.py)
  # Passage filter subset (train.filter's subset.npz): fresh indexes (evaluation, a pool retriever's search) hold
  # only its passages, as the deployed system will. "" = the whole corpus.
  p.subset = ""
  p.encode_batch_size = 64  # passages / questions per encoding batch (fresh indexes, the pool's retriever)
  return p


def eval_config() -> ml_collections.ConfigDict:
  """Dev evaluation with a fresh index of the corpus encoded by the current student."""
  e = ml_collections.ConfigDict()
  e.split = "nq_dev"
  e.questions = 0  # first N dev questions; 0 = all
  e.passages = (1, 10, 20, 30, 40, 50)  # m': read the top m' retrieved passages
  e.ks = (1, 5, 20, 100)  # retrieval accuracy top-k of the fresh index
  e.batch_size = 8  # questions per reading pass (x max m' rows)
  e.answer_rule = "dpr"  # "dpr" (best span of the top-ranked passage) or "weighted" (appendix A.3)
  # em_open_mean (mean over m', appendix A.2), em_open (best over m', A.3), em_open@<m'> or top<k>.
  e.select_metric = "em_open_mean"
  return e


def make_tiny_unified(c: ml_collections.ConfigDict) -> None:
  """The seconds-long setting of a unified-model stage (distillation, finetuning): tiny model, pool and eval."""
  common.make_tiny(c)
  c.pool.k1 = 20
  c.pool.encode_batch_size = 16
  c.eval.passages = (1, 4)
  c.eval.ks = (1, 4)
  c.eval.questions = 16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: none for the paper's setting, "tiny" for a seconds-long random-init run."""
  c = common.base_config()
  u = c.unified = ml_collections.ConfigDict()
  # Exported shared-encoder retriever (train.retriever, §2.2.2) the student starts from, with fresh reader heads:
  # its encoder weights, architecture, pooling, retrieval_dim, normalize and passage token type (model.* of this
  # config are then unused but model.dropout). "" = model.init (an exported reader gives its encoder and heads)
  # with the settings below.
  u.init_retriever = ""
  u.normalize = False  # without init_retriever: cosine retrieval scores (x scale) instead of inner products
  u.passage_token_type = 1  # without init_retriever: token type of passage inputs (questions: 0)
  u.scale = 20.0  # training scores are scale x cosine when the retriever normalises
  c.pool = pool_config()
  d = c.distill = ml_collections.ConfigDict()
  d.teacher = ""  # exported reader teacher (train.reader's W/best), required
  d.m = 24  # passages per question: one positive first, then m - 1 answer-free ones
  d.temperature = 3.0  # τ of every KL term
  d.retrieval_loss = "kd"  # "kd": KL to the teacher ranker's m scores (A.2); "nll": NLL of the positive
  # Beyond the paper: the "nll" retrieval loss over every passage of the batch (other questions' passages as
  # negatives) instead of the question's own m.
  d.in_batch = False
  # Beyond the paper: also distil a teacher *retriever*'s scores into the student's retrieval scores (KL over the
  # batch's passages, all of them with in_batch): an exported retriever (e.g. the teacher system's two-encoder
  # retriever) and its corpus embeddings (infer.encode's layout). "" = none.
  d.retriever_teacher = ""
  d.retriever_teacher_embeddings = ""
  d.retriever_teacher_weight = 1.0
  # Passage samples per question whose teacher outputs are cached (epoch e reads sample e mod S); the cache
  # holds S x questions x m x reader_len float16 start and end logits.
  d.cache_samples = 1
  d.cache_batch_size = 8  # questions per teacher call while caching (x m rows)
  c.eval = eval_config()

  common.schedule(c, lr=1e-5, warmup_steps=0, batch_size=16, num_steps=60000, every=2000)

  if common.is_tiny(arg):
    make_tiny_unified(c)
    c.distill.m = 4
    c.distill.cache_batch_size = 2
  return c
