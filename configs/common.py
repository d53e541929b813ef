"""Every field a stage can read, with the paper's defaults (appendix A).

Config files return ``base_config()`` with changes; the command line overrides
any field: ``--config configs/retriever.py --config.optim.lr=1e-5``.
"""

import os

import ml_collections

from rnr_jax.training import optim


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Our jsonl files (corpus.jsonl, *_train.jsonl, *_dev.jsonl); a flag or RNR_DATA.
  c.data_dir = os.environ.get("RNR_DATA", "../shared/data")
  c.prepared_dir = ""  # default: <workdir>/prepared

  c.model = ml_collections.ConfigDict()
  # Hugging Face directory or hub id of the initial encoder; "minilm" = the installed
  # all-MiniLM-L6-v2; an exported reader (train.reader's W/best: its encoder, e.g. to start the student from the
  # teacher); "" = random init from model.hf_config.
  c.model.init = "minilm"
  c.model.hf_config = ml_collections.ConfigDict()  # used when init == "" (random init)
  c.model.num_layers = ml_collections.FieldReference(None, field_type=int)  # truncate to k layers
  c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU, float32 on CPU
  c.model.dropout = 0.1
  c.model.pooling = "cls"  # "cls" (the paper) or "mean" (how MiniLM was pretrained)
  c.model.retrieval_dim = 128  # first d dims of the pooled vector; 0 = full width

  c.tokens = ml_collections.ConfigDict()
  c.tokens.question_len = 64
  c.tokens.passage_len = 256
  c.tokens.reader_len = 350
  c.tokens.max_answer_len = 10
  c.tokens.buckets = (32, 64, 128, 192, 256, 320, 384, 512)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)
  c.mesh.axes = ("data", "fsdp")
  # (regex on the parameter path, PartitionSpec entries); first match wins, default replicated.
  # Paths as in rnr_jax.models (e.g. layer_0/attention/query/kernel); regexes are full matches.
  c.mesh.rules = (
      (r".*word_embeddings/embedding", ("fsdp", None)),
      (r".*/output/dense/kernel", ("fsdp", None)),
      (r".*/(query|key|value)/kernel", (None, "fsdp")),
      (r".*/intermediate/dense/kernel", (None, "fsdp")),
  )
  c.mesh.distributed = False  # call jax.distributed.initialize() (multi-host)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 2.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = "linear"
  c.optim.grad_accum = 1
  # Learning-rate multiplier of the task heads (optim.head_regex: by default the reader's span and ranking layers).
  c.optim.head_lr_mult = 1.0
  c.optim.head_regex = optim.HEAD_REGEX

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16
  c.train.num_steps = 1000
  c.train.log_every = 20
  c.train.eval_every = 500
  # Also evaluate the starting parameters, as step 0, so a learning curve starts where training does.
  c.train.eval_at_start = False
  c.train.ckpt_every = 500
  c.train.keep_ckpts = 2
  c.train.async_ckpt = True
  c.train.seed = 0
  # PRNG of dropout and init: "threefry2x32" (JAX default) or "rbg" (XLA RngBitGenerator; faster on CPU).
  c.train.rng_impl = "threefry2x32"
  c.train.tensorboard = True  # event files in W/tensorboard (`tensorboard --logdir W`)
  c.train.wandb = ""  # a Weights & Biases project to log to as well (needs `pip install wandb`); "" = none
  c.train.profile_steps = ()  # (first, last): a jax.profiler trace of those steps in W/profile (view with xprof)
  return c


def is_tiny(arg: str | None) -> bool:
  """Whether a config file's argument (``configs/x.py:tiny``) asks for the seconds-long random-init setting."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; expected 'tiny' or none")
  return arg == "tiny"


def schedule(c: ml_collections.ConfigDict, *, lr: float, warmup_steps: int, batch_size: int, num_steps: int,
             every: int) -> None:
  """A stage's training length: peak learning rate and warmup, global batch, steps, and every how many steps it
  evaluates and checkpoints."""
  c.optim.lr, c.optim.warmup_steps = lr, warmup_steps
  c.train.batch_size, c.train.num_steps = batch_size, num_steps
  c.train.eval_every = c.train.ckpt_every = every


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a config into a seconds-long one: random-init 2-layer BERT, short inputs, few steps."""
  c.model.init = ""
  c.model.hf_config = dict(
      model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
      type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
  c.model.retrieval_dim = 16
  c.tokens.question_len = 32
  c.tokens.passage_len = 64
  c.tokens.reader_len = 96
  c.tokens.buckets = (32, 64, 96)
  schedule(c, lr=1e-3, warmup_steps=2, batch_size=8, num_steps=20, every=10)
  c.train.log_every = 5
  c.train.async_ckpt = False
  return c
