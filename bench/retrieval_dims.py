r"""How much retrieval accuracy a retriever's vectors lose when cut to fewer dimensions.

  python -m bench.retrieval_dims --embeddings EMB --config configs/retriever.py \
      --override model.pooling=mean --override model.retrieval_dim=0 --override retriever.normalize=True \
      --override retriever.passage_token_type=0 [--dims 384,256,128] [--record]

``EMB`` is an ``infer.encode`` output of the config's initial (untrained) encoder at full width (its
``embeddings.json`` must carry the same model fingerprint). The dev questions are encoded with that encoder, and
top-k answer accuracy over the whole corpus is computed for the first ``d`` dims of every vector (cosine, as the
paper's truncated [CLS] vector), and for the ``d`` dims of highest variance over the passage vectors (what a
function-preserving permutation of the hidden units could move to the front).
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import report
from infer import encode as encode_cli
from rnr_jax import retrieval
from rnr_jax import tokenization as tk
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData


def _normalized(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--embeddings", required=True, help="infer.encode output of the config's initial encoder")
  parser.add_argument("--config", required=True)
  parser.add_argument("--override", action="append", default=[], help="config override, e.g. model.pooling=mean")
  parser.add_argument("--dims", default="384,256,128")
  parser.add_argument("--splits", default="nq_dev,squadshifts_dev")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()

  passages, info = retrieval.load_embeddings(args.embeddings, mmap=False)
  data = PreparedData.load(info["prepared"])
  mesh = retrieval.data_mesh()
  spec, params, fingerprint = encode_cli.resolve_model(None, None, load_config(args.config, args.override),
                                                      data.manifest["settings"]["tokenizer"], mesh)
  if fingerprint != info["model_fingerprint"]:
    raise SystemExit(f"bench.retrieval_dims: {args.embeddings} holds another model's vectors than --config's")
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  q_encoder = retrieval.BatchEncoder(spec.embed_fns()[0], mesh, 64)
  by_variance = np.argsort(-passages.var(axis=0), kind="stable")
  ks = (1, 5, 20)
  dims = [int(x) for x in args.dims.split(",")]
  variants = [(f"first {d}", np.arange(d)) for d in dims]
  variants += [(f"{d} of highest variance", by_variance[:d]) for d in dims if d < passages.shape[1]]
  splits = args.splits.split(",")
  results: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _ in variants}
  for split in splits:
    questions = data.questions(split)
    q = retrieval.encode_questions(q_encoder, params, tokenizer, [x.question for x in questions],
                                   max_len=spec.question_len, buckets=spec.buckets)
    for name, kept in variants:
      results[name][split] = retrieval.evaluate_retrieval(_normalized(q[:, kept]), _normalized(passages[:, kept]),
                                                          [x.answers for x in questions], data.matcher(), ks)
  table = report.markdown_table(["dims (cosine)", *(f"{s} top-{k}" for s in splits for k in ks)],
                                [[name, *(f"{results[name][s][f'top{k}']:.3f}" for s in splits for k in ks)]
                                 for name, _ in variants])
  print(table)
  if args.record:
    report.record("Retrieval accuracy by vector width (untrained encoder)", table,
                  f"Passage vectors: {args.embeddings} ({passages.shape[0]} x {passages.shape[1]}, whole corpus); "
                  "questions encoded with the same encoder; every variant re-normalised after the cut. Variance "
                  "ranks the dims over the passage vectors.")


if __name__ == "__main__":
  main()
