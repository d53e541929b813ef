"""The encoder skeleton BERT and MobileBERT share: config base, :class:`Encoder` and common blocks.

An encoder checks its inputs, embeds them (``embeddings``), runs ``layer_0`` ...
``layer_{n-1}`` and returns an :class:`EncoderOutput`; a model supplies only its
config, embeddings and layer modules (:mod:`rnr_jax.models.bert`, :mod:`rnr_jax.models.mobilebert`).

Numerics: parameters are stored in ``param_dtype`` and matmuls run in ``dtype``
(e.g. bf16 compute with f32 params). Embedding sums, residual additions before a
norm, normalization statistics and the attention softmax are computed in float32.
"""

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

_SQRT_2_OVER_PI = 0.7978845608028654


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


# Activations named like transformers' ``ACT2FN`` keys (the parameter-free ones).
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": _gelu_tanh,
  "gelu_fast": _gelu_tanh,
  "gelu_accurate": _gelu_tanh,
  "gelu_pytorch_tanh": _gelu_tanh,
  "gelu_python_tanh": _gelu_tanh,
  "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "relu2": lambda x: jnp.square(jax.nn.relu(x)),
  "relu6": jax.nn.relu6,
  "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "hardswish": jax.nn.hard_swish,
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "sigmoid": jax.nn.sigmoid,
  "tanh": jnp.tanh,
  "linear": lambda x: x,
}

