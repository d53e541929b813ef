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


def reads(max_read: int) -> str:
  """How many retrieved passages an evaluation reads (``eval.max_read`` / ``bundle.max_read``)."""
  if max_read == 1:
    return "the top passage (m'=1)"
  return "m' = 1 up to all retrieved" if max_read <= 0 else f"m' = 1 up to {max_read}"


def retrieval_rows(records: Mapping[str, Any], dev_splits: Sequence[str], bundle_name: str) -> list[dict[str, Any]]:
  """Top-k answer accuracy on the dev splits of BM25, the trained retrievers and the evaluated systems."""
  rows = [{"name": "BM25", "accuracy": {sp: {f"top{k}": m[f"bm25_top{k}_answer_acc"] for k in (1, 5, 20, 100)}
                                        for sp, m in records["prepare"]["summary"]["bm25"].items()}}]
  for stage, name in (("teacher_retriever", "teacher: two encoders, full width"),
                      ("student_retriever", "student: shared encoder, first d dims (over the subset)")):
    if stage in records:
      metrics = records[stage]["summary"]["metrics"]
      rows.append({"name": name, "accuracy": {
          sp: {k.split("/")[1]: v for k, v in metrics.items() if k.startswith(sp + "/")} for sp in dev_splits}})
  for stage, name in (("eval_distill", "unified after KD (over the subset)"),
                      ("eval_finetune", "unified after finetuning (over the subset)"), ("bundle", bundle_name)):
    if stage not in records:
      continue
    rows.append({"name": name, "accuracy": {sp: r["top_k_accuracy"]
                                            for sp, r in records[stage]["summary"]["results"].items()}})
  return rows


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
  reading = report.get("reader")
  if reading and reading["metrics"]:
    names = {"em_gold_alone": "the gold passage alone", "em_gold_ranked": "the gold passage among hard negatives, "
             "the ranker choosing", "em_open": "the best of the retrieved top-n"}
    keys = list(reading["metrics"])
    label = lambda k: names.get(k, "the retrieved top " + k.split("@")[1] if "@" in k else k)  # noqa: E731
    curve = reading.get("curve") or [{"step": "best", "questions": "", **reading["metrics"]}]
    out += ["", f"## Teacher reader on {reading['split']} (EM %, each named for what it reads)", "",
            "Its learning curve: EM against the training questions seen, one row per evaluation.", "",
            "| step | questions seen | " + " | ".join(label(k) for k in keys) + " |",
            "|---:|---:|" + "---:|" * len(keys)]
    out += [f"| {e['step']} | {e['questions']} | " + " | ".join(_pct(e.get(k)) for k in keys) + " |" for e in curve]
    out += ["", f"Answers of at most {reading['max_answer_len']} tokens (the reader's span limit) exist for "
            + ", ".join(f"{100 * v:.1f}% of {s}" for s, v in reading["answerable"].items()) + " questions."]
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


def plot(report: Mapping[str, Any], path: str) -> None:
  """Footprint (log x) vs EM per system, one panel per dev split, as a PNG (Figure 1 analogue)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel

  rows, splits = report["systems"], list(report["dev_splits"])
  xs = [r["footprint"]["total"] / MB for r in rows]
  fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), dpi=130, sharey=True, squeeze=False)
  for ax, split in zip(axes[0], splits):
    ys = [100 * r["em"][split] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue")
    for n, (x, y) in enumerate(zip(xs, ys), 1):  # consecutive stages often share a footprint: alternate sides
      ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(7 if n % 2 else -7, -3),
                  ha="left" if n % 2 else "right", fontsize=8)
    ax.set_xscale("log")
    # A few plain labels: the default log ticks overlap on a span of one decade.
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    ax.set_ylim(0, max(100 * max(r["em"][s] for r in rows for s in splits) * 1.2, 5))
    ax.set_xlabel("system footprint (MB, log scale)")
    ax.set_title(split, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
  axes[0][0].set_ylabel("exact match (%)")
  key = "; ".join(f"{n} {r.get('short', r['name'])}" for n, r in enumerate(rows, 1))
  fig.suptitle("Footprint falls, EM holds", fontsize=10)
  fig.text(0.5, 0.01, key, ha="center", fontsize=7, wrap=True)
  fig.tight_layout(rect=(0, 0.06, 1, 0.95))
  import io  # pylint: disable=import-outside-toplevel

  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())


def write(report: Mapping[str, Any], directory: str) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and ``figure1.png`` into ``directory``; returns their paths."""
  paths = {"json": os.path.join(directory, "report.json"), "markdown": os.path.join(directory, "report.md"),
           "figure": os.path.join(directory, "figure1.png")}
  atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
  atomic_write_text(paths["markdown"], markdown(report))
  plot(report, paths["figure"])
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
