r"""ScaNN INT8 brute force vs exact float32 search vs ScaNN tree-AH, on random vectors.

For ``N x d`` standard-normal passage vectors and ``Q`` queries from the same
distribution, measures per :class:`rnr_jax.index.DenseIndex` kind: build time,
queries/s with all queries in one batch and with one query at a time (on a
sample), recall@k against exact float32 search, and the bytes
:meth:`DenseIndex.save` writes. Prints a markdown table and records it, with
the command, machine and date, in ``docs/retrieval.md`` under
"## ScaNN INT8 vs exact search" (replacing only that section).

Isotropic random vectors have no cluster structure, the hardest case for the
tree partitioning of ``"ah"``; real embeddings give it higher recall.

  python -m bench.bench_scann                 # N = 1,000,000 (about 4 GiB of RAM)
  python -m bench.bench_scann --n 100000 --no_record
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

from bench import report
from rnr_jax.index import DenseIndex, exact_search, recall_at_k

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 1_000_000, "Passage vectors.")
flags.DEFINE_integer("dim", 128, "Vector dimension.")
flags.DEFINE_integer("queries", 1000, "Queries (one batch) for throughput and recall.")
flags.DEFINE_integer("single_queries", 100, "Queries searched one at a time for the batch-1 rate.")
flags.DEFINE_integer("k", 10, "Neighbours per query (recall@k).")
flags.DEFINE_integer("seed", 0, "Data seed.")
flags.DEFINE_list("kinds", ["exact", "int8", "int8_row", "ah"], "Index kinds to compare.")
flags.DEFINE_list("ah_options", [], "Overrides of the derived 'ah' settings, e.g. num_leaves=2000.")
flags.DEFINE_list("ah_leaves_to_search", [], "One 'ah' row per value of num_leaves_to_search (default: derived).")
flags.DEFINE_bool("no_record", False, "Only print the table.")

TITLE = "ScaNN INT8 vs exact search"


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def parse_options(items: list[str]) -> dict:
  """``["a=1", "b=0.5", "c=int8"]`` -> ``{"a": 1, "b": 0.5, "c": "int8"}``."""
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    for cast in (int, float, str):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        continue
  return out


def bench_kind(kind: str, x: np.ndarray, queries: np.ndarray, reference: np.ndarray, k: int,
               single: int, options: dict) -> dict:
  """Build, time and measure one index kind."""
  start = time.perf_counter()
  index = DenseIndex.build(x, kind, num_eval_queries=0, **options)
  build_s = time.perf_counter() - start
  index.search(queries[:8], k)  # Warm-up (ScaNN allocates its scratch on the first calls).
  start = time.perf_counter()
  ids, _ = index.search(queries, k)
  batch_qps = len(queries) / (time.perf_counter() - start)
  start = time.perf_counter()
  for i in range(single):
    index.search(queries[i:i + 1], k)
  single_qps = single / (time.perf_counter() - start)
  with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
    sizes = index.save(os.path.join(tmp, "ix"))
  vectors = sum(v for name, v in sizes.items() if name != "ids.npy" and name != "index.json")
  return {"kind": kind, "build_s": build_s, "batch_qps": batch_qps, "single_qps": single_qps,
          "recall": recall_at_k(reference, ids), "bytes": sum(sizes.values()), "vector_bytes": vectors,
          "settings": index.settings}


def table(rows: list[dict], q: int, k: int) -> str:
  lines = [f"| index | build (s) | queries/s, batch of {q} | queries/s, batch 1 | recall@{k} | "
           "bytes without ids | bytes, all files |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  names = {"exact": "exact float32 (numpy matmul)", "int8": "ScaNN INT8 brute force",
           "int8_row": "ScaNN INT8 brute force over per-row int8 codes + exact reorder of the top 100"}
  for r in rows:
    st = r["settings"]
    name = names.get(r["kind"]) or (f"ScaNN tree-AH + {st['reorder_dtype']} reorder, "
                                    f"{st['num_leaves_to_search']}/{st['num_leaves']} leaves")
    lines.append(f"| {name} | {r['build_s']:.2f} | {r['batch_qps']:,.0f} | {r['single_qps']:,.1f} | "
                 f"{r['recall']:.4f} | {r['vector_bytes']:,} ({r['vector_bytes'] / 1e6:.1f} MB) | "
                 f"{r['bytes']:,} ({r['bytes'] / 1e6:.1f} MB) |")
  return "\n".join(lines)


def main(argv):
  del argv
  load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
  rng = np.random.default_rng(FLAGS.seed)
  x = rng.standard_normal((FLAGS.n, FLAGS.dim), dtype=np.float32)
  queries = rng.standard_normal((FLAGS.queries, FLAGS.dim), dtype=np.float32)
  reference, _ = exact_search(x, queries, FLAGS.k)
  single = min(FLAGS.single_queries, FLAGS.queries)
  runs = []
  for kind in FLAGS.kinds:
    if kind != "ah":
      runs.append((kind, {}))
      continue
    for leaves in FLAGS.ah_leaves_to_search or [None]:
      options = parse_options(FLAGS.ah_options)
      if leaves is not None:
        options["num_leaves_to_search"] = int(leaves)
      runs.append((kind, options))
  rows = []
  for kind, options in runs:
    rows.append(bench_kind(kind, x, queries, reference, FLAGS.k, single, options))
    print(f"{kind}: {rows[-1]}", flush=True)
  result = table(rows, FLAGS.queries, FLAGS.k)
  print(result)
  if FLAGS.no_record:
    return
  settings = next(({k: v for k, v in r["settings"].items() if k != "num_leaves_to_search"}
                   for r in rows if r["kind"] == "ah"), None)
  note = "\n".join([
      f"- data: {FLAGS.n:,} x {FLAGS.dim} standard-normal float32 vectors; {FLAGS.queries} queries from the same "
      f"distribution; batch-1 rate over {single} queries; recall@{FLAGS.k} against exact float32 search",
      "- bytes: what `DenseIndex.save` writes, without and with the passage ids (`ids.npy`, int64) "
      "and `index.json`",
      *([f"- ah settings: {settings}"] if settings else []),
      f"- load average before the run (other jobs share this machine): {load_before}",
  ])
  report.record("retrieval", TITLE, result, note)
  print("recorded in docs/")


if __name__ == "__main__":
  app.run(main)
