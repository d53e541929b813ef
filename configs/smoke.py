"""The smoke pipeline: every stage of ``configs/mini.py``, with its topology and bundle settings, on a slice of the
data with tiny random-init models. Minutes on a 2-core CPU; checks the wiring, not accuracy.

  python -m train.pipeline --config configs/smoke.py --workdir W [--data_dir ../shared/data]
"""

from configs import mini
from configs.pipeline_common import pipeline_config, stage


def get_config(arg: str | None = None):
  del arg
  c = pipeline_config("smoke")
  shipped = mini.get_config()
  c.student = shipped.student
  c.bundle = shipped.bundle
  c.slice.questions = 24
  c.slice.distractors = 40
  c.prepare.holdout = shipped.prepare.holdout and 4
  c.prepare.compress = ()
  c.candidates_k = 20
  c.encode_batch_size = 16
  c.eval.top_k = 4
  c.eval.batch_size = 16
  steps = ("train.num_steps=4", "train.eval_every=100000", "train.ckpt_every=2", "optim.warmup_steps=0")
  c.stages.teacher_retriever = stage("configs/retriever.py:tiny", *steps, "retriever.shared=False",
                                     "model.retrieval_dim=0", "model.pooling='mean'", "retriever.normalize=True")
  c.stages.teacher_reader = stage("configs/reader.py:tiny", *steps, "train.eval_every=2", "reader.m=2", "reader.num_negatives=4",
                                  "reader.train_splits=('nq_train', 'squadshifts_train')", "train.batch_size=8",
                                  "reader.group_batches=2")
  c.stages.filter = stage("configs/filter.py:tiny", *steps, "filter.keep=0.5", "filter.val_negatives=16",
                          "filter.positive_splits=('nq_train', 'squadshifts_train')")
  pool = ("pool.train_splits=('nq_train', 'squadshifts_train')", "pool.k1=8", "eval.questions=8",
          "eval.passages=(1, 4)", "eval.ks=(1, 4)")
  c.stages.distill = stage("configs/distill.py:tiny", *steps, *pool, "distill.m=2", "distill.cache_batch_size=4",
                           "model.pooling='mean'", "unified.normalize=True", "distill.retrieval_loss='nll'",
                           "distill.in_batch=True")
  c.stages.finetune = stage("configs/finetune.py:tiny", *steps, *pool, "finetune.m=2")
  return c
