"""What rebuilds a trained model and feeds it: the retriever, reader and QA-system specs.

A spec is saved as JSON beside exported parameters and in a bundle's ``config.json``, so a model is served with the
input settings it was trained with. Specs import JAX and Flax only to build or run a model, so a bundle's spec loads
without them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from rnr_jax import qa_model
  from rnr_jax.models import EncoderConfig

Params = Any
EmbedFn = Callable[[Params, dict[str, Any]], Any]  # (params, batch of jax arrays) -> jax array


def _from_json(cls, d: Mapping[str, Any]):
  return cls(**{**d, "buckets": tuple(d["buckets"])})


def _to_json(spec) -> dict[str, Any]:
  return {**dataclasses.asdict(spec), "encoder": dict(spec.encoder), "buckets": list(spec.buckets)}


@dataclasses.dataclass(frozen=True)
class RetrieverSpec:
  """A retriever (:class:`~rnr_jax.qa_model.Retriever`) and its inputs."""

  encoder: Mapping[str, Any]  # transformers config.json of the encoder (num_hidden_layers: the layers kept)
  shared: bool  # one encoder for questions and passages (paper §2.2.2) or two (DPR)
  pooling: str  # "cls" or "mean"
  retrieval_dim: int  # first d dims of the pooled vector; 0 = full width
  # Cosine scores (how sentence-transformers models were trained) or the raw inner product (DPR and the paper).
  normalize: bool
  passage_token_type: int  # questions use 0
  tokenizer_fingerprint: str  # sha256 of the tokenizer files, so ids of another vocabulary are refused
  question_len: int
  passage_len: int
  buckets: tuple[int, ...]  # padding lengths (rnr_jax.tokenization)
  dtype: str = "float32"  # compute dtype

  def __post_init__(self) -> None:
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
    if self.passage_token_type not in (0, 1):
      raise ValueError(f"passage_token_type must be 0 or 1, got {self.passage_token_type}")
    width = int(self.encoder["hidden_size"])
    if not 0 <= self.retrieval_dim <= width:
      raise ValueError(f"retrieval_dim must be in [0, {width}] (0 = full width), got {self.retrieval_dim}")
    object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))

  @classmethod
  def from_config(cls, config: Any, encoder: EncoderConfig, tokenizer_fingerprint: str) -> RetrieverSpec:
    """The spec of a stage config (sections ``model``, ``tokens``, ``retriever``)."""
    return cls(encoder=encoder.to_hf_dict(), shared=bool(config.retriever.shared), pooling=config.model.pooling,
               retrieval_dim=int(config.model.retrieval_dim), normalize=bool(config.retriever.normalize),
               passage_token_type=int(config.retriever.passage_token_type), tokenizer_fingerprint=tokenizer_fingerprint,
               question_len=int(config.tokens.question_len), passage_len=int(config.tokens.passage_len),
               buckets=tuple(config.tokens.buckets), dtype=config.model.dtype)

  from_json = classmethod(_from_json)
  to_json = _to_json

  def encoder_config(self) -> EncoderConfig:
    from rnr_jax.models import config_from_hf_dict  # pylint: disable=import-outside-toplevel
    return config_from_hf_dict(self.encoder)

  @property
  def dim(self) -> int:
    """Width of the retrieval vectors."""
    return self.retrieval_dim or int(self.encoder["hidden_size"])

  def build(self) -> qa_model.Retriever:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from rnr_jax import qa_model  # pylint: disable=import-outside-toplevel
    return qa_model.Retriever(self.encoder_config(), shared=self.shared, pooling=self.pooling,
                              retrieval_dim=self.retrieval_dim, dtype=jnp.dtype(self.dtype))

  def finish(self, vectors: Any) -> Any:
    """The model's retrieval vectors as scored: L2-normalised if ``normalize``."""
    from rnr_jax.qa_model import l2_normalize  # pylint: disable=import-outside-toplevel
    return l2_normalize(vectors) if self.normalize else vectors

  def embed_fns(self) -> tuple[EmbedFn, EmbedFn]:
    """``(question_fn, passage_fn)``: ``(params, batch) -> [B, dim]`` without dropout (not jitted)."""
    model = self.build()

    def questions(params: Params, batch: dict[str, Any]) -> Any:
      return self.finish(model.apply({"params": params}, batch, method="embed_questions"))

    def passages(params: Params, batch: dict[str, Any]) -> Any:
      return self.finish(model.apply({"params": params}, batch, method="embed_passages"))

    return questions, passages


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
  """A reader (:class:`~rnr_jax.qa_model.RetrieverReader`) and its inputs (lengths in tokens)."""

  encoder: Mapping[str, Any]  # transformers config.json of the encoder (layers kept)
  pooling: str  # the retrieval vector's, unused when only reading
  retrieval_dim: int
  tokenizer_fingerprint: str
  question_len: int
  reader_len: int
  max_answer_len: int
  buckets: tuple[int, ...]
  dtype: str = "float32"

  @classmethod
  def from_config(cls, config: Any, encoder: EncoderConfig, tokenizer_fingerprint: str) -> ReaderSpec:
    """The spec of a stage config (sections ``model`` and ``tokens``)."""
    return cls(encoder=encoder.to_hf_dict(), pooling=config.model.pooling, dtype=config.model.dtype,
               retrieval_dim=int(config.model.retrieval_dim), tokenizer_fingerprint=tokenizer_fingerprint,
               question_len=int(config.tokens.question_len), reader_len=int(config.tokens.reader_len),
               max_answer_len=int(config.tokens.max_answer_len), buckets=tuple(int(b) for b in config.tokens.buckets))

  from_json = classmethod(_from_json)
  to_json = _to_json

  def build(self) -> qa_model.RetrieverReader:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from rnr_jax import qa_model  # pylint: disable=import-outside-toplevel
    from rnr_jax.models import config_from_hf_dict  # pylint: disable=import-outside-toplevel
    return qa_model.RetrieverReader(config_from_hf_dict(self.encoder), pooling=self.pooling,
                                    retrieval_dim=self.retrieval_dim, dtype=jnp.dtype(self.dtype))


