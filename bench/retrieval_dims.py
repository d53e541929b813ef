r"""How much retrieval accuracy a retriever's vectors lose when cut to fewer dimensions.

  python -m bench.retrieval_dims --embeddings EMB --config configs/retriever.py \
      --override model.pooling=mean --override model.retrieval_dim=0 --override retriever.normalize=True \
      --override retriever.passage_token_type=0 [--dims 384,256,128] [--record]
  python -m bench.retrieval_dims --embeddings W/teacher_retriever/embeddings --model_dir W/teacher_retriever/best \
      [--subset W/filter/subset.npz] [--title "..."] [--record]

``EMB`` is an ``infer.encode`` output at full width of the config's initial (untrained) encoder, or of the exported
retriever ``--model_dir`` (e.g. a pipeline's teacher); its ``embeddings.json`` must carry the same model
fingerprint. The dev questions are encoded with that encoder, and top-k answer accuracy over the whole corpus (or
the passages of a filter's ``--subset``) is computed for the first ``d`` dims of every vector (cosine, as the
paper's truncated [CLS] vector), for the ``d`` dims of highest variance over the passage vectors (what a
function-preserving permutation of the hidden units could move to the front), and for the projection on the top
``d`` principal components of the passage vectors (what a learned ``hidden -> d`` projection could reach at best
linearly, centred on the passages' mean).
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import report
from infer import encode as encode_cli
from rnr_jax import embeddings, passage_filter, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData
from rnr_jax.training import mesh as mesh_lib


def _normalized(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--embeddings", required=True,
                      help="infer.encode output (full width) of --config's initial encoder or of --model_dir")
  parser.add_argument("--config", default=None, help="config of an initial encoder (or pass --model_dir)")
  parser.add_argument("--model_dir", default=None, help="an exported retriever (e.g. W/teacher_retriever/best)")
  parser.add_argument("--subset", default=None, help="a passage filter's subset.npz: search only its passages")
  parser.add_argument("--title", default="Retrieval accuracy by vector width (untrained encoder)")
  parser.add_argument("--override", action="append", default=[], help="config override, e.g. model.pooling=mean")
  parser.add_argument("--dims", default="384,256,128")
  parser.add_argument("--splits", default="nq_dev,squadshifts_dev")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()

  passages, info = embeddings.load(args.embeddings, mmap=False)
  data = PreparedData.load(info["prepared"])
  mesh = mesh_lib.data_mesh()
  if (args.config is None) == (args.model_dir is None):
    raise SystemExit("bench.retrieval_dims: pass exactly one of --config and --model_dir")
  config = load_config(args.config, args.override) if args.config else None
  spec, params, fingerprint = encode_cli.resolve_model(None, args.model_dir, config,
                                                      data.manifest["settings"]["tokenizer"], mesh)
  if fingerprint != info["model_fingerprint"]:
    raise SystemExit(f"bench.retrieval_dims: {args.embeddings} holds another model's vectors than "
                     f"{'--config' if args.config else '--model_dir'}'s")
  pids = None
  if args.subset:
    pids = passage_filter.subset_ids(args.subset, data.num_passages)
    passages = passages[pids]
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  q_encoder = retrieval.BatchEncoder(spec.embed_fns()[0], mesh, 64)
  by_variance = np.argsort(-passages.var(axis=0), kind="stable")
  mean = passages.mean(axis=0)
  components = np.linalg.svd(passages - mean, full_matrices=False)[2]  # [hidden, hidden], by decreasing variance
  ks = (1, 5, 20)
  dims = [int(x) for x in args.dims.split(",")]
  variants = [(f"first {d}", np.arange(d)) for d in dims]
  variants += [(f"{d} of highest variance", by_variance[:d]) for d in dims if d < passages.shape[1]]
  variants += [(f"top {d} principal components", components[:d].T) for d in dims if d < passages.shape[1]]
  splits = args.splits.split(",")
  results: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _ in variants}
  for split in splits:
    questions = data.questions(split)
    q = retrieval.encode_questions(q_encoder, params, tokenizer, [x.question for x in questions],
                                   max_len=spec.question_len, buckets=spec.buckets)
    for name, kept in variants:
      if kept.ndim == 2:  # a projection
        qv, pv = (q - mean) @ kept, (passages - mean) @ kept
      else:
        qv, pv = q[:, kept], passages[:, kept]
      results[name][split] = retrieval.evaluate_retrieval(_normalized(qv), _normalized(pv),
                                                          [x.answers for x in questions], data.matcher(), ks,
                                                          passage_ids=pids)
  table = report.markdown_table(["dims (cosine)", *(f"{s} top-{k}" for s in splits for k in ks)],
                                [[name, *(f"{results[name][s][f'top{k}']:.3f}" for s in splits for k in ks)]
                                 for name, _ in variants])
  print(table)
  if args.record:
    where = f"the {len(pids)} passages of {args.subset}" if pids is not None else "whole corpus"
    report.record("retrieval", args.title, table,
                  f"Passage vectors: {args.embeddings} ({passages.shape[0]} x {passages.shape[1]}, {where}); "
                  "questions encoded with the same encoder; every variant re-normalised after the cut. Variance "
                  "ranks the dims over the passage vectors; principal components are theirs, after centring on "
                  "their mean.")


if __name__ == "__main__":
  main()
