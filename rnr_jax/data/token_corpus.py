"""The token-ID corpus (paper §2.3): passages stored as the WordPiece ids of ``title [SEP] text``, not as text.

A corpus directory holds ``tokens.npy`` (all records concatenated), ``offsets.npy`` (``int64[n + 1]``) and ``meta.json``
(dtype, vocabulary size, counts, tokenizer, the arrays' sha256); arrays load memory-mapped. :func:`compress` writes a
bz2 or lzma form, which :meth:`TokenCorpus.load` reads like the plain one."""

from __future__ import annotations

import array
import bz2
import itertools
import lzma
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rnr_jax.io import (CHUNK_BYTES, atomic_dir, atomic_file, atomic_write_json, copy_hashed, read_json, sha256_file,
                        user_cache_dir)

PathLike = str | os.PathLike

FORMAT = "rnr_jax.token_corpus"
VERSION = 1
TOKENS_FILE = "tokens.npy"
OFFSETS_FILE = "offsets.npy"
META_FILE = "meta.json"
COMPRESSORS = {"bz2": bz2, "lzma": lzma}
LEVEL_ARG = {"bz2": "compresslevel", "lzma": "preset"}


def token_dtype(vocab_size: int) -> np.dtype:
  """``uint16`` when every id fits (vocab_size <= 65536), else ``int32``."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def save_npy(path: PathLike, array: np.ndarray) -> None:
  """``np.save`` to ``path`` atomically."""
  with atomic_file(path) as f:
    np.save(f, array, allow_pickle=False)


class RaggedArray:
  """Variable-length integer sequences: one flat ``values`` array plus ``offsets[n + 1]``."""

  def __init__(self, values: np.ndarray, offsets: np.ndarray):
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(values):
      raise ValueError(f"offsets must start at 0 and end at len(values)={len(values)}")
    self.values = values
    self.offsets = offsets

  @classmethod
  def from_sequences(cls, seqs: Iterable[Sequence[int] | np.ndarray], dtype: np.dtype | type) -> "RaggedArray":
    parts = [np.asarray(s) for s in seqs]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    dtype = np.dtype(dtype)
    values = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if dtype.kind in "iu" and len(values):
      lo, hi = int(values.min()), int(values.max())
      if lo < np.iinfo(dtype).min or hi > np.iinfo(dtype).max:
        raise ValueError(f"values in [{lo}, {hi}] do not fit {dtype}")
    return cls(values.astype(dtype, copy=False), offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} sequences")
    i %= len(self)
    return self.values[self.offsets[i]:self.offsets[i + 1]]

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.offsets.nbytes)

  def save(self, directory: PathLike, name: str) -> None:
    """Writes ``<name>.npy`` and ``<name>_offsets.npy`` into ``directory``, each atomically."""
    save_npy(os.path.join(directory, f"{name}.npy"), np.asarray(self.values))
    save_npy(os.path.join(directory, f"{name}_offsets.npy"), np.asarray(self.offsets))

  @classmethod
  def load(cls, directory: PathLike, name: str) -> "RaggedArray":
    """The arrays written by :meth:`save`, memory-mapped."""
    return cls(np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r"),
               np.load(os.path.join(directory, f"{name}_offsets.npy"), mmap_mode="r"))


class TokenCorpus:
  """Token-id records of a passage corpus, memory-mapped; ``corpus[i]`` is record ``i`` as ``int32`` ids."""

  def __init__(self, ragged: RaggedArray, meta: dict[str, Any], tokenizer: Any = None, path: str | None = None):
    self._ragged = ragged
    self.meta = meta
    self.tokenizer = tokenizer
    self.path = path

  @property
  def tokens(self) -> np.ndarray:
    return self._ragged.values

  @property
  def offsets(self) -> np.ndarray:
    return self._ragged.offsets

  def __len__(self) -> int:
    return len(self._ragged)

  def get(self, i: int) -> np.ndarray:
    """Record ``i`` (``title [SEP] text`` ids) as ``int32``."""
    return self._ragged[i].astype(np.int32)

  __getitem__ = get

  def lengths(self) -> np.ndarray:
    return self._ragged.lengths()

  def text(self, i: int) -> str:
    """Record ``i`` decoded to text for display, with the tokenizer given to :meth:`load`."""
    if self.tokenizer is None:
      raise ValueError("TokenCorpus.text needs a tokenizer: TokenCorpus.load(path, tokenizer=...)")
    return self.tokenizer.decode(self.get(i))

  @property
  def nbytes(self) -> int:
    return self._ragged.nbytes

  @classmethod
  def write(cls, path: PathLike, records: Iterable[Sequence[int] | np.ndarray], vocab_size: int, *,
            tokenizer: str | None = None) -> "TokenCorpus":
    """Writes the records (in pid order, streamed) as corpus directory ``path``, replaced atomically, and loads it."""
    dtype = token_dtype(vocab_size)
    with atomic_dir(path) as tmp:
      offsets = array.array("q", [0])
      records = iter(records)
      with open(os.path.join(tmp, TOKENS_FILE + ".raw"), "wb") as f:
        while batch := list(itertools.islice(records, 1 << 16)):
          values = np.concatenate([np.asarray(r, np.int64) for r in batch])
          if values.size and not 0 <= values.min() <= values.max() < vocab_size:
            raise ValueError(f"token ids in [{values.min()}, {values.max()}] outside the vocabulary of {vocab_size}")
          values.astype(dtype).tofile(f)
          offsets.frombytes((np.cumsum([len(r) for r in batch]) + offsets[-1]).astype(np.int64).tobytes())
      _raw_to_npy(os.path.join(tmp, TOKENS_FILE), dtype, offsets[-1])
      np.save(os.path.join(tmp, OFFSETS_FILE), np.frombuffer(offsets, np.int64), allow_pickle=False)
      meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": int(vocab_size),
              "num_records": len(offsets) - 1, "num_tokens": int(offsets[-1]), "tokenizer": tokenizer,
              "sha256": {f: sha256_file(os.path.join(tmp, f)) for f in (TOKENS_FILE, OFFSETS_FILE)}}
      atomic_write_json(os.path.join(tmp, META_FILE), meta)
    return cls.load(path)

  @classmethod
  def load(cls, path: PathLike, *, tokenizer: Any = None, cache_dir: PathLike | None = None) -> "TokenCorpus":
    """Loads a corpus directory; a compressed one is decompressed once into ``cache_dir`` (default: user cache)."""
    path = os.fspath(path)
    meta = read_meta(path)
    if meta.get("compression"):
      path = _decompressed(path, meta, cache_dir)
      meta = read_meta(path)
    ragged = RaggedArray(np.load(os.path.join(path, TOKENS_FILE), mmap_mode="r"),
                         np.load(os.path.join(path, OFFSETS_FILE), mmap_mode="r"))
    if len(ragged) != meta["num_records"] or ragged.values.dtype.name != meta["dtype"]:
      raise ValueError(f"{path}: arrays do not match {META_FILE} ({len(ragged)} records of {ragged.values.dtype}, "
                       f"expected {meta['num_records']} of {meta['dtype']})")
    return cls(ragged, meta, tokenizer, path)


def _raw_to_npy(path: str, dtype: np.dtype, length: int) -> None:
  """Turns ``<path>.raw`` (the values of a 1-D array, written as they came) into the ``.npy`` file ``path``."""
  with open(path, "wb") as out, open(path + ".raw", "rb") as src:
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": (int(length),)})
    shutil.copyfileobj(src, out, CHUNK_BYTES)
  os.remove(path + ".raw")


def read_meta(path: PathLike) -> dict[str, Any]:
  """``meta.json`` of a corpus directory, with a clear error if it is not one."""
  meta_path = os.path.join(path, META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{os.fspath(path)}: not a token-ID corpus (no {META_FILE})")
  meta = read_json(meta_path)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{os.fspath(path)}: unsupported token corpus format {meta.get('format')!r} "
                     f"version {meta.get('version')!r} (expected {FORMAT!r} version {VERSION})")
  return meta


def compress(path: PathLike, method: str = "bz2", out: PathLike | None = None, *, level: int = 9) -> str:
  """Writes the ``"bz2"`` or ``"lzma"`` form of the plain corpus at ``path``; returns its directory (``out``)."""
  if method not in COMPRESSORS:
    raise ValueError(f"unknown compression {method!r}; choose from {sorted(COMPRESSORS)}")
  path = os.fspath(path)
  meta = read_meta(path)
  if meta.get("compression"):
    raise ValueError(f"{path} is already compressed ({meta['compression']})")
  out = os.fspath(out) if out is not None else f"{os.path.normpath(path)}.{method}"
  with atomic_dir(out) as tmp:
    for name in (TOKENS_FILE, OFFSETS_FILE):
      with open(os.path.join(path, name), "rb") as src, \
          COMPRESSORS[method].open(os.path.join(tmp, f"{name}.{method}"), "wb", **{LEVEL_ARG[method]: level}) as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)
    atomic_write_json(os.path.join(tmp, META_FILE), {**meta, "compression": method})
  return out


def _decompressed(path: str, meta: dict[str, Any], cache_dir: PathLike | None) -> str:
  """The plain corpus of compressed ``path`` in the cache, decompressed and verified once."""
  method = meta["compression"]
  if method not in COMPRESSORS:
    raise ValueError(f"{path}: unknown compression {method!r}")
  key = "-".join(meta["sha256"][f][:16] for f in (TOKENS_FILE, OFFSETS_FILE))
  target = os.path.join(os.fspath(cache_dir) if cache_dir is not None else user_cache_dir(), "token_corpus", key)
  if os.path.exists(os.path.join(target, META_FILE)):
    return target
  with atomic_dir(target) as tmp:
    for name in (TOKENS_FILE, OFFSETS_FILE):
      with COMPRESSORS[method].open(os.path.join(path, f"{name}.{method}"), "rb") as src, \
          open(os.path.join(tmp, name), "wb") as dst:
        digest = copy_hashed(src, dst)[1]
      if digest != meta["sha256"][name]:
        raise ValueError(f"{path}: decompressed {name} has sha256 {digest}, expected {meta['sha256'][name]}")
    atomic_write_json(os.path.join(tmp, META_FILE), {k: v for k, v in meta.items() if k != "compression"})
  return target


def data_bytes(path: PathLike) -> int:
  """Bytes of a corpus directory's array files (plain or compressed), without ``meta.json``."""
  return sum(e.stat().st_size for e in os.scandir(path) if e.is_file() and e.name != META_FILE)
