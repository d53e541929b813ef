"""Data directories to prepare from besides a user's own files: a slice of one (smoke runs), SQuAD from TFDS."""

from __future__ import annotations

import json
import os

import numpy as np

from rnr_jax.io import atomic_write_text


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
  atomic_write_text(os.path.join(out, "corpus.jsonl"), "".join(json.dumps(d) + "\n" for d in corpus))
  for name, rows in splits.items():
    atomic_write_text(os.path.join(out, name), "".join(json.dumps(r) + "\n" for r in rows))
  return out


def write_tfds_squad(out: str, tfds_dir: str | None, *, download: bool = False, limit: int | None = None) -> str:
  """SQuAD v1.1 from TensorFlow Datasets as an open-domain data directory (our jsonl files) in ``out``.

  Its contexts become ``corpus.jsonl`` (train and validation contexts together), its questions
  ``squad_train.jsonl`` and ``squad_dev.jsonl`` with the gold context as ``gold_pid``.
  """
  from rnr_jax.data import tfds_sources  # pylint: disable=import-outside-toplevel  (tfds is heavy)

  train_docs, train_questions = tfds_sources.squad_open_domain("train", data_dir=tfds_dir, download=download,
                                                                limit=limit)
  dev_docs, dev_questions = tfds_sources.squad_open_domain("validation", data_dir=tfds_dir, download=download,
                                                            first_doc_id=len(train_docs), limit=limit)
  os.makedirs(out, exist_ok=True)
  atomic_write_text(os.path.join(out, "corpus.jsonl"), "".join(
      json.dumps({"id": d.id, "title": d.title, "text": d.text, "source": d.source}) + "\n"
      for d in (*train_docs, *dev_docs)))
  for name, questions in (("squad_train.jsonl", train_questions), ("squad_dev.jsonl", dev_questions)):
    atomic_write_text(os.path.join(out, name), "".join(
        json.dumps({"id": q.id, "question": q.question, "answers": list(q.answers), "gold_pid": q.gold_pid}) + "\n"
        for q in questions))
  return out
