"""The mini pipeline: the whole method on the shared data in about 70 minutes on a 2-core CPU (69.4 min measured).

  python -m train.pipeline --config configs/mini.py --workdir W [--data_dir ../shared/data]

The corpus and the dev sets stay whole (their EM compares across versions); training is cut to a few hundred
steps on a sample of the training questions, and models are CPU-sized: the teacher is all-MiniLM-L6-v2
(6 layers, 384 wide) as two retriever encoders and a reader. The student is ONE encoder that starts from the
teacher reader (``student_init="teacher_reader"``: its encoder and its span and ranking heads): a few hundred CPU
steps cannot teach a fresh encoder to read (a 3-layer MiniLM student with fresh heads kept 9% of the teacher's EM),
but they can teach a reader to retrieve with the first 128 dims of its mean-pooled output. There is no
retrieval-only stage (``student_retriever_stage=False``): distillation keeps the reading (KL to the teacher) while
it teaches retrieval, by the positive's NLL among all passages of the batch (the teacher's ranker is weak, so the
NLL rather than its KL) and the KL to the teacher retriever's scores, and Algorithm 1 finetunes both. The compression comes from
one encoder instead of three, int8 weights (``bundle.weights_dtype="int8"``), a 128-d INT8 index instead of a 384-d
float32 one, and the compressed token-ID corpus. The bundle retrieves by dense + 0.06 * BM25 (``bundle.lexical_weight``;
BM25 built at load from its own token ids, no bytes): the 128-d retrieval is the student's weak part, and SQuAD-style
questions share words with their passages. The passage filter keeps 90% of the passages: trained on the topics
of the training questions, it ranks passages of unseen articles low (at 50%, only a third of squadshifts_dev's
answer passages survive; the report's sweep shows every fraction). Mean pooling with cosine scores, because MiniLM
was pretrained that way and a few hundred steps cannot teach [CLS] pooling (the paper's choice,
``model.pooling=cls``); for the same reason passages use token type 0, as MiniLM was trained (the paper's type 1
needs longer training). With ``merge.enabled=True`` the finetuned student also gets half the task vector of a shared
128-d retriever trained on its own from MiniLM (merge stages, beyond the paper; the scale chosen on held-out training
questions): nq_dev EM 16.36 -> 17.03 in the paper's setting at session 5, 19.35 -> 19.77 with this config (session
13), the bundle unchanged; off by default (it added 40 min at session 7's batch sizes).
"""

from configs.pipeline_common import pipeline_config, stage

ENCODE_BATCH = 8  # rows per encoding batch on CPU (see get_config)


