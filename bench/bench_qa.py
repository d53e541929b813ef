r"""End-to-end QA speed of a bundle: batch-1 latency and batched throughput, against a FLOP-bound floor.

Loads a bundle (:meth:`rnr_jax.qa_system.QASystem.from_bundle`) and answers
questions with its default ``top_k``, ``read_passages`` and rule, timing whole
:meth:`QASystem.answer` calls (tokenization, question encoding, index search,
reading and answer choice):

* **batch 1**: one question per call; p50 and p95 latency over ``--limit``
  questions x ``--repeats``;
* **batched**: calls of 16 and 64 questions (the question list is cycled to fill
  a batch); questions/s over ``--repeats`` passes.

A first pass over every shape is run before timing; its time (mostly XLA
compilation) is reported separately and excluded from the table.

The floor is the time the model's matmul FLOPs would take at the machine's
measured matmul rate. FLOPs of one question: its encoding at its token length
(``[CLS] q [SEP]``) plus reading ``read_passages`` passages at the length bucket
its read rows are padded to; per sequence of ``L`` tokens, per layer,
``2 x matmul params x L`` (``4H^2 + 2HI`` for BERT) plus attention's
``4 L^2 H``, plus the reader heads. Embeddings, norms, softmax and GELU are not
counted. The rate is measured in the same run: the best of several jitted float32
matmuls of the model's largest shape, ``[read rows x reader_len, H] x [H, I]``.
``measured / floor`` is how far the whole pipeline is from that bound.

  python -m bench.bench_qa --bundle B --questions Q.jsonl --limit 200 --repeats 3 --record

``--record`` replaces this benchmark's section in docs/speed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import report
from rnr_jax import reader_data as rd
from rnr_jax.data.readers import read_questions
from rnr_jax.qa_system import QASystem

TITLE = "End-to-end QA latency and throughput vs FLOP floor"
BATCHES = (16, 64)


# ---- FLOPs -----------------------------------------------------------------------------


def encoder_flops(encoder: Mapping, length: int) -> int:
  """Matmul FLOPs of one ``length``-token sequence through a BERT encoder (a transformers config dict).

  Per layer: ``2 x (4 H^2 + 2 H I)`` per token (query, key, value, attention
  output, FFN in and out) plus ``4 L^2 H`` for the attention scores and the
  weighted sum of values.

  Raises:
    ValueError: the encoder is not a BERT (``model_type`` other than ``"bert"``).
  """
  if encoder.get("model_type", "bert") != "bert":
    raise ValueError(f"FLOP count implemented for BERT encoders only, not {encoder.get('model_type')!r}")
  h, i, n = int(encoder["hidden_size"]), int(encoder["intermediate_size"]), int(encoder["num_hidden_layers"])
  return n * (2 * length * (4 * h * h + 2 * h * i) + 4 * length * length * h)


def read_flops(encoder: Mapping, length: int) -> int:
  """Matmul FLOPs of reading one ``length``-token row: the encoder, start/end logits and the rank logit."""
  h = int(encoder["hidden_size"])
  return encoder_flops(encoder, length) + 2 * length * h * 2 + 2 * h


def question_flops(system: QASystem, questions: Sequence[str]) -> np.ndarray:
  """float64 ``[Q]``: the matmul FLOPs of answering each question alone (its encoding + its read rows)."""
  spec, s, tok = system.spec, system.settings, system.tokenizer
  r = spec.reader
  q_ids = tok.encode_texts(questions)
  pids, _ = system.search(questions, s.top_k)
  m = min(s.read_passages, pids.shape[1])
  out = np.zeros(len(questions))
  for q, ids in enumerate(q_ids):
    q_len = min(len(ids) + 2, spec.retriever.question_len)
    batch = rd.reader_batch(tok, system.store, [ids], pids[q:q + 1, :m], max_len=r.reader_len, buckets=r.buckets,
                            question_len=r.question_len, max_answer_len=r.max_answer_len, max_spans=1)
    out[q] = encoder_flops(spec.retriever.encoder, q_len) + m * read_flops(r.encoder, batch["input_ids"].shape[1])
  return out


def matmul_rate(m: int, k: int, n: int, *, min_s: float = 0.5, max_reps: int = 200) -> float:
  """FLOP/s of the best of repeated jitted float32 ``[m, k] x [k, n]`` matmuls (at least ``min_s`` seconds)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
  b = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best, spent, reps = float("inf"), 0.0, 0
  while (spent < min_s or reps < 3) and reps < max_reps:
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    dt = time.perf_counter() - t0
    best, spent, reps = min(best, dt), spent + dt, reps + 1
  return 2.0 * m * k * n / best


