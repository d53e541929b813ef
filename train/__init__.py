"""Stage entry points: ``python -m train.<stage>``; ``train.pipeline`` runs them all."""

from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags


def define_stage_flags(default_config: str, what: str) -> None:
  """A stage's flags, ``--config`` (with ``--config.<field>`` overrides) and ``--workdir``; defined only when run as a
  program, so stage modules import together."""
  config_flags.DEFINE_config_file("config", default_config, f"{what} config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, exported best model.")
  flags.mark_flag_as_required("workdir")


def run_stage(train_and_evaluate: Callable[[Any, str], Any]) -> None:
  """Runs a stage's ``train_and_evaluate(config, workdir)`` from its flags."""
  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  app.run(main)
