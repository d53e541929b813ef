r"""Reader training batches on CPU: padded tokens and step time, random or grouped by row length, by bucket set.

  python -m bench.reader_batches --workdir W [--steps 60] [--record]

W is a mini pipeline work directory: its prepared data, the teacher retriever's candidates and the teacher reader's
stage config (``W/teacher_reader/config.json``). Each variant draws the same number of batches from the reader's
iterator (:class:`train.reader.ReaderBatches`, the stage's seed, m and batch size) and runs the stage's step (DPR
reader loss, AdamW, its ``optim.grad_accum``) on MiniLM twice over them, timing the second pass, so every shape is
compiled before it is timed. Ratios are against the first row, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import ml_collections
import numpy as np

from bench import report
from rnr_jax import distill, exports, qa_model
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.specs import ReaderSpec
from rnr_jax.training import step as step_lib
from train.reader import ReaderBatches

COARSE = (32, 64, 96, 128, 160, 192)
FINE = tuple(range(16, 193, 16))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a mini pipeline work directory")
  parser.add_argument("--steps", type=int, default=60, help="batches per variant")
  parser.add_argument("--group_batches", type=int, default=50, help="reader.group_batches of the grouped rows")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()

  config = ml_collections.ConfigDict(json.load(open(os.path.join(args.workdir, "teacher_reader", "config.json"))))
  rcfg = config.reader
  data = PreparedData.load(config.prepared_dir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  encoder_config, pretrained, _ = exports.initial_encoder(config.model)
  splits = [rd.load_reader_split(data, s, tokenizer, rcfg.candidates or None, int(rcfg.num_negatives), rcfg.positives)
            for s in rcfg.train_splits]

  rows, first = [], None
  for buckets in (COARSE, FINE):
    config.tokens.buckets = list(buckets)
    spec = ReaderSpec.from_config(config, encoder_config, data.manifest["settings"]["tokenizer"])
    model = spec.build()
    step = step_lib.adamw_step(config, lambda params, batch, rng: distill.reader_loss(model, params, batch, rng))
    update = jax.jit(step.update, donate_argnums=(0,))
    params = qa_model.with_pretrained(qa_model.init_params(model, jax.random.key(0)), encoder=pretrained)
    for group in (0, args.group_batches):
      it = ReaderBatches(splits, tokenizer, data.token_corpus(), spec, m=int(rcfg.m), max_spans=int(rcfg.max_spans),
                         batch_size=int(config.train.batch_size), max_questions=int(rcfg.max_train_questions),
                         seed=int(config.train.seed), group_batches=group)
      batches = [next(it) for _ in range(args.steps)]
      padded = sum(b["attention_mask"].size for b in batches) / sum(b["attention_mask"].sum() for b in batches)
      lengths = {b["input_ids"].shape[1] for b in batches}
      state = step.init_state(jax.tree.map(np.array, params))
      seconds = []
      for _ in range(2):  # the first pass compiles every length met
        start = time.perf_counter()
        for b in batches:
          state, metrics = update(state, b, jax.random.key(1))
        jax.block_until_ready(metrics)
        seconds.append((time.perf_counter() - start) / len(batches))
      first = first or seconds[1]
      rows.append([str(buckets), "grouped" if group else "random", f"{padded:.2f}", str(len(lengths)),
                   f"{seconds[1]:.3f}", f"{seconds[0] * len(batches):.0f}", f"{first / seconds[1]:.2f}x"])
      print(" | ".join(rows[-1]), flush=True)
  table = report.markdown_table(
      ["buckets", "batches", "padded / real tokens", "lengths met", "s/step", "first pass s (compiles)",
       "speed vs first row"], rows)
  print(table)
  if args.record:
    report.record(
        "speed", "Reader batches grouped by row length", table,
        note=f"{args.steps} batches of the teacher reader's stage in {args.workdir} ({int(config.train.batch_size)} "
             f"questions x m = {int(rcfg.m)} rows of at most {int(config.tokens.reader_len)} tokens, grad_accum "
             f"{int(config.optim.grad_accum)}); grouped: `reader.group_batches={args.group_batches}`. A batch pads "
             "every row to its longest: grouping questions of similar row lengths, and buckets every 16 tokens, "
             "leave fewer padded tokens, at the price of a compile per length met. configs/mini.py groups the "
             "teacher reader's batches and keeps its 32-token buckets.")


if __name__ == "__main__":
  main()
