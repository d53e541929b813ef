r"""EM of the answer rules on the same retrieved and read passages: choose a bundle's rule on held-out questions.

  python -m bench.answer_rules --bundle B --questions NAME=FILE[:first:last] [--questions ...] [--top_k 5] [--record]

Each question's top ``top_k`` passages are retrieved (the bundle's retrieval settings, BM25 fusion included) and
read once; then every rule answers from them: DPR (best span of the top-ranked passage) at m'=1 and m'=top_k, the
paper's weighted rule (λ 0.8) and the fused rule (span logits + log Prank + log Pret, retrieval scale 20) at
m'=top_k. Pass questions that are neither trained on nor the dev sets you report (e.g. the tails of training
splits that the mini pipeline's student never sees).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from bench import report
from bench.hybrid_sweep import parse_questions
from rnr_jax.data.readers import read_questions
from rnr_jax.metrics import exact_match
from rnr_jax.qa_system import QASystem, _power_of_two  # pylint: disable=protected-access

RULES = (("dpr", 1), ("dpr", None), ("weighted", None), ("fused", None))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--questions", action="append", required=True, type=parse_questions)
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  system = QASystem.from_bundle(args.bundle, cache_dir=args.cache_dir)
  base = system.settings
  results: dict[str, dict[str, float]] = {}
  for name, path, part in args.questions:
    questions = list(read_questions(path))[part]
    texts = [q.question for q in questions]
    pids, scores = system._retrieve(texts, system.embed_questions(texts), args.top_k, None)  # pylint: disable=protected-access
    m = pids.shape[1]
    q_ids = system.tokenizer.encode_texts(texts)
    correct = {f"{rule} m'={n or m}": [] for rule, n in RULES}
    for start in range(0, len(texts), base.read_batch):
      group = range(start, min(start + base.read_batch, len(texts)))
      batch, logits = system._read_group([q_ids[i] for i in group], pids[group.start:group.stop],  # pylint: disable=protected-access
                                         _power_of_two(len(group), base.read_batch))
      for b, q in enumerate(group):
        for rule, n in RULES:
          s = dataclasses.replace(base, rule=rule, passage_score_weight=0.8)
          p = system._choose(texts[q], batch, logits, b, m, n or m, pids[q], scores[q], s)  # pylint: disable=protected-access
          correct[f"{rule} m'={n or m}"].append(exact_match(p.answer, questions[q].answers))
    results[name] = {k: float(np.mean(v)) for k, v in correct.items()}
    print(name, json.dumps(results[name]), flush=True)
  rules = list(next(iter(results.values())))
  mean = {r: float(np.mean([results[q][r] for q in results])) for r in rules}
  table = report.markdown_table(["rule", *(f"{q} EM %" for q in results), "mean"],
                                [[r, *(f"{100 * results[q][r]:.2f}" for q in results), f"{100 * mean[r]:.2f}"]
                                 for r in rules])
  print(table)
  if args.record:
    sets = "; ".join(f"{name}: {path}[{p.start}:{p.stop}]" for name, path, p in args.questions)
    report.record("Answer rules", table,
                  f"Bundle {args.bundle} (BM25 fusion weight {base.lexical_weight:g}); top {args.top_k} retrieved "
                  f"and read once per question, every rule answering from the same logits. Question sets: {sets}.")
  print(json.dumps({"results": results, "mean": mean}))


if __name__ == "__main__":
  main()
