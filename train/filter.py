r"""Trains the passage filter and writes the passage subset it keeps (paper §2.1, appendix A.1).

  python -m train.filter --config configs/filter.py --workdir W [--config.filter.keep_bytes=500000000]

``J+train`` is every passage retrieved in the top ``filter.top_k`` for a question of ``filter.positive_splits``;
``J-train`` the rest. Each step takes half positives, oversampled by their smoothed retrieval frequency, half uniform
negatives, and minimises the binary cross-entropy of ``s_j = v_j . w``. The best parameters by ``hit_val`` are exported
to ``W/best/``; they then score every passage (``W/passage_scores.npy``) and the top-n go to ``W/subset.npz``
(:func:`rnr_jax.passage_filter.load_subset`), n a count, a fraction or a byte budget.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rnr_jax import exports, qa_model, retrieval
from rnr_jax import passage_filter as pf
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data.token_corpus import save_npy
from rnr_jax.evaluation import FilterEvaluator
from rnr_jax.io import atomic_write_json
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from train import define_stage_flags, run_stage, sources

PyTree = Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
  """Trains the filter of ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the kept pids."""
  fcfg = config.filter
  workdir = loop.start_run(config, workdir)

  # Mesh: the training loop builds the same one from config.mesh; scoring runs on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  parallel = mesh_lib.data_parallelism(mesh)
  pairs = config.train.batch_size // 2
  if config.train.batch_size % 2 or pairs % parallel or fcfg.score_batch_size % parallel:
    raise ValueError(f"train.batch_size {config.train.batch_size} must be even, and half of it and "
                     f"filter.score_batch_size {fcfg.score_batch_size} divisible by the {parallel} "
                     "data-parallel devices")

  # Input: prepared data, J+train with retrieval frequencies, validation sets, resumable pair batches.
  data = sources.prepared_data(config, workdir)
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

  # Model and step: binary cross-entropy of the passage scores.
  encoder_config, pretrained, _ = exports.initial_encoder(config.model)
  loop.check_vocabulary(encoder_config.vocab_size, tokenizer, data)
  model = pf.PassageFilter(encoder_config, pooling=config.model.pooling, dtype=jnp.dtype(config.model.dtype))

  def init_fn(rng: jax.Array) -> PyTree:
    return model.init(rng, qa_model.dummy_inputs())["params"]

  def loss_fn(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    scores = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
    return pf.filter_loss(scores, batch["labels"])

  step = step_lib.adamw_step(config, loss_fn)

  # Evals: hit_val of J+val against J-val; the best filter goes to W/best.
  scorer = retrieval.BatchEncoder(pf.score_fn(model), mesh, int(fcfg.score_batch_size))
  evaluator = FilterEvaluator(scorer, tokenizer, data, sets, max_len=max_len, buckets=buckets)
  model_info = {"encoder": encoder_config.to_hf_dict(), "pooling": config.model.pooling,
                "dtype": config.model.dtype, "passage_len": max_len,
                "tokenizer_fingerprint": data.manifest["settings"]["tokenizer"]}
  best_export = exports.BestExport(workdir, {"filter": model_info}, "hit_val")

  # The loop, then the subset: every passage scored with the best parameters, the top n kept.
  try:
    loop.train_loop(config, workdir=workdir, init_fn=init_fn, step=step, data=batches, evaluator=evaluator,
                    best=best_export, load_pretrained=None if pretrained is None else
                    lambda params: qa_model.with_pretrained(params, encoder=pretrained))
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    params, best = best_export.latest(
        mesh_lib.with_shardings(abstract, mesh_lib.param_shardings(abstract, mesh, config.mesh.rules)))
  finally:
    best_export.close()
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


if __name__ == "__main__":
  define_stage_flags("configs/filter.py", "Passage filter")
  run_stage(train_and_evaluate)
