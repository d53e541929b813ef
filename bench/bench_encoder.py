r"""Encoder throughput: our Flax BERT vs transformers' PyTorch BertModel, same weights.

Runs both side by side in one process, interleaving repetitions so that machine
noise hits both alike, and reports medians and the Flax/PyTorch speed ratio for

* corpus encoding (forward, no gradients), and
* a training step (forward + backward + AdamW update) of an in-batch-negative
  retrieval loss on [CLS] vectors (questions = first half of the batch,
  passages = second half).

  python -m bench.bench_encoder --batch 32 --lengths 128,256 --reps 5 --record

Needs the test extra (torch). ``--record`` replaces this benchmark's section in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
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
  module = build_encoder(config)

  @jax.jit
  def forward(p, ids, mask, types):
    return module.apply({"params": p}, ids, mask, types).cls

  def loss_fn(p, ids, mask, types):
    cls = module.apply({"params": p}, ids, mask, types).cls
    half = cls.shape[0] // 2
    scores = cls[:half] @ cls[half:].T
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scores, -1)))

  opt = optax.adamw(1e-5)

  @jax.jit
  def train_step(p, opt_state, ids, mask, types):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask, types)
    updates, opt_state = opt.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return forward, train_step, opt.init(params)


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
  ap.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
  args = ap.parse_args()

  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.torch_threads)
  model_dir = args.model or default_tokenizer_path()
  config, params = load_hf_encoder(model_dir)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  f_fwd, f_step, f_opt = _flax_fns(config, params)
  t_fwd, t_step = _torch_fns(model_dir)
  rng = np.random.default_rng(0)
  rows = []
  for length in [int(x) for x in args.lengths.split(",")]:
    ids = rng.integers(1000, config.vocab_size, size=(args.batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    j_in = [jnp.asarray(x) for x in (ids, mask, types)]
    t_in = [torch.from_numpy(x.astype(np.int64)) for x in (ids, mask, types)]
    state = {"p": params, "o": f_opt}

    def flax_fwd():
      f_fwd(state["p"], *j_in).block_until_ready()

    def flax_step():
      p, o, loss = f_step(state["p"], state["o"], *j_in)
      loss.block_until_ready()
      state["p"], state["o"] = p, o

    flax_fwd()
    flax_step()  # compile
    t_fwd(*t_in)
    t_step(*t_in)  # warm up
    times = {"flax_fwd": [], "torch_fwd": [], "flax_step": [], "torch_step": []}
    for _ in range(args.reps):  # interleaved
      times["flax_fwd"] += _time(flax_fwd, 1)
      times["torch_fwd"] += _time(lambda: t_fwd(*t_in), 1)
      times["flax_step"] += _time(flax_step, 1)
      times["torch_step"] += _time(lambda: t_step(*t_in), 1)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for kind in ("fwd", "step"):
      rows.append({
          "work": "corpus encoding (forward)" if kind == "fwd" else "training step (fwd+bwd+AdamW)",
          "shape": f"{args.batch}x{length}",
          "flax_seq_per_s": args.batch / med[f"flax_{kind}"],
          "torch_seq_per_s": args.batch / med[f"torch_{kind}"],
          "ratio": med[f"torch_{kind}"] / med[f"flax_{kind}"],
      })
  table = report.markdown_table(
      ["work", "batch x len", "Flax seq/s", "PyTorch seq/s", "Flax / PyTorch"],
      [[r["work"], r["shape"], f"{r['flax_seq_per_s']:.1f}", f"{r['torch_seq_per_s']:.1f}", f"{r['ratio']:.2f}x"]
       for r in rows])
  print(table)
  if args.record:
    note = (f"Model: {config.num_hidden_layers}-layer BERT, hidden {config.hidden_size} (all-MiniLM-L6-v2 weights), "
            f"float32 on CPU; medians of {args.reps} interleaved repetitions; torch threads = {args.torch_threads}; "
            f"jax {jax.__version__}, torch {torch.__version__}.")
    report.record("Encoder throughput: Flax vs PyTorch", table, note)


if __name__ == "__main__":
  main()
