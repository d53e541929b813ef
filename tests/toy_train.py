"""A tiny training run through the real ``train_loop``, as a stage entry point would do it.

  python tests/toy_train.py --workdir /tmp/run [--steps 12] [--fetch_delay 0.1]

Writes the final parameters to ``<workdir>/final_params.npz``. The resume test
kills it midway with SIGKILL and runs the same command again.
"""

import argparse
import io
import os
import sys
import time

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

# Importable without installing: this directory holds toy_model, its parent rnr_jax.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy_model  # noqa: E402

from rnr_jax.io import atomic_write_bytes  # noqa: E402
from rnr_jax.training import loop, mesh, step  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--fetch_delay", type=float, default=0.0,
                      help="seconds of sleep per batch, to slow the run down for the kill test")
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)

  config = toy_model.toy_config(num_steps=args.steps)
  mesh.maybe_initialize_distributed(config.mesh)
  arrays = toy_model.regression_data(100)  # 6 batches per epoch: the run crosses epochs

  def fetch(idx: np.ndarray) -> dict[str, np.ndarray]:
    time.sleep(args.fetch_delay)
    return {k: v[idx] for k, v in arrays.items()}

  data = loop.EpochIterator(fetch, len(arrays["tokens"]), config.train.batch_size,
                            seed=config.train.seed)
  init_fn, loss_fn = toy_model.regressor_fns()
  state = loop.train_loop(config, workdir=args.workdir, init_fn=init_fn, step=step.adamw_step(config, loss_fn),
                          data=data)
  params = {mesh.path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  buf = io.BytesIO()
  np.savez(buf, **params)
  atomic_write_bytes(os.path.join(args.workdir, "final_params.npz"), buf.getvalue())


if __name__ == "__main__":
  main()