NORM_TYPES = ("layer_norm", "no_norm")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class HFEncoderConfig:
  """Base of the encoder configs: the fields they share and conversion from/to a transformers ``config.json`` dict.

  Field names are the transformers config keys, with ``transformers.BertConfig``'s
  defaults. Subclasses add their own fields (and may change defaults), and set
  ``model_type`` (the ``config.json`` ``model_type``) and ``architecture`` (the
  transformers class that loads the converted weights).
  """

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
    for name in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
      "max_position_embeddings",
      "type_vocab_size",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def norm_kind(self) -> str:
    """The :class:`Norm` kind of every norm in the encoder."""
    return "layer_norm"

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> Self:
    """Builds the config from a transformers config dict (e.g. a parsed ``config.json``).

    Keys the encoder does not use (``architectures``, ``id2label``, ``use_cache``...)
    are ignored; a ``model_type`` other than this class's raises ``ValueError``.
    """
    model_type = d.get("model_type", cls.model_type)
    if model_type != cls.model_type:
      raise ValueError(f"{cls.__name__} expects model_type={cls.model_type!r}, got {model_type!r}")
    cls._check_supported(d)
    names = {f.name for f in dataclasses.fields(cls)}
    ignored = sorted(set(d) - names - {"model_type"})
    if ignored:
      logger.debug("%s.from_hf_dict ignores keys %s", cls.__name__, ignored)
    return cls(**{k: d[k] for k in names if k in d})

  @classmethod
  def _check_supported(cls, d: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for transformers settings this encoder does not implement."""

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers ``config.json`` dict (``model_type``, ``architectures`` and all fields)."""
    return {"model_type": self.model_type, "architectures": [self.architecture], **dataclasses.asdict(self)}


# --------------------------------------------------------------------------- inputs and outputs


class EncoderOutput(NamedTuple):
  """Encoder outputs: the final hidden states and the [CLS] (first position) vector."""

  sequence: jax.Array  # [batch, length, hidden]
  cls: jax.Array  # [batch, hidden]


def resolve_num_layers(num_hidden_layers: int, num_layers: int | None) -> int:
  """The number of layers an encoder keeps: all of them, or the first ``num_layers``."""
  if num_layers is None:
    return num_hidden_layers
  if not 1 <= num_layers <= num_hidden_layers:
    raise ValueError(f"num_layers must be in [1, {num_hidden_layers}], got {num_layers}")
  return num_layers


def prepare_inputs(
  input_ids: jax.Array,
  attention_mask: jax.Array | None,
  token_type_ids: jax.Array | None,
  max_position_embeddings: int,
) -> tuple[jax.Array | None, jax.Array]:
  """Validates shapes; returns the ``[B, 1, 1, L]`` boolean key mask (or None) and token types."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  length = input_ids.shape[1]
  if length > max_position_embeddings:
    raise ValueError(f"sequence length {length} exceeds max_position_embeddings={max_position_embeddings}")
  for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
    if x is not None and x.shape != input_ids.shape:
      raise ValueError(f"{name} shape {x.shape} differs from input_ids shape {input_ids.shape}")
  mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  return mask, token_type_ids


# --------------------------------------------------------------------------- building blocks


def dense_layer(features: int, init_std: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
  """A dense layer (kernel ``[in, features]`` plus bias) initialized like transformers' ``Linear``."""
  return nn.Dense(
    features, dtype=dtype, param_dtype=param_dtype, kernel_init=nn.initializers.normal(init_std), name=name
  )


class Norm(nn.Module):
  """LayerNorm (``kind="layer_norm"``) or MobileBERT's NoNorm (``kind="no_norm"``: ``x * scale + bias``).

  Computed in float32 (biased variance, as ``torch.nn.LayerNorm``), returned in ``dtype``.
  """

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


class ResidualProjection(nn.Module):
  """``norm(dropout(dense(x)) + residual)`` with submodules ``dense`` and ``layer_norm``.

  The residual sum is formed in float32.
  """

  features: int
  init_std: float
  norm_kind: str = "layer_norm"
  eps: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
    y = dense_layer(self.features, self.init_std, self.dtype, self.param_dtype, "dense")(x)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = y.astype(jnp.float32) + residual.astype(jnp.float32)
    return Norm(self.norm_kind, self.eps, self.dtype, self.param_dtype, name="layer_norm")(y)


class Intermediate(nn.Module):
  """``activation(dense(x))`` with submodule ``dense``."""

  features: int
  activation: str
  init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense_layer(self.features, self.init_std, self.dtype, self.param_dtype, "dense")(x)
    return ACTIVATIONS[self.activation](y)


class Attention(nn.Module):
  """Multi-head self-attention followed by its :class:`ResidualProjection` (``output``).

  Query, key and value may come from different tensors (MobileBERT's bottlenecks);
  ``residual`` is added before the output norm. Submodules: ``query``, ``key``,
  ``value`` (each one ``[in, num_heads * head_dim]`` dense) and ``output``.
  """

  num_heads: int
  head_dim: int
  init_std: float
  attention_dropout_rate: float = 0.0
  output_dropout_rate: float = 0.0
  norm_kind: str = "layer_norm"
  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    residual: jax.Array,
    mask: jax.Array | None,
    *,
    deterministic: bool,
  ) -> jax.Array:
    width = self.num_heads * self.head_dim

    def project(x: jax.Array, name: str) -> jax.Array:
      """``[B, L, in] -> [B, heads, L, head_dim]``."""
      y = dense_layer(width, self.init_std, self.dtype, self.param_dtype, name)(x)
      return y.reshape(*y.shape[:-1], self.num_heads, self.head_dim).swapaxes(-2, -3)

    # Heads are moved in front of the sequence axis before the two batched matmuls:
    # XLA's CPU backend runs `bqnd,bknd->bnqk` einsums without that layout ~3x slower
    # at 256 tokens (bench/bench_encoder.py).
    q = project(query, "query") * jnp.asarray(self.head_dim**-0.5, self.dtype)
    k = project(key, "key")
    v = project(value, "value")
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=deterministic)
    context = jnp.matmul(probs.astype(v.dtype), v).swapaxes(-2, -3)
    context = context.reshape(*context.shape[:-2], width)
    return ResidualProjection(
      residual.shape[-1],
      self.init_std,
      self.norm_kind,
      self.eps,
      self.output_dropout_rate,
      self.dtype,
      self.param_dtype,
      name="output",
    )(context, residual, deterministic=deterministic)


# --------------------------------------------------------------------------- skeleton


