r"""EM of the answer rules on the same retrieved and read passages: choose a bundle's rule on held-out questions.

  python -m bench.answer_rules --bundle B --questions NAME=FILE[:first:last] [--questions ...] [--top_k 5] [--record]
  python -m bench.answer_rules --workdir W --config configs/mini.py --system teacher ...   (a pipeline's system)

Each question's top ``top_k`` passages are retrieved (the bundle's retrieval settings, BM25 fusion included; a
pipeline's system retrieves densely over its exact index) and read; every rule answers from the same passages:
DPR (best span of the top-ranked passage) at m'=1 and m'=top_k, the paper's weighted rule (λ 0.8) and the fused
rule (span logits + log Prank + log Pret, retrieval scale 20) at m'=top_k. Pass questions that are neither trained
on nor the dev sets you report (e.g. the tails of training splits that the mini pipeline's student never sees).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from bench import report
from bench.hybrid_sweep import add_system_flags, load_system, parse_questions
from rnr_jax.data.readers import read_questions
from rnr_jax.metrics import exact_match


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_system_flags(parser)
  parser.add_argument("--questions", action="append", required=True, type=parse_questions)
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--title", default="Answer rules")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  system, source = load_system(args, "bench.answer_rules")
  base = dataclasses.replace(system.settings, top_k=args.top_k, passage_score_weight=0.8)
  k = min(args.top_k, len(system.index))
  choices = {"dpr": (1, k), "weighted": (k,), "fused": (k,)}
  results: dict[str, dict[str, float]] = {}
  for name, path, part in args.questions:
    questions = list(read_questions(path))[part]
    results[name] = {}
    for rule, counts in choices.items():
      answers = system.predict([q.question for q in questions], top_k=args.top_k, read_counts=counts, rule=rule,
                               passage_score_weight=base.passage_score_weight).predictions
      for n in counts:
        results[name][f"{rule} m'={n}"] = float(np.mean([exact_match(p.answer, q.answers)
                                                         for p, q in zip(answers[n], questions)]))
    print(name, json.dumps(results[name]), flush=True)
  rules = list(next(iter(results.values())))
  mean = {r: float(np.mean([results[q][r] for q in results])) for r in rules}
  table = report.markdown_table(["rule", *(f"{q} EM %" for q in results), "mean"],
                                [[r, *(f"{100 * results[q][r]:.2f}" for q in results), f"{100 * mean[r]:.2f}"]
                                 for r in rules])
  print(table)
  if args.record:
    sets = "; ".join(f"{name}: {path}[{p.start}:{p.stop}]" for name, path, p in args.questions)
    report.record("reading", args.title, table,
                  f"{source} (BM25 fusion weight {base.lexical_weight:g}); top {args.top_k} retrieved "
                  f"and read per question, every rule answering from the same passages. Question sets: {sets}.")
  print(json.dumps({"results": results, "mean": mean}))


if __name__ == "__main__":
  main()
