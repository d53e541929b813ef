r"""End-to-end evaluation of a bundle on a question file (paper appendix A.3).

  python -m infer.evaluate --bundle B --questions Q.jsonl [--limit N --top_k K --rule dpr|weighted|fused
                           --passage_score_weight λ --lexical_weight W --out PRED.jsonl --n_best N
                           --retrieval_out RETRIEVAL.json --trec_out RUN.trec --engine auto|jax|onnx]

Questions are in our jsonl format (``answers``) or NQ-open (``answer``). Each question's top-k passages are retrieved
once and read once; answers are chosen from the first m' passages for each m' in {1, 10, 20, ...} up to ``top_k`` (and
``top_k`` itself). Printed: a progress bar, EM and F1 for each m', the top-k answer accuracy of retrieval (DPR
``has_answer`` on the decoded passage text), questions per second (encoding, search, reading and answer choice,
compilation included), and, as the last line, one JSON object: ``n``, ``em`` and ``f1`` (at the m' with the best EM, as
the paper reports), ``best_read_passages``, ``em_at`` / ``f1_at`` (per m'), ``top_k_accuracy``, ``questions_per_s`` and
the settings. EM and F1 are fractions. ``--out`` writes one JSON line per question with the prediction at the best m':
``id``, ``question``, ``prediction``, its ``probability``, ``passage_id``, ``title``, ``score``, gold ``answers``,
``correct`` (EM), the ``n_best`` answers (``--n_best``) and the ``retrieved`` passages (``id``, ``score``), best first.
``--retrieval_out F.json`` writes the retrieval as DPR retrieval JSON and ``--trec_out RUN`` as a TREC run with its
has_answer qrels in ``RUN.qrels`` (:mod:`infer.formats`; score either with ``python -m infer.score_retrieval``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from infer import check_bundle, check_output, formats, run
from infer.common import define_engine_flag, enable_compilation_cache, local_mesh
from rnr_jax.data.readers import Question, read_questions
from rnr_jax.io import atomic_write_text
from rnr_jax.metrics import exact_match, normalize_answer
from rnr_jax.qa_system import RULES, Prediction, QASystem, evaluate_system

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory (python -m infer.export).")
  flags.DEFINE_string("questions", None, "Question file: our jsonl or NQ-open jsonl.")
  flags.DEFINE_integer("limit", None, "First N questions (default: all).", lower_bound=1)
  flags.DEFINE_integer("top_k", None, "Passages retrieved per question (default: the bundle's).", lower_bound=1)
  flags.DEFINE_enum("rule", None, list(RULES), "Answer rule (default: the bundle's).")
  flags.DEFINE_float("passage_score_weight", None, "λ of the weighted rule (default: the bundle's).", lower_bound=0,
                     upper_bound=1)
  flags.DEFINE_float("lexical_weight", None, "BM25 fusion weight of retrieval, 0 = dense only (default: the "
                     "bundle's; see rnr_jax.lexical).", lower_bound=0)
  flags.DEFINE_integer("batch_size", 64, "Questions per prediction call.", lower_bound=1)
  flags.DEFINE_integer("max_read", 0, "Read at most this many of the top_k passages (m' above it skipped); 0 = all.",
                       lower_bound=0)
  flags.DEFINE_string("out", None, "Write per-question predictions to this jsonl file.")
  flags.DEFINE_integer("n_best", 1, "Answers per question in --out.", lower_bound=1)
  flags.DEFINE_string("retrieval_out", None, "Write the retrieved passages as DPR retrieval JSON to this file.")
  flags.DEFINE_string("trec_out", None, "Write the retrieved passages as a TREC run to this file (qrels: FILE.qrels).")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  flags.DEFINE_integer("devices", 0, "Local devices the batches are split over (0: all; the JAX engine).",
                       lower_bound=0)
  define_engine_flag()
  flags.mark_flags_as_required(["bundle", "questions"])


def prediction_records(questions: Sequence[Question], predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
  """The ``--out`` line of each question."""
  records = []
  for q, p in zip(questions, predictions):
    best = p.answers[0] if p.answers else None
    records.append({
        "id": q.id, "question": q.question, "prediction": p.answer, "probability": best and best.probability,
        "passage_id": best.passage.id if best else -1, "title": best.passage.title if best else "",
        "score": best and best.score, "answers": list(q.answers), "correct": bool(exact_match(p.answer, q.answers)),
        "n_best": [{"text": a.text, "probability": a.probability, "passage_id": a.passage.id} for a in p.answers],
        "retrieved": [{"id": r.id, "score": r.score} for r in p.passages]})
  return records


def write_retrieval(questions: Sequence[Question], predictions: Sequence[Prediction]) -> None:
  """``--retrieval_out`` and ``--trec_out``."""
  records = [formats.dpr_record(q.question, q.answers, p.passages) for q, p in zip(questions, predictions)]
  if FLAGS.retrieval_out:
    formats.write_dpr(FLAGS.retrieval_out, records)
  if FLAGS.trec_out:
    formats.write_trec(FLAGS.trec_out, [q.id if q.id else i for i, q in enumerate(questions)], records,
                       qrels_path=FLAGS.trec_out + ".qrels")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_bundle(FLAGS.bundle)
  for flag in ("out", "retrieval_out", "trec_out"):
    check_output(FLAGS[flag].value, flag)
  questions = list(read_questions(FLAGS.questions))[:FLAGS.limit]
  if not questions:
    raise app.UsageError(f"--questions={FLAGS.questions}: no questions")
  empty = sum(not normalize_answer(a) for q in questions for a in q.answers)
  if empty:
    print(f"infer.evaluate: warning: {empty} gold answers are empty after normalisation; EM and F1 ignore them",
          file=sys.stderr)
  enable_compilation_cache(FLAGS.engine)
  system = QASystem.from_pretrained(FLAGS.bundle, engine=FLAGS.engine, cache_dir=FLAGS.cache_dir,
                                    mesh=local_mesh(FLAGS.devices, FLAGS.engine))
  s = system.settings
  rule = FLAGS.rule or s.rule
  weight = s.passage_score_weight if FLAGS.passage_score_weight is None else FLAGS.passage_score_weight
  summary, predictions = evaluate_system(system, questions, top_k=FLAGS.top_k or s.top_k, rule=rule,
                                         passage_score_weight=weight, batch_size=FLAGS.batch_size,
                                         max_read=FLAGS.max_read, lexical_weight=FLAGS.lexical_weight,
                                         n_best=FLAGS.n_best)
  for n in summary["em_at"]:
    print(f"m'={n:>4}  EM {100 * summary['em_at'][n]:6.2f}  F1 {100 * summary['f1_at'][n]:6.2f}")
  print("retrieval: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in summary["top_k_accuracy"].items()))
  print(f"{summary['n']} questions, {summary['questions_per_s']:.2f} questions/s; best m'="
        f"{summary['best_read_passages']}: EM {100 * summary['em']:.2f}, F1 {100 * summary['f1']:.2f}")
  if FLAGS.out:
    atomic_write_text(FLAGS.out, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                         for r in prediction_records(questions, predictions)))
  write_retrieval(questions, predictions)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  run(main, "infer.evaluate")
