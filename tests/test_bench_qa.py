"""The FLOP count behind bench.bench_qa's floor: a hand count, the model's kernels and XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import bench_qa
from rnr_jax.models import BertConfig
from rnr_jax.qa_model import RetrieverReader

TINY = {"model_type": "bert", "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2}


def test_encoder_flops_hand_count():
  # Per token per layer: 2 * (4 * 4^2 + 2 * 4 * 8) = 256; 3 tokens -> 768; attention 4 * 3^2 * 4 = 144.
  assert bench_qa.encoder_flops(TINY, 3) == 2 * (768 + 144)
  # Reader heads: start/end logits 2 * 3 * 4 * 2 = 48, rank logit 2 * 4 = 8.
  assert bench_qa.read_flops(TINY, 3) == 2 * (768 + 144) + 48 + 8


def test_encoder_flops_rejects_other_encoders():
  with pytest.raises(ValueError, match="BERT"):
    bench_qa.encoder_flops({**TINY, "model_type": "mobilebert"}, 3)


def test_read_flops_match_the_model():
  config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256, max_position_embeddings=32, hidden_act="relu")
  model = RetrieverReader(config, pooling="mean", retrieval_dim=16)
  length = 16
  batch = {k: jnp.ones((1, length), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch)["params"])
  # Every Dense kernel of the encoder layers and the heads is used once per token (the rank head once per row).
  kernels = {"/".join(str(getattr(k, "key", k)) for k in path): np.prod(leaf.shape)
             for path, leaf in jax.tree_util.tree_leaves_with_path(params) if str(path[-1].key) == "kernel"}
  per_token = sum(v for k, v in kernels.items() if "qa_classifier" not in k)
  attention = config.num_hidden_layers * 4 * length ** 2 * config.hidden_size
  expected = 2 * length * per_token + attention + 2 * kernels["qa_classifier/kernel"]
  hf = {"model_type": "bert", **{k: getattr(config, k) for k in ("hidden_size", "intermediate_size",
                                                                   "num_hidden_layers")}}
  assert bench_qa.read_flops(hf, length) == expected
  # XLA's count of the compiled read adds only the elementwise work (norms, softmax; ReLU, since erf-GELU alone
  # costs XLA ~20 FLOPs an element) on top.
  compiled = jax.jit(lambda p, b: model.apply({"params": p}, b, method="read")).lower(params, batch).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert expected <= xla <= 1.05 * expected
