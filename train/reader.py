r"""Trains the reader teacher: DPR's reader with a passage ranker (paper §2.2.3, appendix A.2).

  python -m train.reader --config configs/reader.py --workdir W [--config.reader.candidates=ranked.npz]

Each step takes ``train.batch_size`` questions of the prepared training splits,
each with ``reader.m`` passages: a positive (holding an answer) first, then
negatives (answer-free BM25 hard negatives, or the top passages of a retriever's
ranked candidates file, see :mod:`rnr_jax.reader_data`). The loss is the
ranking cross-entropy of the positive among the m passages plus the marginal
log-likelihood of all answer spans in the positive (:func:`rnr_jax.reader.reader_loss`).
Inputs are ``[CLS] question [SEP] title [SEP] text [SEP]`` built from the
token-ID corpus, up to ``tokens.reader_len`` tokens, padded to length buckets.

Every ``train.eval_every`` steps (and after the last) the dev split
``reader.eval_split`` is read and exact match measured (DPR answer rule by
default: the best span, at most ``tokens.max_answer_len`` tokens, of the
top-ranked passage, widened to whole words and cut from the passage text):

* ``em_gold``: the gold passage given, with ``m - 1`` hard negatives;
* ``em_open@n``: over the top-n retrieved passages for each n in
  ``reader.eval_passages`` (BM25, or the candidates file), and ``em_open``, the
  best of them (appendix A.3).

Metrics go to ``W/metrics.jsonl`` (as ``eval/...``) and ``W/eval.jsonl``. The
parameters of the best evaluation (``reader.select_metric``) are exported to
``W/best/<step>/`` with their :class:`~rnr_jax.reader_data.ReaderSpec`
(:func:`rnr_jax.reader_data.load_reader` reads them). Checkpoints
(``W/checkpoints``) and resuming are the training core's. The prepared data
come from ``config.prepared_dir``, or are built into ``W/prepared``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rnr_jax import qa_model, reader, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.metrics import exact_match
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.metrics_log import append_eval
from rnr_jax.training.step import TrainState

FLAGS = flags.FLAGS
PyTree = Any


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  config_flags.DEFINE_config_file("config", "configs/reader.py", "Reader training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, exported best reader.")
  flags.mark_flag_as_required("workdir")
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class ReaderBatches:
  """Resumable training batches: per question ``m`` passage rows, the positive first, and its answer spans.

  The question order is the training core's :class:`~rnr_jax.training.loop.EpochIterator`;
  passages are drawn with a generator seeded by ``(seed, epoch, batch, process)``,
  so a resumed run sees the same batches.
  """

  def __init__(self, splits: Sequence[rd.ReaderSplit], tokenizer: tk.Tokenizer, corpus: Any, spec: rd.ReaderSpec,
               *, m: int, max_spans: int, batch_size: int, max_questions: int, seed: int):
    self._splits = splits
    self._tokenizer = tokenizer
    self._corpus = corpus
    self._spec = spec
    self._m = m
    self._max_spans = max_spans
    self._seed = seed
    self._examples = [(s, int(q)) for s, split in enumerate(splits) for q in split.trainable()[:max_questions or None]]
    if len(self._examples) < batch_size:
      raise ValueError(f"{len(self._examples)} trainable questions (with a positive and a negative passage), "
                       f"fewer than one batch of {batch_size}")
    self._order = loop.EpochIterator(lambda idx: {"index": idx}, len(self._examples), batch_size, seed=seed)

  def __len__(self) -> int:
    return len(self._examples)

  def __iter__(self) -> ReaderBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    idx = next(self._order)["index"]
    position = self._order.state()
    rng = np.random.default_rng([self._seed, position["epoch"], position["index"], jax.process_index()])
    examples = [self._examples[i] for i in idx]
    pids = np.stack([self._splits[s].training_passages(q, self._m, rng) for s, q in examples])
    spec = self._spec
    return rd.reader_batch(self._tokenizer, self._corpus, [self._splits[s].question_ids[q] for s, q in examples],
                           pids, [self._splits[s].answer_ids[q] for s, q in examples], max_len=spec.reader_len,
                           buckets=spec.buckets, question_len=spec.question_len,
                           max_answer_len=spec.max_answer_len, max_spans=self._max_spans)

  def state(self) -> dict[str, int]:
    return self._order.state()

  def restore(self, state: Mapping[str, Any]) -> None:
    self._order.restore(state)


def read_fn(model: qa_model.RetrieverReader):
  """``(params, batch) -> [rows, 2L + 1]``: start logits, end logits and the rank logit of each row, concatenated.

  One array, so that :class:`retrieval.BatchEncoder` runs and gathers it.
  """
  def read(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    start, end, rank = model.apply({"params": params}, batch, method="read")
    return jnp.concatenate([start, end, rank[:, None]], axis=1)
  return read


class Evaluator:
  """Dev-set exact match with the gold passage given and in the open setting; exports the best parameters.

  Called by the training loop as ``eval_fn(state, step)``.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, spec: rd.ReaderSpec,
               model: qa_model.RetrieverReader, data: PreparedData, tokenizer: tk.Tokenizer, split: rd.ReaderSplit,
               mesh: jax.sharding.Mesh):
    rcfg = config.reader
    self._spec = spec
    self._data = data
    self._tokenizer = tokenizer
    self._split = split
    self._m = int(rcfg.m)
    self._counts = tuple(sorted(int(n) for n in rcfg.eval_passages))
    self._rule = rcfg.answer_rule
    self._batch = int(rcfg.eval_batch_size)
    self._is_continuation = reader.continuation_table(tokenizer.vocab())
    questions = np.arange(len(split))[: int(rcfg.eval_questions) or None]
    self._open_questions = questions
    self._gold_questions = np.asarray([q for q in questions if len(split.positives[q])], np.int64)
    names = {"em_gold", "em_open", *(f"em_open@{n}" for n in self._counts)}
    if rcfg.select_metric not in names:
      raise ValueError(f"reader.select_metric {rcfg.select_metric!r} is not one of {sorted(names)}")
    self._select = rcfg.select_metric
    self._gold_reader = retrieval.BatchEncoder(read_fn(model), mesh, self._batch * self._m)
    self._open_reader = retrieval.BatchEncoder(read_fn(model), mesh, self._batch * self._counts[-1])
    self._path = os.path.join(workdir, "eval.jsonl")
    self._export = rd.ParamsExport(os.path.join(workdir, "best"))
    exported = self._export.latest_info()
    self._best = exported["metrics"][self._select] if exported else -math.inf
    logging.info("Evaluating on %s: %d questions with the gold passage, %d open (top %s).", rcfg.eval_split,
                 len(self._gold_questions), len(questions), self._counts)

  def _answers(self, encoder: retrieval.BatchEncoder, params: PyTree, questions: np.ndarray, m: int,
               counts: Sequence[int], gold: bool) -> dict[int, list[str]]:
    """Predicted answers of ``questions`` reading their first n of ``m`` passages, for each n in ``counts``."""
    split, spec = self._split, self._spec
    answers: dict[int, list[str]] = {n: [] for n in counts}
    for i in range(0, len(questions), self._batch):
      qs = questions[i : i + self._batch]
      pids = np.stack([split.gold_passages(q, m) if gold else split.open_passages(q, m) for q in qs])
      batch = rd.reader_batch(self._tokenizer, self._data.token_corpus(), [split.question_ids[q] for q in qs], pids,
                              max_len=spec.reader_len, buckets=spec.buckets, question_len=spec.question_len,
                              max_answer_len=spec.max_answer_len, max_spans=1)
      rows, length = batch["input_ids"].shape
      out = encoder(params, [(np.arange(rows), tk.EncodedBatch(*(batch[k] for k in ENCODER_INPUTS)))], rows)
      for n in counts:
        answers[n] += rd.predict_answers(self._tokenizer, self._is_continuation, self._data.passages.texts, batch,
                                         pids, out[:, :length], out[:, length : 2 * length], out[:, 2 * length], n,
                                         max_answer_len=spec.max_answer_len, rule=self._rule)
    return answers

  def evaluate(self, params: PyTree) -> dict[str, float]:
    """``em_gold``, ``em_open@n`` and ``em_open`` of ``params``."""
    questions = self._split.questions

    def em(predictions: Sequence[str], qs: np.ndarray) -> float:
      return float(np.mean([exact_match(p, questions[q].answers) for p, q in zip(predictions, qs)])) if len(qs) else 0.0

    metrics = {}
    gold = self._answers(self._gold_reader, params, self._gold_questions, self._m, [self._m], gold=True)
    metrics["em_gold"] = em(gold[self._m], self._gold_questions)
    opened = self._answers(self._open_reader, params, self._open_questions, self._counts[-1], self._counts, gold=False)
    for n in self._counts:
      metrics[f"em_open@{n}"] = em(opened[n], self._open_questions)
    metrics["em_open"] = max(metrics[f"em_open@{n}"] for n in self._counts)
    return metrics

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    start = time.perf_counter()
    metrics = self.evaluate(state.params)
    metrics["eval_s"] = time.perf_counter() - start
    best = metrics[self._select] > self._best
    if best:
      self._best = metrics[self._select]
      self._export.save(step, state.params, {"reader": self._spec.to_json(), "metrics": metrics,
                                             "select_metric": self._select})
      logging.info("Step %d: new best %s %.4f, exported to %s.", step, self._select, self._best,
                   self._export.directory)
    append_eval(self._path, step, {**metrics, "best": best})
    return metrics

  def close(self) -> None:
    self._export.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains and evaluates the reader of ``config`` in ``workdir`` (resuming if it holds checkpoints)."""
  rcfg = config.reader
  workdir = loop.start_run(config, workdir)

  # Mesh: the training loop builds the same one from config.mesh; evaluation reads on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  parallel = retrieval.data_parallelism(mesh)
  if config.train.batch_size % parallel or rcfg.eval_batch_size % parallel:
    raise ValueError(f"train.batch_size {config.train.batch_size} and reader.eval_batch_size "
                     f"{rcfg.eval_batch_size} must be divisible by the {parallel} data-parallel devices")

  # Input: prepared data, passage pools of the training and dev questions, resumable batches.
  data = rd.load_prepared(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  encoder_config, pretrained = retrieval.initial_encoder(config.model)
  if encoder_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the encoder's vocabulary ({encoder_config.vocab_size}) is smaller than the prepared "
                     f"data's tokenizer ({tokenizer.vocab_size}, {data.tokenizer_path})")
  spec = rd.ReaderSpec.from_config(config, encoder_config, data.manifest["settings"]["tokenizer"])
  candidates = rcfg.candidates or None
  train_splits = [rd.load_reader_split(data, s, tokenizer, candidates, int(rcfg.num_negatives))
                  for s in rcfg.train_splits]
  batches = ReaderBatches(train_splits, tokenizer, data.token_corpus(), spec, m=int(rcfg.m),
                          max_spans=int(rcfg.max_spans), batch_size=int(config.train.batch_size),
                          max_questions=int(rcfg.max_train_questions), seed=int(config.train.seed))
  logging.info("Training on %s: %d questions with a positive and a negative passage.", list(rcfg.train_splits),
               len(batches))

  # Model: parameter init (abstract shapes, shardings, the jitted init and the resume
  # order are the training loop's: params are born sharded), and the loss.
  model = spec.build()

  def init_fn(rng: jax.Array) -> PyTree:
    return model.init(rng, retrieval.dummy_inputs())["params"]

  def loss_fn(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    start, end, rank = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng},
                                   method="read")
    num_q, m = batch["passage_mask"].shape
    length = batch["input_ids"].shape[1]
    pos = jnp.arange(length)[None, :]
    valid = (pos >= batch["text_start"][:, None]) & (pos < batch["text_end"][:, None])
    shape = (num_q, m, length)
    return reader.reader_loss(start.reshape(shape), end.reshape(shape), rank.reshape(num_q, m), valid.reshape(shape),
                              batch["span_starts"], batch["span_ends"], batch["span_mask"], batch["passage_mask"])

  load_pretrained = qa_model.pretrained_loader(pretrained)

  # Evals, then the loop.
  dev = rd.load_reader_split(data, rcfg.eval_split, tokenizer, candidates, int(rcfg.num_negatives))
  evaluator = Evaluator(config, workdir, spec, model, data, tokenizer, dev, mesh)
  try:
    return loop.train_loop(config, workdir=workdir, init_fn=init_fn, loss_fn=loss_fn, data=batches,
                           eval_fn=evaluator, load_pretrained=load_pretrained)
  finally:
    evaluator.close()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
