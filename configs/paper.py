r"""The paper's recipe: NQ and DPR's 21M-passage Wikipedia on a TPU v4-32 slice (16 chips, 4 hosts).

  python -m train.pipeline --config configs/paper.py --workdir W --corpus psgs_w100.tsv \
      --questions nq_train=biencoder-nq-train.json nq_dev=nq-dev.qa.csv          # on every host of the slice
  python -m train.pipeline --config configs/paper.py:mobilebert=DIR,bert=DIR ...   # local weights
  python -m train.pipeline --config configs/paper.py:slice --workdir W              # every stage, tiny, minutes

Teacher: two BERT-base encoders (DPR) and a BERT-base reader with ranker (m = 24, 350 tokens). Passage filter
(§2.1, A.1), keeping 1,224,000 passages. Student (the ``paper`` topology): MobileBERT when its weights are given,
else the first 4 layers of BERT-base, one shared encoder retrieving with the first 128 dims of [CLS] (§2.2.1-2),
distilled from the reader (k1 = 200, m = 24, τ = 3, §2.2.3), then Algorithm 1 (§2.2.4). Bundle: INT8 index, FP16
weights, compressed token ids (§2.3). Hyperparameters are appendix A's; step counts follow its epochs for DPR's
58,880 filtered NQ training questions. Batches are global and split over the 16 chips (``mesh.shape = (-1, 1)``),
so every batch is a multiple of 16: the filter's 18 (9 + 9) becomes 32 (16 + 16).

Expected accelerator time on v4-32 (estimates, from 6 x parameters x tokens FLOPs per training token and 2 x for
inference, at 40% of the slice's 4.4 PFLOP/s bf16; not measured): teacher retriever 0.2 h of steps plus 0.2 h per
evaluation (4 x 21M-passage encodings), reader 0.9 h, filter 0.1 h training plus 0.2 h scoring 21M passages,
student retriever 0.05 h, teacher cache 0.2 h, distillation 1 h, iterative finetuning 0.6 h (two updates and three
passes per step), fresh-index evaluations 0.05 h each over the kept 1.2M passages: about 5 h in all. Host-side
work grows with the corpus (docs/scale.md): prepare takes about 6 CPU hours and 28 GB on one host; the teacher
retriever's candidates and each retrieval evaluation search 21M x 768 float32 vectors on the host (a 65 GB memory
map). Should reach about 35 EM on NQ dev after iterative finetuning (Table 4: 35.19).
"""

from configs.pipeline_common import pipeline_config, stage

NQ_TRAIN = 58_880  # DPR's filtered NQ training questions (Table 2)
CHIPS = 16  # TPU v4-32


def epochs(n: float, batch: int) -> int:
  """Steps of ``n`` epochs over the NQ training questions."""
  return int(n * NQ_TRAIN / batch)


