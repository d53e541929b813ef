"""Shared by the unified-model tests (``test_distill.py``, ``test_finetune.py``): a tiny retriever-reader, a random
unified batch, a cheap compile and a numpy KL reference."""

import jax
import numpy as np

from rnr_jax import qa_model
from rnr_jax.models import config_from_hf_dict

TINY_BERT = dict(model_type="bert", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                 layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tiny_model() -> qa_model.RetrieverReader:
  """A one-layer random-init retriever-reader without dropout (milliseconds per step)."""
  return qa_model.RetrieverReader(config_from_hf_dict(TINY_BERT), retrieval_dim=8)


def tiny_params(model: qa_model.RetrieverReader, batch, seed: int = 0):
  return model.init(jax.random.key(seed), {k: batch[k] for k in ENCODER_INPUTS})["params"]


def compiled(fn, *args):
  """``jax.jit(fn)`` compiled for ``args`` without XLA's backend optimisations (half the compile time)."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def random_batch(seed: int = 0, num_q: int = 2, m: int = 3, length: int = 12, q_len: int = 6, p_len: int = 8
                 ) -> dict[str, np.ndarray]:
  """A unified batch (:mod:`rnr_jax.pool`) of random tokens with span targets; question 1's last passage is
  padding."""
  rng = np.random.default_rng(seed)
  rows = num_q * m

  def inputs(n, length, real):
    ids = rng.integers(1, TINY_BERT["vocab_size"], (n, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.asarray(real)[:, None]).astype(np.int32)
    types = np.ones_like(ids) * (np.arange(length)[None, :] >= 4) * mask
    return ids * mask, mask, types.astype(np.int32)

  lengths = rng.integers(8, length + 1, rows)
  batch = dict(zip(ENCODER_INPUTS, inputs(rows, length, lengths)))
  batch["text_start"] = np.full(rows, 4, np.int32)
  batch["text_end"] = (lengths - 1).astype(np.int32)
  batch["passage_mask"] = np.ones((num_q, m), bool)
  batch["passage_mask"][1, -1] = False
  batch["text_end"][m * 2 - 1] = 4  # the padding passage has no text
  batch.update({f"q_{k}": v for k, v in zip(ENCODER_INPUTS, inputs(num_q, q_len, rng.integers(3, q_len + 1, num_q)))})
  batch["q_token_type_ids"] = np.zeros_like(batch["q_token_type_ids"])
  batch.update({f"p_{k}": v for k, v in zip(ENCODER_INPUTS, inputs(rows, p_len, rng.integers(3, p_len + 1, rows)))})
  batch["span_starts"] = np.tile(np.array([[5, 6], [4, 4]], np.int32), (num_q // 2, 1))
  batch["span_ends"] = np.tile(np.array([[5, 7], [6, 4]], np.int32), (num_q // 2, 1))
  batch["span_mask"] = np.tile(np.array([[True, True], [True, False]]), (num_q // 2, 1))
  return batch


def kl_numpy(teacher, student, temperature, mask):
  """Mean over rows with a True entry of KL(softmax(t/T) || softmax(s/T)) over the masked entries (float64)."""
  width = teacher.shape[-1]
  values = []
  for t, s, k in zip(np.reshape(teacher, (-1, width)), np.reshape(student, (-1, width)),
                     np.reshape(np.broadcast_to(mask, np.shape(teacher)), (-1, width))):
    if not k.any():
      continue
    t, s = t[k].astype(np.float64) / temperature, s[k].astype(np.float64) / temperature
    log_pt = t - t.max() - np.log(np.exp(t - t.max()).sum())
    log_ps = s - s.max() - np.log(np.exp(s - s.max()).sum())
    values.append(float((np.exp(log_pt) * (log_pt - log_ps)).sum()))
  return float(np.mean(values))


def log_softmax_numpy(x, mask):
  x = np.where(mask, np.asarray(x, np.float64), -np.inf)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
