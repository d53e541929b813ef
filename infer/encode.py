r"""Encodes the whole prepared corpus with a retriever (or a unified retriever-reader), for the index stage.

  python -m infer.encode --workdir W --out EMB                   # W's exported best retriever, W/prepared
  python -m infer.encode --model_dir W/best --prepared P --out EMB
  python -m infer.encode --model_dir DISTILL/best --prepared P --out EMB   # a unified student (its retrieval
                                                                 # settings); infer.export --embeddings EMB reuses it
  python -m infer.encode --config configs/retriever.py --config.model.pooling=mean \
      --config.model.retrieval_dim=0 --config.retriever.normalize=True --config.retriever.passage_token_type=0 \
      --prepared P --out EMB --eval_splits nq_dev,squadshifts_dev
                                                                 # the config's initial (untrained) encoder

Writes ``EMB/embeddings.npy`` and ``EMB/embeddings.json`` (:mod:`rnr_jax.embeddings`), chunk by chunk, so a killed run
started again skips the finished chunks; a finished output of the same model and corpus is kept. With ``--eval_splits``,
those splits' top-k answer accuracy over the whole corpus is printed and written to ``EMB/eval.json``
(``--lexical_weight W``: also dense + W x BM25, ``EMB/eval_lexical.json``).

Several hosts share the work by contiguous shards, each with its own devices, then one joins them:

  python -m infer.encode --model_dir M --prepared P --out EMB --shard 0/2      # on host 0 (1/2 on host 1)
  python -m infer.encode --out EMB --merge                                      # the file an unsharded run writes
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from infer import check_output, run
from infer.common import enable_compilation_cache
from rnr_jax import embeddings, exports, qa_model
from rnr_jax.data import PreparedData
from rnr_jax.models import Params
from rnr_jax.specs import RetrieverSpec, SystemSpec
from rnr_jax.training import mesh as mesh_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("workdir", None, "Retriever run directory: encodes with <workdir>/best, reads "
                      "<workdir>/prepared.")
  flags.DEFINE_string("model_dir", None, "Exported retriever directory, or a unified retriever-reader's exported "
                      "with its system spec (train.distill, train.finetune, the pipeline's merge); default: "
                      "<workdir>/best.")
  config_flags.DEFINE_config_file("config", None, "Instead of an exported retriever: a retriever config whose "
                                  "initial encoder (model.init, e.g. the untrained MiniLM) is used.")
  flags.DEFINE_string("prepared", None, "Prepared dataset directory (default: <workdir>/prepared).")
  flags.DEFINE_string("out", None, "Output directory of the embeddings.")
  flags.DEFINE_integer("batch_size", 64, "Passages per encoding batch (a multiple of the device count).",
                       lower_bound=1)
  flags.DEFINE_integer("chunk_size", 4096, "Passages per saved chunk (the unit of resumption).", lower_bound=1)
  flags.DEFINE_string("shard", "0/1", "i/n: encode only the i-th of n contiguous parts of the corpus, into "
                      "<out>/shards/i-of-n (one host each; --merge joins them).")
  flags.DEFINE_bool("merge", False, "Join the finished shards under --out into <out>/embeddings.npy and stop.")
  flags.DEFINE_list("eval_splits", [], "Prepared splits whose top-k answer accuracy to report.")
  flags.DEFINE_integer("max_eval_questions", 0, "First N questions of each eval split; 0 = all.", lower_bound=0)
  flags.DEFINE_float("lexical_weight", 0.0, "With --eval_splits and > 0: also the accuracy of dense + weight x "
                     "BM25 (the prepared data's index, rnr_jax.lexical.fuse over both top 100s), in "
                     "<out>/eval_lexical.json.", lower_bound=0)
  flags.mark_flag_as_required("out")


def resolve_model(workdir: str | None, model_dir: str | None, config: Any, tokenizer_fingerprint: str,
                  mesh: jax.sharding.Mesh) -> tuple[RetrieverSpec | SystemSpec, Params, str]:
  """``(spec, params replicated on mesh, fingerprint)`` of an exported retriever, an exported unified
  retriever-reader (a :class:`SystemSpec`) or a config's initial retriever."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if config is not None:
    if workdir or model_dir:
      raise app.UsageError("pass either --config or --workdir/--model_dir, not both")
    encoder_config, pretrained, _ = exports.initial_encoder(config.model)
    spec = RetrieverSpec.from_config(config, encoder_config, tokenizer_fingerprint)
    params = qa_model.with_pretrained(qa_model.init_params(spec.build(), jax.random.key(config.seed)), pretrained)
    return spec, jax.device_put(params, replicated), exports.params_fingerprint(params)
  model_dir = model_dir or (os.path.join(workdir, "best") if workdir else None)
  if not model_dir:
    raise app.UsageError("pass --workdir, --model_dir or --config")
  info = exports.read_info(model_dir) if os.path.isdir(model_dir) else None
  if info is not None and "retriever" not in info:
    spec, params = exports.load_system(model_dir, None, mesh, require_system=True)
    fingerprint = exports.params_fingerprint(params)
    logging.info("Unified retriever-reader of %s.", model_dir)
  else:
    spec, params, model = exports.load_retriever(model_dir, mesh)
    fingerprint = model["fingerprint"]
    logging.info("Retriever of %s, step %d (%s).", model_dir, model["step"], model.get("metrics"))
  if embeddings.retrieval_spec(spec).tokenizer_fingerprint != tokenizer_fingerprint:
    raise ValueError(f"{model_dir} was trained with another tokenizer than the prepared data's; "
                     "its embeddings of these token ids would be meaningless")
  return spec, params, fingerprint


