r"""Training-step throughput and model-FLOP utilisation (MFU) on every local device, at the paper's shapes.

Times the real steps of the stages (the retriever's in-batch NLL, the reader's loss, the distillation loss,
Algorithm 1's two-update step) and corpus encoding, on random inputs of full length: questions of 32 tokens,
passages of 256, reader rows of 350, m = 24 passages per question, in-batch negatives over the global batch,
parameters born sharded by the config's rules and float32 master weights under ``--dtype`` compute.

  python -m bench.accelerator                              # GPU / TPU: the paper's batches, bfloat16
  python -m bench.accelerator --preset cpu --record        # CPU: small batches, float32 (docs/speed.md)
  python -m bench.accelerator --preset tiny                # seconds: a tiny BERT (the test)

Model FLOPs are counted from the encoder config (matmuls, x3 for a forward and backward pass), at each input's own
length. MFU divides the achieved FLOP/s by the devices' datasheet peak (dense, of the compute dtype) and, in the last
column, by the peak of a large matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import textwrap
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import report
from bench.bench_qa import encoder_flops, read_flops
from configs import common
from rnr_jax import distill, iterative, qa_model
from rnr_jax.models import config_from_hf_dict
from rnr_jax.specs import ReaderSpec, RetrieverSpec, SystemSpec
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from train.retriever import make_loss_fn as retriever_loss_fn

TITLE = "Accelerator training steps: throughput and MFU"
_BERT = dict(model_type="bert", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
             layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
ENCODERS = {  # transformers config.json fields; weights are random (speed does not depend on them)
    "minilm": {**_BERT, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
               "intermediate_size": 1536},  # all-MiniLM-L6-v2, the project's default encoder
    "bert-base": {**_BERT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072},  # the paper's teacher
    "tiny": {**_BERT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}


@dataclasses.dataclass(frozen=True)
class Shapes:
  encoder: str
  dtype: str
  question_len: int
  passage_len: int
  reader_len: int
  m: int
  retriever_batch: int  # questions per global batch, each with a positive and a hard negative
  batch: int  # questions per global batch of the reader, distillation and Algorithm 1 (x m rows)
  encode_batch: int  # passages per corpus-encoding call
  steps: int
  matmul: int  # n of the [n, n] x [n, n] matmul per device that measures the peak


PRESETS = {
    # Appendix A.2: retriever batches of 128 questions, the reader's and the student's of 16 x m = 24 passages.
    "paper": Shapes("minilm", "bfloat16", 32, 256, 350, 24, 128, 16, 1024, 10, 8192),
    "cpu": Shapes("minilm", "float32", 32, 256, 350, 24, 16, 1, 64, 3, 1024),
    "tiny": Shapes("tiny", "float32", 8, 16, 24, 4, 8, 8, 16, 2, 128),  # batches split over 8 test devices
}

# Dense peak TFLOP/s of one JAX device in bfloat16 (float32 compute has no tensor-core datasheet figure here), by
# device_kind prefix; first match wins. TPU v2/v3 devices are single cores (half a chip).
PEAK_BF16_TFLOPS = (("nvidia h100 pcie", 756.0), ("nvidia h100", 989.4), ("nvidia h200", 989.4),
                    ("nvidia a100", 312.0), ("nvidia l4", 121.0), ("tpu v6", 918.0), ("tpu v5 lite", 197.0),
                    ("tpu v5e", 197.0), ("tpu v5", 459.0), ("tpu v4", 275.0), ("tpu v3", 61.5), ("tpu v2", 22.5))


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of ``device_kind`` computing in ``dtype``; None when unknown."""
  if dtype != "bfloat16":
    return None
  kind = device_kind.lower()
  return next((tflops * 1e12 for prefix, tflops in PEAK_BF16_TFLOPS if kind.startswith(prefix)), None)


