"""The smoke pipeline: every stage of ``configs/mini.py`` on a slice of the data with tiny random-init models.

  python -m train.pipeline --config configs/smoke.py --workdir W [--data_dir ../shared/data]

Minutes on a 2-core CPU; exercised by ``tests/test_pipeline.py``. Checks the wiring, not accuracy.
"""

from configs.pipeline_common import pipeline_config, stage


def get_config(arg: str | None = None):
  del arg
  c = pipeline_config("smoke")
  c.slice.questions = 24
  c.slice.distractors = 40
  c.prepare.compress = ()
  c.student_init = "teacher_reader"  # as configs/mini.py: the student descends from the teacher reader
  c.student_retriever_teacher = True  # as configs/mini.py: it also distils the teacher retriever's scores
  c.bundle.index_kind = "int8_row"  # as configs/mini.py
  c.bundle.lexical_weight = 0.06  # as configs/mini.py
  c.bundle.rule, c.bundle.max_read = "fused", 5  # as configs/mini.py
  c.candidates_k = 20
  c.encode_batch_size = 16
  c.eval.top_k = 4
  c.eval.batch_size = 16
  steps = ("train.num_steps=4", "train.eval_every=100000", "train.ckpt_every=2", "optim.warmup_steps=0")
  c.stages.teacher_retriever = stage("configs/retriever.py:tiny", *steps, "retriever.shared=False",
                                     "model.retrieval_dim=0", "model.pooling='mean'", "retriever.normalize=True")
  c.stages.teacher_reader = stage("configs/reader.py:tiny", *steps, "reader.m=2", "reader.num_negatives=4",
                                  "reader.train_splits=('nq_train', 'squadshifts_train')", "train.batch_size=8")
  c.stages.filter = stage("configs/filter.py:tiny", *steps, "filter.keep=0.5", "filter.val_negatives=16",
                          "filter.positive_splits=('nq_train', 'squadshifts_train')")
  c.stages.student_retriever = stage("configs/retriever.py:tiny", *steps, "model.num_layers=1",
                                     "model.pooling='mean'")
  pool = ("pool.train_splits=('nq_train', 'squadshifts_train')", "pool.k1=8", "eval.questions=8",
          "eval.passages=(1, 4)", "eval.ks=(1, 4)", "eval.keep_best=1")
  c.student_retriever_stage = False  # as configs/mini.py: distillation starts from the teacher reader
  c.stages.distill = stage("configs/distill.py:tiny", *steps, *pool, "distill.m=2", "distill.cache_batch_size=4",
                           "model.pooling='mean'", "unified.normalize=True", "distill.retrieval_loss='nll'",
                           "distill.in_batch=True")
  c.stages.finetune = stage("configs/finetune.py:tiny", *steps, *pool, "finetune.m=2")
  # As configs/mini.py, the task-vector merge; random-init models share the teacher reader as their ancestor.
  c.merge.enabled = True
  c.merge.base = "teacher_reader"
  c.merge.base_weights = (0.0, 0.5)
  c.merge.scales = (0.0, 1.0)
  c.merge.select_questions = 8
  c.merge.select_k = 4
  c.merge.init_scale = 0.5  # the student also starts from the teacher reader + 0.5 x the retriever's task vector
  c.stages.merge_retriever = stage("configs/retriever.py:tiny", *steps, "model.pooling='mean'",
                                   "retriever.normalize=True")
  return c