def parse_shard(text: str) -> tuple[int, int]:
  """``"i/n"`` as ``(i, n)``, with ``0 <= i < n``."""
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise app.UsageError(f"--shard must be i/n, e.g. 0/2, got {text!r}") from None
  if not 0 <= i < n:
    raise app.UsageError(f"--shard {text}: need 0 <= i < n")
  return i, n


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.merge:
    print(json.dumps({k: v for k, v in embeddings.merge_shards(FLAGS.out).items() if k != "spec"}))
    return
  shard = parse_shard(FLAGS.shard)
  if shard[1] > 1 and FLAGS.eval_splits:
    raise app.UsageError("--eval_splits needs the whole corpus: pass it to an unsharded run")
  enable_compilation_cache()
  prepared = FLAGS.prepared or (os.path.join(FLAGS.workdir, "prepared") if FLAGS.workdir else None)
  if not prepared:
    raise app.UsageError("pass --prepared (or --workdir with a <workdir>/prepared)")
  check_output(FLAGS.out, "out", directory=True)
  mesh = mesh_lib.data_mesh()
  if FLAGS.batch_size % len(mesh.devices.flat):
    raise app.UsageError(f"--batch_size={FLAGS.batch_size}: not a multiple of the {len(mesh.devices.flat)} devices")
  manifest = PreparedData.load(prepared).manifest
  unknown = [s for s in FLAGS.eval_splits if s not in manifest["splits"]]
  if unknown:
    raise app.UsageError(f"--eval_splits: no split {unknown[0]!r} in {prepared} "
                         f"(it has {', '.join(manifest['splits'])})")
  tokenizer_fingerprint = manifest["settings"]["tokenizer"]
  spec, params, fingerprint = resolve_model(FLAGS.workdir, FLAGS.model_dir, FLAGS.config, tokenizer_fingerprint, mesh)
  info = embeddings.encode_prepared(out=FLAGS.out, prepared=prepared, spec=spec, params=params,
                                    fingerprint=fingerprint, mesh=mesh, batch_size=FLAGS.batch_size,
                                    chunk_size=FLAGS.chunk_size,
                                    eval_splits=FLAGS.eval_splits, max_eval_questions=FLAGS.max_eval_questions,
                                    lexical_weight=FLAGS.lexical_weight, shard=shard)
  summary = ("dim", "pooling", "passages_per_s", "wall_s", "eval", "eval_lexical", "eval_s")
  print(json.dumps({k: info[k] for k in summary if k in info}))


if __name__ == "__main__":
  define_flags()
  run(main, "infer.encode")