def _args(arg: str | None) -> dict[str, str]:
  """``"slice"``, ``"mobilebert=DIR"``, ``"bert=DIR"``, comma-separated."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in ("slice", "mobilebert", "bert"):
      raise ValueError(f"unknown configs/paper.py argument {item!r}; expected slice, mobilebert=DIR, bert=DIR")
    out[key] = value
  return out


def get_config(arg: str | None = None):
  args = _args(arg)
  if "slice" in args:
    return slice_config(args)
  c = pipeline_config("paper")
  c.student = "paper"
  c.dev_splits = ("nq_dev",)
  c.candidates_k = 200  # the teacher retriever's top-200: the filter's J+train and J_read (k1)
  c.encode_batch_size = 1024
  c.eval.update(top_k=100, rule="dpr", max_read=0, batch_size=64)  # A.3: the best EM over m' = 1 .. 100
  # A.3: the submitted system scored answers by (1 - λ)(log Ps + log Pe) + 2λ log Prank, λ = 0.8.
  c.bundle.update(index_kind="int8", weights_dtype="float16", rule="weighted")
  c.common_overrides = ("mesh.distributed=True", "model.dtype='bfloat16'", "mesh.shape=(-1, 1)",
                        "train.keep_ckpts=2")
  bert = args.get("bert") or "bert-base-uncased"  # a Hugging Face id or directory
  nq = ("nq_train",)
  # DPR's bi-encoder (A.2 after Karpukhin et al.): lr 2e-5, warmup 1237, 1 positive + 127 in-batch negatives,
  # 256 tokens, 40 epochs; each evaluation encodes the whole corpus, so every 10 epochs.
  retriever = ("train.batch_size=128", "optim.lr=2e-5", "optim.warmup_steps=1237", "optim.clip_norm=2.0",
               "tokens.passage_len=256", f"train.num_steps={epochs(40, 128)}", f"train.eval_every={epochs(10, 128)}",
               f"train.ckpt_every={epochs(1, 128)}", "retriever.hard_negatives=1", f"retriever.train_splits={nq}",
               "retriever.eval_splits=('nq_dev',)", "retriever.select_metric='nq_dev/top20'",
               f"retriever.encode_batch_size={c.encode_batch_size}")
  c.stages.teacher_retriever = stage("configs/retriever.py", *retriever, f"model.init='{bert}'",
                                     "retriever.shared=False", "model.retrieval_dim=0", "model.pooling='cls'",
                                     "retriever.passage_token_type=0")
  # DPR's reader with ranker: m = 24 passages of 350 tokens, lr 1e-5, batch 16, 16 epochs.
  c.stages.teacher_reader = stage(
      "configs/reader.py", f"model.init='{bert}'", "reader.m=24", "tokens.reader_len=350", f"reader.train_splits={nq}",
      "reader.eval_split='nq_dev'", "train.batch_size=16", "optim.lr=1e-5", "optim.warmup_steps=0",
      f"train.num_steps={epochs(16, 16)}", "train.eval_every=2000", "train.ckpt_every=2000",
      "reader.eval_passages=(1, 10, 20, 50)", "reader.eval_batch_size=16")
  # A.1 (a RoBERTa-base classifier there; BERT-base here): lr 1e-5, warmup 1000, one epoch of positives
  # oversampled by log10(freq) + 1 from the top-200, evaluation every 2000 steps on 893 + 9107 passages.
  c.stages.filter = stage(
      "configs/filter.py", f"model.init='{bert}'", "tokens.passage_len=256", f"filter.positive_splits={nq}",
      "filter.top_k=200", "filter.log_base=10.0", "filter.val_split='nq_dev'", "filter.val_negatives=9107",
      "filter.keep=1224000", "filter.score_batch_size=1024", "train.batch_size=32", "train.num_steps=0",
      "filter.epochs=1.0", "optim.lr=1e-5", "optim.warmup_steps=1000", "train.eval_every=2000",
      "train.ckpt_every=2000")
  # §2.2.1-2: the lighter encoder shared by questions and passages, [CLS], the first 128 dims; DPR's recipe.
  light = (f"model.init='{args['mobilebert']}'",) if args.get("mobilebert") else (f"model.init='{bert}'",
                                                                                   "model.num_layers=4")
  c.stages.student_retriever = stage("configs/retriever.py", *retriever, *light, "retriever.shared=True",
                                     "model.retrieval_dim=128", "model.pooling='cls'",
                                     "retriever.passage_token_type=1")
  # A.2: k1 = 200, m = 24, lr 1e-5, no warmup, 350 tokens, batch 16, τ = 3, 16 epochs (A.5), evaluation every 2000
  # steps selecting the best mean EM over m' in {1, 10, ..., 50}. Four cached passage samples per question.
  pool = (f"pool.train_splits={nq}", "pool.k1=200", f"pool.encode_batch_size={c.encode_batch_size}",
          "eval.split='nq_dev'", "eval.passages=(1, 10, 20, 30, 40, 50)", "eval.select_metric='em_open_mean'",
          "eval.batch_size=16", "tokens.reader_len=350", "train.batch_size=16", "optim.lr=1e-5",
          "optim.warmup_steps=0", "train.eval_every=2000", "train.ckpt_every=2000")
  c.stages.distill = stage("configs/distill.py", *pool, "distill.m=24", "distill.temperature=3.0",
                           "distill.retrieval_loss='kd'", "distill.cache_samples=4", "distill.cache_batch_size=16",
                           f"train.num_steps={epochs(16, 16)}")
  # A.2: Algorithm 1 for at most six epochs, the rest as in distillation.
  c.stages.finetune = stage("configs/finetune.py", *pool, "finetune.m=24", "finetune.temperature=3.0",
                            f"train.num_steps={epochs(6, 16)}")
  return c


def slice_config(args: dict[str, str]):
  """Every stage of the recipe (topology, filter, k1/m/τ scaled down, INT8 index, FP16 weights) with tiny random-init
  models on a slice of the data: a CI check of the wiring on CPU, not of accuracy."""
  full = get_config(",".join(f"{k}={v}" if v else k for k, v in args.items() if k != "slice"))
  c = pipeline_config("paper_slice")
  c.student, c.bundle, c.eval.rule = full.student, full.bundle, full.eval.rule
  c.dev_splits = ("nq_dev",)
  c.slice.update(questions=24, distractors=40)
  c.prepare.compress = ()
  c.candidates_k = 20
  c.encode_batch_size = 16
  c.eval.update(top_k=4, batch_size=16)
  nq = ("nq_train",)
  # Mean pooling: a random-init encoder's [CLS] vector hardly depends on its input, so [CLS] would rank the same
  # passages for every question.
  steps = ("train.num_steps=4", "train.eval_every=100000", "train.ckpt_every=2", "optim.warmup_steps=0",
           "model.pooling='mean'")
  c.stages.teacher_retriever = stage("configs/retriever.py:tiny", *steps, "retriever.shared=False",
                                     "model.retrieval_dim=0", "retriever.passage_token_type=0",
                                     f"retriever.train_splits={nq}", "retriever.eval_splits=('nq_dev',)")
  c.stages.teacher_reader = stage("configs/reader.py:tiny", *steps, "reader.m=4", "reader.num_negatives=4",
                                  f"reader.train_splits={nq}", "train.batch_size=8")
  c.stages.filter = stage("configs/filter.py:tiny", *steps, "filter.keep=0.5", "filter.val_negatives=16",
                          "filter.top_k=20", f"filter.positive_splits={nq}")
  c.stages.student_retriever = stage("configs/retriever.py:tiny", *steps, "model.num_layers=1",
                                     "retriever.shared=True", "retriever.passage_token_type=1",
                                     f"retriever.train_splits={nq}", "retriever.eval_splits=('nq_dev',)")
  pool = (f"pool.train_splits={nq}", "pool.k1=8", "eval.split='nq_dev'", "eval.questions=8", "eval.passages=(1, 4)",
          "eval.ks=(1, 4)")
  c.stages.distill = stage("configs/distill.py:tiny", *steps, *pool, "distill.m=2", "distill.temperature=3.0",
                           "distill.retrieval_loss='kd'", "distill.cache_batch_size=4")
  c.stages.finetune = stage("configs/finetune.py:tiny", *steps, *pool, "finetune.m=2", "finetune.temperature=3.0")
  return c
