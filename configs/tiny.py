"""A tiny random-init BERT for tests and smoke runs (seconds on one CPU)."""

from configs import common


def get_config():
  c = common.base_config()
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
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.train.batch_size = 8
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.ckpt_every = 10
  c.train.async_ckpt = False
  return c
