r"""Asks a bundle one or more questions from the command line.

  python -m infer.ask --bundle B "who wrote the iliad" ["another question" ...] [--top_k K --read_passages M
                      --n_best N --no_answer_threshold P --json --engine auto|jax|onnx]

Prints, per question, the n-best answers with their probabilities, each with the title and id of its passage and the
passage with the answer highlighted (ANSI bold on a terminal, ``**...**`` otherwise), then the retrieved titles;
``--json`` prints one JSON object per question instead (:meth:`Prediction.to_json`). ``--bundle`` takes a bundle
directory or a Hugging Face Hub id.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from infer import check_bundle, run
from infer.common import define_engine_flag, enable_compilation_cache
from rnr_jax.qa_system import RULES, Prediction, QASystem

FLAGS = flags.FLAGS
BOLD, RESET = "\033[1m", "\033[0m"


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory (python -m infer.export).")
  flags.DEFINE_integer("top_k", None, "Passages retrieved (default: the bundle's).", lower_bound=1)
  flags.DEFINE_integer("read_passages", None, "Passages read, m' (default: the bundle's).", lower_bound=1)
  flags.DEFINE_enum("rule", None, list(RULES), "Answer rule (default: the bundle's).")
  flags.DEFINE_float("passage_score_weight", None, "λ of the weighted rule (default: the bundle's).", lower_bound=0,
                     upper_bound=1)
  flags.DEFINE_float("lexical_weight", None, "BM25 fusion weight of retrieval, 0 = dense only (default: the bundle's).",
                     lower_bound=0)
  flags.DEFINE_integer("n_best", 3, "Answers shown per question.", lower_bound=1)
  flags.DEFINE_float("no_answer_threshold", 0.0, "Say there is no answer below this probability.", lower_bound=0,
                     upper_bound=1)
  flags.DEFINE_bool("json", False, "Print one JSON object per question.")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  define_engine_flag()
  flags.mark_flag_as_required("bundle")


def highlight(passage: str, start: int, end: int, tty: bool) -> str:
  """``passage`` with ``[start, end)`` in bold (ANSI on a terminal, else ``**...**``); unchanged if start < 0."""
  if start < 0:
    return passage
  left, right = (BOLD, RESET) if tty else ("**", "**")
  return f"{passage[:start]}{left}{passage[start:end]}{right}{passage[end:]}"


def render(p: Prediction, tty: bool) -> str:
  """The printed form of a prediction."""
  if not p.answers:
    return f"Q: {p.question}\nA: (no answer: no passage was retrieved)\n"
  lines = [f"Q: {p.question}", f"A: {p.answer or '(no confident answer)'}"]
  for i, a in enumerate(p.answers, 1):
    lines += [f"{i}. {a.text} (p={a.probability:.3f}) from passage {a.passage.id} (rank {a.passage.rank + 1}): "
              f"{a.passage.title}", f"   {highlight(a.passage.text, a.start, a.end, tty)}"]
  lines.append("Retrieved: " + "; ".join(f"{r.rank + 1}. {r.title} ({r.score:.3f})" for r in p.passages))
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  questions = list(argv[1:])
  if not questions or any(not q.strip() for q in questions):
    raise app.UsageError("give one or more non-empty questions, e.g. python -m infer.ask --bundle B \"question\"")
  check_bundle(FLAGS.bundle)
  enable_compilation_cache(FLAGS.engine)
  system = QASystem.from_pretrained(FLAGS.bundle, engine=FLAGS.engine, cache_dir=FLAGS.cache_dir)
  top_k, read = FLAGS.top_k or system.settings.top_k, FLAGS.read_passages or system.settings.read_passages
  if read > top_k:
    raise app.UsageError(f"--read_passages={read}: more than the {top_k} passages retrieved (--top_k)")
  predictions = system.answer(questions, top_k=FLAGS.top_k, read_passages=FLAGS.read_passages, rule=FLAGS.rule,
                              passage_score_weight=FLAGS.passage_score_weight, lexical_weight=FLAGS.lexical_weight,
                              n_best=FLAGS.n_best, no_answer_threshold=FLAGS.no_answer_threshold)
  if FLAGS.json:
    print("".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in predictions), end="")
    return
  tty = sys.stdout.isatty()
  print("\n".join(render(p, tty) for p in predictions), end="")


if __name__ == "__main__":
  define_flags()
  run(main, "infer.ask")
