r"""Encoder throughput: our Flax BERT vs transformers' PyTorch BertModel, same weights.

Runs both side by side in one process, interleaving repetitions so that machine
noise hits both alike, and reports medians, model GFLOP/s and the Flax/PyTorch
speed ratio for

* corpus encoding (forward, no gradients), and
* a training step (forward + backward + AdamW update) of an in-batch-negative
  retrieval loss on [CLS] vectors (questions = first half of the batch,
  passages = second half), without dropout and with it (one row per JAX PRNG).

The note gives each backend's rate on one of the encoder's matmuls, measured in
the same run: how much of the gap is the matmul kernels (XLA's own on CPU,
oneDNN/MKL in PyTorch) rather than the rest of the step. XLA_FLAGS, if set, are
recorded with the table.

  python -m bench.bench_encoder --batch 16 --lengths 128,256 --reps 3 --record

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
from bench.bench_qa import encoder_flops, matmul_rate
from rnr_jax.models import build_encoder, load_hf_encoder
from rnr_jax.tokenization import default_tokenizer_path


def _flax_fns(config):
  """Jitted forward and training steps (with dropout, as PyTorch's train mode, or without); the steps donate
  parameters and optimiser state (as our trainers do)."""
  module = build_encoder(config)

  @jax.jit
  def forward(p, ids, mask, types):
    return module.apply({"params": p}, ids, mask, types).cls

  def loss_fn(p, ids, mask, types, rng, dropout):
    cls = module.apply({"params": p}, ids, mask, types, deterministic=not dropout, rngs={"dropout": rng}).cls
    half = cls.shape[0] // 2
    scores = cls[:half] @ cls[half:].T
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scores, -1)))

  opt = optax.adamw(1e-5)

  @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="dropout")
  def train_step(p, opt_state, ids, mask, types, rng, step, dropout=True):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask, types, jax.random.fold_in(rng, step), dropout)
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

  def train_step(ids, mask, types, dropout=True):
    model.train(dropout)
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
  ap.add_argument("--matmul", default="",
                  help="m,k,n of the matmul whose rate each backend reports (default: batch*128 x hidden x FFN)")
  ap.add_argument("--record", action="store_true", help="write the table into docs/speed.md")
  args = ap.parse_args()

  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.torch_threads)
  load = os.getloadavg()
  model_dir = args.model or default_tokenizer_path()
  config, params = load_hf_encoder(model_dir)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  f_fwd, f_step, opt = _flax_fns(config)
  t_fwd, t_step = _torch_fns(model_dir)
  impls = ("threefry2x32", "rbg")
  steps = {"nodrop": (False, "threefry2x32"), **{impl: (True, impl) for impl in impls}}  # name: (dropout, PRNG)
  hf = {"model_type": "bert", "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers}
  rng = np.random.default_rng(0)
  rows = []
  for length in [int(x) for x in args.lengths.split(",")]:
    ids = rng.integers(1000, config.vocab_size, size=(args.batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    j_in = [jnp.asarray(x) for x in (ids, mask, types)]
    t_in = [torch.from_numpy(x.astype(np.int64)) for x in (ids, mask, types)]
    states = {name: {"p": jax.tree.map(jnp.array, params), "o": opt.init(params),
                     "k": jax.random.key(0, impl=impl), "n": 0} for name, (_, impl) in steps.items()}

    def flax_fwd():
      f_fwd(params, *j_in).block_until_ready()

    def flax_step(name):
      st = states[name]
      st["p"], st["o"], loss = f_step(st["p"], st["o"], *j_in, st["k"], st["n"], dropout=steps[name][0])
      st["n"] += 1
      jax.block_until_ready((st["p"], loss))

    flax_fwd()
    for name in steps:
      flax_step(name)  # compile
    t_fwd(*t_in)
    t_step(*t_in)  # warm up
    times = {k: [] for k in ("flax_fwd", "torch_fwd", "torch_step", "torch_step_nodrop",
                             *(f"flax_step_{name}" for name in steps))}
    for _ in range(args.reps):  # interleaved
      times["flax_fwd"] += _time(flax_fwd, 1)
      times["torch_fwd"] += _time(lambda: t_fwd(*t_in), 1)
      for name in steps:
        times[f"flax_step_{name}"] += _time(lambda: flax_step(name), 1)  # pylint: disable=cell-var-from-loop
      times["torch_step"] += _time(lambda: t_step(*t_in), 1)
      times["torch_step_nodrop"] += _time(lambda: t_step(*t_in, dropout=False), 1)
    med = {k: float(np.median(v)) for k, v in times.items()}
    fwd_flops = args.batch * encoder_flops(hf, length)
    works = [("corpus encoding (forward)", "flax_fwd", "torch_fwd", 1),
             ("training step (fwd+bwd+AdamW), no dropout", "flax_step_nodrop", "torch_step_nodrop", 3)] + [
        (f"training step, dropout; JAX PRNG {impl}", f"flax_step_{impl}", "torch_step", 3) for impl in impls]
    for work, flax_key, torch_key, passes in works:
      rows.append({
          "work": work,
          "shape": f"{args.batch}x{length}",
          "flax_seq_per_s": args.batch / med[flax_key],
          "torch_seq_per_s": args.batch / med[torch_key],
          "flax_gflops": passes * fwd_flops / med[flax_key] / 1e9,
          "torch_gflops": passes * fwd_flops / med[torch_key] / 1e9,
          "ratio": med[torch_key] / med[flax_key],
      })
  m, k, n = (int(x) for x in args.matmul.split(",")) if args.matmul else (
      args.batch * 128, config.hidden_size, config.intermediate_size)
  xla_rate, torch_rate = matmul_rate(m, k, n), _torch_matmul_rate(torch, m, k, n)
  table = report.markdown_table(
      ["work", "batch x len", "Flax seq/s", "PyTorch seq/s", "Flax GFLOP/s", "PyTorch GFLOP/s", "Flax / PyTorch"],
      [[r["work"], r["shape"], f"{r['flax_seq_per_s']:.1f}", f"{r['torch_seq_per_s']:.1f}", f"{r['flax_gflops']:.0f}",
        f"{r['torch_gflops']:.0f}", f"{r['ratio']:.2f}x"] for r in rows])
  print(table)
  flags = os.environ.get("XLA_FLAGS", "")
  print(f"matmul {m}x{k}x{n}: XLA {xla_rate / 1e9:.0f} GFLOP/s, PyTorch {torch_rate / 1e9:.0f} GFLOP/s; "
        f"load before {load}")
  if args.record:
    note = (f"Model: {config.num_hidden_layers}-layer BERT, hidden {config.hidden_size} (all-MiniLM-L6-v2 weights), "
            f"float32 on CPU; medians of {args.reps} interleaved repetitions; torch threads = {args.torch_threads}; "
            "training steps: the in-batch loss on [CLS] vectors, with dropout 0.1 on both sides (PyTorch train mode) "
            "or without, parameters and optimiser state donated to the jitted step (as in rnr_jax.training); GFLOP/s "
            f"count the encoder's matmuls (x3 for a step). One {m}x{k} x {k}x{n} float32 matmul in the same run: XLA "
            f"{xla_rate / 1e9:.0f} GFLOP/s, PyTorch {torch_rate / 1e9:.0f} GFLOP/s. XLA_FLAGS: {flags or 'none'}; "
            f"load average before the run {' '.join(f'{x:.2f}' for x in load)} (other jobs shared the machine); "
            f"jax {jax.__version__}, torch {torch.__version__}.")
    report.record("speed", "Encoder throughput: Flax vs PyTorch", table, note)


def _torch_matmul_rate(torch, m: int, k: int, n: int, min_s: float = 0.5) -> float:
  """FLOP/s of the best of repeated float32 ``[m, k] x [k, n]`` matmuls in PyTorch (at least ``min_s`` seconds)."""
  a, b = torch.randn(m, k), torch.randn(k, n)
  torch.mm(a, b)
  best, spent = float("inf"), 0.0
  while spent < min_s:
    t0 = time.perf_counter()
    torch.mm(a, b)
    dt = time.perf_counter() - t0
    best, spent = min(best, dt), spent + dt
  return 2.0 * m * k * n / best


if __name__ == "__main__":
  main()
