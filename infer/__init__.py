"""Inference entry points, ``python -m infer.<name>``; :func:`run` reports every user mistake in one line."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from absl import app, flags

from rnr_jax.data.prepared import PreparedDataError
from rnr_jax.data.readers import DataFormatError
from rnr_jax.io import BadFileError
from rnr_jax.qa_system import is_local_bundle

# Mistakes in the command line or its input files, as opposed to bugs, which keep their traceback.
USER_ERRORS = (app.UsageError, BadFileError, DataFormatError, PreparedDataError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError)


def message(error: BaseException) -> str:
  """The one-line text of a user error (``path: reason`` for an OSError that names a file)."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    return f"{error.filename}: {error.strerror}"
  return str(error)


def run(main: Callable[[Sequence[str]], None], prog: str) -> None:
  """``absl.app.run(main)``, printing ``<prog>: error: <message>`` and exiting 1 on a bad flag or a user error."""
  def parse(argv: Sequence[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f"{prog}: error: {e}")

  def guarded(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except USER_ERRORS as e:
      sys.exit(f"{prog}: error: {message(e)}")

  app.run(guarded, flags_parser=parse)


def check_dir(path: str | None, flag: str) -> None:
  """Fails at once, naming ``flag``, unless ``path`` (when given) is a directory."""
  if path is not None and not os.path.isdir(path):
    raise app.UsageError(f"--{flag}={path}: {'not a directory' if os.path.exists(path) else 'no such directory'}")


def check_bundle(bundle: str) -> None:
  """:func:`check_dir` for a ``--bundle`` that names a local path rather than a Hub model id."""
  if is_local_bundle(bundle):
    check_dir(os.path.expanduser(bundle), "bundle")


def check_output(path: str | None, flag: str, directory: bool = False) -> None:
  """Fails at once, naming ``flag``, unless a file (or ``directory``) can be written at ``path``: outputs are
  written after the work, as a temporary sibling renamed into place."""
  if path is None:
    return
  if os.path.isdir(path) and not directory:
    raise app.UsageError(f"--{flag}={path}: is a directory")
  try:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise app.UsageError(f"--{flag}={path}: cannot write there ({e.strerror})") from None
