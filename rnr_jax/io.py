"""File helpers: atomic writes, hashing, and checks of files against recorded sizes and hashes.

Writes go to a temporary sibling, fsynced, then renamed over the target (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

PathLike = str | os.PathLike[str]

CHUNK_BYTES = 1 << 22  # Read size for hashing and copying.


class BadFileError(ValueError):
  """A file is missing, truncated, corrupt or inconsistent; ``path`` names it."""

  def __init__(self, path: PathLike, problem: str):
    self.path = os.fspath(path)
    super().__init__(f"{self.path}: {problem}")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_dir(path: PathLike) -> None:
  """Makes a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
  """Yields a binary file that replaces ``path`` when the block succeeds; its directory must exist."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode.
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_dir(parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
  with atomic_file(path) as f:
    f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
  """Writes ``obj`` as JSON indented by 2, with a trailing newline, atomically."""
  atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
  """Yields a temporary sibling directory that becomes ``path`` when the block succeeds (and is removed if not).

  An existing ``path`` is renamed aside first, so readers see the old directory, the new one or, for an instant, none,
  never a partial one.
  """
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; use the usual directory mode.
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
    os.replace(path, os.path.join(old, name))
  os.replace(tmp, path)
  _fsync_dir(parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def relative_files(directory: PathLike) -> list[tuple[str, str]]:
  """``(path relative to directory with '/' separators, full path)`` of every file below ``directory``, sorted by folder
  then name (a folder's own files before its subfolders')."""
  out = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(root, name)
      out.append((os.path.relpath(full, directory).replace(os.sep, "/"), full))
  return out


def user_cache_dir() -> str:
  """``$XDG_CACHE_HOME/rnr_jax`` (``~/.cache/rnr_jax`` when unset): where decompressed files are cached."""
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "rnr_jax")


def sha256_file(path: PathLike) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def copy_hashed(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
  """Copies ``src`` to ``dst``; returns the number of bytes and their hex sha256."""
  h, n = hashlib.sha256(), 0
  while block := src.read(CHUNK_BYTES):
    h.update(block)
    n += len(block)
    dst.write(block)
  return n, h.hexdigest()


def check_file(path: PathLike, size: int, sha256: str, *, verify: bool, recorded_in: str,
               error: type[BadFileError] = BadFileError) -> None:
  """Raises ``error`` unless ``path`` has ``size`` bytes (and ``sha256`` when ``verify``), as ``recorded_in`` says."""
  if not os.path.isfile(path):
    raise error(path, "missing")
  got = os.path.getsize(path)
  if got != size:
    raise error(path, f"size {got} bytes, {recorded_in} records {size} (truncated or altered)")
  if verify and sha256_file(path) != sha256:
    raise error(path, f"sha256 does not match {recorded_in} (corrupt)")


def read_json(path: PathLike, *, missing: str = "missing", error: type[BadFileError] = BadFileError) -> Any:
  """Parsed JSON file, or ``error(path, missing)`` / ``error(path, "not valid JSON (...)")``."""
  if not os.path.isfile(path):
    raise error(path, missing)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise error(path, f"not valid JSON ({e})") from e
