r"""Where the unified student loses EM: its retrieval or its reading, against the teacher system's.

  python -m bench.em_decomposition --config configs/mini.py --workdir W [--data_dir D] [--run finetune] [--record]

Four systems over the same passages (the filter's subset of a finished pipeline work directory W): each reader
(the teacher's, the unified student's) reads the top-1 passage of each retrieval (the teacher's two-encoder
retriever, the student's own 128-d index), DPR rule, every question of each dev split. The off-diagonal cells
separate the two losses: ``student reader x teacher retrieval`` is what the student would score with the teacher's
retrieval, ``teacher reader x student retrieval`` what the teacher's reader makes of the student's passages. Also
printed: top-1 answer accuracy of each retrieval and EM among questions whose top-1 passage holds an answer.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import report
from rnr_jax.config import load_config
from rnr_jax.metrics import exact_match
from train.pipeline import Pipeline


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="the pipeline config W was run with")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--run", default="finetune", choices=("distill", "finetune"), help="the unified model")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()

  pipeline = Pipeline(load_config(args.config), args.workdir, data_dir=args.data_dir)
  for stage in ("eval_filtered", f"eval_{args.run}"):
    if pipeline.finished(stage) is None:
      raise SystemExit(f"bench.em_decomposition: {args.workdir} has not finished stage {stage}")
  pids = pipeline.subset_pids()
  readers = {"teacher": pipeline.teacher_system(pids)[0], "student": pipeline.unified_system(args.run)[0]}
  matcher = pipeline.data.matcher()
  rows, results = [], {}
  for split in pipeline.dev_splits:
    questions = pipeline.questions(split)
    texts, answers = [q.question for q in questions], [q.answers for q in questions]
    for retriever, searcher in readers.items():
      ids, scores = searcher.search(texts, 1, lexical_weight=0.0)
      for reader, system in readers.items():
        predictions = system.read_given(texts, ids, scores, [("dpr", 1)])["dpr", 1]  # this reader, that retrieval
        correct = np.array([exact_match(p.answer, a) for p, a in zip(predictions, answers)])
        hit = np.array([p.passage_id >= 0 and matcher.has_answer(a, p.passage_id)
                        for p, a in zip(predictions, answers)])
        given = float(correct[hit].mean()) if hit.any() else 0.0
        results[f"{split}/{reader} reader/{retriever} retrieval"] = {
            "em": float(correct.mean()), "top1": float(hit.mean()), "em_given_top1": given}
        rows.append([split, f"{reader} reader", f"{retriever} retrieval", f"{100 * correct.mean():.2f}",
                     f"{100 * hit.mean():.2f}", f"{given:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
  table = report.markdown_table(["split", "reader", "retrieval (top-1 read)", "EM %", "top-1 holds an answer %",
                                 "EM given such a top-1"], rows)
  print(table)
  print(json.dumps(results))
  if args.record:
    report.record(f"Where the unified student loses EM ({args.run}): retrieval vs reading", table,
                  f"Work directory {args.workdir} ({args.config}); every question of each dev split, exact index "
                  f"over the filter's {len(pids)} kept passages, float32 weights, DPR rule over the top-1 passage.")


if __name__ == "__main__":
  main()
