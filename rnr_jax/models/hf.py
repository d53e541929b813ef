"""Hugging Face interop: config dispatch, encoder factory and checkpoint conversion (both ways).

A Hugging Face directory (``config.json`` plus safetensors or ``pytorch_model.bin``) converts to ``(config, params)``,
checked against ``jax.eval_shape`` of the encoder's ``init``, and back, for ``transformers.AutoModel``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from rnr_jax.io import atomic_dir
from rnr_jax.models.bert import BertConfig, BertEncoder
from rnr_jax.models.encoder import Dtype, resolve_num_layers
from rnr_jax.models.mobilebert import MobileBertConfig, MobileBertEncoder
from rnr_jax.tokenization import default_tokenizer_path

logger = logging.getLogger(__name__)

EncoderConfig = BertConfig | MobileBertConfig
Params = dict[str, Any]  # nested {module: {... {param: array}}}, as ``module.init(...)["params"]``

_CONFIG_CLASSES: dict[str, type[EncoderConfig]] = {"bert": BertConfig, "mobilebert": MobileBertConfig}

# Non-persistent buffers that older transformers versions saved with the weights.
_BUFFERS = frozenset({"embeddings.position_ids", "embeddings.token_type_ids"})
_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_TORCH_BIN, _TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_HUB_PATTERNS = ["config.json", "model*.safetensors", _SAFETENSORS_INDEX, *TOKENIZER_FILES]
_HUB_TORCH_PATTERNS = ["pytorch_model*.bin", _TORCH_BIN_INDEX]

_LAYER_RE = re.compile(r"layer_(\d+)")
_FFN_RE = re.compile(r"ffn_(\d+)")
_HF_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.")
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def config_from_hf_dict(d: Mapping[str, Any]) -> EncoderConfig:
  """The encoder config for a transformers config dict, dispatching on its ``model_type``."""
  model_type = d.get("model_type")
  if model_type not in _CONFIG_CLASSES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(_CONFIG_CLASSES)}")
  return _CONFIG_CLASSES[model_type].from_hf_dict(d)


def build_encoder(config: EncoderConfig, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  num_layers: int | None = None) -> BertEncoder | MobileBertEncoder:
  """The encoder module for ``config`` (BERT or MobileBERT)."""
  if isinstance(config, BertConfig):
    return BertEncoder(config, dtype, param_dtype, num_layers)
  if isinstance(config, MobileBertConfig):
    return MobileBertEncoder(config, dtype, param_dtype, num_layers)
  raise TypeError(f"expected BertConfig or MobileBertConfig, got {type(config).__name__}")


@functools.lru_cache(maxsize=32)
def _param_shapes(config: EncoderConfig, num_layers: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened parameter path -> shape of the encoder keeping ``num_layers`` layers."""
  module = build_encoder(config, num_layers=num_layers)
  ids = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), ids)["params"])
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract).items()}


def _hf_key(path: tuple[str, ...]) -> str:
  """The (unprefixed) transformers state-dict key of a Flax parameter path."""
  *modules, leaf = path
  parts: list[str] = []
  for name in modules:
    if match := _LAYER_RE.fullmatch(name):
      parts += ["encoder", "layer", match[1]]
    elif match := _FFN_RE.fullmatch(name):
      parts += ["ffn", match[1]]
    elif name == "layer_norm":
      parts.append("LayerNorm")
    elif name in ("query", "key", "value") and parts[-1] == "attention":
      parts += ["self", name]
    else:
      parts.append(name)
  parts.append(_LEAF_TO_HF[leaf])
  return ".".join(parts)


def _unused_hf_tensors(config: EncoderConfig, num_layers: int) -> dict[str, np.ndarray]:
  """Tensors transformers' MobileBERT builds but never uses under ``config`` (``embedding_transformation``, shared
  bottleneck ``attention``), with their initial values: ignored on load, written on save."""
  if not isinstance(config, MobileBertConfig):
    return {}
  c = config
  tensors: dict[str, np.ndarray] = {}
  if not c.uses_embedding_transformation:
    # Here embedding_size == hidden_size and there are no trigrams.
    tensors["embeddings.embedding_transformation.weight"] = np.zeros((c.hidden_size, c.embedding_size), np.float32)
    tensors["embeddings.embedding_transformation.bias"] = np.zeros((c.hidden_size,), np.float32)
  if c.use_bottleneck and c.key_query_shared_bottleneck and c.use_bottleneck_attention:
    size = c.intra_bottleneck_size
    for i in range(num_layers):
      prefix = f"encoder.layer.{i}.bottleneck.attention"
      tensors[f"{prefix}.dense.weight"] = np.zeros((size, c.hidden_size), np.float32)
      tensors[f"{prefix}.dense.bias"] = np.zeros((size,), np.float32)
      tensors[f"{prefix}.LayerNorm.weight"] = np.ones((size,), np.float32)
      tensors[f"{prefix}.LayerNorm.bias"] = np.zeros((size,), np.float32)
  return tensors


