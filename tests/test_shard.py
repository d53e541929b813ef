"""Sharded training core on 8 fake CPU devices: sharded == single-device, no recompiles."""

import chex
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import toy_model
from rnr_jax.training import losses, mesh as mesh_lib, optim, step as step_lib

# Differences between a sharded and a single-device float32 computation are
# reduction-order rounding; the brief's bound for "equal".
RTOL = 1e-5


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |b| over all entries of two pytrees.

  Normalising by the tree's largest value, not each entry's, keeps leaves that
  are analytically zero (e.g. the passage projection bias's gradient under a
  softmax loss) from turning rounding noise into huge relative errors.
  """
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def make_mesh(shape, devices=None):
  cfg = ml_collections.ConfigDict(dict(shape=shape, axes=("data", "fsdp")))
  return mesh_lib.make_mesh(cfg, devices=devices)


def single_device_mesh():
  return make_mesh((1, 1), devices=jax.devices()[:1])


def optim_cfg(**overrides):
  # No warmup: the first update must not be zero, or the comparisons would be vacuous.
  cfg = toy_model.toy_config().optim
  cfg.update(dict(warmup_steps=0, schedule="constant"), **overrides)
  return cfg


def init_sharded(init_fn, mesh):
  """Parameters born sharded by the rules, as train_loop initialises them (eval_shape, then jit with shardings)."""
  shardings = mesh_lib.param_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh, toy_model.RULES)
  return jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))


def build_step(mesh, init_fn, loss_fn, *, grad_accum=1, trainable_mask=None, num_steps=10):
  """(jitted step, initial state) on ``mesh``, as train_loop builds them."""
  optimizer, schedule = optim.make_optimizer(optim_cfg(), num_steps, trainable_mask)
  new_state = lambda rng: step_lib.TrainState.create(init_fn(rng), optimizer)  # noqa: E731
  state = init_sharded(new_state, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, optimizer, grad_accum=grad_accum, schedule=schedule),
      shardings, mesh_lib.batch_sharding(mesh))
  return train_step, state


def run_steps(mesh, batches, dropout=0.1, **kwargs):
  init_fn, loss_fn = toy_model.regressor_fns(dropout)
  train_step, state = build_step(mesh, init_fn, loss_fn, **kwargs)
  rng = jax.device_put(jax.random.key(1), mesh_lib.replicated(mesh))
  losses_ = []
  for batch in batches:
    state, metrics = train_step(state, mesh_lib.make_global_batch(batch, mesh), rng)
    losses_.append(metrics["loss"])
  return jax.device_get(state), np.asarray(losses_)


def batches(num, size=16):
  data = toy_model.regression_data(num * size, seed=3)
  return [{k: v[i * size:(i + 1) * size] for k, v in data.items()} for i in range(num)]


def test_mesh_and_rules_shard_params():
  mesh = make_mesh((-1, 2))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  init_fn, _ = toy_model.regressor_fns()
  params = init_sharded(init_fn, mesh)
  specs = jax.tree.map(lambda x: x.sharding.spec, params)
  assert specs["embed"]["embedding"] == P(None, "fsdp")
  assert specs["hidden"]["kernel"] == P("fsdp", None)
  assert specs["hidden"]["bias"] == P("fsdp")
  assert specs["out"]["bias"] == P(None)  # size 3: not divisible by fsdp=2, replicated
  # Born sharded: each device holds only its half of the kernel.
  assert params["hidden"]["kernel"].addressable_shards[0].data.shape == (8, 32)
  with pytest.raises(ValueError, match="more than one -1"):
    mesh_lib.resolve_mesh_shape((-1, -1), 8)


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)], ids=["data8", "data4_fsdp2"])
def test_sharded_train_step_matches_single_device(shape):
  data = batches(3)
  ref_state, ref_losses = run_steps(single_device_mesh(), data)
  state, step_losses = run_steps(make_mesh(shape), data)
  assert max_rel_diff(step_losses, ref_losses) <= RTOL
  assert max_rel_diff(state.params, ref_state.params) <= RTOL
  assert max_rel_diff(state.opt_state, ref_state.opt_state) <= RTOL
  # The parameters moved (the comparison is not between two initial states).
  init_fn, _ = toy_model.regressor_fns()
  assert max_rel_diff(state.params, init_fn(jax.random.key(0))) > 1e-3


def test_in_batch_nll_sharded_matches_single_device():
  init_fn, loss_fn = toy_model.dual_encoder_fns()
  params = init_fn(jax.random.key(0))
  rng = np.random.default_rng(0)
  # 16 questions, 2 passages each (positive + hard negative): 32 passages in the global batch.
  batch = {"q_tokens": rng.integers(0, toy_model.VOCAB, (16, toy_model.SEQ)).astype(np.int32),
           "p_tokens": rng.integers(0, toy_model.VOCAB, (32, toy_model.SEQ)).astype(np.int32)}

  def value_and_grads(mesh):
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                             in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh),
                                           None))
    (loss, aux), grads = value_and_grad(params, mesh_lib.make_global_batch(batch, mesh), None)
    return jax.device_get((loss, aux["accuracy"], grads))

  ref = value_and_grads(single_device_mesh())
  sharded_mesh = make_mesh((8, 1))
  assert mesh_lib.make_global_batch(batch, sharded_mesh)["p_tokens"].sharding.spec == P(("data", "fsdp"))
  loss, acc, grads = value_and_grads(sharded_mesh)
  assert max_rel_diff(loss, ref[0]) <= RTOL
  assert acc == ref[1]
  assert max_rel_diff(grads["q_enc"], ref[2]["q_enc"]) <= RTOL
  assert max_rel_diff(grads["p_enc"], ref[2]["p_enc"]) <= RTOL

  # Gradients reach every passage of the global batch, not only those on the question's device.
  def loss_of_embeddings(q, p):
    return losses.in_batch_nll(q @ p.T)[0]
  q = jax.random.normal(jax.random.key(1), (16, 8))
  p = jax.random.normal(jax.random.key(2), (32, 8))
  sharding = mesh_lib.batch_sharding(sharded_mesh)
  grad_p = jax.jit(jax.grad(loss_of_embeddings, argnums=1), in_shardings=(sharding, sharding))(q, p)
  assert np.all(np.abs(np.asarray(grad_p)).sum(axis=1) > 0)
  ref_grad_p = jax.grad(loss_of_embeddings, argnums=1)(q, p)
  assert max_rel_diff(grad_p, ref_grad_p) <= RTOL


def test_kl_and_masked_in_batch_nll_sharded_match_reference():
  mesh = make_mesh((8, 1))
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(2, 16, 5)).astype(np.float32)
  mask = rng.random((16, 5)) > 0.3
  mask[3] = False  # a fully masked row is left out
  sharded = mesh_lib.make_global_batch({"t": t, "s": s, "mask": mask}, mesh)
  kl = jax.jit(lambda b: losses.kl_div(b["t"], b["s"], 2.0, b["mask"]))(sharded)
  # In-batch NLL over 8 questions x 4 passages (positive first), two padding passages masked out.
  scores = rng.normal(size=(8, 32)).astype(np.float32)
  passages = np.ones((1, 32), bool)
  passages[0, [5, 30]] = False
  nll, _ = jax.jit(losses.in_batch_nll)(jax.device_put(scores, mesh_lib.batch_sharding(mesh)), passages)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  rows = [i for i in range(16) if mask[i].any()]
  ref_kl = np.mean([np.sum(softmax(t[i][mask[i]] / 2) * (np.log(softmax(t[i][mask[i]] / 2))
                                                         - np.log(softmax(s[i][mask[i]] / 2))))
                    for i in rows])
  ref_nll = np.mean([-np.log(softmax(scores[i][passages[0]])[list(np.flatnonzero(passages[0])).index(4 * i)])
                     for i in range(8)])
  assert abs(float(kl) - ref_kl) <= RTOL * abs(ref_kl)
  assert abs(float(nll) - ref_nll) <= RTOL * abs(ref_nll)
  grad = jax.jit(jax.grad(lambda x: losses.kl_div(sharded["t"], x, 2.0, sharded["mask"])))(sharded["s"])
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[~mask] == 0)


def test_sharded_train_step_compiles_once():
  mesh = make_mesh((4, 2))
  init_fn, loss_fn = toy_model.regressor_fns()
  # assert_max_traces wraps the python function: a retrace (for new shapes,
  # dtypes or shardings of the inputs) would raise.
  counted_loss = chex.assert_max_traces(loss_fn, n=1)
  train_step, state = build_step(mesh, init_fn, counted_loss)
  rng = jax.device_put(jax.random.key(1), mesh_lib.replicated(mesh))
  for batch in batches(4):
    state, _ = train_step(state, mesh_lib.make_global_batch(batch, mesh), rng)
  assert train_step._cache_size() == 1


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accum_matches_big_batch_sharded(k):
  mesh = make_mesh((4, 2))
  data = batches(2, size=32)
  # Without dropout: micro-batches draw their own keys, so masks would differ.
  ref_state, ref_losses = run_steps(mesh, data, dropout=0.0, grad_accum=1)
  state, accum_losses = run_steps(mesh, data, dropout=0.0, grad_accum=k)
  assert max_rel_diff(accum_losses, ref_losses) <= RTOL
  assert max_rel_diff(state.params, ref_state.params) <= RTOL


def test_grad_accum_microbatches_keep_sharded_layout():
  # 8 questions with 2 passages each (rows 2q, 2q + 1), split into 2 micro-batches.
  batch = {"q": np.arange(8), "p": np.arange(16) // 2, "label": np.arange(8) * 10}
  micro = jax.device_get(step_lib.split_microbatches(batch, 2))
  np.testing.assert_array_equal(micro["q"], [[0, 2, 4, 6], [1, 3, 5, 7]])
  np.testing.assert_array_equal(micro["p"], np.repeat(micro["q"], 2, axis=1))  # own passages, in order
  np.testing.assert_array_equal(micro["label"], micro["q"] * 10)
  # On the mesh each micro-batch stays spread over the data shards.
  mesh = make_mesh((4, 2))
  split = jax.jit(lambda b: step_lib.split_microbatches(b, 2))
  q = split(mesh_lib.make_global_batch({"q": np.arange(16)}, mesh))["q"]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 1)}


def test_frozen_subtree_unchanged_sharded():
  mesh = make_mesh((4, 2))
  init_fn, _ = toy_model.regressor_fns()
  initial = init_fn(jax.random.key(0))
  state, _ = run_steps(mesh, batches(3), trainable_mask=lambda p: optim.regex_mask(r"embed/.*", p, match=False))
  np.testing.assert_array_equal(state.params["embed"]["embedding"], initial["embed"]["embedding"])
  assert max_rel_diff(state.params["hidden"], initial["hidden"]) > 1e-3


def test_schedule_and_decay_mask_for_sharded_training():
  schedule = optim.make_schedule(optim_cfg(warmup_steps=4, schedule="linear", lr=1.0), 12)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 8, 12)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)
  # Weight decay skips biases and LayerNorm-style scales, applies to kernels and embeddings.
  init_fn, _ = toy_model.regressor_fns()
  mask = optim.regex_mask(optim.NO_DECAY_REGEX, init_fn(jax.random.key(0)), match=False)
  assert mask["hidden"] == {"kernel": True, "bias": False}
  assert mask["embed"] == {"embedding": True}


def test_head_lr_mult_scales_head_updates_only():
  """optim.head_lr_mult: the heads' AdamW step is mult x the encoder's; frozen leaves stay out of the clip norm."""
  rng = np.random.default_rng(0)
  params = {"encoder": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
            "qa_outputs": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)},
            "embed": {"embedding": rng.normal(size=(5,)).astype(np.float32)}}
  trained = {k: v for k, v in params.items() if k != "embed"}
  cfg = optim_cfg(lr=1e-2, clip_norm=0.5, weight_decay=0.01)
  mult = optim_cfg(lr=1e-2, clip_norm=0.5, weight_decay=0.01, head_lr_mult=7.0)
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 3, params) for _ in range(3)]
  for g in grads:
    g["embed"]["embedding"] *= 1e3  # would dominate the global norm if frozen leaves counted
  ref, _ = optim.make_optimizer(cfg, 10)  # the reference: trained leaves only, one learning rate
  got, _ = optim.make_optimizer(mult, 10, lambda p: optim.regex_mask(r"embed/.*", p, match=False))
  ref_state, got_state = ref.init(trained), got.init(params)
  for g in grads:
    ref_up, ref_state = ref.update({k: v for k, v in g.items() if k != "embed"}, ref_state, trained)
    got_up, got_state = got.update(g, got_state, params)
    np.testing.assert_allclose(got_up["encoder"]["kernel"], ref_up["encoder"]["kernel"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got_up["qa_outputs"]["kernel"], 7.0 * ref_up["qa_outputs"]["kernel"],
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(got_up["embed"]["embedding"], 0.0)
  with pytest.raises(ValueError, match="head_lr_mult"):
    optim.make_optimizer(optim_cfg(head_lr_mult=0.0), 10)
