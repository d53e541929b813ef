r"""Encoder speed by batch size, length buckets and gradient accumulation, side by side in one run.

  python -m bench.bench_batch --prepared W/prepared [--passages 4096] [--record]

Encodes the same random sample of the prepared corpus's passages with MiniLM (the mini pipeline's encoder) in
batches of several sizes and with two bucket sets, then times a training step (forward + backward of a
mean-squared output, as a stand-in for any loss, and an SGD update) of a ``[B, L]`` batch with the training
core's step (``rnr_jax.training.step.make_train_step``) at several ``grad_accum`` (``optim.grad_accum``). Every
variant is warmed up (compiled) before it is timed; ratios are against the first row of each table, so noise from
a shared machine shows in them less than in the absolute rates.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import report
from rnr_jax import retrieval
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.models import bert
from rnr_jax.models.hf import load_minilm
from rnr_jax.specs import RetrieverSpec
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib

COARSE = (32, 64, 128, 192, 256)
FINE = (32, 64, 96, 128, 160, 192, 224, 256)


def encode_rate(p_fn, params, tokenizer, records, mesh, batch_size: int, buckets: tuple[int, ...]) -> float:
  encoder = retrieval.BatchEncoder(p_fn, mesh, batch_size)
  run = lambda recs: retrieval.encode_corpus(encoder, params, tokenizer, recs, max_len=256, buckets=buckets,
                                             token_type=0)
  run(records[:len(records) // 4])  # compiles every bucket met (the sample is random, so nearly all)
  start = time.perf_counter()
  run(records)
  return len(records) / (time.perf_counter() - start)


def step_seconds(model, params, batch_rows: int, length: int, accum: int, repeats: int) -> float:
  """Seconds per step of the training core's train step (``grad_accum=accum``, plain SGD) on a random batch."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 20000, (batch_rows, length)), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}

  def loss_fn(p, b, _):
    out = model.apply({"params": p}, b["input_ids"], b["attention_mask"], jnp.zeros_like(b["input_ids"]),
                      deterministic=True)
    return jnp.mean(out.sequence ** 2), {}

  optimizer = optax.sgd(1e-6)
  step = jax.jit(step_lib.make_train_step(loss_fn, optimizer, grad_accum=accum))
  state, key = step_lib.TrainState.create(params, optimizer), jax.random.key(0)
  state, _ = step(state, batch, key)
  jax.block_until_ready(state.params)
  start = time.perf_counter()
  for _ in range(repeats):
    state, _ = step(state, batch, key)
  jax.block_until_ready(state.params)
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prepared", required=True, help="a prepared dataset directory (train.prepare)")
  parser.add_argument("--passages", type=int, default=4096, help="random passages encoded per variant")
  parser.add_argument("--batch_sizes", default="64,32,16,8")
  parser.add_argument("--train_shapes", default="32x192,12x192", help="BxL of the timed training steps")
  parser.add_argument("--accums", default="1,2,4")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()

  data = PreparedData.load(args.prepared)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  corpus = data.token_corpus()
  sample = np.random.default_rng(0).choice(len(corpus), min(args.passages, len(corpus)), replace=False)
  records = [corpus[int(i)] for i in sample]
  lengths = np.minimum(np.array([len(r) + 2 for r in records]), 256)
  config, params = load_minilm()
  spec = RetrieverSpec(encoder=config.to_hf_dict(), pooling="mean", retrieval_dim=0, normalize=True,
                                 shared=True, question_len=64, passage_len=256, passage_token_type=0, buckets=FINE,
                                 tokenizer_fingerprint="")
  mesh = mesh_lib.data_mesh()
  params_on_mesh = jax.device_put({"encoder": params},
                                  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  p_fn = spec.embed_fns()[1]

  rows = []
  for buckets in (COARSE, FINE):
    padded = np.array([tk.bucket_length(int(n), buckets, 256) for n in lengths])
    for bs in (int(b) for b in args.batch_sizes.split(",")):
      rate = encode_rate(p_fn, params_on_mesh, tokenizer, records, mesh, bs, buckets)
      rows.append((buckets, float(padded.mean()), bs, rate))
      print(f"buckets {buckets} batch {bs}: {rate:.1f} passages/s", flush=True)
  base = rows[0][3]
  encode_table = report.markdown_table(
      ["buckets", "mean padded length", "batch", "passages/s", "vs first row"],
      [[str(b), f"{p:.1f}", str(bs), f"{r:.1f}", f"{r / base:.2f}x"] for b, p, bs, r in rows])

  model = bert.BertEncoder(config)
  train_rows = []
  for shape in args.train_shapes.split(","):
    b, length = (int(x) for x in shape.split("x"))
    first = None
    for accum in (int(a) for a in args.accums.split(",")):
      if b % accum:
        continue
      seconds = step_seconds(model, params, b, length, accum, args.repeats)
      first = first or seconds
      train_rows.append([f"{b}x{length}", str(accum), f"{b // accum}", f"{seconds:.2f}", f"{b / seconds:.1f}",
                         f"{first / seconds:.2f}x"])
      print(f"train {b}x{length} accum {accum}: {seconds:.2f} s/step", flush=True)
  train_table = report.markdown_table(
      ["batch (rows x tokens)", "grad_accum", "rows per pass", "s/step", "rows/s", "speed vs accum 1"], train_rows)
  table = encode_table + "\n\n" + train_table
  print(table)
  if args.record:
    report.record(
        "speed", "Batch size and length buckets on CPU (MiniLM forward and training step)", table,
        note=f"Encoding: {len(records)} random passages of {args.prepared}'s corpus (token type 0, mean pooling, "
             f"max 256 tokens); mean real length {lengths.mean():.1f} tokens. Training: random token ids, no "
             "padding, forward + backward of the encoder. XLA's CPU kernels are faster on small batches, whose "
             "activations stay in cache: the mini pipeline (configs/mini.py) therefore encodes in batches of 8 "
             "with buckets every 32 tokens and accumulates reader / finetuning gradients over micro-batches.")


if __name__ == "__main__":
  main()
