"""The encoder skeleton BERT and MobileBERT share: config base, :class:`Encoder` and common blocks.

A model supplies only its config, embeddings and layer module (:mod:`rnr_jax.models.bert`,
:mod:`rnr_jax.models.mobilebert`). Parameters are stored in ``param_dtype`` and matmuls run in ``dtype``; embedding
sums, residual additions before a norm, normalization statistics and the attention softmax are computed in float32."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

Dtype = Any  # anything jnp.dtype accepts (jnp.float32, jnp.bfloat16, "float32", ...)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))  # sqrt(2 / pi)


# Activations named like transformers' ``ACT2FN`` keys (the parameter-free ones).
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
  **dict.fromkeys(("gelu", "gelu_python"), lambda x: jax.nn.gelu(x, approximate=False)),
  **dict.fromkeys(("gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh", "gelu_python_tanh"), _gelu_tanh),
  "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "relu2": lambda x: jnp.square(jax.nn.relu(x)),
  "relu6": jax.nn.relu6,
  "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
  **dict.fromkeys(("silu", "swish"), jax.nn.silu),
  "hardswish": jax.nn.hard_swish,
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "sigmoid": jax.nn.sigmoid,
  "tanh": jnp.tanh,
  "linear": lambda x: x,
}

NORM_TYPES = ("layer_norm", "no_norm")


@dataclasses.dataclass(frozen=True)
class HFEncoderConfig:
  """Fields the encoder configs share (transformers keys, ``BertConfig`` defaults) and ``config.json`` conversion;
  subclasses set ``model_type`` (as in ``config.json``) and ``architecture`` (the transformers class)."""

  model_type: ClassVar[str]
  architecture: ClassVar[str]

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0

  def __post_init__(self) -> None:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def norm_kind(self) -> str:
    """The :class:`Norm` kind of every norm in the encoder."""
    return "layer_norm"

  @property
  def true_hidden_size(self) -> int:
    """Width inside a layer (attention and FFN outputs)."""
    return self.hidden_size

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> Self:
    """The config of a transformers config dict; unused keys are ignored, another ``model_type`` raises."""
    model_type = d.get("model_type", cls.model_type)
    if model_type != cls.model_type:
      raise ValueError(f"{cls.__name__} expects model_type={cls.model_type!r}, got {model_type!r}")
    cls._check_supported(d)
    names = {f.name for f in dataclasses.fields(cls)}
    if ignored := sorted(set(d) - names - {"model_type"}):
      logger.debug("%s.from_hf_dict ignores keys %s", cls.__name__, ignored)
    return cls(**{k: d[k] for k in names if k in d})

  @classmethod
  def _check_supported(cls, d: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for transformers settings this encoder does not implement."""

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers ``config.json`` dict."""
    return {"model_type": self.model_type, "architectures": [self.architecture], **dataclasses.asdict(self)}


class EncoderOutput(NamedTuple):
  """The final hidden states ``[B, L, H]`` and the [CLS] (first position) vector ``[B, H]``."""

  sequence: jax.Array
  cls: jax.Array


def resolve_num_layers(num_hidden_layers: int, num_layers: int | None) -> int:
  """The number of layers an encoder keeps: all of them, or the first ``num_layers``."""
  if num_layers is None:
    return num_hidden_layers
  if not 1 <= num_layers <= num_hidden_layers:
    raise ValueError(f"num_layers must be in [1, {num_hidden_layers}], got {num_layers}")
  return num_layers


class Norm(nn.Module):
  """LayerNorm (biased variance, as torch) or MobileBERT's NoNorm (``x * scale + bias``), computed in float32."""

  kind: str = "layer_norm"
  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    if self.kind == "layer_norm":
      centered = x - jnp.mean(x, axis=-1, keepdims=True)
      variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
      x = centered * jax.lax.rsqrt(variance + self.eps)
    elif self.kind != "no_norm":
      raise ValueError(f"unknown normalization kind {self.kind!r}; expected one of {NORM_TYPES}")
    return (x * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ConfigModule(nn.Module):
  """Base of the modules built from an encoder config; its factories apply the config's init, norm and dtypes."""

  config: HFEncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def child(self, cls: type[ConfigModule], name: str, **fields: Any) -> Any:
    return cls(self.config, self.dtype, self.param_dtype, name=name, **fields)

  def dense(self, features: int, name: str) -> nn.Dense:
    init = nn.initializers.normal(self.config.initializer_range)
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name)

  def norm(self, eps: float, name: str = "layer_norm") -> Norm:
    return Norm(self.config.norm_kind, eps, self.dtype, self.param_dtype, name=name)

  def feed_forward(self, x: jax.Array, dropout_rate: float, *, deterministic: bool) -> jax.Array:
    """The FFN ``output(activation(intermediate(x)), residual=x)``."""
    h = self.child(Intermediate, "intermediate")(x)
    return self.child(ResidualProjection, "output", dropout_rate=dropout_rate)(h, x, deterministic=deterministic)


