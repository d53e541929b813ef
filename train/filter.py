r"""Trains the passage filter and writes the passage subset it keeps (paper §2.1, appendix A.1).

  python -m train.filter --config configs/filter.py --workdir W [--config.filter.keep_bytes=500000000]

``J+train`` is every passage retrieved in the top ``filter.top_k`` for a
question of ``filter.positive_splits`` (prepared BM25 candidates, or a ranked
candidates file ``filter.candidates``); ``J-train`` the rest. Each step takes
``train.batch_size / 2`` positives, oversampled by their smoothed frequency
``log_b(freq) + 1`` (b = ``filter.log_base``), and as many uniform negatives, and
minimises the binary cross-entropy of ``s_j = v_j . w`` (:mod:`rnr_jax.passage_filter`).
With ``train.num_steps = 0`` the run lasts ``filter.epochs`` epochs of
oversampled positives (one in the paper).

Every ``train.eval_every`` steps (and after the last) the hit ratio ``hit_val``
of ``J+val`` (the best-ranked answer passage of each ``filter.val_split``
question) against ``filter.val_negatives`` held-out negatives is measured and
written to ``W/metrics.jsonl`` (``eval/hit_val``) and ``W/eval.jsonl``; the best
parameters are exported to ``W/best/<step>/``. After training, the best
parameters score every passage (``W/passage_scores.npy``, float32, one per
passage id) and the top-n are written to ``W/subset.npz`` (``pids`` best first,
``scores``, ``num_passages``; :func:`rnr_jax.passage_filter.load_subset`), with a
summary in ``W/subset.json``. n is ``filter.keep`` (a count, or a fraction of the
corpus) or, when set, the byte budget ``filter.keep_bytes`` of the kept passages
in the token-ID corpus.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rnr_jax import passage_filter as pf
from rnr_jax import qa_model, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data.token_corpus import TokenCorpus, save_npy
from rnr_jax.io import atomic_write_json
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.metrics_log import append_eval
from rnr_jax.training.step import TrainState

FLAGS = flags.FLAGS
PyTree = Any


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  config_flags.DEFINE_config_file("config", "configs/filter.py", "Passage filter config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, best filter, kept subset.")
  flags.mark_flag_as_required("workdir")


class Evaluator:
  """``hit_val`` of ``J+val`` against ``J-val``; exports the best parameters. The loop's ``eval_fn``."""

  def __init__(self, workdir: str, scorer: retrieval.BatchEncoder, tokenizer: tk.Tokenizer, corpus: TokenCorpus,
               sets: pf.FilterSets, model_info: dict[str, Any], *, max_len: int, buckets: Sequence[int]):
    self._scorer = scorer
    self._tokenizer = tokenizer
    self._corpus = corpus
    self._pids = np.concatenate([sets.val_positives, sets.val_negatives])
    self._num_positives = len(sets.val_positives)
    self._model_info = model_info
    self._max_len = max_len
    self._buckets = buckets
    self._path = os.path.join(workdir, "eval.jsonl")
    self.export = rd.ParamsExport(os.path.join(workdir, "best"))
    exported = self.export.latest_info()
    self._best = exported["metrics"]["hit_val"] if exported else -math.inf

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    start = time.perf_counter()
    scores = pf.score_passages(self._scorer, state.params, self._tokenizer, self._corpus, self._pids,
                               max_len=self._max_len, buckets=self._buckets)
    metrics = {"hit_val": pf.hit_ratio(scores[: self._num_positives], scores[self._num_positives :]),
               "eval_s": time.perf_counter() - start}
    best = metrics["hit_val"] > self._best
    if best:
      self._best = metrics["hit_val"]
      self.export.save(step, state.params, {"filter": self._model_info, "metrics": metrics})
      logging.info("Step %d: new best hit_val %.4f, exported to %s.", step, self._best, self.export.directory)
    append_eval(self._path, step, {**metrics, "best": best})
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
  """Trains the filter of ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the kept pids."""
  fcfg = config.filter
  workdir = loop.start_run(config, workdir)

  # Mesh: the training loop builds the same one from config.mesh; scoring runs on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  parallel = retrieval.data_parallelism(mesh)
  pairs = config.train.batch_size // 2
  if config.train.batch_size % 2 or pairs % parallel or fcfg.score_batch_size % parallel:
    raise ValueError(f"train.batch_size {config.train.batch_size} must be even, and half of it and "
                     f"filter.score_batch_size {fcfg.score_batch_size} divisible by the {parallel} "
                     "data-parallel devices")

  # Input: prepared data, J+train with retrieval frequencies, validation sets, resumable pair batches.
  data = rd.load_prepared(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  corpus = data.token_corpus()
  num_passages = data.num_passages
  candidates = fcfg.candidates or None
  freq = pf.retrieval_frequency([rd.ranked_pids(data, s, candidates) for s in fcfg.positive_splits],
                                int(fcfg.top_k), num_passages)
  val_questions = data.questions(fcfg.val_split)
  val_positives = pf.first_answer_passages(rd.ranked_pids(data, fcfg.val_split, candidates),
                                           [q.answers for q in val_questions], data.matcher())
  rng = np.random.default_rng(config.train.seed)
  sets = pf.make_filter_sets(num_passages, freq, val_positives, int(fcfg.val_negatives), float(fcfg.log_base), rng)
  positives, negatives = pf.training_pairs(sets, rng)
  max_len, buckets = int(config.tokens.passage_len), tuple(config.tokens.buckets)
  batches = loop.EpochIterator(
      lambda idx: pf.pair_batch(tokenizer, corpus, positives[idx], negatives[idx], max_len=max_len, buckets=buckets),
      len(positives), pairs, seed=int(config.train.seed))
  logging.info("J+train %d passages (top %d of %s; %d oversampled per epoch), J-train %d for training; "
               "J+val %d, J-val %d.", len(sets.train_positives), fcfg.top_k, list(fcfg.positive_splits),
               len(positives), len(sets.train_negatives), len(sets.val_positives), len(sets.val_negatives))
  if not config.train.num_steps:
    config = config.copy_and_resolve_references()
    config.train.num_steps = max(1, math.ceil(float(fcfg.epochs) * batches.batches_per_epoch))
    logging.info("train.num_steps = %d (%.3g epochs of %d steps).", config.train.num_steps, fcfg.epochs,
                 batches.batches_per_epoch)

  # Model: parameter init (abstract shapes, shardings, the jitted init and the resume
  # order are the training loop's: params are born sharded), and the loss.
  encoder_config, pretrained = retrieval.initial_encoder(config.model)
  if encoder_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the encoder's vocabulary ({encoder_config.vocab_size}) is smaller than the prepared "
                     f"data's tokenizer ({tokenizer.vocab_size}, {data.tokenizer_path})")
  model = pf.PassageFilter(encoder_config, pooling=config.model.pooling, dtype=jnp.dtype(config.model.dtype))

  def init_fn(rng: jax.Array) -> PyTree:
    return model.init(rng, retrieval.dummy_inputs())["params"]

  def loss_fn(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    scores = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
    return pf.filter_loss(scores, batch["labels"])

  load_pretrained = qa_model.pretrained_loader(pretrained)

  # Evals, then the loop.
  scorer = retrieval.BatchEncoder(pf.score_fn(model), mesh, int(fcfg.score_batch_size))
  model_info = {"encoder": encoder_config.to_hf_dict(), "pooling": config.model.pooling,
                "dtype": config.model.dtype, "passage_len": max_len,
                "tokenizer_fingerprint": data.manifest["settings"]["tokenizer"]}
  evaluator = Evaluator(workdir, scorer, tokenizer, corpus, sets, model_info, max_len=max_len, buckets=buckets)
  try:
    loop.train_loop(config, workdir=workdir, init_fn=init_fn, loss_fn=loss_fn, data=batches, eval_fn=evaluator,
                    load_pretrained=load_pretrained)

    # The subset: score every passage with the best parameters, keep the top n.
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    params = evaluator.export.restore(
        mesh_lib.with_shardings(abstract, mesh_lib.param_shardings(abstract, mesh, config.mesh.rules)))
    best = evaluator.export.latest_info()
  finally:
    evaluator.export.close()
  start = time.perf_counter()
  scores = _scores_of(workdir, best["step"])
  if scores is None or len(scores) != num_passages:
    scores = pf.score_passages(scorer, params, tokenizer, corpus, np.arange(num_passages), max_len=max_len,
                               buckets=buckets)
  else:
    logging.info("Reusing %s (scores of the filter of step %d).", os.path.join(workdir, "passage_scores.npy"),
                 best["step"])
  kept = pf.select_top(scores, float(fcfg.keep), int(fcfg.keep_bytes), pf.record_bytes(corpus))
  summary = {"kept": len(kept), "num_passages": num_passages, "fraction": len(kept) / num_passages,
             "kept_bytes": int(pf.record_bytes(corpus)[kept].sum()), "keep": float(fcfg.keep),
             "keep_bytes": int(fcfg.keep_bytes), "best_step": best["step"], "hit_val": best["metrics"]["hit_val"],
             "score_s": round(time.perf_counter() - start, 3)}
  if jax.process_index() == 0:
    save_npy(os.path.join(workdir, "passage_scores.npy"), scores)
    pf.save_subset(os.path.join(workdir, "subset.npz"), kept, scores[kept], num_passages)
    atomic_write_json(os.path.join(workdir, "subset.json"), summary)
  logging.info("Kept %d of %d passages (%d bytes of token ids) with the filter of step %d (hit_val %.4f).",
               len(kept), num_passages, summary["kept_bytes"], best["step"], best["metrics"]["hit_val"])
  return kept


def _scores_of(workdir: str, step: int) -> np.ndarray | None:
  """The passage scores an earlier run wrote with the filter of ``step`` (a new ``filter.keep`` reuses them)."""
  try:
    with open(os.path.join(workdir, "subset.json"), encoding="utf-8") as f:
      if json.load(f).get("best_step") != step:
        return None
    return np.load(os.path.join(workdir, "passage_scores.npy"))
  except (FileNotFoundError, ValueError):
    return None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
