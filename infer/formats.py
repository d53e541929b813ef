"""The retrieval formats IR and QA tools exchange: DPR retrieval JSON and TREC run files, written and read.

DPR retrieval JSON (what DPR's retriever writes and FiD and pyserini's evaluators read): a list of ``{"question",
"answers", "ctxs": [{"id", "title", "text", "score", "has_answer"}, ...]}``, passages best first. A TREC run has one
line ``qid Q0 docid rank score tag`` per retrieved passage; its qrels (``qid 0 docid 0|1``) judge every retrieved
passage by DPR's ``has_answer``, so trec_eval-style tools compute top-k accuracy as ``Success@k`` over all questions.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rnr_jax.io import atomic_write_text
from rnr_jax.metrics import DEFAULT_KS, answer_patterns, dpr_tokenize, top_k_accuracy


def dpr_record(question: str, answers: Sequence[str], passages: Iterable[Any]) -> dict[str, Any]:
  """One DPR retrieval record from retrieved passages (``id``, ``title``, ``text``, ``score`` attributes)."""
  patterns = answer_patterns(answers)
  ctxs = []
  for p in passages:
    text = " " + " ".join(dpr_tokenize(p.text)) + " "
    ctxs.append({"id": str(p.id), "title": p.title, "text": p.text, "score": float(p.score),
                 "has_answer": any(a in text for a in patterns)})
  return {"question": question, "answers": list(answers), "ctxs": ctxs}


def write_dpr(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  atomic_write_text(path, json.dumps(list(records), ensure_ascii=False, indent=1) + "\n")


def read_dpr(path: str) -> list[dict[str, Any]]:
  """The records of a DPR retrieval JSON file; ``ValueError`` names the first malformed one."""
  with open(path, encoding="utf-8") as f:
    records = json.load(f)
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of {{question, answers, ctxs}} records")
  for i, r in enumerate(records):
    if not (isinstance(r, dict) and isinstance(r.get("answers"), list) and isinstance(r.get("ctxs"), list)
            and all(isinstance(c, dict) and ("text" in c or "has_answer" in c) for c in r["ctxs"])):
      raise ValueError(f"{path}: record {i} is not {{question, answers: [...], ctxs: [{{id, text|has_answer}}]}}")
  return records


def dpr_top_k_accuracy(records: Sequence[Mapping[str, Any]], ks: Sequence[int] = DEFAULT_KS,
                       use_file_flags: bool = False) -> dict[int, float]:
  """Top-k answer accuracy of DPR retrieval records: ``has_answer`` recomputed from each ctx's text with DPR's
  criterion (as pyserini's evaluator does), or taken from the file (``use_file_flags``, as DPR's and FiD's do)."""
  depth = max((len(r["ctxs"]) for r in records), default=0)
  hits = np.zeros((len(records), depth), bool)
  for q, r in enumerate(records):
    patterns = answer_patterns(r["answers"])
    for rank, c in enumerate(r["ctxs"]):
      hits[q, rank] = bool(c["has_answer"]) if use_file_flags else any(
          a in " " + " ".join(dpr_tokenize(c.get("text", ""))) + " " for a in patterns)
  return top_k_accuracy(hits, ks)


def trec_qid(qid: Any) -> str:
  qid = re.sub(r"\s+", "_", str(qid).strip())
  if not qid:
    raise ValueError("an empty question id")
  return qid


def write_trec(path: str, qids: Sequence[Any], records: Sequence[Mapping[str, Any]], tag: str = "rnr_jax",
               qrels_path: str | None = None) -> None:
  """A TREC run of DPR records (question ``qids[i]`` for record i) and, with ``qrels_path``, its has_answer qrels."""
  run, qrels = [], []
  for qid, r in zip(map(trec_qid, qids), records):
    for rank, c in enumerate(r["ctxs"], 1):
      run.append(f"{qid} Q0 {c['id']} {rank} {float(c['score'])!r} {tag}\n")  # full precision: no ties made
      qrels.append(f"{qid} 0 {c['id']} {int(c['has_answer'])}\n")
  atomic_write_text(path, "".join(run))
  if qrels_path:
    atomic_write_text(qrels_path, "".join(qrels))


def read_trec(path: str) -> dict[str, list[tuple[str, float]]]:
  """``{qid: [(docid, score), ...]}`` of a TREC run, each list ranked as trec_eval ranks it: by score, descending
  (ties by docid, descending); ``ValueError`` names a malformed line."""
  run: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      try:
        qid, _, docid, _, score = parts[:5]
        run[qid].append((docid, float(score)))
      except ValueError as e:
        raise ValueError(f"{path}:{line_no}: expected 'qid Q0 docid rank score tag', got {line.strip()!r}") from e
  return {q: sorted(docs, key=lambda d: (d[1], d[0]), reverse=True) for q, docs in run.items()}


def trec_top_k_accuracy(run: Mapping[str, Sequence[tuple[str, float]]], answers: Mapping[str, Sequence[str]],
                        passage_text: Callable[[str], str], ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """Top-k answer accuracy of a TREC run over the questions in ``answers`` (a question the run lacks: a miss), with
  DPR's ``has_answer`` on ``passage_text(docid)``."""
  records = [{"answers": list(a), "ctxs": [{"text": passage_text(d)} for d, _ in run.get(qid, ())]}
             for qid, a in answers.items()]
  return dpr_top_k_accuracy(records, ks)
