"""Iterative finetuning of the unified retriever-reader (paper §2.2.4, Algorithm 1; appendix A.2).

  python -m train.finetune --config configs/finetune.py --workdir W --config.finetune.init=DISTILL/best \
      --config.pool.retriever=RETRIEVER/best
  python -m train.finetune --config configs/finetune.py:tiny --workdir W --config.finetune.init=...   # seconds

Appendix A.2: at most six epochs, the other settings as in distillation (lr 1e-5, clipping at 2.0, no warmup,
batch 16, m = 24, τ = 3). The model, its input lengths and retrieval settings are the exported student's
(``model.*`` and ``tokens.*`` are unused but ``model.dropout``).
"""

import ml_collections

from configs import common, distill


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: none for the paper's setting, "tiny" for a seconds-long run."""
  c = common.base_config()
  c.pool = distill.pool_config()
  f = c.finetune = ml_collections.ConfigDict()
  f.init = ""  # exported student of train.distill (its W/best or W/top/step_<n>), required
  f.m = 24  # passages per question: one positive first, then m - 1 answer-free ones
  f.temperature = 3.0  # τ of L_recon
  f.max_spans = 10  # answer occurrences in the positive used as span targets
  c.eval = distill.eval_config()

  common.schedule(c, lr=1e-5, warmup_steps=0, batch_size=16, num_steps=20000, every=2000)

  if common.is_tiny(arg):
    distill.make_tiny_unified(c)
    c.finetune.m = 4
  return c
