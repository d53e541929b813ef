"""Data directories the pipeline prepares from besides a user's own files: a slice (smoke runs), SQuAD from TFDS."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from rnr_jax.io import atomic_write_text


def _write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
  atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_slice(data_dir: str, out: str, questions: int, distractors: int, seed: int = 0) -> str:
  """A small data directory: the first ``questions`` of each split, their gold documents and random distractors."""
  rng = np.random.default_rng(seed)
  os.makedirs(out, exist_ok=True)
  splits = {}
  for name in sorted(os.listdir(data_dir)):
    if name.endswith(("_train.jsonl", "_dev.jsonl")):
      with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        rows = []
        for line in f:
          if line.strip():
            rows.append(json.loads(line))
          if len(rows) == questions:
            break
      splits[name] = rows
  gold = {r.get("gold_pid") for rows in splits.values() for r in rows} - {None}
  with open(os.path.join(data_dir, "corpus.jsonl"), encoding="utf-8") as f:
    docs = [json.loads(line) for line in f if line.strip()]
  others = [d for d in docs if d["id"] not in gold]
  picked = set(rng.choice(len(others), size=min(distractors, len(others)), replace=False).tolist())
  corpus = [d for d in docs if d["id"] in gold] + [d for i, d in enumerate(others) if i in picked]
  _write_jsonl(os.path.join(out, "corpus.jsonl"), corpus)
  for name, rows in splits.items():
    _write_jsonl(os.path.join(out, name), rows)
  return out


def write_tfds_squad(out: str, tfds_dir: str | None, *, download: bool = False, limit: int | None = None) -> str:
  """SQuAD v1.1 from TFDS as data directory ``out``: contexts as the corpus, each question's as its gold_pid."""
  from rnr_jax.data import tfds_sources  # pylint: disable=import-outside-toplevel  (tfds is heavy)

  train_docs, train_questions = tfds_sources.squad_open_domain("train", data_dir=tfds_dir, download=download,
                                                                limit=limit)
  dev_docs, dev_questions = tfds_sources.squad_open_domain("validation", data_dir=tfds_dir, download=download,
                                                            first_doc_id=len(train_docs), limit=limit)
  os.makedirs(out, exist_ok=True)
  _write_jsonl(os.path.join(out, "corpus.jsonl"), map(dataclasses.asdict, [*train_docs, *dev_docs]))
  _write_jsonl(os.path.join(out, "squad_train.jsonl"), (q.to_json() for q in train_questions))
  _write_jsonl(os.path.join(out, "squad_dev.jsonl"), (q.to_json() for q in dev_questions))
  return out