# ---- timing ----------------------------------------------------------------------------


def _batches(questions: Sequence[str], size: int) -> list[list[str]]:
  """At least one batch of ``size`` questions, cycling through ``questions``; every question at least once."""
  count = -(-max(len(questions), size) // size)
  cycled = list(itertools.islice(itertools.cycle(questions), count * size))
  return [cycled[i:i + size] for i in range(0, len(cycled), size)]


def _timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def measure(system: QASystem, questions: Sequence[str], repeats: int, batch_sizes: Sequence[int]) -> dict:
  """Warm-up times, batch-1 latencies (seconds) and questions/s per batch size."""
  warmup = {1: sum(_timed(lambda q=q: system.answer([q])) for q in questions)}
  for size in batch_sizes:
    warmup[size] = sum(_timed(lambda b=b: system.answer(b)) for b in _batches(questions, size))
  latencies = np.array([_timed(lambda q=q: system.answer([q])) for _ in range(repeats) for q in questions])
  rates = {}
  for size in batch_sizes:
    batches = _batches(questions, size)
    spent = sum(_timed(lambda b=b: system.answer(b)) for _ in range(repeats) for b in batches)
    rates[size] = repeats * len(batches) * size / spent
  return {"warmup_s": warmup, "latencies_s": latencies, "questions_per_s": rates}


# ---- report ----------------------------------------------------------------------------


def table(result: dict, flops: np.ndarray | None, rate: float, label: str = "") -> str:
  """Rows: batch-1 p50 / p95 latency and batched questions/s; columns: measured, floor, measured / floor."""
  return report.markdown_table(["work", "measured", "FLOP floor", "measured / floor"],
                               table_rows(result, flops, rate, label))


def table_rows(result: dict, flops: np.ndarray | None, rate: float, label: str = "") -> list[list[str]]:
  lat = result["latencies_s"]
  rows = []
  for name, q in (("p50", 50), ("p95", 95)):
    measured = float(np.percentile(lat, q))
    floor = float(np.percentile(flops, q)) / rate if flops is not None else None
    rows.append([f"{label}batch 1, {name} latency", f"{1e3 * measured:.2f} ms",
                 f"{1e3 * floor:.3f} ms" if floor else "n/a", f"{measured / floor:,.0f}x" if floor else "n/a"])
  for size, qps in result["questions_per_s"].items():
    floor_qps = rate / float(np.mean(flops)) if flops is not None else None
    rows.append([f"{label}batch {size}, throughput", f"{qps:,.1f} questions/s",
                 f"{floor_qps:,.0f} questions/s" if floor_qps else "n/a",
                 f"{floor_qps / qps:,.0f}x" if floor_qps else "n/a"])
  return rows


def describe(system: QASystem) -> str:
  """The model and settings in a few words."""
  spec, s = system.spec, system.settings
  enc = spec.reader.encoder
  model = (f"{enc.get('model_type', 'bert')}, {enc['num_hidden_layers']}-layer, hidden {enc['hidden_size']}, "
           f"FFN {enc['intermediate_size']}, {spec.reader.dtype}")
  kind = "unified retriever-reader" if spec.unified else "retriever + reader"
  return (f"{kind} ({model}); top_k {s.top_k}, read_passages {s.read_passages}, rule {s.rule}, "
          f"BM25 fusion weight {s.lexical_weight:g}, "
          f"reader_len {spec.reader.reader_len}, buckets {list(spec.reader.buckets)}; "
          f"index {system.index.kind} ({len(system.index):,} passages, dim {system.index.dim})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--bundle", required=True, help="bundle directory (python -m infer.export)")
  ap.add_argument("--questions", required=True, help="question file (our jsonl or NQ-open jsonl)")
  ap.add_argument("--limit", type=int, default=200, help="questions used (the first N)")
  ap.add_argument("--repeats", type=int, default=3, help="timed passes over the questions")
  ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes for throughput")
  ap.add_argument("--cache_dir", default=None, help="where to unpack the bundle (default: <bundle>/.cache)")
  ap.add_argument("--lexical_weight", type=float, default=None,
                  help="BM25 fusion weight (default: the bundle's); when > 0 the dense-only system is timed too")
  ap.add_argument("--record", action="store_true", help="write the table into docs/speed.md")
  args = ap.parse_args()

  load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
  questions = [q.question for q in itertools.islice(read_questions(args.questions), args.limit)]
  t0 = time.perf_counter()
  system = QASystem.from_bundle(args.bundle, cache_dir=args.cache_dir)
  load_s = time.perf_counter() - t0
  if args.lexical_weight is not None:
    system.settings = dataclasses.replace(system.settings, lexical_weight=args.lexical_weight)
  hybrid = system.settings.lexical_weight > 0
  lexical_s = _timed(system.lexical_index) if hybrid else 0.0
  batch_sizes = [int(b) for b in args.batches.split(",") if b]
  result = measure(system, questions, args.repeats, batch_sizes)
  dense_result = None
  if hybrid:  # the same system without BM25, timed in the same run
    weight = system.settings.lexical_weight
    system.settings = dataclasses.replace(system.settings, lexical_weight=0.0)
    dense_result = measure(system, questions, args.repeats, batch_sizes)
    system.settings = dataclasses.replace(system.settings, lexical_weight=weight)

  spec, s = system.spec, system.settings
  enc = spec.reader.encoder
  rows = min(s.read_batch, max(batch_sizes, default=1)) * min(s.read_passages, s.top_k, len(system.index))
  shape = (rows * spec.reader.reader_len, int(enc["hidden_size"]), int(enc["intermediate_size"]))
  rate = matmul_rate(*shape)
  square = matmul_rate(1024, 1024, 1024)
  try:
    flops = question_flops(system, questions)
  except ValueError as e:
    print(f"no FLOP floor: {e}")
    flops = None
  if dense_result is None:
    result_table = table(result, flops, rate)
  else:
    result_table = report.markdown_table(["work", "measured", "FLOP floor", "measured / floor"],
                                         table_rows(result, flops, rate, "dense + BM25: ")
                                         + table_rows(dense_result, flops, rate, "dense only: "))
  warmup = ", ".join(f"batch {k}: {v:.1f} s" for k, v in result["warmup_s"].items())
  info = {"load_s": round(load_s, 2), "warmup_s": {k: round(v, 2) for k, v in result["warmup_s"].items()},
          "matmul_gflops": round(rate / 1e9, 2), "matmul_shape": shape, "square_1024_gflops": round(square / 1e9, 2),
          "mean_mflops_per_question": None if flops is None else round(float(np.mean(flops)) / 1e6, 3)}
  print(json.dumps(info))
  print(result_table)
  if not args.record:
    return
  note = "\n".join([
      f"- system: {describe(system)}",
      f"- questions: the first {len(questions)} of `{os.path.basename(args.questions)}`; batch-1 latency over "
      f"{args.repeats} passes; batched rates over {args.repeats} passes (questions cycled to fill a batch); "
      f"whole `QASystem.answer` calls (tokenization, encoding, search, reading, answer choice)",
      f"- not in the table: loading the bundle {load_s:.1f} s; first pass over each shape (compilation) {warmup}"
      + (f"; building the BM25 index from the bundle's passages {lexical_s:.1f} s (once per load)" if hybrid else ""),
      "- floor: model matmul FLOPs (question at its token length + read_passages rows at their length bucket; "
      f"mean {info['mean_mflops_per_question']} MFLOP per question) / the best jitted float32 matmul rate of "
      f"{shape[0]}x{shape[1]} x {shape[1]}x{shape[2]} measured in the same run: {rate / 1e9:.1f} GFLOP/s "
      f"(1024^3: {square / 1e9:.1f} GFLOP/s)",
      f"- jax {jax.__version__}, backend {jax.default_backend()}; load average before the run (other jobs share "
      f"this machine): {load_before}",
  ])
  report.record("speed", TITLE, result_table, note)
  print("recorded in docs/")


if __name__ == "__main__":
  main()
