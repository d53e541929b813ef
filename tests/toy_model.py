"""Tiny Flax models and configs for the training-core tests (milliseconds per step)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from rnr_jax.training import losses
from rnr_jax.training.loop import EpochIterator

VOCAB, SEQ, OUT = 32, 6, 3

# Kernels and embeddings split over 'fsdp'; 'out/bias' (size 3) cannot be and falls back to replicated.
RULES = (
    (r".*embed/embedding", (None, "fsdp")),
    (r".*kernel", ("fsdp", None)),
    (r".*bias", ("fsdp",)),
)


class ToyRegressor(nn.Module):
  """Embedding bag -> Dense -> gelu -> dropout -> Dense, regressing OUT targets."""
  dim: int = 16
  hidden: int = 32
  dropout: float = 0.1

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Embed(VOCAB, self.dim, name="embed")(tokens).mean(axis=1)
    x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(OUT, name="out")(x)


def regressor_fns(dropout: float = 0.1):
  """(init_fn, loss_fn) of the regressor in the form the training core takes."""
  model = ToyRegressor(dropout=dropout)

  def init_fn(rng):
    return model.init(rng, jnp.zeros((1, SEQ), jnp.int32), train=False)["params"]

  def loss_fn(params, batch, rng):
    pred = model.apply({"params": params}, batch["tokens"], train=True, rngs={"dropout": rng})
    per_example = ((pred - batch["target"]) ** 2).mean(axis=-1)
    return per_example.mean(), {"max_err": jnp.abs(pred - batch["target"]).max()}

  return init_fn, loss_fn


def regressor_evaluator(dropout: float = 0.1, num: int = 32, seed: int = 1):
  """``(params, step) -> {"mse": ...}``: the regressor's error on held-out data, without dropout."""
  model = ToyRegressor(dropout=dropout)
  data = regression_data(num, seed)
  predict = jax.jit(lambda params: model.apply({"params": params}, data["tokens"], train=False))

  def evaluate(params, step):
    del step
    return {"mse": float(((np.asarray(predict(params)) - data["target"]) ** 2).mean())}

  return evaluate


def regression_data(num: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, VOCAB, (num, SEQ)).astype(np.int32),
          "target": rng.normal(size=(num, OUT)).astype(np.float32)}


def array_batches(arrays: dict[str, np.ndarray], global_batch_size: int, *, seed: int, **kwargs) -> EpochIterator:
  """A resumable :class:`EpochIterator` over in-memory arrays sharing their leading dimension."""
  num = {len(v) for v in arrays.values()}
  assert len(num) == 1, "arrays differ in length"
  return EpochIterator(lambda idx: {k: v[idx] for k, v in arrays.items()}, num.pop(), global_batch_size, seed=seed,
                       **kwargs)


class BagEncoder(nn.Module):
  """Mean of token embeddings, projected: a stand-in for a BERT encoder."""
  dim: int = 8

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(VOCAB, 16, name="embed")(tokens).mean(axis=1)
    return nn.Dense(self.dim, name="proj")(jnp.tanh(x))


class ToyDualEncoder(nn.Module):
  """Separate question and passage encoders, as in the paper's retriever."""

  def setup(self):
    self.q_enc = BagEncoder()
    self.p_enc = BagEncoder()

  def __call__(self, q_tokens: jax.Array, p_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.q_enc(q_tokens), self.p_enc(p_tokens)


def dual_encoder_fns():
  model = ToyDualEncoder()

  def init_fn(rng):
    z = jnp.zeros((1, SEQ), jnp.int32)
    return model.init(rng, z, z)["params"]

  def loss_fn(params, batch, rng):
    del rng
    q, p = model.apply({"params": params}, batch["q_tokens"], batch["p_tokens"])
    nll, acc = losses.in_batch_nll(q @ p.T)
    return nll, {"accuracy": acc}

  return init_fn, loss_fn


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  """mesh/optim/train sections as in configs/common.py, sized for the toy models."""
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 2), axes=("data", "fsdp"), rules=RULES,
                                          distributed=False))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=2, weight_decay=0.01, clip_norm=2.0, b1=0.9, b2=0.999, eps=1e-8,
      schedule="linear", grad_accum=1))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16, num_steps=12, log_every=4, eval_every=6, ckpt_every=4, keep_ckpts=2,
      async_ckpt=True, seed=0))
  c.train.update(train_overrides)
  return c


class Interrupted(Exception):
  pass


class StopAt:
  """Wraps an iterator; fetching the ``at``-th batch raises :class:`Interrupted`, as if the run were killed there."""

  def __init__(self, inner, at):
    self.inner, self.at, self.calls = inner, at, 0

  def __next__(self):
    self.calls += 1
    if self.calls == self.at:
      raise Interrupted(f"batch {self.at}")
    return next(self.inner)

  def state(self):
    return self.inner.state()

  def restore(self, state):
    self.inner.restore(state)
