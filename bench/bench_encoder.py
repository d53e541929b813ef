r"""Encoder throughput: our Flax BERT vs transformers' PyTorch BertModel, same weights.

Runs both side by side in one process, interleaving repetitions so that machine
noise hits both alike, and reports medians and the Flax/PyTorch speed ratio for

* corpus encoding (forward, no gradients), and
* a training step (forward + backward + AdamW update) of an in-batch-negative
  retrieval loss on [CLS] vectors (questions = first half of the batch,
  passages = second half).

  python -m bench.bench_encoder --batch 32 --lengths 128,256 --reps 5 --record

Needs the test extra (torch). ``--record`` replaces this benchmark's section in
docs/speed.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import report
from rnr_jax.models import build_encoder, load_hf_encoder
from rnr_jax.tokenization import default_tokenizer_path


def _flax_fns(config, params):
  """Jitted forward and training steps; the steps apply dropout (as PyTorch's train mode does) with keys of
  each PRNG implementation, and donate parameters and optimiser state (as our trainers do)."""
  module = build_encoder(config)

  @jax.jit
  def forward(p, ids, mask, types):
    return module.apply({"params": p}, ids, mask, types).cls

  def loss_fn(p, ids, mask, types, rng):
    cls = module.apply({"params": p}, ids, mask, types, deterministic=False, rngs={"dropout": rng}).cls
    half = cls.shape[0] // 2
    scores = cls[:half] @ cls[half:].T
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scores, -1)))

  opt = optax.adamw(1e-5)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, opt_state, ids, mask, types, rng, step):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask, types, jax.random.fold_in(rng, step))
    updates, opt_state = opt.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return forward, train_step, opt


def _torch_fns(model_dir):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoModel  # pylint: disable=import-outside-toplevel

  model = AutoModel.from_pretrained(model_dir).float()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

  def forward(ids, mask, types):
    model.eval()
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state[:, 0]

  def train_step(ids, mask, types):
    model.train()
    cls = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state[:, 0]
    half = cls.shape[0] // 2
    scores = cls[:half] @ cls[half:].T
    loss = -torch.log_softmax(scores, -1).diagonal().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  return forward, train_step


def _time(fn, reps):
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="", help="HF BERT directory (default: installed all-MiniLM-L6-v2)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lengths", default="128,256")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--torch_threads", type=int, default=os.cpu_count())
  ap.add_argument("--record", action="store_true", help="write the table into docs/speed.md")
  args = ap.parse_args()

  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.torch_threads)
  model_dir = args.model or default_tokenizer_path()
  config, params = load_hf_encoder(model_dir)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  f_fwd, f_step, opt = _flax_fns(config, params)
  t_fwd, t_step = _torch_fns(model_dir)
  impls = ("threefry2x32", "rbg")
  rng = np.random.default_rng(0)
  rows = []
  for length in [int(x) for x in args.lengths.split(",")]:
    ids = rng.integers(1000, config.vocab_size, size=(args.batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    j_in = [jnp.asarray(x) for x in (ids, mask, types)]
    t_in = [torch.from_numpy(x.astype(np.int64)) for x in (ids, mask, types)]
    states = {impl: {"p": jax.tree.map(jnp.array, params), "o": opt.init(params), "k": jax.random.key(0, impl=impl),
                     "n": 0} for impl in impls}

    def flax_fwd():
      f_fwd(params, *j_in).block_until_ready()

    def flax_step(impl):
      st = states[impl]
      st["p"], st["o"], loss = f_step(st["p"], st["o"], *j_in, st["k"], st["n"])
      st["n"] += 1
      jax.block_until_ready((st["p"], loss))

    flax_fwd()
    for impl in impls:
      flax_step(impl)  # compile
    t_fwd(*t_in)
    t_step(*t_in)  # warm up
    times = {"flax_fwd": [], "torch_fwd": [], "torch_step": [], **{f"flax_step_{i}": [] for i in impls}}
    for _ in range(args.reps):  # interleaved
      times["flax_fwd"] += _time(flax_fwd, 1)
      times["torch_fwd"] += _time(lambda: t_fwd(*t_in), 1)
      for impl in impls:
        times[f"flax_step_{impl}"] += _time(lambda: flax_step(impl), 1)  # pylint: disable=cell-var-from-loop
      times["torch_step"] += _time(lambda: t_step(*t_in), 1)
    med = {k: float(np.median(v)) for k, v in times.items()}
    works = [("corpus encoding (forward)", "fwd", "flax_fwd")] + [
        (f"training step (fwd+bwd+AdamW, dropout; JAX PRNG {impl})", "step", f"flax_step_{impl}") for impl in impls]
    for work, kind, key in works:
      rows.append({
          "work": work,
          "shape": f"{args.batch}x{length}",
          "flax_seq_per_s": args.batch / med[key],
          "torch_seq_per_s": args.batch / med[f"torch_{kind}"],
          "ratio": med[f"torch_{kind}"] / med[key],
      })
  table = report.markdown_table(
      ["work", "batch x len", "Flax seq/s", "PyTorch seq/s", "Flax / PyTorch"],
      [[r["work"], r["shape"], f"{r['flax_seq_per_s']:.1f}", f"{r['torch_seq_per_s']:.1f}", f"{r['ratio']:.2f}x"]
       for r in rows])
  print(table)
  if args.record:
    note = (f"Model: {config.num_hidden_layers}-layer BERT, hidden {config.hidden_size} (all-MiniLM-L6-v2 weights), "
            f"float32 on CPU; medians of {args.reps} interleaved repetitions; torch threads = {args.torch_threads}; "
            "training steps: the in-batch loss on [CLS] vectors with dropout 0.1 on both sides (PyTorch train mode), "
            "parameters and optimiser state donated to the jitted step (as in rnr_jax.training); "
            f"jax {jax.__version__}, torch {torch.__version__}.")
    report.record("speed", "Encoder throughput: Flax vs PyTorch", table, note)


if __name__ == "__main__":
  main()
