r"""Builds the prepared dataset directory that every later stage reads.

  python -m train.prepare --corpus psgs_w100.tsv.gz --questions nq_train=nq-train.json nq_dev=nq-dev.qa.csv --out P
  python -m train.prepare --corpus tfds:squad/train --corpus tfds:squad/validation \
      --questions squad_train=tfds:squad/train squad_dev=tfds:squad/validation --out P
  python -m train.prepare --data_dir ../shared/data --out P     # corpus.jsonl, *_train.jsonl, *_dev.jsonl

Each file's format is recognised from its content and extension (``train.sources``): our jsonl, DPR psgs_w100.tsv,
DPR retriever json (its positive and hard-negative contexts used as given), NQ-open jsonl, DPR *.qa.csv, SQuAD json;
gzip too; and tfds:NAME/SPLIT. A split NAME ending in _train is a training split, _dev a dev split. Writes DPR-style
passages, the token-ID corpus (plain, bz2 and lzma), a saved BM25 index, and for every question its BM25 top-k,
gold passages, positives and hard negatives; then ``manifest.json``. A rerun with the same inputs and settings
prints "up to date". Prints a summary and, last, one JSON line with the passage count and each dev split's BM25
answer accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app, flags, logging

from rnr_jax.data.prepared import PrepareSettings, prepare
from rnr_jax.metrics import DEFAULT_KS
from train import input_errors_exit, sources

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("corpus", [], "Corpus file or tfds:squad/SPLIT (repeat for several; documents of all).")
flags.DEFINE_multi_string("questions", [], "NAME=SPEC question splits (repeat the flag, or list several after it).")
flags.DEFINE_string("data_dir", None, "Instead of --corpus/--questions: a directory of our jsonl files (corpus.jsonl, "
                    "*_train.jsonl, *_dev.jsonl); default $RNR_DATA when neither is given.")
flags.DEFINE_string("out", None, "Prepared dataset directory to build.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the installed all-MiniLM-L6-v2).")
flags.DEFINE_integer("words_per_passage", 100, "Words per DPR-style passage.")
flags.DEFINE_integer("bm25_topk", 100, "BM25 passages stored per question.")
flags.DEFINE_integer("hard_negatives", 30, "Answer-free BM25 passages kept per question as hard negatives.")
flags.DEFINE_integer("max_train_questions", None, "Keep only the first N questions of each *_train split.")
flags.DEFINE_integer("holdout", 0, "Move the last N questions of each *_train split to a held-out split "
                     "(nq_train -> nq_holdout) for choosing settings without the dev sets.")
flags.DEFINE_string("stemmer", "auto", "BM25 stemmer: auto (English when PyStemmer is installed), a Snowball "
                    "language, or none.")
flags.DEFINE_list("compress", ["bz2", "lzma"], "Compressed forms of the token-ID corpus to write.")
flags.DEFINE_bool("skip_bad", False, "Skip malformed records (counted, logged) instead of failing.")
flags.DEFINE_integer("threads", None, "BM25 retrieval threads (default: all CPUs).")
flags.DEFINE_string("tfds_data_dir", None, "Where tfds: datasets are prepared (default: TFDS's own).")
flags.DEFINE_bool("tfds_download", False, "Let TFDS download and build a missing dataset (needs internet).")
flags.DEFINE_bool("force", False, "Rebuild even if the directory is up to date.")
flags.mark_flag_as_required("out")


def input_specs(corpus: list[str], questions: list[str], data_dir: str | None) -> tuple[list[str], dict[str, str]]:
  """Corpus and ``{split: spec}`` from the flags: --corpus/--questions, else --data_dir (or $RNR_DATA)."""
  if corpus or questions:
    if data_dir:
      raise app.UsageError("pass --corpus/--questions or --data_dir, not both")
    if not corpus:
      raise app.UsageError("--questions needs --corpus")
    return corpus, sources.parse_questions(questions)
  data_dir = data_dir or os.environ.get("RNR_DATA")
  if not data_dir:
    raise app.UsageError("pass --corpus and --questions, or --data_dir (or set RNR_DATA)")
  return sources.data_dir_specs(data_dir)


def summary_line(manifest: dict[str, Any]) -> dict[str, Any]:
  """The one-line JSON summary: passage count and BM25 accuracy of each dev split."""
  line: dict[str, Any] = {"passages": manifest["counts"]["passages"]}
  for name, info in manifest["splits"].items():
    if name.endswith("_dev"):
      acc = {f"bm25_top{k}_answer_acc": info["metrics"][f"bm25_top{k}_answer_acc"] for k in DEFAULT_KS}
      line[name] = {"questions": info["questions"], **acc}
  return {**line, "bytes_per_passage": manifest["bytes_per_passage"], "prepare_s": manifest["timings_s"]["total"]}


def _print_summary(manifest: dict) -> None:
  counts = manifest["counts"]
  print(f"documents {counts['documents']}  passages {counts['passages']}  tokens {counts['tokens']}  "
        f"skipped {counts['skipped_bad_documents']}  empty {counts['empty_documents']}")
  print("bytes per passage: " + "  ".join(f"{k} {v}" for k, v in manifest["bytes_per_passage"].items()))
  print("timings (s): " + "  ".join(f"{k} {v}" for k, v in manifest["timings_s"].items()))
  for name, info in manifest["splits"].items():
    m = info["metrics"]
    acc = " / ".join(f"{v:.3f}" for k, v in m.items() if k.endswith("_answer_acc"))
    gold = " / ".join(f"{v:.3f}" for k, v in m.items() if k.startswith("bm25_gold_recall"))
    print(f"{name:<20} questions {info['questions']:>6}  positives for {info['with_positive']:>6}  "
          f"BM25 answer acc@1/5/20/100 {acc}  gold recall {gold}")


def main(argv: list[str]) -> None:
  # absl leaves the NAME=SPEC items after the first one of "--questions A=x B=y" as arguments.
  extra = argv[1:]
  if bad := [a for a in extra if "=" not in a]:
    raise app.UsageError(f"unexpected arguments: {bad} (repeat --corpus for several corpus files)")
  corpus, questions = input_specs(FLAGS.corpus, FLAGS.questions + extra, FLAGS.data_dir)
  settings = PrepareSettings(
      tokenizer=FLAGS.tokenizer, words_per_passage=FLAGS.words_per_passage, bm25_topk=FLAGS.bm25_topk,
      hard_negatives=FLAGS.hard_negatives, max_train_questions=FLAGS.max_train_questions, holdout=FLAGS.holdout, stemmer=FLAGS.stemmer,
      compress=tuple(FLAGS.compress), skip_bad=FLAGS.skip_bad)
  tfds = sources.TfdsOptions(FLAGS.tfds_data_dir, FLAGS.tfds_download)
  with input_errors_exit("train.prepare"):
    corpus_sources, question_sources = sources.build(corpus, questions, tfds)
    result = prepare(corpus_sources, question_sources, FLAGS.out, settings, n_threads=FLAGS.threads,
                     force=FLAGS.force, echo=lambda s: logging.info("%s", s))
  if result.built:
    _print_summary(result.manifest)
  else:
    print(f"{result.path}: up to date")
  print(json.dumps(summary_line(result.manifest)))


if __name__ == "__main__":
  app.run(main)