def measured_peak(n: int, dtype: str, mesh: jax.sharding.Mesh, min_s: float = 1.0) -> float:
  """Best FLOP/s per device of ``[n, n] x [n, n]`` matmuls, one per device at once (``dtype`` inputs, float32
  accumulation)."""
  devices = mesh.devices.size
  sharding = mesh_lib.batch_sharding(mesh)
  a = jax.jit(lambda: jnp.ones((devices, n, n), dtype), out_shardings=sharding)()  # born on its device
  f = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x, preferred_element_type=jnp.float32).astype(dtype))
  jax.block_until_ready(f(a))
  best, spent = float("inf"), 0.0
  while spent < min_s:
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best, spent = min(best, time.perf_counter() - t0), spent + time.perf_counter() - t0
  return 2.0 * n ** 3 / best


def _config(shapes: Shapes) -> Any:
  c = common.base_config()
  c.model.dtype = shapes.dtype
  c.model.retrieval_dim = min(128, ENCODERS[shapes.encoder]["hidden_size"])
  c.tokens.question_len, c.tokens.passage_len, c.tokens.reader_len = (shapes.question_len, shapes.passage_len,
                                                                      shapes.reader_len)
  c.tokens.buckets = (shapes.question_len, shapes.passage_len, shapes.reader_len)
  c.optim.warmup_steps, c.train.num_steps = 0, 1000
  c.finetune = {"temperature": 3.0}
  return c


def _tokens(rng: np.random.Generator, rows: int, length: int, vocab: int, prefix: str = "") -> dict[str, np.ndarray]:
  ids = rng.integers(1000, vocab, (rows, length), dtype=np.int32)
  return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": np.ones_like(ids),
          f"{prefix}token_type_ids": np.zeros_like(ids)}


def _unified_batch(rng: np.random.Generator, s: Shapes, vocab: int) -> dict[str, np.ndarray]:
  """Reader rows with span targets, the questions and passages of the retrieval scores, the teacher's logits."""
  rows, length = s.batch * s.m, s.reader_len
  text_start = s.question_len + 2
  starts = rng.integers(text_start, length - 4, (s.batch, 10), dtype=np.int32)
  return {**_tokens(rng, rows, length, vocab), **_tokens(rng, s.batch, s.question_len, vocab, "q_"),
          **_tokens(rng, rows, s.passage_len, vocab, "p_"),
          "text_start": np.full(rows, text_start, np.int32), "text_end": np.full(rows, length - 1, np.int32),
          "passage_mask": np.ones((s.batch, s.m), bool), "span_starts": starts, "span_ends": starts + 2,
          "span_mask": np.arange(10)[None, :].repeat(s.batch, 0) < 2,
          "t_start": rng.standard_normal((rows, length)).astype(np.float16),
          "t_end": rng.standard_normal((rows, length)).astype(np.float16),
          "t_rank": rng.standard_normal((s.batch, s.m)).astype(np.float32)}


@dataclasses.dataclass
class Work:
  name: str
  unit: str  # what an example is
  examples: int  # per step (or call)
  flops: float  # model FLOPs per step
  run: Callable[[], Any]  # one step; returns something to block on


def _train_work(name: str, config: Any, mesh: jax.sharding.Mesh, init_fn: Callable, step: step_lib.Step,
                batch: dict[str, np.ndarray], examples: int, flops: float) -> Work:
  """A stage's step as the training loop runs it: born-sharded state, donated, batches over the data axes."""
  rng = jax.random.key(0)
  abstract = jax.eval_shape(lambda r: step.init_state(init_fn(r)), rng)
  shardings = mesh_lib.param_shardings(abstract, mesh, config.mesh.rules)
  holder = {"state": jax.jit(lambda r: step.init_state(init_fn(r)), out_shardings=shardings)(rng)}
  update = step_lib.jit_train_step(step.update, shardings, mesh_lib.batch_sharding(mesh))
  global_batch = mesh_lib.make_global_batch(batch, mesh)
  base = jax.device_put(rng, mesh_lib.replicated(mesh))

  def run() -> Any:
    holder["state"], metrics = update(holder["state"], global_batch, base)
    return metrics["loss"]

  return Work(name, "questions", examples, flops, run)


