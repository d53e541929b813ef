r"""Choose a bundle's BM25 fusion weight (``lexical_weight``) on held-out questions.

  python -m bench.hybrid_sweep --bundle B --questions NAME=FILE[:first:last] [--questions ...]
                               [--weights 0,0.01,0.02,0.04,0.08] [--eval NAME=FILE ...] [--record]
  python -m bench.hybrid_sweep --workdir W --config configs/mini.py --system teacher ...   (a pipeline's system)

For each question set, the dense top ``lexical_candidates`` (the bundle's setting) and the BM25 top as many are
retrieved once; each weight fuses them (:func:`rnr_jax.lexical.fuse`) and scores top-1/5/20 answer accuracy. The
chosen weight has the best top-1 accuracy averaged over the sets (ties: the smaller weight). Pass questions that
the model never trained on and that are not the dev sets you report, e.g. the tail of a training split the mini
pipeline does not use (``nq_train.jsonl:-500:``). The last line of stdout is a JSON object with every accuracy
and ``chosen``; give that to ``infer.export --lexical_weight`` (or a pipeline config's ``bundle.lexical_weight``).
``--eval`` then reports EM (DPR rule, top passage read) and top-1 of each named question file at weight 0 and at
the chosen weight. ``--workdir`` takes the system from a finished pipeline work directory instead of a bundle: the
teacher system over the whole corpus, or a unified run (``distill`` / ``finetune``) over the filter's subset.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench import report
from rnr_jax.data.readers import read_questions
from rnr_jax.lexical import fuse
from rnr_jax.metrics import AnswerMatcher, answer_top_k_accuracy
from rnr_jax.qa_system import RULES, QASystem, evaluate_system

EVAL_TOP_K = 5  # passages retrieved per question in the --eval runs

KS = (1, 5, 20)


def add_system_flags(parser: argparse.ArgumentParser) -> None:
  """``--bundle``, or ``--workdir`` / ``--config`` / ``--data_dir`` / ``--system``: the system to measure."""
  parser.add_argument("--bundle", default=None)
  parser.add_argument("--workdir", default=None, help="a finished pipeline work directory (instead of --bundle)")
  parser.add_argument("--config", default=None, help="the pipeline config W was run with")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--system", default="teacher", choices=("teacher", "distill", "finetune"))
  parser.add_argument("--cache_dir", default=None)


def load_system(args: argparse.Namespace, prog: str) -> tuple[QASystem, str]:
  """``(system, description)`` from the flags of :func:`add_system_flags`."""
  if (args.bundle is None) == (args.workdir is None):
    raise SystemExit(f"{prog}: pass --bundle, or --workdir with --config")
  if args.bundle is not None:
    return QASystem.from_bundle(args.bundle, cache_dir=args.cache_dir), f"Bundle {args.bundle}"
  from rnr_jax.config import load_config  # pylint: disable=import-outside-toplevel
  from train.pipeline import Pipeline  # pylint: disable=import-outside-toplevel
  if args.config is None:
    raise SystemExit(f"{prog}: --workdir needs --config")
  pipeline = Pipeline(load_config(args.config), args.workdir, data_dir=args.data_dir)
  system = (pipeline.teacher_system(None) if args.system == "teacher" else pipeline.unified_system(args.system))[0]
  return system, f"System {args.system} of {args.workdir} (float32, exact index)"


def parse_questions(spec: str) -> tuple[str, str, slice]:
  """``NAME=FILE[:first:last]`` -> (name, file, slice); first / last are Python slice bounds."""
  name, sep, rest = spec.partition("=")
  if not sep or not name or not rest:
    raise argparse.ArgumentTypeError(f"--questions wants NAME=FILE[:first:last], got {spec!r}")
  parts = rest.rsplit(":", 2)
  if len(parts) == 3 and all(p == "" or p.lstrip("-").isdigit() for p in parts[1:]):
    path, first, last = parts
    return name, path, slice(int(first) if first else None, int(last) if last else None)
  return name, rest, slice(None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_system_flags(parser)
  parser.add_argument("--questions", action="append", required=True, type=parse_questions)
  parser.add_argument("--eval", action="append", default=[], type=parse_questions)
  parser.add_argument("--eval_rule", default="dpr", choices=RULES,
                      help="answer rule of the --eval runs")
  parser.add_argument("--eval_read", type=int, default=1, help="passages read per question in the --eval runs (m')")
  parser.add_argument("--weights", default="0,0.01,0.02,0.03,0.04,0.06,0.08")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  weights = sorted({float(w) for w in args.weights.split(",")})
  if not weights or min(weights) < 0:
    raise SystemExit("bench.hybrid_sweep: --weights must be numbers >= 0")

  system, source = load_system(args, "bench.hybrid_sweep")
  n = min(system.settings.lexical_candidates, len(system.index))
  start = time.perf_counter()
  lexical = system.lexical_index()
  build_s = time.perf_counter() - start
  matcher = AnswerMatcher(lambda pid: system.passage(pid)[1])
  results: dict[str, dict[str, dict[str, float]]] = {}
  for name, path, part in args.questions:
    questions = list(read_questions(path))[part]
    if not questions:
      raise SystemExit(f"bench.hybrid_sweep: {path}: no questions in {part}")
    texts = [q.question for q in questions]
    answers = [q.answers for q in questions]
    dense = system.search(texts, n, lexical_weight=0.0)
    bm25 = lexical.search(texts, n)
    results[name] = {}
    for w in weights:
      ids = dense[0][:, :max(KS)] if w == 0 else fuse(*dense, *bm25, w, max(KS))[0]
      acc = answer_top_k_accuracy(ids, answers, matcher, KS)
      results[name][str(w)] = {f"top{k}": float(v) for k, v in acc.items()}
    results[name]["bm25"] = {f"top{k}": float(v) for k, v in
                             answer_top_k_accuracy(bm25[0][:, :max(KS)], answers, matcher, KS).items()}
    print(f"{name}: {len(questions)} questions of {path}", flush=True)
  mean_top1 = {w: float(np.mean([results[q][str(w)]["top1"] for q in results])) for w in weights}
  chosen = max(weights, key=lambda w: (mean_top1[w], -w))
  header = ["weight", *(f"{q} top-{k}" for q in results for k in KS), "mean top-1"]
  rows = [[("BM25 alone" if w == "bm25" else f"{float(w):g}" + (" (chosen)" if float(w) == chosen else "")),
           *(f"{results[q][w]['top{}'.format(k)]:.3f}" for q in results for k in KS),
           f"{mean_top1[float(w)]:.3f}" if w != "bm25" else "-"]
          for w in [*map(str, weights), "bm25"]]
  table = report.markdown_table(header, rows)
  print(table)
  evals = {}
  eval_read = min(args.eval_read, EVAL_TOP_K)
  for name, path, part in args.eval:
    questions = list(read_questions(path))[part]
    for w in sorted({0.0, chosen}):
      summary, _ = evaluate_system(system, questions, top_k=EVAL_TOP_K, rule=args.eval_rule,
                                     passage_score_weight=0.8, max_read=args.eval_read, progress=False,
                                     lexical_weight=w)
      em = summary["em_at"][str(eval_read)]
      evals[f"{name}@{w:g}"] = {"em": em, "top1": summary["top_k_accuracy"]["top1"], "n": len(questions)}
      print(f"{name}, weight {w:g}: EM {100 * em:.2f}, top-1 {100 * evals[f'{name}@{w:g}']['top1']:.2f}",
            flush=True)
  if evals:
    table += "\n\n" + report.markdown_table(
        ["question set", "weight", f"EM % ({args.eval_rule} rule, m'={eval_read})", "top-1 %"],
        [[*k.split("@"), f"{100 * v['em']:.2f}", f"{100 * v['top1']:.2f}"] for k, v in evals.items()])
  if args.record:
    sets = "; ".join(f"{name}: {path}[{p.start}:{p.stop}]" for name, path, p in args.questions)
    title = ("Hybrid retrieval: BM25 fusion weight" + ("" if args.bundle else f" ({args.system} system)")
             + ("" if (args.eval_rule, args.eval_read) == ("dpr", 1)
                else f", {args.eval_rule} rule m'={args.eval_read}"))
    report.record("retrieval", title, table,
                  f"{source} ({len(system.index)} passages); BM25 (bm25s, stemmed) built from the "
                  f"system's token-ID passages in {build_s:.1f} s; {n} candidates from each retrieval; weight 0 = "
                  f"the dense index alone. Question sets: {sets}. Chosen: the best mean top-1."
                  + (" Second table: every question of each --eval file at weight 0 and the chosen weight, top "
                     f"{EVAL_TOP_K} retrieved, answer by the {args.eval_rule} rule from the first {eval_read} "
                     "(m')." if evals else ""))
  print(json.dumps({"results": results, "mean_top1": {str(w): v for w, v in mean_top1.items()}, "chosen": chosen,
                    "lexical_build_s": round(build_s, 2), "eval": evals}))


if __name__ == "__main__":
  main()
