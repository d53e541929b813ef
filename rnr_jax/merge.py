"""Weight-space merging of encoders finetuned from one pretrained checkpoint (beyond the paper).

The unified student and a shared retriever trained on its own both start from the same pretrained encoder. Two
moves in weight space, neither a training step of the student:

* back toward the pretrained weights (WiSE-FT; Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR
  2022): a few hundred steps on a small training sample pull the student away from what the pretrained encoder
  did well (MiniLM was trained for retrieval), and part of the way back keeps both;
* adding the retriever's *task vector*, its weights minus the pretrained ones (Ilharco et al., "Editing models with
  task arithmetic", ICLR 2023).

  theta = theta_student + base_weight * (theta_pretrained - theta_student) + scale * (theta_retriever - theta_pretrained)

A third, optional move averages the student with other unified students finetuned from the same start (a
uniform *model soup*; Wortsman et al., "Model soups", ICML 2022): every parameter, heads included, is the mean of
the ingredients' (:func:`average`), and the two moves above then apply to that average.

Both weights, and whether to start from the soup, are chosen by evaluation (``train.pipeline``'s merge stage: on
held-out training questions). The two moves change the encoder only (heads stay those of the student, or of the
soup); the retrieval settings stay the student's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

Params = Any


def _paths(tree: Params) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_same_layout(a: Params, b: Params, what_a: str, what_b: str) -> None:
  """Raises a ValueError naming the first parameter that one tree lacks or holds in another shape."""
  pa, pb = _paths(a), _paths(b)
  for name in sorted(pa.keys() | pb.keys()):
    if name not in pa or name not in pb:
      missing = what_a if name not in pa else what_b
      raise ValueError(f"parameter {name} is missing from {missing}: the two encoders differ in architecture")
    if pa[name] != pb[name]:
      raise ValueError(f"parameter {name}: shape {pa[name]} in {what_a} but {pb[name]} in {what_b}")


def task_vector(tuned: Params, pretrained: Params, *, what: str = "the tuned encoder") -> Params:
  """``tuned - pretrained`` leaf by leaf (float32 host arrays); both must have the same layout."""
  check_same_layout(tuned, pretrained, what, "the pretrained encoder")
  return jax.tree.map(lambda t, p: np.asarray(t, np.float32) - np.asarray(p, np.float32), tuned, pretrained)


def add_scaled(params: Params, vector: Params, scale: float, *, what: str = "the model's encoder") -> Params:
  """``params + scale * vector`` leaf by leaf, in ``params``' dtypes (host arrays)."""
  check_same_layout(params, vector, what, "the task vector")
  return jax.tree.map(lambda p, v: (np.asarray(p, np.float32) + np.float32(scale) * v).astype(np.asarray(p).dtype),
                      params, vector)


def average(trees: Sequence[Params], whats: Sequence[str]) -> Params:
  """The uniform mean of ``trees`` leaf by leaf (float32 sum, each leaf back in the first tree's dtype); every tree
  must have the first one's layout (``whats`` name them in the error)."""
  if not trees or len(trees) != len(whats):
    raise ValueError(f"average needs one name per tree and at least one tree, got {len(trees)} and {len(whats)}")
  for tree, what in zip(trees[1:], whats[1:]):
    check_same_layout(trees[0], tree, whats[0], what)
  n = np.float32(len(trees))

  def mean(*leaves):
    total = np.asarray(leaves[0], np.float32).copy()
    for leaf in leaves[1:]:
      total += np.asarray(leaf, np.float32)
    return (total / n).astype(np.asarray(leaves[0]).dtype)

  return jax.tree.map(mean, *[jax.device_get(t) for t in trees])


def merge_encoder(params: Params, terms: Sequence[tuple[float, Params]]) -> Params:
  """A unified model's parameters with ``sum(weight * vector)`` added to its ``encoder`` subtree (heads unchanged)."""
  if "encoder" not in params:
    raise ValueError(f"not a unified model's parameters (top-level keys {sorted(params)}, no 'encoder')")
  out = dict(params)
  encoder = jax.device_get(params["encoder"])
  for weight, vector in terms:
    encoder = add_scaled(encoder, vector, weight)
  out["encoder"] = encoder
  return out


def student_terms(student_encoder: Params, pretrained: Params, retriever_vector: Params | None, base_weight: float,
                  scale: float) -> list[tuple[float, Params]]:
  """The terms of :func:`merge_encoder` for ``base_weight`` toward ``pretrained`` and ``scale`` x the retriever's
  task vector (None when no retriever was trained; then ``scale`` must be 0)."""
  terms = []
  if base_weight:
    terms.append((base_weight, task_vector(pretrained, student_encoder, what="the pretrained encoder")))
  if scale:
    if retriever_vector is None:
      raise ValueError("a retriever task vector scale > 0 needs the merge retriever")
    terms.append((scale, retriever_vector))
  return terms


def choose(scores: Mapping[tuple[float, ...], float]) -> tuple[float, ...]:
  """The weights with the highest score; ties go to the least change (smallest sum, then smallest weights)."""
  if not scores:
    raise ValueError("no merge was evaluated")
  best = max(scores.values())
  return min((k for k, v in scores.items() if v == best), key=lambda k: (sum(k), k))
