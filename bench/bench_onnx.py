r"""The student's ONNX graph on ONNX Runtime against JAX: agreement, latency, and int8 weights two ways.

One process, the same weights: jitted JAX (float32), the graph with float32 weights, the graph with the bundle's int8
weights (``weights_dtype="int8"``, dequantized: float32 compute) and ONNX Runtime's dynamic int8 quantization (int8
matmuls, per output channel). Agreement with float32 on real questions and passages: cosine of the retrieval vectors,
top-10 overlap of each question's ranking of a passage pool (the BM25 top-10 of every question), and the reader's
best start and end token; latency: batch-1 question encoding and one question's 10-passage reading, p50 / p95.

  python -m bench.bench_onnx --prepared runs/mini/prepared [--model runs/mini/finetune/best] [--record]

Without ``--model``, all-MiniLM-L6-v2 with random reader heads (its retrieval is real; its spans are not).
"""

from __future__ import annotations

import argparse
import bz2
import os
import tempfile
import time

import jax
import numpy as np

from bench import report
from rnr_jax import exports, onnx_export, qa_model
from rnr_jax.bundle import flatten_params, stored_values, write_params
from rnr_jax.data import PreparedData
from rnr_jax.models import load_minilm
from rnr_jax.runtime import INPUTS, OnnxStudent
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.tokenization import Tokenizer


def _student(model_dir: str | None) -> tuple[SystemSpec, dict]:
  if model_dir:
    spec, _, params = exports.load_unified(model_dir)
    return spec, jax.device_get(params)
  config, encoder = load_minilm()
  reader = ReaderSpec(encoder=config.to_hf_dict(), pooling="mean", retrieval_dim=128, tokenizer_fingerprint="",
                      question_len=64, reader_len=256, max_answer_len=10, buckets=(32, 64, 128, 192, 256))
  spec = SystemSpec.unified_model(reader, normalize=True, passage_token_type=0)
  params = qa_model.with_pretrained(qa_model.init_params(spec.reader.build(), jax.random.key(0)), encoder=encoder)
  return spec, jax.device_get(params)


def _engines(spec: SystemSpec, params: dict, tmp: str, threads: int) -> tuple[dict, dict]:
  """``({name: (embed, read)}, {name: stored bytes, bzip2 bytes})``."""
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=import-outside-toplevel

  flat = flatten_params(params)
  graph = onnx_export.build_model(spec.to_json(), flat, external=True).SerializeToString()
  full, quantized = os.path.join(tmp, "full.onnx"), os.path.join(tmp, "int8.onnx")
  onnx_export.save(full, spec.to_json(), flat, external=False)
  quantize_dynamic(full, quantized, per_channel=True, weight_type=QuantType.QInt8)
  write_params(os.path.join(tmp, "int8.safetensors"), params, "int8")
  embed_fn, read_fn = jax.jit(spec.embed_fns()[0]), jax.jit(spec.read_fn())
  students = {"onnx float32": OnnxStudent.load(graph, flat, threads),
              "onnx, bundle int8 weights": OnnxStudent.load(graph, flatten_params(stored_values(params, "int8")),
                                                            threads),
              "onnx, ORT dynamic int8": OnnxStudent.load(quantized, None, threads)}
  engines = {"jax float32": (lambda b: np.asarray(embed_fn(params, b)), lambda b: np.asarray(read_fn(params, b)))}
  engines.update({name: (s.embed, s.read) for name, s in students.items()})
  sizes = {}
  for name, path in (("onnx float32", full), ("onnx, bundle int8 weights", os.path.join(tmp, "int8.safetensors")),
                     ("onnx, ORT dynamic int8", quantized)):
    data = open(path, "rb").read()
    sizes[name] = (len(data), len(bz2.compress(data, 9)))
  sizes["graph only (external weights)"] = (len(graph), len(bz2.compress(graph, 9)))
  return engines, sizes