def get_config(arg: str | None = None):
  del arg
  c = pipeline_config("mini")
  c.eval.top_k = 5
  # EM of the DPR rule reads only the top passage; reading all five (m'=5) takes 3-4x longer per evaluation and
  # scores lower with this teacher's weak ranker (nq_dev EM 0.100 at m'=5 vs 0.204 at m'=1, session 2): among the
  # top 5 its ranking head picks an answer passage for 44% of nq_dev questions, retrieval order for 72% (session 17,
  # docs/benchmarks.md "The reader's ranker, a vote rule ...").
  c.eval.max_read = 1
  # Every matrix as int8 (per row / output unit; vectors float16): half the float16 bundle.
  c.bundle.weights_dtype = "int8"
  # INT8 codes with one scale per row (ScaNN INT8 brute force + exact reordering of the stored rows): recall@20
  # 0.993 vs exact float32 on this student's vectors, 0.988 with ScaNN's per-dimension scales ("int8").
  c.bundle.index_kind = "int8_row"
  # Hybrid retrieval (beyond the paper): dense + 0.06 * BM25, BM25 built at load from the bundle's token-ID passages.
  # 0.06 has the best mean top-1 over 500 held-out questions of each training split (their tails, which no student
  # stage trains on; the teacher's stages sample all training questions): nq 0.656 -> 0.694, squadshifts
  # 0.402 -> 0.698 (bench.hybrid_sweep, docs/benchmarks.md "Hybrid retrieval: BM25 fusion weight").
  c.bundle.lexical_weight = 0.06
  # Answer rule "fused" over the top 5 (beyond the paper: span logits + log Prank + log Pret; the DPR rule trusts
  # the weak ranker alone): on the same held-out questions EM 20.6 -> 23.6 (nq), 12.4 -> 12.2 (squadshifts) over the
  # DPR rule at m'=1 (docs/benchmarks.md "Answer rules").
  c.bundle.rule = "fused"
  c.bundle.max_read = 5
  # CPU speed (bench.bench_batch, docs/benchmarks.md "Batch size and length buckets on CPU"): XLA's CPU kernels run
  # a MiniLM forward 1.6x faster in batches of 8 than of 64 (the activations of a small batch stay in cache), 2.0x
  # with buckets every 32 tokens (mean padded passage length 119 -> 108 tokens), and a 12-row reader step 1.5x
  # faster as 2 accumulated micro-batches. So every corpus / question encoding runs ENCODE_BATCH rows at a time,
  # reading passes 8-10 rows, and the reader and finetuning steps accumulate gradients over micro-batches of 2
  # questions (exact: their losses are per question). The pipeline went from 148 to 69 min (docs/benchmarks.md
  # "Mini pipeline wall time"). On TPU / GPU keep larger batches (configs/common.py's defaults).
  c.encode_batch_size = ENCODE_BATCH
  c.common_overrides = ("tokens.buckets=(32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)",)
  retriever_common = ("model.pooling='mean'", "retriever.normalize=True", "retriever.scale=20.0",
                      "retriever.hard_negatives=1", "train.batch_size=16", "optim.lr=2e-5",
                      "train.eval_every=100000", "train.ckpt_every=50", "tokens.passage_len=256",
                      f"retriever.encode_batch_size={ENCODE_BATCH}")
  c.stages.teacher_retriever = stage(
      "configs/retriever.py", *retriever_common, "retriever.shared=False", "model.retrieval_dim=0",
      "retriever.passage_token_type=0", "train.num_steps=60", "optim.warmup_steps=6",
      "retriever.select_metric='mean/top20'")
  # The reader's span and ranking heads start random on MiniLM; at lr 5e-5 an Adam step moves a weight by ~5e-5, so
  # 500 steps leave them near their init. At 20x the encoder's rate (optim.head_lr_mult, lr 1e-3 for the heads) the
  # teacher's nq_dev EM goes 20.35 -> 22.34 and the finetuned student's, distilled from it, 16.86 -> 19.35
  # (docs/benchmarks.md "Reader heads' learning rate").
  c.stages.teacher_reader = stage(
      "configs/reader.py", "reader.m=3", "reader.num_negatives=20", "tokens.reader_len=192",
      "reader.train_splits=('nq_train', 'squadshifts_train')", "train.batch_size=4", "train.num_steps=500",
      "optim.lr=5e-5", "optim.warmup_steps=50", "train.eval_every=100000", "train.ckpt_every=100",
      "reader.eval_questions=200", "reader.eval_passages=(1, 5)", "reader.eval_batch_size=2",
      "optim.grad_accum=2", "optim.head_lr_mult=20")
  c.stages.filter = stage(
      "configs/filter.py", "model.num_layers=2", "model.pooling='mean'", "tokens.passage_len=128",
      "filter.positive_splits=('nq_train', 'squadshifts_train')", "filter.top_k=2", "filter.keep=0.9",
      "filter.val_negatives=3000", "filter.score_batch_size=16", "train.batch_size=18", "train.num_steps=150",
      "optim.lr=5e-5", "optim.warmup_steps=15", "train.eval_every=75", "train.ckpt_every=75")
  c.student_init = "teacher_reader"
  c.student_retriever_teacher = True
  c.stages.student_retriever = stage(
      "configs/retriever.py", *retriever_common, "retriever.shared=True", "model.retrieval_dim=128",
      "retriever.passage_token_type=0", "train.num_steps=200", "optim.lr=5e-5", "optim.warmup_steps=20",
      "retriever.select_metric='mean/top20'")
  pool = ("pool.train_splits=('nq_train', 'squadshifts_train')", "pool.max_train_questions=400", "pool.k1=50",
          "eval.questions=300", "eval.passages=(1, 5)", "eval.ks=(1, 5, 20)", "eval.keep_best=1",
          "tokens.reader_len=192", "train.batch_size=4", "train.eval_every=100000", "train.ckpt_every=50",
          f"pool.encode_batch_size={ENCODE_BATCH}", "eval.batch_size=2")
  # No retrieval-only stage: distillation starts from the teacher reader itself (its encoder and heads) and learns
  # retrieval under the reading KL, from the positive's NLL among all 32 passages of the batch and the teacher
  # retriever's scores over them (session 3: a retrieval-only stage first cut the student's EM given a correct
  # top-1 passage from 0.29 to 0.23, and the KD that followed did not win it back).
  c.student_retriever_stage = False
  c.stages.distill = stage("configs/distill.py", *pool, "model.pooling='mean'", "model.retrieval_dim=128",
                           "unified.normalize=True", "unified.passage_token_type=0", "tokens.passage_len=256",
                           "pool.max_train_questions=600", "distill.m=4", "distill.cache_batch_size=2",
                           "distill.retrieval_loss='nll'", "distill.in_batch=True", "train.batch_size=8",
                           "train.num_steps=150", "optim.lr=5e-5", "optim.warmup_steps=15")
  c.stages.finetune = stage("configs/finetune.py", *pool, "finetune.m=4", "train.num_steps=80", "optim.lr=2e-5",
                            "optim.grad_accum=2")
  # Beyond the paper: a weight-space merge of the finetuned student (rnr_jax.merge): part of the way back to MiniLM
  # (the teacher reader's start, so the student's too) and + a shared retriever's task vector, the pair of weights
  # chosen among merge.base_weights x merge.scales on the last 200 questions of each training split. The retriever
  # trains from MiniLM with the student's retrieval settings, 200 steps, no evaluation, never on those questions.
  # Off by default (--config.merge.enabled=True turns it on): measured with this config (docs/benchmarks.md
  # "Weight-space merge"), it lifts the unified student's nq_dev EM 16.36 -> 17.03 in the paper's setting (19.35 ->
  # 19.77 with this config's heads at 20x, session 13; a merge.soup of other students ties it), but the
  # bundle, which retrieves with BM25 fusion and answers by the fused rule, is unchanged within a few questions
  # (nq_dev 19.02 -> 18.94, squadshifts_dev 12.80 -> 13.02) while the stages add about 40 min.
  c.merge.enabled = False
  # The same retriever's task vector added to the student's init instead (merge.init_scale=1.0) gave a head start on
  # retrieval that was gone by step 20 of distillation, and nq_dev EM 18.27 vs 19.35 after finetuning
  # (docs/benchmarks.md "Retriever task vector at the student's init"): off.
  c.merge.init_scale = 0.0
  # Pulling back toward MiniLM (base_weights 0.25, 0.5) never beat base_weight 0 at the same scale in the 3 x 3 grid
  # on held-out questions (one tie; it buys retrieval, it costs reading), so the mini grid tries scales only.
  c.merge.base_weights = (0.0,)
  # 200 steps: a retriever trained 600 steps (42 min) gives a task vector that buys the same 5 nq_dev questions
  # (docs/benchmarks.md "A longer-trained merge retriever", session 14).
  c.stages.merge_retriever = stage(
      "configs/retriever.py", *retriever_common, "retriever.passage_token_type=0", "model.retrieval_dim=128",
      "train.num_steps=200", "optim.lr=5e-5", "optim.warmup_steps=20")
  return c