def _normalize_keys(state_dict: Mapping[str, np.ndarray], model_type: str, source: str) -> dict[str, np.ndarray]:
  """Strips the ``bert.``/``mobilebert.`` prefix and renames legacy ``LayerNorm.gamma/beta``."""
  prefix = f"{model_type}."
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    new = key.removeprefix(prefix)
    if ".LayerNorm." in new:
      new = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", new))
    if new in out:
      raise ValueError(f"{source}: tensor {key!r} duplicates another tensor mapping to {new!r}")
    out[new] = value
  return out


def _outside_encoder(key: str, num_layers: int, num_hidden_layers: int) -> bool:
  """Whether a tensor belongs to a head/pooler or to a layer dropped by truncation."""
  if not key.startswith(("embeddings.", "encoder.")):
    return True
  match = _HF_LAYER_RE.match(key)
  return match is not None and num_layers <= int(match[1]) < num_hidden_layers


def hf_state_dict_to_params(config: EncoderConfig, state_dict: Mapping[str, np.ndarray], num_layers: int | None = None,
                            *, source: str = "state dict") -> Params:
  """Float32 encoder params of the first ``num_layers`` layers of a transformers state dict (pooler, heads and task
  prefixes ignored); a ``ValueError`` naming ``source`` lists every missing, unexpected or misshapen tensor."""
  n = resolve_num_layers(config.num_hidden_layers, num_layers)
  expected = {_hf_key(path): (path, shape) for path, shape in _param_shapes(config, n).items()}
  unused = _unused_hf_tensors(config, config.num_hidden_layers)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  ignored, unexpected, misshaped = [], [], []
  for key, value in _normalize_keys(state_dict, config.model_type, source).items():
    if key in expected:
      path, shape = expected[key]
      hf_shape = shape[::-1] if path[-1] == "kernel" else shape
      if tuple(value.shape) != hf_shape:
        misshaped.append(f"{key} {tuple(value.shape)} (expected {hf_shape})")
        continue
      array = np.asarray(value, dtype=np.float32)
      flat[path] = np.ascontiguousarray(array.T) if path[-1] == "kernel" else array
    elif key in _BUFFERS or key in unused or _outside_encoder(key, n, config.num_hidden_layers):
      ignored.append(key)
    else:
      unexpected.append(key)
  missing = sorted(key for key, (path, _) in expected.items() if path not in flat)
  found = {"missing tensors": missing, "unexpected encoder tensors": unexpected, "wrongly shaped tensors": misshaped}
  if problems := [f"{what}: {', '.join(sorted(keys))}" for what, keys in found.items() if keys]:
    raise ValueError(f"{source} does not match {config.architecture} ({n} layers): " + "; ".join(problems))
  if ignored:
    logger.debug("%s: ignored %d tensors not used by the encoder: %s", source, len(ignored), sorted(ignored))
  return traverse_util.unflatten_dict(flat)


def _num_layers(flat_params: Mapping[tuple[str, ...], Any]) -> int:
  return len({path[0] for path in flat_params if _LAYER_RE.fullmatch(path[0])})