class ConfigModule(nn.Module):
  """Base of the modules built from an encoder config (embeddings, layers, their parts, encoders).

  Its factories create the shared blocks with the config's initializer range,
  activation, norm kind and epsilon, in the module that calls them.
  """

  config: HFEncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def dense(self, features: int, name: str) -> nn.Dense:
    return dense_layer(features, self.config.initializer_range, self.dtype, self.param_dtype, name)

  def norm(self, eps: float, name: str = "layer_norm") -> Norm:
    return Norm(self.config.norm_kind, eps, self.dtype, self.param_dtype, name=name)

  def residual_projection(self, features: int, dropout_rate: float, name: str) -> ResidualProjection:
    c = self.config
    return ResidualProjection(
      features,
      c.initializer_range,
      c.norm_kind,
      c.layer_norm_eps,
      dropout_rate,
      self.dtype,
      self.param_dtype,
      name=name,
    )

  def intermediate(self, x: jax.Array) -> jax.Array:
    """``intermediate``: ``activation(dense(x))`` to ``intermediate_size``."""
    c = self.config
    return Intermediate(
      c.intermediate_size, c.hidden_act, c.initializer_range, self.dtype, self.param_dtype, name="intermediate"
    )(x)

  def feed_forward(self, x: jax.Array, dropout_rate: float, *, deterministic: bool) -> jax.Array:
    """``output(intermediate(x), residual=x)``: the FFN with submodules ``intermediate`` and ``output``."""
    return self.residual_projection(x.shape[-1], dropout_rate, "output")(
      self.intermediate(x), x, deterministic=deterministic
    )

  def attention(self, head_dim: int, output_dropout_rate: float) -> Attention:
    c = self.config
    return Attention(
      num_heads=c.num_attention_heads,
      head_dim=head_dim,
      init_std=c.initializer_range,
      attention_dropout_rate=c.attention_probs_dropout_prob,
      output_dropout_rate=output_dropout_rate,
      norm_kind=c.norm_kind,
      eps=c.layer_norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attention",
    )


class Embeddings(ConfigModule):
  """Word vectors + absolute position + token type embeddings (summed in float32), norm, dropout.

  Subclasses define :meth:`words` (the ``[B, L, hidden_size]`` word vectors from
  ``word_embeddings`` and whatever transforms them) and may change :meth:`norm_eps`.
  Submodules: those of :meth:`words`, ``position_embeddings``, ``token_type_embeddings``
  and ``layer_norm``.
  """

  def embed(self, num: int, features: int, name: str) -> nn.Embed:
    return nn.Embed(
      num,
      features,
      dtype=self.param_dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.initializers.normal(self.config.initializer_range),
      name=name,
    )

  def words(self, input_ids: jax.Array) -> jax.Array:
    raise NotImplementedError

  def norm_eps(self) -> float:
    return self.config.layer_norm_eps

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool) -> jax.Array:
    c = self.config
    x = self.words(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      x.astype(jnp.float32)
      + self.embed(c.max_position_embeddings, c.hidden_size, "position_embeddings")(positions).astype(jnp.float32)
      + self.embed(c.type_vocab_size, c.hidden_size, "token_type_embeddings")(token_type_ids).astype(jnp.float32)
    )
    x = self.norm(self.norm_eps())(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class Encoder(ConfigModule):
  """A text encoder: ``embeddings``, then layers ``layer_0`` ... ``layer_{n-1}``.

  A model subclasses it and sets :attr:`embeddings_class` (an :class:`Embeddings`)
  and :attr:`layer_class` (a :class:`ConfigModule` mapping ``(x, mask, *,
  deterministic)`` to the next hidden states).

  Attributes:
    config: the architecture.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); outputs are in this dtype.
    param_dtype: parameter dtype.
    num_layers: keep only the first ``num_layers`` layers (``None``: all of them).
  """

  embeddings_class: ClassVar[type[Embeddings]]
  layer_class: ClassVar[type[ConfigModule]]

  num_layers: int | None = None

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> EncoderOutput:
    """Encodes ``input_ids`` ``[B, L]``; ``attention_mask`` is 1 for real tokens, 0 for padding.

    With ``deterministic=False`` dropout is active and needs ``rngs={"dropout": key}``.
    """
    c = self.config
    mask, token_type_ids = prepare_inputs(input_ids, attention_mask, token_type_ids, c.max_position_embeddings)
    x = self.embeddings_class(c, self.dtype, self.param_dtype, name="embeddings")(
      input_ids, token_type_ids, deterministic=deterministic
    )
    for i in range(resolve_num_layers(c.num_hidden_layers, self.num_layers)):
      x = self.layer_class(c, self.dtype, self.param_dtype, name=f"layer_{i}")(x, mask, deterministic=deterministic)
    return EncoderOutput(sequence=x, cls=x[:, 0])
