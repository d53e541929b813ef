r"""Retrieval accuracy table (Training stages I) from finished runs' artifacts.

Collects top-k answer accuracy per dev split from a prepared dataset's BM25
numbers (``manifest.json``), embedding directories written by ``infer.encode``
(``eval.json``, or the hybrid ``eval_lexical.json`` given as the path) and retriever
workdirs (the best row of ``eval.jsonl``), prints
one markdown table and, with ``--record``, stores it in docs/retrieval.md.

  python -m bench.retrieval_table --prepared runs/mini/prepared \
      --run "untrained MiniLM (mean, 384-d, cosine)=EMBEDDINGS_DIR" \
      --run "trained shared 128-d=RETRIEVER_WORKDIR" --record
"""

from __future__ import annotations

import argparse
import json
import os

from bench import report

KS = (1, 5, 20, 100)


def bm25_row(prepared: str, splits: list[str]) -> dict[str, dict[str, float]]:
  with open(os.path.join(prepared, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  return {s: {f"top{k}": manifest["splits"][s]["metrics"][f"bm25_top{k}_answer_acc"] for k in KS} for s in splits}


def run_row(path: str) -> tuple[dict[str, dict[str, float]], str]:
  """Metrics of an ``infer.encode`` output dir, of one of its evaluation files (``eval_lexical.json``: the
  hybrid ranking) or of the best eval of a retriever workdir."""
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      metrics = json.load(f)
    return metrics.get("splits", metrics), ""
  if os.path.exists(os.path.join(path, "eval.json")):
    with open(os.path.join(path, "eval.json"), encoding="utf-8") as f:
      return json.load(f), ""
  evals = os.path.join(path, "eval.jsonl")
  if not os.path.exists(evals):
    raise FileNotFoundError(f"{path}: neither eval.json (infer.encode) nor eval.jsonl (train.retriever)")
  with open(evals, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f"{evals} is empty")
  best = next((r for r in reversed(rows) if r.get("best")), rows[-1])
  metrics = {}
  for key, value in best.items():
    if "/" in key:
      split, metric = key.split("/", 1)
      metrics.setdefault(split, {})[metric] = value
  return metrics, f"step {best.get('step')}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--prepared", required=True, help="prepared dataset dir (for BM25 numbers)")
  ap.add_argument("--run", action="append", default=[], help="NAME=PATH of an infer.encode dir or retriever workdir")
  ap.add_argument("--splits", default="nq_dev,squadshifts_dev")
  ap.add_argument("--note", default="", help="extra text recorded under the table")
  ap.add_argument("--title", default="Retrieval accuracy (Training stages I)",
                  help="docs/retrieval.md section to write (a new title keeps earlier tables)")
  ap.add_argument("--record", action="store_true")
  args = ap.parse_args()
  splits = args.splits.split(",")
  rows = [("BM25 (bm25s, stemmed)", bm25_row(args.prepared, splits), "")]
  for item in args.run:
    name, _, path = item.partition("=")
    metrics, where = run_row(path)
    rows.append((name, metrics, where))
  header = ["retriever"] + [f"{s} top-{k}" for s in splits for k in (1, 5, 20)] + ["checkpoint"]
  cell = lambda m, s, k: f"{m[s][f'top{k}']:.3f}" if s in m and f"top{k}" in m[s] else "-"
  body = [[name] + [cell(m, s, k) for s in splits for k in (1, 5, 20)] + [where or "-"] for name, m, where in rows]
  table = report.markdown_table(header, body)
  print(table)
  if args.record:
    report.record("retrieval", args.title, table, args.note)


if __name__ == "__main__":
  main()
