r"""Iterative finetuning of the unified retriever-reader (paper §2.2.4, Algorithm 1; appendix A.2).

  python -m train.finetune --config configs/finetune.py --workdir W --config.finetune.init=DISTILL/best

Starts from the distillation stage's exported student (its model, input lengths and retrieval settings). Each step takes
``train.batch_size`` training questions with ``finetune.m`` passages of their candidate pool J_read (drawn afresh every
epoch), the positive first, and runs Algorithm 1 (:mod:`rnr_jax.iterative`): a reader update on DPR's reader loss, then
an update of the result on ``L_recon + L_nll`` of the retrieval scores. Evaluation and exports are those of
``train.distill``.
"""

from __future__ import annotations

import jax
import ml_collections

from rnr_jax import exports, iterative, qa_model
from rnr_jax import tokenization as tk
from rnr_jax.pool import UnifiedBatches, load_pool
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from train import define_stage_flags, run_stage, sources
from train.distill import check_divisible, fresh_evaluation


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Finetunes the student ``config.finetune.init`` in ``workdir`` (resuming if it can)."""
  fcfg, pcfg = config.finetune, config.pool
  if not fcfg.init:
    raise ValueError("finetune.init (the distillation stage's exported student) is required")
  workdir = loop.start_run(config, workdir)

  # Mesh: the loop builds the same one from config.mesh; encoding and evaluation run on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  m = int(fcfg.m)
  check_divisible(config, mesh_lib.data_parallelism(mesh), m)

  # Input: prepared data, the exported student (host arrays), the candidate pool, batches with span targets.
  data = sources.prepared_data(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  system, scale, initial = exports.load_unified(fcfg.init)
  if system.reader.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
    raise ValueError(f"{fcfg.init} was trained with another tokenizer than {data.path}'s")
  system = system.with_dropout(float(config.model.dropout))
  initial = jax.device_get(initial)
  pool = load_pool(pcfg, data, tokenizer, workdir, mesh)
  batches = UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=m,
                           batch_size=int(config.train.batch_size), seed=int(config.train.seed),
                           max_spans=int(fcfg.max_spans))

  # Model and step: Algorithm 1; the export's values replace the random initialisation.
  model = system.reader.build()
  step = iterative.iterative_step(config, model, normalize=system.retriever.normalize, scale=scale)

  # Evals.
  evaluator, best = fresh_evaluation(config, workdir, system, scale, data, tokenizer, mesh)

  # The loop.
  try:
    return loop.train_loop(config, workdir=workdir, init_fn=lambda rng: qa_model.init_params(model, rng), step=step,
                           data=batches, evaluator=evaluator, best=best, load_pretrained=lambda _: initial)
  finally:
    best.close()


if __name__ == "__main__":
  define_stage_flags("configs/finetune.py", "Finetuning")
  run_stage(train_and_evaluate)