def _p(times: list[float], q: float) -> str:
  return f"{1e3 * float(np.percentile(times, q)):.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prepared", required=True)
  parser.add_argument("--model", default=None, help="an exported unified student (default: MiniLM, random heads)")
  parser.add_argument("--split", default="nq_dev")
  parser.add_argument("--questions", type=int, default=100)
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
  parser.add_argument("--record", action="store_true", help="replace this benchmark's section in docs/speed.md")
  args = parser.parse_args()
  spec, params = _student(args.model)
  data = PreparedData.load(args.prepared)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  corpus = data.token_corpus()
  questions = [q.question for q in data.questions(args.split)[:args.questions]]
  ranked = np.asarray(data.candidates(args.split).bm25_pids[:args.questions, :10])
  pool = np.unique(ranked[ranked >= 0])
  r = spec.retriever
  q_batch = tokenizer.questions(questions, r.question_len, r.buckets).as_dict()
  p_batches = [tokenizer.passages_from_records([corpus[int(p)] for p in pool[i:i + 16]], 128, r.buckets).as_dict()
               for i in range(0, len(pool), 16)]
  read_batches = [tokenizer.reader_from_records(questions[q], [corpus[int(p)] for p in ranked[q] if p >= 0],
                                                spec.reader.reader_len, spec.reader.buckets).as_dict()
                  for q in range(len(questions))]
  with tempfile.TemporaryDirectory() as tmp:
    engines, sizes = _engines(spec, params, tmp, args.threads)
    outputs = {}
    for name, (embed, read) in engines.items():
      vectors = np.concatenate([embed(q_batch)] + [embed(b) for b in p_batches])
      logits = [read(b) for b in read_batches[:20]]
      outputs[name] = vectors, logits
    times = {name: ([], []) for name in engines}
    one_q = {k: v[:1] for k, v in q_batch.items() if k in INPUTS}
    for rep in range(args.reps + 1):
      for name, (embed, read) in engines.items():
        for fn, batch, out in ((embed, one_q, times[name][0]), (read, read_batches[rep % 20], times[name][1])):
          start = time.perf_counter()
          fn(batch)
          if rep:  # the first round compiles
            out.append(time.perf_counter() - start)
  ref_vectors, ref_logits = outputs["onnx float32"]
  ref_rank = np.argsort(-(ref_vectors[:len(questions)] @ ref_vectors[len(questions):].T), axis=1)[:, :10]
  rows = []
  for name in engines:
    vectors, logits = outputs[name]
    cos = (vectors * ref_vectors).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(ref_vectors, axis=1)
    rank = np.argsort(-(vectors[:len(questions)] @ vectors[len(questions):].T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rank, ref_rank)])
    same_span = []
    for got, want, batch in zip(logits, ref_logits, read_batches):
      length = batch["input_ids"].shape[1]
      for part in (slice(0, length), slice(length, 2 * length)):
        same_span.append(got[:, part].argmax(1) == want[:, part].argmax(1))
    stored, packed = sizes.get(name, ("", ""))
    rows.append([name, f"{cos.mean():.6f} / {cos.min():.6f}", f"{overlap:.4f}",
                 f"{np.mean(np.concatenate(same_span)):.4f}",
                 f"{_p(times[name][0], 50)} / {_p(times[name][0], 95)}",
                 f"{_p(times[name][1], 50)} / {_p(times[name][1], 95)}",
                 f"{stored / 1e6:.2f} / {packed / 1e6:.2f}" if stored else "(training params)"])
  graph = sizes["graph only (external weights)"]
  rows.append(["graph only (external weights)", "", "", "", "", "", f"{graph[0] / 1e6:.3f} / {graph[1] / 1e6:.3f}"])
  table = report.markdown_table(
      ["engine", "cosine to float32 (mean / min)", "top-10 overlap", "same start / end token",
       "question, batch 1 p50 / p95 (ms)", "10 passages p50 / p95 (ms)", "weights MB (raw / bzip2)"], rows)
  note = (f"{len(questions)} {args.split} questions, a pool of {len(pool)} passages (their BM25 top-10, 128 tokens); "
          f"reading: 20 questions x their 10 passages at {spec.reader.reader_len} tokens; {args.reps} interleaved "
          f"repetitions; model: {args.model or 'all-MiniLM-L6-v2 + random reader heads'}.")
  print(table + "\n\n" + note)
  if args.record:
    report.record("speed", "ONNX Runtime engine: agreement, latency, int8", table, note)


if __name__ == "__main__":
  main()
