"""Stage entry points: ``python -m train.<stage>``; ``train.pipeline`` runs them all.

Every entry point takes ``--config`` (a path, or ``configs/<name>.py`` of the installed package from any directory),
``--library_logs`` and ``--compile_cache``, applied by :func:`setup` first thing in its ``main``.
"""

import contextlib
import logging as py_logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

import configs
from rnr_jax.data.prepared import PreparedDataError
from rnr_jax.data.readers import DataFormatError
from rnr_jax.io import BadFileError, user_cache_dir

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_CODE = tuple(os.path.join(_ROOT, package) + os.sep for package in ("rnr_jax", "train", "infer", "configs", "bench"))


@contextlib.contextmanager
def input_errors_exit(prog: str):
  """Ends the program with one line naming the file, line and field of a bad input, instead of a traceback."""
  try:
    yield
  except (DataFormatError, PreparedDataError, BadFileError, FileNotFoundError) as e:
    sys.exit(f"{prog}: error: {e}")


class OwnInfoOnly(py_logging.Filter):
  """Passes warnings and errors, and lower levels only from our own packages: Orbax alone logs a dozen INFO lines a
  checkpoint."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(OWN_CODE)


class _PackageConfigParser(ConfigFileFlagParser):
  """Reads ``--config`` after :func:`configs.resolve`; a missing file is a one-line flag error."""

  def parse(self, path: str) -> Any:
    path = configs.resolve(path)
    if not os.path.isfile(path.partition(":")[0]):
      raise ValueError(f"no config file {path.partition(':')[0]} (nor in the installed configs package)")
    return super().parse(path)


def define_flags(default_config: str, what: str) -> None:
  """``--config`` (with ``--config.<field>`` overrides), ``--library_logs`` and ``--compile_cache``."""
  config_flags.DEFINE_config_file("config", configs.resolve(default_config), f"{what} config file.", lock_config=True)
  flags.FLAGS["config"].parser = _PackageConfigParser("config", lock_config=True)
  flags.DEFINE_bool("library_logs", False, "Show the INFO lines of libraries (Orbax, ...) too; warnings and our own "
                    "lines are always shown.")
  flags.DEFINE_string("compile_cache", None, "Directory of JAX's persistent compilation cache (local or gs://); "
                      "default: $JAX_COMPILATION_CACHE_DIR, else jax_compile in the user cache; 'off' turns it off.")


def setup() -> None:
  """Applies :func:`define_flags`' log and compilation-cache flags."""
  if not flags.FLAGS.library_logs:
    logging.get_absl_handler().addFilter(OwnInfoOnly())
  cache = (flags.FLAGS.compile_cache or jax.config.jax_compilation_cache_dir
           or os.path.join(user_cache_dir(), "jax_compile"))
  if cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)


def define_stage_flags(default_config: str, what: str) -> None:
  """A stage's flags, :func:`define_flags` and ``--workdir``; defined only when run as a program, so stage modules
  import together."""
  define_flags(default_config, what)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, exported best model.")
  flags.mark_flag_as_required("workdir")


def run_stage(train_and_evaluate: Callable[[Any, str], Any]) -> None:
  """Runs a stage's ``train_and_evaluate(config, workdir)`` from its flags."""
  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  app.run(main)
