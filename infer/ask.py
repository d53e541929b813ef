r"""Asks a bundle one or more questions from the command line.

  python -m infer.ask --bundle B "who wrote the iliad" ["another question" ...] [--top_k K --read_passages M]

Prints, per question, the answer, the title and id of the passage it comes from, and the passage with the answer
highlighted: ANSI bold on a terminal, ``**...**`` otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from rnr_jax.bundle import BundleError
from rnr_jax.qa_system import RULES, Prediction, QASystem

FLAGS = flags.FLAGS
BOLD, RESET = "\033[1m", "\033[0m"


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory (python -m infer.export).")
  flags.DEFINE_integer("top_k", None, "Passages retrieved (default: the bundle's).")
  flags.DEFINE_integer("read_passages", None, "Passages read, m' (default: the bundle's).")
  flags.DEFINE_enum("rule", None, list(RULES), "Answer rule (default: the bundle's).")
  flags.DEFINE_float("passage_score_weight", None, "λ of the weighted rule (default: the bundle's).")
  flags.DEFINE_float("lexical_weight", None, "BM25 fusion weight of retrieval, 0 = dense only (default: the bundle's).")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  flags.mark_flag_as_required("bundle")


def highlight(passage: str, start: int, end: int, tty: bool) -> str:
  """``passage`` with ``[start, end)`` in bold (ANSI on a terminal, else ``**...**``); unchanged if start < 0."""
  if start < 0:
    return passage
  left, right = (BOLD, RESET) if tty else ("**", "**")
  return f"{passage[:start]}{left}{passage[start:end]}{right}{passage[end:]}"


def render(p: Prediction, tty: bool) -> str:
  """The printed form of a prediction."""
  if p.passage_id < 0:
    return f"Q: {p.question}\nA: (no answer: no passage was retrieved)\n"
  return (f"Q: {p.question}\nA: {p.answer}\n"
          f"Passage {p.passage_id} (rank {p.rank + 1}, score {p.score:.3f}): {p.title}\n"
          f"{highlight(p.passage, p.answer_start, p.answer_end, tty)}\n")


def main(argv: Sequence[str]) -> None:
  questions = list(argv[1:])
  if not questions or any(not q.strip() for q in questions):
    raise app.UsageError("give one or more non-empty questions, e.g. python -m infer.ask --bundle B \"question\"")
  try:
    system = QASystem.from_bundle(FLAGS.bundle, cache_dir=FLAGS.cache_dir)
  except (BundleError, FileNotFoundError) as e:
    sys.exit(f"infer.ask: error: {e}")
  predictions = system.answer(questions, top_k=FLAGS.top_k, read_passages=FLAGS.read_passages, rule=FLAGS.rule,
                              passage_score_weight=FLAGS.passage_score_weight, lexical_weight=FLAGS.lexical_weight)
  tty = sys.stdout.isatty()
  print("\n".join(render(p, tty) for p in predictions), end="")


if __name__ == "__main__":
  define_flags()
  app.run(main)