def workloads(s: Shapes, mesh: jax.sharding.Mesh) -> list[Work]:
  """The five timed works of ``s`` on ``mesh``."""
  config, encoder = _config(s), ENCODERS[s.encoder]
  rng = np.random.default_rng(0)
  vocab = encoder["vocab_size"]
  enc = lambda length: encoder_flops(encoder, length)  # noqa: E731
  retrieval_fwd = s.batch * enc(s.question_len) + s.batch * s.m * enc(s.passage_len)
  reading_fwd = s.batch * s.m * read_flops(encoder, s.reader_len)

  config.retriever = {"shared": True, "normalize": False, "passage_token_type": 1}
  spec = RetrieverSpec.from_config(config, config_from_hf_dict(encoder), "")
  retriever = spec.build()
  batch = {**_tokens(rng, s.retriever_batch, s.question_len, vocab, "q_"),
           **_tokens(rng, 2 * s.retriever_batch, s.passage_len, vocab, "p_")}
  works = [_train_work("retriever step (in-batch NLL, 1 hard negative)", config, mesh,
                       lambda r: qa_model.init_params(retriever, r),
                       step_lib.adamw_step(config, retriever_loss_fn(spec, 20.0)), batch, s.retriever_batch,
                       3 * s.retriever_batch * (enc(s.question_len) + 2 * enc(s.passage_len)))]

  reader_spec = ReaderSpec.from_config(config, config_from_hf_dict(encoder), "")
  model = reader_spec.build()
  init = lambda r: qa_model.init_params(model, r)  # noqa: E731
  unified = _unified_batch(rng, s, vocab)
  reader_batch = {k: v for k, v in unified.items() if not k.startswith(("q_", "p_", "t_"))}
  works.append(_train_work(f"reader step (m = {s.m})", config, mesh, init, step_lib.adamw_step(
      config, lambda p, b, r: distill.reader_loss(model, p, b, r)), reader_batch, s.batch, 3 * reading_fwd))
  works.append(_train_work(f"distillation step (m = {s.m}, KD of reading and retrieval)", config, mesh, init,
                           step_lib.adamw_step(config, distill.make_distill_loss(
                               model, normalize=False, scale=20.0, temperature=3.0, retrieval_loss="kd")),
                           unified, s.batch, 3 * (reading_fwd + retrieval_fwd)))
  # Algorithm 1: (1) retrieval forward, (2) reader forward + backward, (3)-(6) retrieval forward + backward.
  works.append(_train_work(f"Algorithm 1 step (m = {s.m}, two updates)", config, mesh, init,
                           iterative.iterative_step(config, model, normalize=False, scale=20.0),
                           {k: v for k, v in unified.items() if not k.startswith("t_")}, s.batch,
                           3 * reading_fwd + 4 * retrieval_fwd))

  system = SystemSpec.unified_model(reader_spec, passage_len=s.passage_len)
  params = jax.device_put(jax.jit(init)(jax.random.key(1)), mesh_lib.replicated(mesh))
  embed = jax.jit(system.embed_fns()[1], in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)))
  passages = mesh_lib.make_global_batch(_tokens(rng, s.encode_batch, s.passage_len, vocab), mesh)
  works.append(Work("corpus encoding (forward)", "passages", s.encode_batch, s.encode_batch * enc(s.passage_len),
                    lambda: embed(params, passages)))
  return works


