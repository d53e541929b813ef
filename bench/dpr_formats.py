r"""``train.prepare`` on DPR's formats against our jsonl: the same passages must give the same BM25 accuracy.

  python -m bench.dpr_formats --data_dir $RNR_DATA --workdir runs/dpr_formats [--no_record]

Prepares the shared data, then writes its passages twice, as DPR's ``psgs_w100.tsv`` (gzip) and as our corpus
jsonl (one document per passage, so both cut into the same passages), and its questions twice, as NQ-open jsonl
(``question``, ``answer``) and as our question jsonl without gold documents (NQ-open has none); prepares both and
compares every split's BM25 answer accuracy. Records the table in ``docs/scale.md``.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

from absl import app, flags

from bench import report
from rnr_jax.data import PreparedData

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.environ.get("RNR_DATA", "../shared/data"), "The shared data directory.")
flags.DEFINE_string("workdir", "runs/dpr_formats", "Prepared directories and the two copies of the data.")
flags.DEFINE_bool("no_record", False, "Only print the table.")

KS = (1, 5, 20, 100)


def _prepare(out: str, *args: str) -> dict:
  cmd = [sys.executable, "-m", "train.prepare", "--out", out, "--compress", "", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return PreparedData.load(out).manifest


def write_copies(data: PreparedData, out: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """The DPR copy and our jsonl copy of the prepared passages and questions: ``{"corpus": [...], "questions": [...]}``
  arguments of ``train.prepare`` for each."""
  os.makedirs(out, exist_ok=True)
  table = data.passages
  tsv, ours = os.path.join(out, "psgs_w100.tsv.gz"), os.path.join(out, "corpus.jsonl")
  with gzip.open(tsv, "wt", encoding="utf-8", newline="") as f, open(ours, "w", encoding="utf-8") as g:
    f.write("id\ttext\ttitle\n")
    for pid in range(len(table)):
      title, text = table.titles[pid], table.texts[pid]
      f.write(f"{pid + 1}\t{_tsv_field(text)}\t{_tsv_field(title)}\n")  # DPR's ids start at 1
      g.write(json.dumps({"id": pid + 1, "title": title, "text": text}, ensure_ascii=False) + "\n")
  dpr_q, our_q = [], []
  for split in data.splits:
    nq, mine = os.path.join(out, f"{split}.nq-open.jsonl"), os.path.join(out, f"{split}.jsonl")
    with open(nq, "w", encoding="utf-8") as f, open(mine, "w", encoding="utf-8") as g:
      for q in data.questions(split):
        f.write(json.dumps({"question": q.question, "answer": list(q.answers)}, ensure_ascii=False) + "\n")
        g.write(json.dumps({"id": q.id, "question": q.question, "answers": list(q.answers)}, ensure_ascii=False)
                + "\n")
    dpr_q.append(f"{split}={nq}")
    our_q.append(f"{split}={mine}")
  return {"corpus": [tsv], "questions": dpr_q}, {"corpus": [ours], "questions": our_q}


def _tsv_field(value: str) -> str:
  """A TSV field as DPR's files quote it (csv quoting when it holds a quote, tab or newline)."""
  return '"' + value.replace('"', '""') + '"' if any(c in value for c in '"\t\n\r') else value


def main(argv: list[str]) -> None:
  del argv
  work = os.path.abspath(FLAGS.workdir)
  base = _prepare(os.path.join(work, "prepared"), "--data_dir", FLAGS.data_dir)
  dpr, ours = write_copies(PreparedData.load(os.path.join(work, "prepared")), os.path.join(work, "copies"))
  manifests = {}
  for name, inputs in (("DPR psgs_w100.tsv.gz + NQ-open jsonl", dpr), ("our jsonl, same passages", ours)):
    args = [a for spec in inputs["corpus"] for a in ("--corpus", spec)] + ["--questions", *inputs["questions"]]
    manifests[name] = _prepare(os.path.join(work, name.split()[0].lower()), *args)
  rows = []
  for split in base["splits"]:
    for name, m in manifests.items():
      acc = m["splits"][split]["metrics"]
      rows.append([split, name, m["counts"]["passages"], m["splits"][split]["questions"],
                   *(f"{acc[f'bm25_top{k}_answer_acc']:.4f}" for k in KS)])
  text = report.markdown_table(["split", "input", "passages", "questions", *(f"top-{k}" for k in KS)], rows)
  same = all(manifests[n]["splits"][s]["metrics"] == next(iter(manifests.values()))["splits"][s]["metrics"]
             for n in manifests for s in base["splits"])
  print(text)
  print(json.dumps({"identical": same}))
  if not FLAGS.no_record:
    report.record("scale", "DPR formats against our jsonl", text,
                  "BM25 answer accuracy of train.prepare on the two copies of the shared data's passages and "
                  f"questions; every split's metrics {'identical' if same else 'DIFFER'} between the two.",
                  command="python -m bench.dpr_formats --data_dir $RNR_DATA --workdir runs/dpr_formats")


if __name__ == "__main__":
  app.run(main)
