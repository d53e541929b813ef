"""Task-vector merging (``rnr_jax.merge``): exact arithmetic, layout checks, the choice of scale, and that adding
one model's task vector to another trained from the same start gives the merged model both skills (toy data)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnr_jax import merge


def tree(seed, shape=(3, 4)):
  rng = np.random.default_rng(seed)
  return {"layer_0": {"kernel": rng.normal(size=shape).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)},
          "embed": rng.normal(size=(5, 4)).astype(np.float32)}


def test_task_vector_round_trip_and_scales():
  base, tuned = tree(0), tree(1)
  vector = merge.task_vector(tuned, base)
  for scale in (0.0, 0.5, 1.0):
    got = merge.add_scaled(base, vector, scale)
    for g, b, t in zip(jax.tree.leaves(got), jax.tree.leaves(base), jax.tree.leaves(tuned)):
      np.testing.assert_allclose(g, b + scale * (t - b), rtol=1e-6, atol=1e-6)
      assert g.dtype == b.dtype
  for g, b in zip(jax.tree.leaves(merge.add_scaled(base, vector, 0.0)), jax.tree.leaves(base)):
    np.testing.assert_array_equal(g, b)


def test_merge_encoder_keeps_heads_and_sums_terms():
  params = {"encoder": tree(0), "qa_outputs": {"kernel": np.ones((4, 2), np.float32)}}
  pretrained, retriever = tree(2), tree(1)
  vector = merge.task_vector(retriever, pretrained)
  out = merge.merge_encoder(params, merge.student_terms(params["encoder"], pretrained, vector, 0.25, 0.5))
  assert out["qa_outputs"] is params["qa_outputs"]
  for got, s, p, r in zip(*(jax.tree.leaves(t) for t in (out["encoder"], tree(0), pretrained, retriever))):
    np.testing.assert_allclose(got, s + 0.25 * (p - s) + 0.5 * (r - p), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(merge.merge_encoder(params, merge.student_terms(
      params["encoder"], pretrained, None, 0.0, 0.0))["encoder"]), jax.tree.leaves(tree(0))):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="needs the merge retriever"):
    merge.student_terms(params["encoder"], pretrained, None, 0.0, 1.0)
  with pytest.raises(ValueError, match="no 'encoder'"):
    merge.merge_encoder({"question_encoder": tree(0)}, [(1.0, vector)])


def test_layout_errors_name_the_parameter():
  other = tree(1)
  del other["layer_0"]["bias"]
  with pytest.raises(ValueError, match=r"\['layer_0'\]\['bias'\] is missing from the merge retriever"):
    merge.task_vector(other, tree(0), what="the merge retriever")
  with pytest.raises(ValueError, match=r"\['layer_0'\]\['kernel'\]: shape \(3, 5\)"):
    merge.task_vector(tree(1, shape=(3, 5)), tree(0))


def test_choose_prefers_the_least_change_on_ties():
  assert merge.choose({(0.0, 0.0): 0.2, (0.0, 0.5): 0.3, (0.25, 0.0): 0.3, (0.5, 1.0): 0.3}) == (0.25, 0.0)
  assert merge.choose({(0.0, 0.0): 0.4, (0.0, 1.0): 0.3}) == (0.0, 0.0)
  with pytest.raises(ValueError):
    merge.choose({})


def test_average_is_the_leafwise_mean_in_each_leafs_dtype():
  a = {"w": np.array([1.0, 2.0], np.float32), "h": np.array([1, 3], np.float16)}
  b = {"w": np.array([3.0, -2.0], np.float32), "h": np.array([5, 5], np.float16)}
  c = {"w": np.array([2.0, 3.0], np.float32), "h": np.array([0, 1], np.float16)}
  got = merge.average([a, b, c], ["a", "b", "c"])
  np.testing.assert_array_equal(got["w"], np.array([2.0, 1.0], np.float32))
  np.testing.assert_array_equal(got["h"], np.array([2, 3], np.float16))
  assert got["h"].dtype == np.float16
  np.testing.assert_array_equal(merge.average([a], ["a"])["w"], a["w"])
  with pytest.raises(ValueError, match=r"\['w'\]: shape \(2,\) in a but \(3,\) in d"):
    merge.average([a, {"w": np.zeros(3, np.float32), "h": a["h"]}], ["a", "d"])
  with pytest.raises(ValueError, match="at least one tree"):
    merge.average([], [])


def test_task_vectors_of_two_finetunes_add_both_skills():
  """Two linear heads finetuned from one start, on targets that depend on disjoint input features: adding the
  second's task vector to the first fits both tasks far better than either alone."""
  rng = np.random.default_rng(0)
  d = 8
  x = rng.normal(size=(256, d)).astype(np.float32)
  w_a = np.zeros(d, np.float32)
  w_a[:4] = rng.normal(size=4)
  w_b = np.zeros(d, np.float32)
  w_b[4:] = rng.normal(size=4)
  # Task A sees only features 0-3 (4-7 are zero in its data), task B only 4-7: each finetune moves only its weights.
  x_a, x_b = x * (np.arange(d) < 4), x * (np.arange(d) >= 4)
  start = {"w": np.zeros(d, np.float32)}

  def finetune(inputs, target):
    opt = optax.sgd(0.1)
    params, state = jax.tree.map(jnp.asarray, start), None
    state = opt.init(params)
    loss = lambda p: jnp.mean((inputs @ p["w"] - target) ** 2)
    for _ in range(300):
      grads = jax.grad(loss)(params)
      updates, state = opt.update(grads, state)
      params = optax.apply_updates(params, updates)
    return jax.device_get(params)

  tuned_a, tuned_b = finetune(x_a, x_a @ w_a), finetune(x_b, x_b @ w_b)
  merged = merge.add_scaled(tuned_a, merge.task_vector(tuned_b, start), 1.0)
  error = lambda p: float(np.mean((x @ p["w"] - x @ (w_a + w_b)) ** 2))
  assert error(merged) < 0.01 * min(error(tuned_a), error(tuned_b))
