r"""Trains the retriever: a DPR bi-encoder, or the paper's single shared encoder (§2.2.2).

  python -m train.retriever --config configs/retriever.py --workdir W [--config.retriever.shared=False ...]

Each step takes ``train.batch_size`` questions, each with its positive and ``retriever.hard_negatives`` BM25 hard
negatives, and minimises the NLL of the positive among all passages of the global batch. Every ``train.eval_every``
steps the corpus is encoded and each dev split's top-k answer accuracy measured; the best parameters
(``retriever.select_metric``) are exported to ``W/best/`` (and, with ``retriever.save_embeddings``, their corpus
encoding to ``W/embeddings``, the ``infer.encode`` layout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rnr_jax import embeddings, exports, qa_model
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData, sample_retriever_passages
from rnr_jax.evaluation import RetrievalEvaluator
from rnr_jax.specs import RetrieverSpec
from rnr_jax.training import loop, losses
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from train import define_stage_flags, run_stage, sources

PyTree = Any


class RetrieverBatches(loop.EpochIterator):
  """Resumable batches in the DPR layout: ``q_*`` one row per question, ``p_*`` its positive then hard negatives.

  Hard negatives are drawn from ``(seed, epoch, batch, process)``, so a resumed run sees the same batches; a hard
  negative is never one of the (process-local) batch's positives unless a question has no other.
  """

  def __init__(self, data: PreparedData, tokenizer: tk.Tokenizer, spec: RetrieverSpec, *, splits: Sequence[str],
               hard_negatives: int, batch_size: int, max_questions: int, seed: int):
    self._tokenizer = tokenizer
    self._spec = spec
    self._hard_negatives = hard_negatives
    self._corpus = data.token_corpus()
    self._questions: list[str] = []
    self._positives: list[np.ndarray] = []
    self._negatives: list[np.ndarray] = []
    for split in splits:
      cands = data.candidates(split)
      usable = cands.positives.lengths() > 0
      if hard_negatives:
        usable &= cands.hard_negatives.lengths() > 0
      rows = np.flatnonzero(usable)[:max_questions or None]
      texts = data.questions(split)
      self._questions += [texts[q].question for q in rows]
      self._positives += [np.asarray(cands.positives[q]) for q in rows]
      self._negatives += [np.asarray(cands.hard_negatives[q]) for q in rows]
      logging.info("Training split %s: %d of %d questions have a positive%s.", split, len(rows), len(cands),
                   " and a hard negative" if hard_negatives else "")
    if len(self._questions) < batch_size:
      raise ValueError(f"{len(self._questions)} training questions in {list(splits)}, fewer than one batch "
                       f"of {batch_size}")
    super().__init__(self._batch, len(self._questions), batch_size, seed=seed)

  def _batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    position = self.state()
    rng = np.random.default_rng([self._seed, position["epoch"], position["index"], jax.process_index()])
    taken = np.array([self._positives[i][0] for i in idx])
    pids = []
    for i in idx:
      pool = self._negatives[i]
      free = pool[~np.isin(pool, taken)]
      pos, negs = sample_retriever_passages(self._positives[i], free if len(free) else pool,
                                            self._hard_negatives, rng)
      pids += [pos, *negs.tolist()]
    spec = self._spec
    q = self._tokenizer.questions([self._questions[i] for i in idx], spec.question_len, spec.buckets)
    p = self._tokenizer.passages_from_records([self._corpus[pid] for pid in pids], spec.passage_len, spec.buckets,
                                              spec.passage_token_type)
    return {**{f"q_{k}": v for k, v in q.as_dict().items()}, **{f"p_{k}": v for k, v in p.as_dict().items()}}


def make_loss_fn(spec: RetrieverSpec, scale: float) -> step_lib.LossFn:
  """In-batch-negative NLL of each question's positive, with dropout; with ``spec.normalize`` the scores are ``scale`` x
  cosine (their range [-1, 1] alone is too narrow for a softmax over the batch)."""
  model = spec.build()

  def loss_fn(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    inputs = lambda prefix: {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
    q, p = model.apply({"params": params}, inputs("q_"), inputs("p_"), deterministic=False, rngs={"dropout": rng})
    q, p = spec.finish(q), spec.finish(p)
    q = q * scale if spec.normalize else q
    nll, accuracy = losses.in_batch_nll(jnp.einsum("qd,pd->qp", q, p, preferred_element_type=jnp.float32))
    return nll, {"in_batch_accuracy": accuracy}

  return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Trains and evaluates the retriever of ``config`` in ``workdir`` (resuming if it holds checkpoints)."""
  rcfg = config.retriever
  workdir = loop.start_run(config, workdir)

  # Mesh: the loop builds the same one from config.mesh; evaluation encodes on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.train.batch_size % mesh_lib.data_parallelism(mesh):
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                     f"{mesh_lib.data_parallelism(mesh)} data-parallel devices")

  # Input: prepared data, the model's input layout, resumable batches.
  data = sources.prepared_data(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  encoder_config, pretrained, _ = exports.initial_encoder(config.model)
  loop.check_vocabulary(encoder_config.vocab_size, tokenizer, data)
  spec = RetrieverSpec.from_config(config, encoder_config, data.manifest["settings"]["tokenizer"])
  batches = RetrieverBatches(data, tokenizer, spec, splits=tuple(rcfg.train_splits),
                             hard_negatives=int(rcfg.hard_negatives), batch_size=int(config.train.batch_size),
                             max_questions=int(rcfg.max_train_questions), seed=int(config.train.seed))

  # Model and step.
  model = spec.build()
  step = step_lib.adamw_step(config, make_loss_fn(spec, float(rcfg.scale)))

  # Evals: the best parameters go to W/best, their corpus encoding to W/embeddings.
  evaluator = RetrievalEvaluator(rcfg, spec, data, tokenizer, mesh)

  def keep_embeddings(step_num: int, item: dict[str, Any]) -> None:
    if rcfg.save_embeddings and evaluator.passage_ids is None and jax.process_index() == 0:
      embeddings.save(os.path.join(workdir, "embeddings"), evaluator.last.vectors, {
          **embeddings.key_of(spec, item["fingerprint"], data.token_corpus().meta["sha256"]), "dim": spec.dim,
          "spec": spec.to_json(), "prepared": data.path, "devices": jax.device_count(),
          "passages_per_s": round(evaluator.last.passages_per_s, 2), "step": step_num})

  best = exports.BestExport(workdir, {"retriever": spec.to_json()}, rcfg.select_metric, fingerprint=True,
                            on_best=keep_embeddings)

  # The loop.
  try:
    return loop.train_loop(config, workdir=workdir, init_fn=lambda rng: qa_model.init_params(model, rng), step=step,
                           data=batches, evaluator=evaluator, best=best,
                           init_checkpoint=rcfg.init_checkpoint or None,
                           load_pretrained=None if pretrained is None else
                           lambda params: qa_model.with_pretrained(params, encoder=pretrained))
  finally:
    best.close()


if __name__ == "__main__":
  define_stage_flags("configs/retriever.py", "Retriever training")
  run_stage(train_and_evaluate)
