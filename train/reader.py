r"""Trains the reader teacher: DPR's reader with a passage ranker (paper §2.2.3, appendix A.2).

  python -m train.reader --config configs/reader.py --workdir W [--config.reader.candidates=ranked.npz]

Each step takes ``train.batch_size`` questions, each with ``reader.m`` passages: a positive first, then answer-free
negatives (BM25 hard negatives, or the top passages of a ranked candidates file). The loss is the positive's ranking
cross-entropy among the m plus the marginal likelihood of all answer spans in it. Every ``train.eval_every`` steps the
dev split is read (:class:`rnr_jax.evaluation.ReaderEvaluator`); the best parameters (``reader.select_metric``) are
exported to ``W/best/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from rnr_jax import distill, exports, qa_model
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.evaluation import ReaderEvaluator
from rnr_jax.specs import ReaderSpec
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from train import define_stage_flags, run_stage, sources

PyTree = Any


class ReaderBatches(loop.EpochIterator):
  """Resumable batches: per question ``m`` passage rows, the positive first, and its answer spans; each epoch
  draws every question's passages from ``(seed, epoch)``, so a resumed run sees the same batches.
  ``group_batches > 0`` batches questions of similar row lengths (:class:`loop.EpochIterator`): a batch pads every
  row to its longest, and in random batches that is ~1.5x the tokens of the rows themselves."""

  def __init__(self, splits: Sequence[rd.ReaderSplit], tokenizer: tk.Tokenizer, corpus: Any, spec: ReaderSpec,
               *, m: int, max_spans: int, batch_size: int, max_questions: int, seed: int, group_batches: int = 0):
    self._splits = splits
    self._tokenizer = tokenizer
    self._corpus = corpus
    self._spec = spec
    self._m = m
    self._max_spans = max_spans
    self._examples = [(s, int(q)) for s, split in enumerate(splits) for q in split.trainable()[:max_questions or None]]
    if len(self._examples) < batch_size:
      raise ValueError(f"{len(self._examples)} trainable questions (with a positive and a negative passage), "
                       f"fewer than one batch of {batch_size}")
    self._drawn: tuple[int, np.ndarray] | None = None  # (epoch, its passages [questions, m])
    if group_batches:
      self._record_lengths = np.asarray(corpus.lengths())
      self._question_lengths = np.asarray([len(splits[s].question_ids[q]) for s, q in self._examples])
    super().__init__(self._batch, len(self._examples), batch_size, seed=seed,
                     sizes=self._row_sizes if group_batches else None, group_batches=group_batches)

  def __len__(self) -> int:
    return len(self._examples)

  def _passages(self, epoch: int) -> np.ndarray:
    if self._drawn is None or self._drawn[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._drawn = epoch, np.stack([self._splits[s].training_passages(q, self._m, rng) for s, q in self._examples])
    return self._drawn[1]

  def _row_sizes(self, epoch: int) -> np.ndarray:
    """Each question's longest row, in tokens before truncation (question + passage record)."""
    return self._record_lengths[self._passages(epoch)].max(1) + self._question_lengths

  def _batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self._examples[i] for i in idx]
    pids = self._passages(self.state()["epoch"])[idx]
    spec = self._spec
    return rd.reader_batch(self._tokenizer, self._corpus, [self._splits[s].question_ids[q] for s, q in examples],
                           pids, [self._splits[s].answer_ids[q] for s, q in examples], max_len=spec.reader_len,
                           buckets=spec.buckets, question_len=spec.question_len,
                           max_answer_len=spec.max_answer_len, max_spans=self._max_spans)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Trains and evaluates the reader of ``config`` in ``workdir`` (resuming if it holds checkpoints)."""
  rcfg = config.reader
  workdir = loop.start_run(config, workdir)

  # Mesh: the loop builds the same one from config.mesh; evaluation reads on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  parallel = mesh_lib.data_parallelism(mesh)
  if config.train.batch_size % parallel or rcfg.eval_batch_size % parallel:
    raise ValueError(f"train.batch_size {config.train.batch_size} and reader.eval_batch_size "
                     f"{rcfg.eval_batch_size} must be divisible by the {parallel} data-parallel devices")

  # Input: prepared data, passage pools of the training and dev questions, resumable batches.
  data = sources.prepared_data(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  encoder_config, pretrained, _ = exports.initial_encoder(config.model)
  loop.check_vocabulary(encoder_config.vocab_size, tokenizer, data)
  spec = ReaderSpec.from_config(config, encoder_config, data.manifest["settings"]["tokenizer"])
  candidates = rcfg.candidates or None
  train_splits = [rd.load_reader_split(data, s, tokenizer, candidates, int(rcfg.num_negatives), rcfg.positives)
                  for s in rcfg.train_splits]
  batches = ReaderBatches(train_splits, tokenizer, data.token_corpus(), spec, m=int(rcfg.m),
                          max_spans=int(rcfg.max_spans), batch_size=int(config.train.batch_size),
                          max_questions=int(rcfg.max_train_questions), seed=int(config.train.seed),
                          group_batches=int(rcfg.group_batches))
  logging.info("Training on %s: %d questions with a positive and a negative passage.", list(rcfg.train_splits),
               len(batches))

  # Model and step: DPR's reader loss.
  model = spec.build()
  step = step_lib.adamw_step(config, lambda params, batch, rng: distill.reader_loss(model, params, batch, rng))

  # Evals.
  dev = rd.load_reader_split(data, rcfg.eval_split, tokenizer, candidates, int(rcfg.num_negatives), rcfg.positives)
  evaluator = ReaderEvaluator(rcfg, spec, dev, data, tokenizer, mesh)
  best = exports.BestExport(workdir, {"reader": spec.to_json()}, rcfg.select_metric)

  # The loop.
  try:
    return loop.train_loop(config, workdir=workdir, init_fn=lambda rng: qa_model.init_params(model, rng), step=step,
                           data=batches, evaluator=evaluator, best=best,
                           load_pretrained=None if pretrained is None else
                           lambda params: qa_model.with_pretrained(params, encoder=pretrained))
  finally:
    best.close()


if __name__ == "__main__":
  define_stage_flags("configs/reader.py", "Reader training")
  run_stage(train_and_evaluate)
