"""A bundle's stored files: compression, checks against the manifest, copying and unpacking."""

from __future__ import annotations

import bz2
import codecs
import concurrent.futures
import dataclasses
import functools
import lzma
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rnr_jax.io import BadFileError, check_file, copy_hashed, sha256_file

COMPRESSIONS = ("bz2", "lzma", "none")
SUFFIXES = {"bz2": ".bz2", "lzma": ".xz", "none": ""}
DEFAULT_COMPRESSION = {"binary": "bz2", "text": "lzma"}
# bzip2 -9 is bz2.open's default level; lzma's is 6.
_WRITERS = {"bz2": bz2.open, "lzma": functools.partial(lzma.open, preset=9), "none": open}
# Leading bytes of already-compressed streams: xz, gzip, zip, zstd (bzip2: see _classify).
_MAGICS = (b"\xfd7zXZ\x00", b"\x1f\x8b", b"PK\x03\x04", b"\x28\xb5\x2f\xfd")


class BundleError(BadFileError):
  """A bundle file (or the manifest) is missing, truncated, corrupt or inconsistent; ``path`` names it."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A file to store: its unpacked path in the bundle, where to read it, its component."""

  path: str
  source: str
  component: str
  compression: str | None = None  # Forced method; None: by content and policy.


def check_policy(compression: Mapping[str, str] | None) -> dict[str, str]:
  """The compression policy ``{"binary": method, "text": method}``: ``compression`` over the defaults."""
  policy = dict(DEFAULT_COMPRESSION)
  if compression:
    if unknown := set(compression) - set(policy):
      raise ValueError(f"compression keys must be 'binary' and/or 'text', got {sorted(unknown)}")
    policy.update(compression)
  for kind, method in policy.items():
    if method not in COMPRESSIONS:
      raise ValueError(f"compression[{kind!r}] must be one of {COMPRESSIONS}, got {method!r}")
  return policy


def _classify(path: str) -> str:
  """``"compressed"``, ``"text"`` (UTF-8 without NUL in the first 1 MiB) or ``"binary"``."""
  with open(path, "rb") as f:
    head = f.read(1 << 20)
    at_end = not f.read(1)
  bzip2 = head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")
  if head.startswith(_MAGICS) or bzip2:
    return "compressed"
  if b"\0" in head:
    return "binary"
  try:
    codecs.getincrementaldecoder("utf-8")().decode(head, final=at_end)
  except UnicodeDecodeError:
    return "binary"
  return "text"


def store(src: Source, out_root: str, policy: Mapping[str, str]) -> dict[str, Any]:
  """Writes ``src`` under ``out_root``, compressed per ``src.compression`` or else ``policy`` by content; returns its
  manifest entry. Already-compressed streams and files that would shrink by less than 10% are stored as they are."""
  method = src.compression
  if method is None:
    kind = _classify(src.source)
    method = "none" if kind == "compressed" else policy[kind]
  stored = src.path + SUFFIXES[method]
  dst = os.path.join(out_root, stored)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(src.source, "rb") as fin, _WRITERS[method](dst, "wb") as fout:
    raw_bytes, raw_sha = copy_hashed(fin, fout)
  stored_bytes, stored_sha = (raw_bytes, raw_sha) if method == "none" else (os.path.getsize(dst), sha256_file(dst))
  # A file stored as it is is hard-linked into the unpack cache, costing its bytes once on disk instead of stored +
  # unpacked: worth more than a few percent of download (int8 weights and codes save 2-6% under bzip2).
  if stored_bytes > 0.9 * raw_bytes and method != "none":
    os.remove(dst)
    return store(dataclasses.replace(src, compression="none"), out_root, policy)
  return {"path": stored, "unpacked_path": src.path, "component": src.component, "compression": method,
          "bytes": stored_bytes, "sha256": stored_sha, "raw_bytes": raw_bytes, "raw_sha256": raw_sha}


def check_stored(path: str, entry: Mapping[str, Any], verify: bool, key: str = "") -> None:
  """Raises BundleError unless ``path`` has the entry's size (and sha256 when ``verify``); ``key="raw_"``: unpacked."""
  check_file(path, entry[f"{key}bytes"], entry[f"{key}sha256"], verify=verify, recorded_in="the manifest",
             error=BundleError)


def copy_stored(entry: Mapping[str, Any], old_root: str, out_root: str) -> dict[str, Any]:
  """Copies a stored file of an existing bundle unchanged, checking it against its entry."""
  src = os.path.join(old_root, entry["path"])
  check_stored(src, entry, verify=False)
  dst = os.path.join(out_root, entry["path"])
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    if copy_hashed(fin, fout)[1] != entry["sha256"]:
      raise BundleError(src, "sha256 does not match the manifest (corrupt)")
  return dict(entry)


def unpack(entry: Mapping[str, Any], bundle_dir: str, out_root: str) -> int:
  """Writes one file uncompressed under ``out_root``; returns 1 if it was decompressed (else linked or copied)."""
  src = os.path.join(bundle_dir, entry["path"])
  dst = os.path.join(out_root, entry["unpacked_path"])
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if entry["compression"] == "none":
    try:
      os.link(os.path.realpath(src), dst)  # Linux link(2) would link a symlink itself (Hub caches hold symlinks)
    except OSError:
      shutil.copyfile(src, dst)
    return 0
  try:
    with (bz2.open if entry["compression"] == "bz2" else lzma.open)(src, "rb") as fin, open(dst, "wb") as fout:
      n, digest = copy_hashed(fin, fout)
  except (OSError, EOFError, lzma.LZMAError) as e:
    raise BundleError(src, f"cannot {entry['compression']}-decompress it ({e})") from e
  if n != entry["raw_bytes"] or digest != entry["raw_sha256"]:
    raise BundleError(src, "decompressed content does not match the manifest's raw size / sha256")
  return 1


def parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
  """``[fn(x) for x in items]`` on a thread pool (bz2, lzma and hashlib release the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    return list(pool.map(fn, items))
