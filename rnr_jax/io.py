"""Atomic writes of files and directories on a local (or mounted) filesystem.

A reader never sees a half-written file: data goes to a temporary sibling which
is flushed, fsynced and then renamed over the target with ``os.replace`` (atomic
on POSIX when both paths are on the same filesystem, which a sibling is).

Orbax checkpoints do not go through this module; they have their own atomic
commit protocol that also works on object stores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

PathLike = str | os.PathLike[str]


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_dir(path: PathLike) -> None:
  """Makes a rename inside ``path`` durable (best effort; not all filesystems allow it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode.
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_dir(parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
  """Text version of :func:`atomic_write_bytes`."""
  atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
  """Writes ``obj`` as JSON (with a trailing newline) atomically."""
  atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
  """Yields a temporary sibling directory that becomes ``path`` when the block succeeds.

  On an exception the temporary directory is removed and ``path`` is untouched.
  An existing ``path`` is replaced: it is first renamed aside, the new directory
  renamed into place, then the old one deleted. Readers thus see the old
  directory, the complete new one, or (for an instant) none at all, but never a
  partially written one.

  Example::

    with atomic_dir("out/index") as tmp:
      np.save(os.path.join(tmp, "vectors.npy"), vectors)
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
