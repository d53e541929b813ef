"""File helpers: atomic writes of files and directories (built in a temporary sibling, fsynced, swapped in under the
directory's lock, so a kill leaves the old or the new one), hashing and checks against recorded hashes."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
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


def _fsync(path: PathLike, strict: bool = False) -> None:
  """Flushes a file (``strict``: errors raised) or, making renames in it durable, a directory (best effort)."""
  with contextlib.suppress(*(() if strict else (OSError,))):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


try:  # Linux's renameat2(RENAME_EXCHANGE) swaps two paths in one atomic step.
  _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):
  _renameat2 = None


def _exchange(a: str, b: str) -> bool:
  """Swaps paths ``a`` and ``b`` atomically; False where the system or filesystem cannot (nothing changed then)."""
  return _renameat2 is not None and _renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0


def _aside(path: str) -> str:
  """Where a swap by two renames keeps the old copy of ``path`` between them."""
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")


def _repair(path: str) -> None:
  """Puts back the old copy a swap killed between its renames left aside, then removes what killed writers left."""
  parent, name = os.path.split(path)
  if os.path.isdir(_aside(path)) and not os.path.lexists(path):
    os.rename(_aside(path), path)  # Roll back: the writer died before it could report success.
    _fsync(parent)
  # .<name>.old, and .<name>.<8 random characters>.tmp: with no dot in them, a sibling <name>.x's never match.
  pattern = re.compile(re.escape(f".{name}.") + r"([a-z0-9_]{8}\.tmp|old)")
  for leftover in [os.path.join(parent, e) for e in os.listdir(parent) if pattern.fullmatch(e)]:
    shutil.rmtree(leftover, ignore_errors=True)


_held = threading.local()  # .locks: {path: fd} of the directory locks this thread holds


@contextlib.contextmanager
def dir_lock(path: PathLike) -> Iterator[None]:
  """Holds the ``flock`` of directory ``path`` (``.<name>.lock`` beside it; reentrant in a thread), repairing ``path``
  first (:func:`_repair`), as a killed holder may have left it mid-swap."""
  path = os.path.abspath(os.fspath(path))
  locks = vars(_held).setdefault("locks", {})
  if path in locks:
    yield
    return
  parent, name = os.path.split(path)
  lock_path = os.path.join(parent, f".{name}.lock")
  os.makedirs(parent, exist_ok=True)
  while True:  # The last holder removes the lock file: a lock taken on a file removed meanwhile is no lock.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      with contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
          break
    except BaseException:
      os.close(fd)
      raise
    os.close(fd)
  locks[path] = fd
  try:
    _repair(path)
    yield
  finally:
    del locks[path]
    with contextlib.suppress(OSError):
      os.remove(lock_path)
    os.close(fd)  # Releases the flock.


def repair_dir(path: PathLike) -> None:
  """Restores ``path`` now if a swap killed between its two renames left it missing (else does nothing)."""
  if not os.path.lexists(path) and os.path.isdir(_aside(os.path.abspath(os.fspath(path)))):
    with dir_lock(path):
      pass


def scratch_dir(path: PathLike) -> tempfile.TemporaryDirectory:
  """A temporary sibling for work towards writing ``path`` under ``dir_lock(path)`` (cleaned up after a kill)."""
  parent, name = os.path.split(os.path.abspath(os.fspath(path)))
  return tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".tmp", dir=parent)


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
  _fsync(parent)


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
  """Yields a temporary sibling directory that becomes ``path`` when the block succeeds, under :func:`dir_lock`: files
  fsynced, then an atomic exchange (``renameat2``) or two renames that :func:`repair_dir` rolls back."""
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  with dir_lock(path):
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
      os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; use the usual directory mode.
      yield tmp
      for root, _, files in os.walk(tmp, topdown=False):  # Files, then folders deepest first, reach the disk.
        for f in files:
          _fsync(os.path.join(root, f), strict=True)
        _fsync(root)
      if not os.path.lexists(path):
        os.rename(tmp, path)
      elif not _exchange(tmp, path):
        os.rename(path, _aside(path))
        os.rename(tmp, path)  # Killed before this: the next lock holder puts the old one back.
      _fsync(parent)
    finally:  # After an exchange tmp holds the old directory, after two renames .<name>.old does.
      shutil.rmtree(tmp, ignore_errors=True)
      if os.path.lexists(path):
        shutil.rmtree(_aside(path), ignore_errors=True)


def relative_files(directory: PathLike) -> list[tuple[str, str]]:
  """``(path relative to directory with '/' separators, full path)`` of every file below ``directory``, folder by
  folder (a folder's own files, sorted, before its subfolders')."""
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
