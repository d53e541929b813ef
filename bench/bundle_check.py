r"""What compression costs: a bundle against the in-memory model it was exported from, on real dev questions.

  python -m bench.bundle_check --bundle W/bundle --model W/finetune/best --questions ../shared/data/nq_dev.jsonl \
      [--limit N] [--record]

Three systems answer the same questions with the bundle's settings (top_k, m', rule):

* ``bundle``: loaded from the bundle (FP16 weight values, INT8 index, token-ID corpus, all decompressed);
* ``in-memory <stored dtype>``: the exported float32 parameters rounded in memory as the bundle stores them (float16
  values; with ``float16+int8-embeddings`` also the per-row int8 word embeddings), the bundle's index and corpus;
  must give exactly the bundle's predictions (same answers, passages and scores);
* ``in-memory FP32``: the float32 parameters, same index: the EM difference to the bundle is the cost of storing
  the weights in fewer bits.

Also printed: the bundle's INT8 recall@10/@20 against exact float32 search (measured at export on real question
embeddings, ``infer.export --recall_split``).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from bench import report
from rnr_jax import exports
from rnr_jax.bundle import stored_values
from rnr_jax.data.readers import read_questions
from rnr_jax.qa_system import QASystem, evaluate_system
from rnr_jax.retrieval import JaxEngine
from rnr_jax.training import mesh as mesh_lib


def bundled_config(bundle: str) -> dict:
  with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--model", required=True, help="the exported model the bundle was made from (W/best)")
  parser.add_argument("--questions", required=True)
  parser.add_argument("--limit", type=int, default=0)
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()

  questions = list(read_questions(args.questions))[:args.limit or None]
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  bundled = QASystem.from_bundle(args.bundle, engine="jax", mesh=mesh)
  s = bundled.settings
  spec, params32 = exports.load_system(args.model, None, mesh)
  params32 = jax.device_get(params32)
  weights_dtype = bundled_config(args.bundle)["weights"]["stored_dtype"]
  params16 = stored_values(params32, weights_dtype)  # what the bundle stores, rounded in memory

  def in_memory(params):
    return QASystem(spec, JaxEngine(spec, params, mesh), bundled.index, bundled.store, bundled.tokenizer, settings=s)

  runs = {}
  stored = f"in-memory {weights_dtype}"
  for name, system in (("bundle", bundled), (stored, in_memory(params16)),
                       ("in-memory FP32", in_memory(params32))):
    summary, predictions = evaluate_system(system, questions, top_k=s.top_k, rule=s.rule,
                                           passage_score_weight=s.passage_score_weight)
    runs[name] = (summary, predictions)
    print(f"{name}: EM {100 * summary['em']:.2f} (m'={summary['best_read_passages']}), "
          f"{summary['questions_per_s']:.2f} questions/s")

  def agreement(a: str, b: str) -> tuple[float, float]:
    pa, pb = runs[a][1], runs[b][1]
    top = lambda p: (p.answers[0].passage.id, p.answers[0].score) if p.answers else (-1, 0.0)
    same = np.mean([x.answer == y.answer and top(x)[0] == top(y)[0] for x, y in zip(pa, pb)])
    score = max(abs(top(x)[1] - top(y)[1]) for x, y in zip(pa, pb))
    return float(same), float(score)

  em_at = {name: r[0]["em_at"] for name, r in runs.items()}
  counts = list(runs["bundle"][0]["em_at"])
  index_report = bundled.index.build_report or {}
  rows = ["| system | " + " | ".join(f"EM m'={n}" for n in counts) + " | same answer+passage as bundle | "
          "max score diff |", "|---|" + "---:|" * (len(counts) + 2)]
  for name in runs:
    same, diff = agreement(name, "bundle")
    rows.append(f"| {name} | " + " | ".join(f"{100 * em_at[name][n]:.2f}" for n in counts)
                + f" | {100 * same:.2f}% | {diff:.2e} |")
  delta = {n: 100 * (em_at["bundle"][n] - em_at["in-memory FP32"][n]) for n in counts}
  rows.append("")
  rows.append(f"{weights_dtype} - float32 EM (points): " + ", ".join(f"m'={n}: {d:+.2f}" for n, d in delta.items()))
  if index_report:
    rows.append(f"INT8 index: {index_report.get('n')} x {index_report.get('dim')}, recall@10 "
                f"{index_report.get('recall@10')}, recall@20 {index_report.get('recall@20')} vs exact float32 "
                f"({index_report.get('eval_source')})")
  table = "\n".join(rows)
  print(table)
  print(json.dumps({"n": len(questions), "em": em_at, "fp16_minus_fp32_points": delta,
                    "weights_dtype": weights_dtype,
                    "bundle_equals_in_memory": agreement(stored, "bundle")[0] == 1.0,
                    "index": index_report}))
  if args.record:
    report.record("compression", f"Compression check: {weights_dtype} bundle vs in-memory model (nq_dev)", table,
                  f"{len(questions)} questions of {args.questions}; bundle {args.bundle}; settings top_k={s.top_k}, "
                  f"rule={s.rule}.", "python -m bench.bundle_check " + " ".join(
                      f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False, 0) and k != "record")
                  + " --record")


if __name__ == "__main__":
  main()