def read_fn(model: qa_model.RetrieverReader, select: Callable[[Params], Params] = lambda p: p) -> EmbedFn:
  """``(params, batch) -> [rows, 2L + 1]``: start, end and rank logits of each row, one array to gather."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def read(params: Params, batch: dict[str, Any]) -> Any:
    start, end, rank = model.apply({"params": select(params)}, batch, method="read")
    return jnp.concatenate([start, end, rank[:, None]], axis=1)
  return read


@dataclasses.dataclass(frozen=True)
class SystemSpec:
  """A QA system's model(s); ``config.json["model"]`` of a bundle."""

  reader: ReaderSpec  # for a unified system, the whole retriever-reader
  retriever: RetrieverSpec  # for a unified system, the reader's embed (its encoder shared)
  unified: bool  # one model (the reader's parameters) or two ({"retriever": ..., "reader": ...})

  def __post_init__(self) -> None:
    if self.reader.tokenizer_fingerprint != self.retriever.tokenizer_fingerprint:
      raise ValueError("the retriever and the reader were trained with different tokenizers")
    if self.unified and (dict(self.reader.encoder) != dict(self.retriever.encoder)
                         or self.reader.pooling != self.retriever.pooling
                         or self.reader.retrieval_dim != self.retriever.retrieval_dim):
      raise ValueError("a unified system's retrieval settings must be those of its reader's encoder")

  @classmethod
  def unified_model(cls, reader_spec: ReaderSpec, *, passage_len: int = 256, passage_token_type: int = 1,
                    normalize: bool = False) -> SystemSpec:
    """A unified retriever-reader: the reader's ``embed`` retrieves (questions token type 0, paper §2.2.2)."""
    retriever = RetrieverSpec(
        encoder=reader_spec.encoder, shared=True, pooling=reader_spec.pooling,
        retrieval_dim=reader_spec.retrieval_dim, normalize=normalize, passage_token_type=passage_token_type,
        tokenizer_fingerprint=reader_spec.tokenizer_fingerprint, question_len=reader_spec.question_len,
        passage_len=passage_len, buckets=reader_spec.buckets, dtype=reader_spec.dtype)
    return cls(reader_spec, retriever, unified=True)

  @classmethod
  def two_models(cls, retriever_spec: RetrieverSpec, reader_spec: ReaderSpec) -> SystemSpec:
    """A retriever and a separate reader."""
    return cls(reader_spec, retriever_spec, unified=False)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> SystemSpec:
    return cls(ReaderSpec.from_json(d["reader"]), RetrieverSpec.from_json(d["retriever"]), bool(d["unified"]))

  def to_json(self) -> dict[str, Any]:
    return {"unified": self.unified, "reader": self.reader.to_json(), "retriever": self.retriever.to_json()}

  def with_dropout(self, dropout: float) -> SystemSpec:
    """This system with the encoder's hidden and attention dropout set to ``dropout`` (for training)."""
    encoder = {**self.reader.encoder, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    r = self.retriever
    return SystemSpec.unified_model(dataclasses.replace(self.reader, encoder=encoder), passage_len=r.passage_len,
                                    passage_token_type=r.passage_token_type, normalize=r.normalize)

  @property
  def dim(self) -> int:
    """Width of the retrieval vectors."""
    return self.retriever.dim

  def embed_fns(self) -> tuple[EmbedFn, EmbedFn]:
    """``(question_fn, passage_fn)``: ``(system params, batch) -> [B, dim]`` (not jitted)."""
    if not self.unified:
      questions, passages = self.retriever.embed_fns()
      return (lambda params, batch: questions(params["retriever"], batch),
              lambda params, batch: passages(params["retriever"], batch))
    model = self.reader.build()

    def embed_fn(params: Params, batch: dict[str, Any]) -> Any:
      return self.retriever.finish(model.apply({"params": params}, batch, method="embed"))

    return embed_fn, embed_fn

  def read_fn(self) -> EmbedFn:
    """``(system params, batch) -> [rows, 2L + 1]`` (:func:`read_fn`)."""
    return read_fn(self.reader.build(), (lambda p: p) if self.unified else (lambda p: p["reader"]))
