r"""How long answers are, in reader tokens: the share of each split's questions with an answer of at most n tokens.

  python -m bench.answer_lengths --prepared runs/mini/prepared [--lengths 10,12,16,20,24,30] [--record]

Choose ``tokens.max_answer_len`` from the training splits: a question whose every answer is longer can never be
matched exactly, and in training it gives no span target.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import report
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prepared", required=True)
  parser.add_argument("--lengths", default="10,12,16,20,24,30")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  lengths = [int(n) for n in args.lengths.split(",")]
  data = PreparedData.load(args.prepared)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  shares = {}
  for split in data.splits:
    shortest = np.asarray([min(len(ids) for ids in tokenizer.encode_texts(list(q.answers)))
                           for q in data.questions(split) if q.answers])
    shares[split] = {n: float(np.mean(shortest <= n)) for n in lengths}
  table = report.markdown_table(["split", *(f"<= {n} tokens" for n in lengths)],
                                [[s, *(f"{100 * v[n]:.1f}" for n in lengths)] for s, v in shares.items()])
  print(table)
  if args.record:
    report.record("reading", "Answer lengths in reader tokens", table,
                  "Share (%) of each split's questions whose shortest answer has at most n WordPiece tokens.")
  print(json.dumps(shares))


if __name__ == "__main__":
  main()
