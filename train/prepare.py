r"""Builds the prepared dataset directory that every later stage reads.

  python -m train.prepare --data_dir ../shared/data --out work/prepared

From ``corpus.jsonl`` and the ``*_train.jsonl`` / ``*_dev.jsonl`` question files of ``--data_dir``: DPR-style 100-word
passages, the token-ID corpus (plain, bz2 and lzma), a saved BM25 index, and for every question its BM25 top-k (ids,
scores, has_answer flags), gold passages, positives and hard negatives; then ``manifest.json``. A rerun with the same
inputs and settings prints "up to date" and does nothing. Prints a summary and, last, one JSON line with the passage
count and the BM25 answer accuracy of each dev split.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from rnr_jax.data.prepared import PrepareSettings, prepare, summary_line

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.environ.get("RNR_DATA"), "Directory of corpus.jsonl and the question files "
                    "(default: $RNR_DATA).")
flags.DEFINE_string("out", None, "Prepared dataset directory to build.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the installed all-MiniLM-L6-v2).")
flags.DEFINE_integer("words_per_passage", 100, "Words per DPR-style passage.")
flags.DEFINE_integer("bm25_topk", 100, "BM25 passages stored per question.")
flags.DEFINE_integer("hard_negatives", 30, "Answer-free BM25 passages kept per question as hard negatives.")
flags.DEFINE_integer("max_train_questions", None, "Keep only the first N questions of each *_train split.")
flags.DEFINE_string("stemmer", "auto", "BM25 stemmer: auto (English when PyStemmer is installed), a Snowball "
                    "language, or none.")
flags.DEFINE_list("compress", ["bz2", "lzma"], "Compressed forms of the token-ID corpus to write.")
flags.DEFINE_bool("skip_bad", False, "Skip malformed records (counted, logged) instead of failing.")
flags.DEFINE_integer("threads", None, "BM25 retrieval threads (default: all CPUs).")
flags.DEFINE_bool("force", False, "Rebuild even if the directory is up to date.")
flags.mark_flag_as_required("out")


def _print_summary(manifest: dict) -> None:
  counts = manifest["counts"]
  print(f"documents {counts['documents']}  passages {counts['passages']}  tokens {counts['tokens']}")
  print("bytes per passage: " + "  ".join(f"{k} {v}" for k, v in manifest["bytes_per_passage"].items()))
  print("timings (s): " + "  ".join(f"{k} {v}" for k, v in manifest["timings_s"].items()))
  for name, info in manifest["splits"].items():
    m = info["metrics"]
    acc = " / ".join(f"{v:.3f}" for k, v in m.items() if k.endswith("_answer_acc"))
    gold = " / ".join(f"{v:.3f}" for k, v in m.items() if k.startswith("bm25_gold_recall"))
    print(f"{name:<20} questions {info['questions']:>6}  positives for {info['with_positive']:>6}  "
          f"BM25 answer acc@1/5/20/100 {acc}  gold recall {gold}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.data_dir:
    raise app.UsageError("pass --data_dir or set RNR_DATA")
  settings = PrepareSettings(
      tokenizer=FLAGS.tokenizer, words_per_passage=FLAGS.words_per_passage, bm25_topk=FLAGS.bm25_topk,
      hard_negatives=FLAGS.hard_negatives, max_train_questions=FLAGS.max_train_questions, stemmer=FLAGS.stemmer,
      compress=tuple(FLAGS.compress), skip_bad=FLAGS.skip_bad)
  result = prepare(FLAGS.data_dir, FLAGS.out, settings, n_threads=FLAGS.threads, force=FLAGS.force,
                   echo=lambda s: logging.info("%s", s))
  if result.built:
    _print_summary(result.manifest)
  else:
    print(f"{result.path}: up to date")
  print(json.dumps(summary_line(result.manifest)))


if __name__ == "__main__":
  app.run(main)