class ResidualProjection(ConfigModule):
  """``norm(dropout(dense(x)) + residual)`` to the residual's width, the sum in float32."""

  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
    y = self.dense(residual.shape[-1], "dense")(x)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = y.astype(jnp.float32) + residual.astype(jnp.float32)
    return self.norm(self.config.layer_norm_eps)(y)


class Intermediate(ConfigModule):
  """``activation(dense(x))`` to ``intermediate_size``."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.config.hidden_act](self.dense(self.config.intermediate_size, "dense")(x))


class Attention(ConfigModule):
  """Multi-head attention (query, key, value may differ: MobileBERT bottlenecks), then ``output`` with ``residual``."""

  output_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, residual: jax.Array, mask: jax.Array | None,
               *, deterministic: bool) -> jax.Array:
    c = self.config
    head_dim = c.true_hidden_size // c.num_attention_heads
    width = c.num_attention_heads * head_dim

    def project(x: jax.Array, name: str) -> jax.Array:  # [B, L, in] -> [B, heads, L, head_dim]
      y = self.dense(width, name)(x)
      return y.reshape(*y.shape[:-1], c.num_attention_heads, head_dim).swapaxes(-2, -3)

    # Heads are moved in front of the sequence axis before the two batched matmuls:
    # XLA's CPU backend runs `bqnd,bknd->bnqk` einsums without that layout ~3x slower
    # at 256 tokens (bench/bench_encoder.py).
    q = project(query, "query") * jnp.asarray(head_dim**-0.5, self.dtype)
    k = project(key, "key")
    v = project(value, "value")
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.matmul(probs.astype(v.dtype), v).swapaxes(-2, -3)
    context = context.reshape(*context.shape[:-2], width)
    output = self.child(ResidualProjection, "output", dropout_rate=self.output_dropout_rate)
    return output(context, residual, deterministic=deterministic)


class Embeddings(ConfigModule):
  """Word vectors (:meth:`words`) + absolute position + token type embeddings, summed in float32, norm, dropout."""

  def embed(self, num: int, features: int, name: str) -> nn.Embed:
    init = nn.initializers.normal(self.config.initializer_range)
    return nn.Embed(num, features, dtype=self.param_dtype, param_dtype=self.param_dtype, embedding_init=init, name=name)

  def words(self, input_ids: jax.Array) -> jax.Array:
    raise NotImplementedError

  def norm_eps(self) -> float:
    return self.config.layer_norm_eps

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool) -> jax.Array:
    c = self.config
    x = self.words(input_ids).astype(jnp.float32)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = x + self.embed(c.max_position_embeddings, c.hidden_size, "position_embeddings")(positions).astype(jnp.float32)
    x = x + self.embed(c.type_vocab_size, c.hidden_size, "token_type_embeddings")(token_type_ids).astype(jnp.float32)
    x = self.norm(self.norm_eps())(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class Encoder(ConfigModule):
  """``embeddings_class`` named ``embeddings``, then ``layer_class`` as ``layer_0`` ... ``layer_{n-1}``; ``dtype``
  computes (and outputs), ``param_dtype`` stores; ``num_layers`` keeps only the first layers (``None``: all)."""

  embeddings_class: ClassVar[type[Embeddings]]
  layer_class: ClassVar[type[ConfigModule]]  # (x, mask, *, deterministic) -> next hidden states

  num_layers: int | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, deterministic: bool = True) -> EncoderOutput:
    """Encodes ``input_ids`` ``[B, L]`` (mask: 1 real, 0 padding); dropout needs ``rngs={"dropout": key}``."""
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings={c.max_position_embeddings}")
    for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if x is not None and x.shape != input_ids.shape:
        raise ValueError(f"{name} shape {x.shape} differs from input_ids shape {input_ids.shape}")
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.child(self.embeddings_class, "embeddings")(input_ids, token_type_ids, deterministic=deterministic)
    for i in range(resolve_num_layers(c.num_hidden_layers, self.num_layers)):
      x = self.child(self.layer_class, f"layer_{i}")(x, mask, deterministic=deterministic)
    return EncoderOutput(sequence=x, cls=x[:, 0])
