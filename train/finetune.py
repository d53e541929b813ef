r"""Iterative finetuning of the unified retriever-reader (paper §2.2.4, Algorithm 1; appendix A.2).

  python -m train.finetune --config configs/finetune.py --workdir W --config.finetune.init=DISTILL/best \
      [--config.pool.retriever=RETRIEVER/best] [--config.finetune.mode=joint]

Starts from the distillation stage's exported student (``finetune.init``; its model, input lengths and retrieval
settings). Each step takes ``train.batch_size`` training questions with ``finetune.m`` passages of their candidate
pool J_read (as in ``train.distill``, drawn afresh every epoch), the positive first, and

* ``finetune.mode="iterative"``: runs Algorithm 1 (:func:`rnr_jax.distill.make_iterative_step`): a reader update on
  the DPR reader loss (span marginal NLL + ranking CE), then an update of the result on ``L_recon + L_nll`` of the
  retrieval scores; one AdamW state advancing twice per step, or two (``finetune.optimizer_states``);
* ``finetune.mode="joint"``: one update on reader loss + retrieval NLL (:func:`rnr_jax.distill.make_joint_loss`).

Evaluation (fresh index of the student's own retrieval), exports (``W/best/``, ``W/top/step_<step>/``), the optional
pool refresh (``pool.refresh_every``), checkpoints and resuming are as in ``train.distill``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from rnr_jax import distill, passage_filter, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.qa_system import SystemSpec
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from rnr_jax.training.optim import make_optimizer
from train.distill import check_divisible

FLAGS = flags.FLAGS
PyTree = Any
MODES = ("iterative", "joint")


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  config_flags.DEFINE_config_file("config", "configs/finetune.py", "Finetuning config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, exports.")
  flags.mark_flag_as_required("workdir")


def with_dropout(system: SystemSpec, dropout: float) -> SystemSpec:
  """``system`` with the encoder's hidden and attention dropout set to ``dropout``."""
  encoder = {**system.reader.encoder, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
  r = system.retriever
  return SystemSpec.unified_model(dataclasses.replace(system.reader, encoder=encoder), passage_len=r.passage_len,
                                  passage_token_type=r.passage_token_type, normalize=r.normalize)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Finetunes the student ``config.finetune.init`` in ``workdir`` (resuming if it can)."""
  fcfg, pcfg = config.finetune, config.pool
  if not fcfg.init:
    raise ValueError("finetune.init (the distillation stage's exported student) is required")
  if fcfg.mode not in MODES:
    raise ValueError(f"finetune.mode must be one of {MODES}, got {fcfg.mode!r}")
  workdir = loop.start_run(config, workdir)

  # Mesh: the training loop builds the same one from config.mesh; encoding and evaluation run on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  m = int(fcfg.m)
  check_divisible(config, retrieval.data_parallelism(mesh), m)

  # Input: prepared data, the exported student (host arrays), the candidate pool, batches with span targets.
  data = rd.load_prepared(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  system, scale, initial, _ = distill.load_unified(fcfg.init)
  if system.reader.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
    raise ValueError(f"{fcfg.init} was trained with another tokenizer than {data.path}'s")
  system = with_dropout(system, float(config.model.dropout))
  initial = jax.device_get(initial)
  pool = distill.load_pool(pcfg, data, tokenizer, workdir, mesh)
  batches = distill.UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=m,
                                   batch_size=int(config.train.batch_size), seed=int(config.train.seed),
                                   max_spans=int(fcfg.max_spans))

  # Model: parameter init (the export's values replace the random ones) and the step of the mode.
  model = system.reader.build()
  normalize, num_steps = system.retriever.normalize, int(config.train.num_steps)

  def init_fn(rng: jax.Array) -> PyTree:
    return model.init(rng, retrieval.dummy_inputs())["params"]

  grad_accum = int(config.optim.grad_accum)
  if fcfg.mode == "iterative":
    optimizer, schedule = distill.iterative_optimizer(config.optim, num_steps, fcfg.optimizer_states)
    step_fn = distill.make_iterative_step(model, optimizer, normalize=normalize, scale=scale,
                                          temperature=float(fcfg.temperature),
                                          optimizer_states=fcfg.optimizer_states, grad_accum=grad_accum,
                                          schedule=schedule)

    def new_state(params: PyTree) -> step_lib.TrainState:
      return distill.init_iterative_state(params, optimizer, fcfg.optimizer_states)
  else:
    optimizer, schedule = make_optimizer(config.optim, num_steps)
    step_fn = step_lib.make_train_step(distill.make_joint_loss(model, normalize=normalize, scale=scale), optimizer,
                                       grad_accum=grad_accum, schedule=schedule)

    def new_state(params: PyTree) -> step_lib.TrainState:
      return step_lib.TrainState.create(params, optimizer)

  # Evals (a fresh index of the corpus, shared with the pool refresh), then the loop.
  index = distill.FreshIndex(*system.embed_fns(), system.retriever, tokenizer, data.token_corpus(), mesh,
                             int(pcfg.encode_batch_size), passage_filter.subset_ids(pcfg.subset, data.num_passages),
                             cache_dir=os.path.join(workdir, "index"))
  evaluator = distill.OpenEvaluator(config.eval, workdir, system, scale, data, tokenizer, index, mesh)
  try:
    return distill.train_loop(config, workdir=workdir, init_fn=init_fn, new_state=new_state, step_fn=step_fn,
                              data=batches, eval_fn=evaluator, refresh=distill.PoolRefresher(pool, batches, index),
                              refresh_every=int(pcfg.refresh_every), load_pretrained=lambda _: initial)
  finally:
    evaluator.close()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