def params_to_hf_state_dict(config: EncoderConfig, params: Params) -> dict[str, np.ndarray]:
  """Converts encoder params (any number of layers) to a float32 ``BertModel``/``MobileBertModel`` state dict (no
  pooler); ``ValueError`` unless ``params`` has exactly the encoder's parameters and shapes."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  n = _num_layers(flat)
  if not 1 <= n <= config.num_hidden_layers:
    raise ValueError(f"params have {n} layer_* subtrees; expected 1 to {config.num_hidden_layers}")
  expected = _param_shapes(config, n)
  missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
  unexpected = sorted("/".join(p) for p in flat.keys() - expected.keys())
  misshaped = sorted(f"{'/'.join(p)} {tuple(np.shape(flat[p]))} (expected {shape})"
                     for p, shape in expected.items() if p in flat and tuple(np.shape(flat[p])) != shape)
  if missing or unexpected or misshaped:
    raise ValueError(f"params do not match {config.architecture} ({n} layers): "
                     f"missing {missing}, unexpected {unexpected}, wrongly shaped {misshaped}")
  state_dict = _unused_hf_tensors(config, n)
  for path, value in flat.items():
    array = np.array(value, dtype=np.float32)  # a writable copy
    state_dict[_hf_key(path)] = np.ascontiguousarray(array.T) if path[-1] == "kernel" else array
  return state_dict


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  with safe_open(str(path), framework="numpy") as f:
    bf16 = {key for key in f.keys() if f.get_slice(key).get_dtype() == "BF16"}
    out = {key: f.get_tensor(key) for key in f.keys() if key not in bf16}
  if bf16:  # numpy has no bfloat16: read through jax (host memory) into ml_dtypes arrays.
    with jax.default_device(jax.devices("cpu")[0]), safe_open(str(path), framework="flax") as f:
      out.update({key: np.asarray(f.get_tensor(key)) for key in bf16})
  return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch; install it or convert the checkpoint to safetensors") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return {key: (t.detach().float() if t.is_floating_point() else t.detach()).numpy() for key, t in state_dict.items()}


def _read_weights(directory: Path) -> tuple[dict[str, np.ndarray], str]:
  """Reads the weights of a Hugging Face model directory, in order of preference; returns ``(state_dict, source)``."""
  formats = ((_SAFETENSORS, _SAFETENSORS_INDEX, _read_safetensors), (_TORCH_BIN, _TORCH_BIN_INDEX, _read_torch_bin))
  for single, index, reader in formats:
    if (directory / single).is_file():
      return reader(directory / single), str(directory / single)
    if (directory / index).is_file():
      shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
      state_dict: dict[str, np.ndarray] = {}
      for shard in shards:
        state_dict.update(reader(directory / shard))
      return state_dict, str(directory / index)
  raise FileNotFoundError(f"no weights in {directory}: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_TORCH_BIN} "
                          f"or {_TORCH_BIN_INDEX}")


def _download(repo_id: str) -> Path:
  """Fetches config, weights and tokenizer files of a Hub model (safetensors if it has them)."""
  try:
    from huggingface_hub import snapshot_download

    directory = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    if not any(directory.glob("*.safetensors")):
      directory = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS + _HUB_TORCH_PATTERNS))
  except Exception as e:  # any hub failure gets the same actionable message
    raise OSError(f"{repo_id!r} is not a local directory and the Hugging Face Hub is unreachable or has no such "
                  f"model ({type(e).__name__}: {e}). Pass a local directory with config.json and model.safetensors "
                  "(or pytorch_model.bin) instead.") from e
  return directory


def _resolve_directory(path_or_hub_id: str | os.PathLike[str]) -> Path:
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise NotADirectoryError(f"{path} is not a Hugging Face model directory")
  text = str(path_or_hub_id)
  if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
    raise FileNotFoundError(f"no such directory: {path}")
  return _download(text)


def load_hf_encoder(path_or_hub_id: str | os.PathLike[str], num_layers: int | None = None
                    ) -> tuple[EncoderConfig, Params]:
  """``(config, float32 params)`` of the first ``num_layers`` layers of a Hugging Face directory or Hub id, the
  config's ``num_hidden_layers`` set to match."""
  directory = _resolve_directory(path_or_hub_id)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"no config.json in {directory}")
  try:
    config = config_from_hf_dict(json.loads(config_file.read_text()))
  except ValueError as e:
    raise ValueError(f"{config_file}: {e}") from e
  state_dict, source = _read_weights(directory)
  params = hf_state_dict_to_params(config, state_dict, num_layers, source=source)
  n = resolve_num_layers(config.num_hidden_layers, num_layers)
  return dataclasses.replace(config, num_hidden_layers=n), params


def save_hf_encoder(config: EncoderConfig, params: Params, out_dir: str | os.PathLike[str],
                    tokenizer_dir: str | os.PathLike[str] | None = None) -> Path:
  """Writes ``config.json`` (``num_hidden_layers``: the layers in ``params``), ``model.safetensors`` (no pooler) and
  the tokenizer files of ``tokenizer_dir`` as directory ``out_dir``, replaced atomically; returns its path."""
  out = Path(out_dir).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"{out} exists and is not a directory")
  tokenizer_files: list[Path] = []
  if tokenizer_dir is not None:
    candidates = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES]
    tokenizer_files = [file for file in candidates if file.is_file()]
    if not tokenizer_files:
      raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
  state_dict = params_to_hf_state_dict(config, params)
  hf_config = dataclasses.replace(config, num_hidden_layers=_num_layers(traverse_util.flatten_dict(params)))
  with atomic_dir(out) as tmp:
    (Path(tmp) / "config.json").write_text(json.dumps(hf_config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    save_file(state_dict, os.path.join(tmp, _SAFETENSORS), metadata={"format": "pt"})
    for file in tokenizer_files:
      shutil.copy2(file, os.path.join(tmp, file.name))
  return out


def minilm_dir() -> Path:
  """The Hugging Face directory of all-MiniLM-L6-v2 (:func:`rnr_jax.tokenization.default_tokenizer_path`)."""
  return Path(default_tokenizer_path())


def load_minilm(num_layers: int | None = None) -> tuple[BertConfig, Params]:
  """``(config, params)`` of all-MiniLM-L6-v2 (6-layer BERT, hidden 384), offline."""
  config, params = load_hf_encoder(minilm_dir(), num_layers)
  if not isinstance(config, BertConfig):
    raise TypeError(f"{minilm_dir()} holds a {config.model_type!r} model, expected 'bert'")
  return config, params
