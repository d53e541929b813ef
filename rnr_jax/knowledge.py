"""Knowledge edits: add, remove or replace passages of a live QA system's index and passage store without
retraining; :func:`save_edits` writes them into its bundle (docs/design.md, "Knowledge edits")."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rnr_jax.bundle import update_bundle
from rnr_jax.io import dir_lock, scratch_dir
from rnr_jax.qa_system import QASystem


@dataclasses.dataclass(frozen=True)
class Passage:
  """A passage to add (``id`` None: the next free id) or a replacement for passage ``id``."""

  title: str
  text: str
  id: int | None = None

  def __post_init__(self):  # No coercion: a float or boolean id, a null title are mistakes.
    if not isinstance(self.title, str) or not isinstance(self.text, str) or not self.text.strip() or not (
        self.id is None or (isinstance(self.id, int | np.integer) and not isinstance(self.id, bool) and self.id >= 0)):
      raise ValueError(f"a passage needs a string title, a non-empty text and an integer id >= 0 or None: {self!r}")


def _put(system: QASystem, passages: Sequence[Passage], ids: np.ndarray,
         update_index: Callable[[np.ndarray, np.ndarray], Any]) -> None:
  """Encodes passages with the system's own encoder, so vectors share the index's space, and stores them under ids."""
  records = system.tokenizer.passage_token_ids([p.title for p in passages], [p.text for p in passages])
  update_index(system.embed_passages(records), ids)
  system.store.put(ids.tolist(), records, [(p.title, p.text) for p in passages])


def add_passages(system: QASystem, passages: Sequence[Passage]) -> np.ndarray:
  """Adds passages, retrievable at once; returns their ids (given ones, or fresh ones after the largest id)."""
  if not passages:
    return np.zeros(0, np.int64)
  fresh = itertools.count(system.store.next_id())
  ids = np.asarray([next(fresh) if p.id is None else int(p.id) for p in passages], np.int64)
  if present := [int(i) for i in ids if i in system.store]:
    raise ValueError(f"passage ids already in use (replace them instead): {present[:10]}")
  _put(system, passages, ids, system.index.add)
  return ids


def _check_present(system: QASystem, ids: np.ndarray) -> None:
  if missing := [int(i) for i in ids if i not in system.store or i not in system.index]:
    raise KeyError(f"no passages with ids {missing[:10]}")


def remove_passages(system: QASystem, ids: Sequence[int]) -> None:
  """Removes passages: they are never retrieved or read again. ``KeyError`` if one is absent (nothing removed)."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  if not len(ids):
    return
  _check_present(system, ids)
  system.index.remove(ids)
  system.store.delete(ids.tolist())


def replace_passages(system: QASystem, passages: Sequence[Passage]) -> None:
  """Replaces the title and text of existing passages (each ``Passage.id`` must be set and present)."""
  if not passages:
    return
  if any(p.id is None for p in passages):
    raise ValueError("a replacement passage needs the id of the passage it replaces")
  ids = np.asarray([p.id for p in passages], np.int64)
  _check_present(system, ids)
  _put(system, passages, ids, system.index.replace)


def save_edits(system: QASystem, bundle_dir: str | os.PathLike) -> dict[str, Any]:
  """Writes the system's index and passages into ``bundle_dir`` (the bundle it came from); returns the manifest."""
  with dir_lock(bundle_dir), scratch_dir(bundle_dir) as tmp:
    corpus_dir = os.path.join(tmp, "corpus")
    system.store.write(corpus_dir)
    return update_bundle(bundle_dir, index=system.index, token_corpus_dir=corpus_dir)