def run(shapes: Shapes) -> dict[str, Any]:
  """Measures every work of ``shapes``; returns the rows and the peaks."""
  mesh = mesh_lib.make_mesh(common.base_config().mesh, jax.local_devices())
  devices = mesh.devices.size
  for size in (shapes.retriever_batch, shapes.batch, shapes.encode_batch):
    if size % devices:
      raise ValueError(f"batch {size} is not divisible by the {devices} devices")
  kind = jax.local_devices()[0].device_kind
  peak, measured = datasheet_peak(kind, shapes.dtype), measured_peak(shapes.matmul, shapes.dtype, mesh)
  rows = []
  for work in workloads(shapes, mesh):
    t0 = time.perf_counter()
    jax.block_until_ready(work.run())  # compiles
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(work.run())
    t0 = time.perf_counter()
    for _ in range(shapes.steps):
      out = work.run()
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / shapes.steps
    achieved = work.flops / seconds / devices  # per device
    rows.append({"work": work.name, "unit": work.unit, "examples": work.examples,
                 "examples_per_s": work.examples / seconds, "step_s": seconds, "compile_s": compile_s,
                 "tflop_per_step": work.flops / 1e12, "tflops_per_device": achieved / 1e12,
                 "mfu": achieved / peak if peak else None, "of_measured_peak": achieved / measured})
    print(json.dumps(rows[-1]), flush=True)
  return {"device": kind, "devices": devices, "backend": jax.default_backend(), "datasheet_peak": peak,
          "measured_peak": measured, "rows": rows}


def table(result: dict[str, Any]) -> str:
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  return report.markdown_table(
      ["work", "examples / step", "examples/s", "model TFLOP / step", "TFLOP/s per device", "MFU (datasheet)",
       "of measured matmul peak"],
      [[r["work"], f"{r['examples']} {r['unit'] if r['examples'] > 1 else r['unit'][:-1]}",
        f"{r['examples_per_s']:.3g}", f"{r['tflop_per_step']:.3g}", f"{r['tflops_per_device']:.3g}", pct(r["mfu"]),
        pct(r["of_measured_peak"])] for r in result["rows"]])


def record(result: dict[str, Any], command: str) -> None:
  """Writes the table and its conditions into docs/speed.md."""
  s, peak = Shapes(**result["shapes"]), result["datasheet_peak"]
  peak_text = "n/a" if peak is None else f"{peak / 1e12:.4g} TFLOP/s"
  encoder = ENCODERS[s.encoder]
  note = (f"Device: {result['devices']} x {result['device']} ({result['backend']}); encoder {s.encoder} "
          f"({encoder['num_hidden_layers']} layers, hidden {encoder['hidden_size']}), {s.dtype} compute, float32 "
          f"master weights; questions {s.question_len} tokens, passages {s.passage_len}, reader rows {s.reader_len}, "
          f"m = {s.m}; global batches: retriever {s.retriever_batch} questions (+ a positive and a hard negative "
          f"each), the others {s.batch} x m reader rows, corpus encoding {s.encode_batch} passages; mean of "
          f"{s.steps} steps after one warm-up step. Measured matmul peak {result['measured_peak'] / 1e12:.3g} TFLOP/s "
          f"per device ({s.matmul}^3, {s.dtype}); datasheet peak {peak_text}. jax {result['jax']}; load average "
          f"before the run {' '.join(f'{x:.2f}' for x in result['load_before'])}.")
  report.record("speed", TITLE, table(result), textwrap.fill(note, 120), command)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
  ap.add_argument("--encoder", choices=sorted(ENCODERS), help="override the preset's encoder")
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="override the preset's compute dtype")
  ap.add_argument("--steps", type=int, help="timed steps per work")
  ap.add_argument("--out", help="also write the result as JSON here")
  ap.add_argument("--record", action="store_true", help="write the table into docs/speed.md")
  args = ap.parse_args()
  shapes = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in (
      ("encoder", args.encoder), ("dtype", args.dtype), ("steps", args.steps)) if v is not None})
  load = os.getloadavg()
  result = run(shapes)
  result.update(shapes=dataclasses.asdict(shapes), jax=jax.__version__, load_before=load)
  text = table(result)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  if args.record:
    options = [f"--{k} {v}" for k, v in (("preset", args.preset), ("encoder", args.encoder), ("dtype", args.dtype),
                                          ("steps", args.steps)) if v is not None]
    record(result, " ".join(["python -m bench.accelerator", *options, "--record"]))


if __name__ == "__main__":
  main()
