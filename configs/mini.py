"""The mini pipeline: the whole method on the shared data; 93 minutes measured on a 2-core CPU (docs/pipeline.md).

  python -m train.pipeline --config configs/mini.py --workdir W [--data_dir ../shared/data]

The corpus and the dev sets stay whole; training is cut to a few hundred steps on a sample of the training
questions, and models are CPU-sized: the teacher is all-MiniLM-L6-v2 (6 layers, 384 wide) as two retriever encoders
and a reader. The student is one encoder that starts from the teacher reader (``from_teacher_reader``): a few
hundred CPU steps cannot teach a fresh encoder to read, but they can teach a reader to retrieve with the first 128
dims of its mean-pooled output. Compression: one encoder instead of three, int8 weights, a 128-d INT8 index and
the compressed token-ID corpus. The teacher reader, which the student inherits, trains longest of all stages; its
held-out EM climbs over its 4,800 training questions (learning curve in docs/results.md). No stage uses dropout.
"""

from configs.pipeline_common import pipeline_config, stage

ENCODE_BATCH = 8  # rows per encoding batch on CPU (see get_config)
BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)


def get_config(arg: str | None = None):
  del arg
  c = pipeline_config("mini")
  c.student = "from_teacher_reader"
  # The last 400 questions of each training split are never trained on: the trainers evaluate on them and the
  # bundle's m' is chosen on them, so no setting is chosen on the dev sets.
  c.prepare.holdout = 400
  # The distilled student goes straight into finetuning: evaluating it on its own would encode the kept passages a
  # third time (~12 minutes with its evaluation) for a report row no later stage reads. Its curve on held-out
  # questions is in docs/pipeline.md.
  c.eval_distilled = False
  c.eval.top_k = 5
  # EM reads the top passage only: this teacher's ranker picks an answer passage less often than retrieval order
  # does, so m' > 1 costs reading time and EM (docs/reading.md).
  c.eval.max_read = 1
  c.bundle.weights_dtype = "int8"  # every matrix as int8 per row / output unit, vectors float16
  # INT8 codes with one scale per row, ScaNN INT8 brute force plus exact reordering of the stored rows.
  c.bundle.index_kind = "int8_row"
  # Dense + 0.06 * BM25 (BM25 built at load from the bundle's token-ID passages, no bundle bytes): the 128-d
  # retrieval is the student's weak part, and SQuAD-style questions share words with their passages. 0.06 has the
  # best mean top-1 on held-out training questions (bench.hybrid_sweep, docs/retrieval.md).
  c.bundle.lexical_weight = 0.06
  # The fused answer rule over the top 5 (span logits + log Prank + log Pret), chosen on the same held-out
  # questions (bench.answer_rules, docs/reading.md).
  c.bundle.rule = "fused"
  c.bundle.max_read = 5
  # XLA's CPU kernels run these encoders faster on small batches (activations stay in cache) and with fine length
  # buckets, so encoding runs ENCODE_BATCH rows at a time, reading passes 8-10 rows, and the reader and finetuning
  # steps accumulate gradients over micro-batches of 2 questions (bench.bench_batch, docs/speed.md). On TPU or GPU
  # keep the larger defaults of configs/common.py.
  c.encode_batch_size = ENCODE_BATCH
  # Answers of at most 20 tokens: 91.5% of nq_train's and 99.7% of squadshifts_train's questions have one (QED's
  # NQ answers are long; at 10 tokens, 81.1%), so fewer questions go without a span target or an exact match
  # (bench.answer_lengths, docs/reading.md).
  # No dropout: no stage sees a training example twice (the teacher reader reads 4,800 of 13,222 questions, the
  # others fewer), so there is no repetition to regularise against, and its masks slow a CPU step (docs/speed.md).
  # On held-out questions the teacher reader without it reads better at both evaluations of a paired run, on the same
  # batches (docs/pipeline.md).
  c.common_overrides = (f"tokens.buckets={BUCKETS}", "tokens.max_answer_len=20", "model.dropout=0.0")
  retriever_common = ("model.pooling='mean'", "retriever.normalize=True", "retriever.scale=20.0",
                      "retriever.hard_negatives=1", "train.batch_size=16", "optim.lr=2e-5",
                      "train.eval_every=100000", "train.ckpt_every=50", "tokens.passage_len=256",
                      f"retriever.encode_batch_size={ENCODE_BATCH}")
  # Mean pooling with cosine scores and passages of token type 0, as MiniLM was pretrained; a few hundred steps
  # cannot move it to the paper's [CLS] pooling and passage type 1. Top-20 picks the exported step; the pipeline
  # measures it on nq_holdout. 20 steps: by then its learning curve has its SQuADShifts top-1 (what the teacher
  # system reads) at the step-40 value, and it never moves NQ (docs/pipeline.md). Its question encoder encodes
  # every question of every split (~20,000: the candidates and the teacher systems' evaluations), most of them
  # under 16 tokens, so they get a 16-token bucket.
  c.stages.teacher_retriever = stage(
      "configs/retriever.py", *retriever_common, "retriever.shared=False", "model.retrieval_dim=0",
      "retriever.passage_token_type=0", "train.num_steps=20", "optim.warmup_steps=2",
      "retriever.select_metric='mean/top20'", f"tokens.buckets={(16, *BUCKETS)}")
  # Held-out EM reading the gold passage climbs steeply to ~2,400 training questions (docs/pipeline.md, learning
  # curves), so the reader gets 1,200 steps x 4 questions, the most training minutes of any stage, at m=2 (the
  # positive and one hard negative): the system reads only the top passage, and a row spent on the ranker's
  # negatives is a question not read. Measured on held-out questions, 1,200 steps read 3 points more than 800
  # steps (at step 800 the longer schedule still has a high learning rate and has already passed the shorter one)
  # for ~7 more minutes (1.0 s a step in the report's run, docs/pipeline.md).
  # The heads start random on MiniLM; at 20x the encoder's learning rate (optim.head_lr_mult) they leave their
  # initialisation early (docs/reading.md). Evaluated on 300 held-out questions every 400 steps: the learning curve.
  # Batches group questions of similar row lengths (runs of 50 batches sorted): random batches of 4 pad their rows
  # to 1.54x their tokens, grouped ones to 1.33x, and a step takes ~9% less time (docs/speed.md).
  c.stages.teacher_reader = stage(
      "configs/reader.py", "reader.m=2", "reader.num_negatives=20", "tokens.reader_len=192",
      "reader.train_splits=('nq_train', 'squadshifts_train')", "train.batch_size=4", "train.num_steps=1200",
      "optim.lr=5e-5", "optim.warmup_steps=100", "train.eval_every=400", "train.ckpt_every=400",
      "reader.eval_questions=300", "reader.eval_passages=(1,)", "reader.eval_batch_size=2",
      "optim.grad_accum=2", "optim.head_lr_mult=20", "reader.group_batches=50")
  # Keeps 95% of the passages. Trained on the topics of the training questions, the filter ranks passages of
  # unseen articles low: at 90% kept, 4.3% of nq_holdout's and 11.1% of squadshifts_holdout's questions lose every
  # answer-holding passage; at 95%, 2.0% and 3.5% (the report's sweep, held-out splits first). 75 steps: its
  # held-out hit rate is flat from there (learning curve, docs/pipeline.md).
  c.stages.filter = stage(
      "configs/filter.py", "model.num_layers=2", "model.pooling='mean'", "tokens.passage_len=128",
      "filter.positive_splits=('nq_train', 'squadshifts_train')", "filter.top_k=2", "filter.keep=0.95",
      "filter.val_negatives=3000", "filter.score_batch_size=16", "train.batch_size=18", "train.num_steps=75",
      "optim.lr=5e-5", "optim.warmup_steps=8", "train.eval_every=75", "train.ckpt_every=75")
  pool = ("pool.train_splits=('nq_train', 'squadshifts_train')", "pool.max_train_questions=200", "pool.k1=50",
          "eval.questions=300", "eval.passages=(1, 5)", "eval.ks=(1, 5, 20)",
          "tokens.reader_len=192", "train.batch_size=4", "train.eval_every=100000", "train.ckpt_every=50",
          f"pool.encode_batch_size={ENCODE_BATCH}", "eval.batch_size=2")
  # Retrieval is learnt here: the positive's NLL among all 32 passages of the batch (the teacher's ranker is too
  # weak for the paper's KL to it) plus the KL to the teacher retriever's scores over them. Distillation and
  # finetuning steps follow their learning curves (docs/pipeline.md): distillation's retrieval is flat from step 50
  # and its EM within noise from step 25: 50 steps read each of the pool's 400 questions (200 per split) once, and
  # the teacher cache holds no question distillation skips. Finetuning's EM over the top five peaks at step 40.
  c.stages.distill = stage("configs/distill.py", *pool, "model.pooling='mean'", "model.retrieval_dim=128",
                           "unified.normalize=True", "unified.passage_token_type=0", "tokens.passage_len=256",
                           "distill.m=4", "distill.cache_batch_size=2",
                           "distill.retrieval_loss='nll'", "distill.in_batch=True", "train.batch_size=8",
                           "train.num_steps=50", "optim.lr=5e-5", "optim.warmup_steps=5")
  c.stages.finetune = stage("configs/finetune.py", *pool, "finetune.m=4", "train.num_steps=40", "optim.lr=2e-5",
                            "optim.grad_accum=2")
  return c
