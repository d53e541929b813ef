r"""Scores a retrieval file with this toolkit's top-k answer accuracy (DPR's ``has_answer``), whoever wrote it.

  python -m infer.score_retrieval --dpr RETRIEVAL.json [--use_file_flags] [--ks 1,5,20,100]
  python -m infer.score_retrieval --trec RUN --questions Q.jsonl --bundle B

A DPR retrieval JSON file (:mod:`infer.formats`) carries its passages' text; a TREC run names passages by id, so their
text comes from ``--bundle`` (ids as the bundle numbers its passages) and the answers from ``--questions`` (a question's
id, or its line number from 0 when it has none). Prints one JSON object: ``n`` and ``top_k_accuracy``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from infer import formats
from rnr_jax.bundle import BundleError
from rnr_jax.data.readers import DataFormatError, read_questions
from rnr_jax.qa_system import QASystem

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("dpr", None, "DPR retrieval JSON file.")
  flags.DEFINE_bool("use_file_flags", False, "--dpr: trust the file's has_answer instead of recomputing it.")
  flags.DEFINE_string("trec", None, "TREC run file.")
  flags.DEFINE_string("questions", None, "--trec: question file (our jsonl or NQ-open) with the answers.")
  flags.DEFINE_string("bundle", None, "--trec: bundle directory or hub id whose passages the run ranks.")
  flags.DEFINE_list("ks", ["1", "5", "20", "100"], "Cut-offs k.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.dpr) == bool(FLAGS.trec) or (FLAGS.trec and not (FLAGS.questions and FLAGS.bundle)):
    raise app.UsageError("give --dpr FILE, or --trec RUN with --questions and --bundle")
  ks = sorted({int(k) for k in FLAGS.ks})
  try:
    if FLAGS.dpr:
      records = formats.read_dpr(FLAGS.dpr)
      n, accuracy = len(records), formats.dpr_top_k_accuracy(records, ks, FLAGS.use_file_flags)
    else:
      questions = list(read_questions(FLAGS.questions))
      answers = {formats.trec_qid(q.id or i): q.answers for i, q in enumerate(questions)}
      system = QASystem.from_pretrained(FLAGS.bundle)
      n, accuracy = len(answers), formats.trec_top_k_accuracy(formats.read_trec(FLAGS.trec), answers,
                                                              lambda d: system.passage(int(d))[1], ks)
  except (BundleError, DataFormatError, OSError, ValueError, KeyError) as e:
    sys.exit(f"infer.score_retrieval: error: {e}")
  print(json.dumps({"n": n, "top_k_accuracy": {f"top{k}": v for k, v in accuracy.items()}}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
