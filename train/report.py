"""The pipeline's report: the paper's Table 3 (footprint), Table 4 (EM per stage) and Figure 1 analogues.

Each evaluated system is one row: its name, the stage that produced it, the footprint of its components (retriever,
reader, index, corpus; bytes) and the EM on each dev split. ``report.json`` holds the rows; :func:`markdown` renders the
two tables and :func:`plot` the footprint-vs-EM figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rnr_jax.io import atomic_write_bytes, atomic_write_text

COMPONENTS = ("retriever", "reader", "index", "corpus")
MB = 1e6


def _mb(n: float | None) -> str:
  return "-" if n is None else f"{n / MB:.1f}"


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def markdown(report: Mapping[str, Any], figure: str | None = "figure1.png") -> str:
  """The report's tables (Table 3 and 4 analogues, retrieval accuracy, stage times) as markdown.

  ``figure``: path of the Figure 1 analogue relative to the markdown file (None: no link).
  """
  rows = report["systems"]
  splits = list(report["dev_splits"])
  out = [f"# {report['title']}", "", report.get("description", ""), ""]
  if figure:
    out += [f"![Footprint vs EM (Figure 1 analogue)]({figure})", ""]
  out += ["## Footprint per stage (Table 3 analogue, MB = 10^6 bytes)", "",
          "| system | retriever | reader | index | corpus | total | vs first |",
          "|---|---:|---:|---:|---:|---:|---:|"]
  first = rows[0]["footprint"]["total"] if rows else None
  for r in rows:
    f = r["footprint"]
    shared = " (shared)" if f.get("shared_encoder") else ""
    ratio = f"{first / f['total']:.1f}x smaller" if first and r is not rows[0] else "1x"
    out.append(f"| {r['name']} | {_mb(f.get('retriever'))}{shared} | {_mb(f.get('reader'))} | {_mb(f.get('index'))} "
               f"| {_mb(f.get('corpus'))} | {_mb(f['total'])} | {ratio} |")
  out += ["", "## Exact match per stage (Table 4 analogue, %)", "",
          "| system | " + " | ".join(splits) + " | " + " | ".join(f"{s} vs first" for s in splits) + " |",
          "|---|" + "---:|" * (2 * len(splits))]
  for r in rows:
    ems = [r["em"].get(s) for s in splits]
    rel = [None if first_em is None or not first_em or em is None else em / first_em
           for em, first_em in zip(ems, [rows[0]["em"].get(s) for s in splits])]
    out.append(f"| {r['name']} | " + " | ".join(_pct(e) for e in ems) + " | "
               + " | ".join("-" if x is None else f"{100 * x:.1f}%" for x in rel) + " |")
  retrieval = report.get("retrieval", [])
  if retrieval:
    ks = sorted({k for r in retrieval for s in r["accuracy"].values() for k in s}, key=lambda k: int(k[3:]))
    out += ["", "## Retrieval: top-k answer accuracy (%)", "",
            "| retriever | " + " | ".join(f"{s} {k}" for s in splits for k in ks) + " |",
            "|---|" + "---:|" * (len(splits) * len(ks))]
    for r in retrieval:
      out.append(f"| {r['name']} | " + " | ".join(_pct(r['accuracy'].get(s, {}).get(k)) for s in splits for k in ks)
                 + " |")
  extra = report.get("filter")
  if extra:
    out += ["", "## Passage filter", "", f"kept {extra['kept']} of {extra['num_passages']} passages "
            f"({100 * extra['fraction']:.1f}%); answer-holding passages survive for "
            + ", ".join(f"{100 * v:.1f}% of {s}" for s, v in extra["survival"].items()) + " questions; "
            + "teacher top-20 " + ", ".join(
                f"{s} {100 * v['before']:.1f} -> {100 * v['after']:.1f}" for s, v in extra["top20"].items()) + "."]
  sweep = (extra or {}).get("sweep")
  if sweep:
    splits_ = list(next(iter(sweep.values())))
    out += ["", "Keeping the top fraction of passages by filter score (teacher candidates restricted to them; "
            "survival: questions keeping a gold answer-holding passage):", "",
            "| kept | " + " | ".join(f"{s} survival | {s} top-1 | {s} top-20" for s in splits_) + " |",
            "|---:|" + "---:|" * (3 * len(splits_))]
    for fraction, row in sweep.items():
      out.append(f"| {float(fraction):.0%} | " + " | ".join(
          f"{_pct(row[s]['survival'])} | {_pct(row[s]['top1'])} | {_pct(row[s]['top20'])}" for s in splits_) + " |")
  stages = report.get("stages", {})
  if stages:
    out += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---:|"]
    out += [f"| {name} | {s['seconds']:.0f} |" for name, s in stages.items()]
    out.append(f"| total | {sum(s['seconds'] for s in stages.values()):.0f} |")
  return "\n".join(out) + "\n"


def plot(report: Mapping[str, Any], path: str, split: str) -> None:
  """Footprint (log x) vs EM on ``split`` per system, as a PNG (Figure 1 analogue)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = [r for r in report["systems"] if r["em"].get(split) is not None]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  xs = [r["footprint"]["total"] / MB for r in rows]
  ys = [100 * r["em"][split] for r in rows]
  ax.plot(xs, ys, "o-", color="tab:blue")
  for x, y, r in zip(xs, ys, rows):
    ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("system footprint (MB, log scale)")
  ax.set_ylabel(f"EM on {split} (%)")
  ax.set_title(report["title"], fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  import io  # pylint: disable=import-outside-toplevel

  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())


def write(report: Mapping[str, Any], directory: str, figure_split: str | None = None) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and ``figure1.png`` into ``directory``; returns their paths."""
  paths = {"json": os.path.join(directory, "report.json"), "markdown": os.path.join(directory, "report.md"),
           "figure": os.path.join(directory, "figure1.png")}
  atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
  atomic_write_text(paths["markdown"], markdown(report))
  plot(report, paths["figure"], figure_split or report["dev_splits"][0])
  return paths


def system_row(name: str, stage: str, footprint: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]],
               **extra: Any) -> dict[str, Any]:
  """One row: ``footprint`` (component bytes) and per-split evaluation summaries (``em``, ``f1``, ...)."""
  return {"name": name, "stage": stage, "footprint": dict(footprint),
          "em": {s: r["em"] for s, r in results.items()}, "f1": {s: r["f1"] for s, r in results.items()},
          "results": {s: dict(r) for s, r in results.items()}, **extra}


def total(parts: Mapping[str, Any], keys: Sequence[str] = COMPONENTS) -> int:
  return int(sum(parts.get(k) or 0 for k in keys))


def nbytes(params: Any) -> int:
  """Bytes of a parameter pytree as stored (float32 weights: 4 per value)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
