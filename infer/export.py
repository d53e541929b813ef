r"""Exports a trained QA system as a deployable bundle (paper §2.3, appendix A.4).

  python -m infer.export --workdir W --out BUNDLE                  # W/best (unified retriever-reader), W/prepared
  python -m infer.export --model W/best --prepared P --out BUNDLE \
      [--subset F/subset.npz] [--embeddings EMB] [--recall_split nq_dev]
  python -m infer.export --retriever R/best --model W/best --prepared P --out BUNDLE   # retriever + separate reader

A unified student keeps its own retrieval settings; a plain reader export takes ``--passage_len``,
``--passage_token_type`` and ``--normalize``. The kept passages are encoded (or taken from ``--embeddings``), indexed
(its recall against exact search reported) and written with the weights (:mod:`rnr_jax.deploy`). Prints the footprint
table (model, index, corpus, other; paper Table 3) and, last, one JSON line.

``--hf_out DIR`` (with or without ``--out``) writes a unified student for the Hugging Face ecosystem:
``config.json`` and ``model.safetensors`` that ``transformers.AutoModel.from_pretrained(DIR)`` loads, the tokenizer,
``heads.safetensors`` (``qa_outputs``: start and end logits of each token's hidden state; ``qa_classifier``: the
passage-ranking logit of the [CLS] state; torch ``Linear`` layout) and ``rnr_jax.json`` (the system spec: pooling,
retrieval width, normalisation and token types of the retrieval vectors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from infer import check_output, run
from infer.common import enable_compilation_cache
from rnr_jax import deploy, exports
from rnr_jax.bundle import WEIGHTS_DTYPES, format_footprint
from rnr_jax.data import PreparedData
from rnr_jax.index import KINDS
from rnr_jax.io import atomic_write_json
from rnr_jax.models.hf import config_from_hf_dict, save_hf_encoder
from rnr_jax.qa_model import HEAD_NAMES
from rnr_jax.qa_system import RULES, InferenceSettings
from rnr_jax.specs import SystemSpec
from rnr_jax.training import mesh as mesh_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("workdir", None, "Run directory: exports <workdir>/best with <workdir>/prepared.")
  flags.DEFINE_string("model", None, "Exported unified retriever-reader (or reader, with --retriever) directory.")
  flags.DEFINE_string("retriever", None, "Exported retriever directory: a two-model system (retriever + reader).")
  flags.DEFINE_string("prepared", None, "Prepared dataset directory (default: <workdir>/prepared).")
  flags.DEFINE_string("subset", None, "Passage filter subset (train.filter's subset.npz): only its passages ship.")
  flags.DEFINE_string("embeddings", None, "Embeddings directory of the whole corpus (infer.encode) to reuse.")
  flags.DEFINE_string("out", None, "Bundle directory to write.")
  flags.DEFINE_string("hf_out", None, "Also (or only) write the unified student as a Hugging Face model directory.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out.")
  flags.DEFINE_enum("index_kind", "int8", list(KINDS), "Index kind (int8 = the paper's INT8 index).")
  flags.DEFINE_enum("weights_dtype", "float16", list(WEIGHTS_DTYPES), "Stored weight values (float16+int8-embeddings: "
                    "the word-embedding table as per-row int8; int8: every matrix as int8, per row or output unit).")
  flags.DEFINE_integer("passage_len", 256, "Unified model without a system spec: passage tokens when encoding.",
                       lower_bound=4)  # [CLS] title [SEP] text [SEP] with a word of text
  flags.DEFINE_integer("passage_token_type", 1, "Unified model without a system spec: passage token type.",
                       lower_bound=0, upper_bound=1)
  flags.DEFINE_bool("normalize", False, "Unified model without a system spec: L2-normalise retrieval vectors.")
  flags.DEFINE_integer("batch_size", 64, "Passages per encoding batch.", lower_bound=1)
  flags.DEFINE_string("recall_split", None, "Prepared split whose questions measure the index recall.")
  flags.DEFINE_integer("recall_questions", 1000, "Questions of --recall_split used for the recall.", lower_bound=1)
  flags.DEFINE_integer("top_k", 20, "Default passages retrieved per question.", lower_bound=1)
  flags.DEFINE_integer("read_passages", 10, "Default passages read per question (m').", lower_bound=1)
  flags.DEFINE_enum("rule", "dpr", list(RULES), "Default answer rule (appendix A.3).")
  flags.DEFINE_float("passage_score_weight", 0.8, "Default λ of the weighted rule.", lower_bound=0, upper_bound=1)
  flags.DEFINE_float("lexical_weight", 0.0, "Default BM25 fusion weight of retrieval (0 = dense only; BM25 is built "
                     "from the shipped passages at load, no bundle bytes; choose it with bench.hybrid_sweep).",
                     lower_bound=0)
  flags.DEFINE_bool("onnx", True, "Write the ONNX graph a unified BERT student is served with without JAX "
                    "(rnr_jax.runtime), extra/student.onnx: kilobytes, the weights are the bundle's own.")


def write_hf(out_dir: str, spec: SystemSpec, params: Any, tokenizer_dir: str | None) -> None:
  """The ``--hf_out`` directory (see the module docstring)."""
  if not spec.unified:
    raise app.UsageError("--hf_out writes a unified retriever-reader; this is a retriever with a separate reader")
  params = jax.device_get(params)
  save_hf_encoder(config_from_hf_dict(spec.reader.encoder), params["encoder"], out_dir, tokenizer_dir)
  heads = {f"{name}.{torch_name}": np.ascontiguousarray(np.asarray(params[name][ours], np.float32).T)
           for name in HEAD_NAMES for torch_name, ours in (("weight", "kernel"), ("bias", "bias"))}
  save_file(heads, os.path.join(out_dir, "heads.safetensors"), metadata={"format": "pt"})
  atomic_write_json(os.path.join(out_dir, "rnr_jax.json"), {"system": spec.to_json(), "heads": {
      "qa_outputs": "logits = hidden_states @ weight.T + bias; [..., 0] start, [..., 1] end",
      "qa_classifier": "rank logit = hidden_states[:, 0] @ weight.T + bias"}})


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model_dir = FLAGS.model or (os.path.join(FLAGS.workdir, "best") if FLAGS.workdir else None)
  prepared = FLAGS.prepared or (os.path.join(FLAGS.workdir, "prepared") if FLAGS.workdir else None)
  if not model_dir or not (prepared or not FLAGS.out) or not (FLAGS.out or FLAGS.hf_out):
    raise app.UsageError("pass --out and/or --hf_out, and --workdir, or --model and --prepared")
  for flag, path in (("model", model_dir), ("prepared", prepared), ("retriever", FLAGS.retriever),
                     ("subset", FLAGS.subset), ("embeddings", FLAGS.embeddings)):
    if path and not os.path.exists(path):
      raise app.UsageError(f"--{flag}={path}: no such file or directory")
  if FLAGS.out and os.path.lexists(FLAGS.out) and not FLAGS.overwrite:
    raise app.UsageError(f"--out={FLAGS.out}: exists (pass --overwrite to replace the bundle)")
  check_output(FLAGS.out, "out", directory=True)
  check_output(FLAGS.hf_out, "hf_out", directory=True)
  enable_compilation_cache()
  mesh = mesh_lib.data_mesh()
  spec, params = exports.load_system(model_dir, FLAGS.retriever, mesh, passage_len=FLAGS.passage_len,
                                     passage_token_type=FLAGS.passage_token_type, normalize=FLAGS.normalize)
  if FLAGS.hf_out:
    tokenizer_dir = PreparedData.load(prepared).tokenizer_path if prepared and os.path.isdir(prepared) else None
    write_hf(FLAGS.hf_out, spec, params, tokenizer_dir)
    print(f"wrote {FLAGS.hf_out}: transformers encoder, heads and system spec")
    if not FLAGS.out:
      return
  settings = InferenceSettings(top_k=FLAGS.top_k, read_passages=FLAGS.read_passages, rule=FLAGS.rule,
                               passage_score_weight=FLAGS.passage_score_weight, lexical_weight=FLAGS.lexical_weight)
  summary = deploy.export(out=FLAGS.out, prepared=prepared, spec=spec, params=params, mesh=mesh,
                          settings=settings, subset=FLAGS.subset, embeddings_dir=FLAGS.embeddings,
                          index_kind=FLAGS.index_kind, weights_dtype=FLAGS.weights_dtype, batch_size=FLAGS.batch_size,
                          recall_split=FLAGS.recall_split, recall_questions=FLAGS.recall_questions,
                          overwrite=FLAGS.overwrite, onnx=FLAGS.onnx)
  report = summary["index"]
  print(f"index: {report['kind']}, {report['n']} x {report['dim']}, recall@10 {report['recall@10']:.4f}, "
        f"recall@20 {report['recall@20']:.4f} vs exact ({report['eval_source']})")
  print(format_footprint(summary["footprint"]))
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  run(main, "infer.export")
