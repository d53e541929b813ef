r"""How the cost of every corpus-sized step grows with the corpus, projected to DPR's 21M passages (docs/scale.md).

  python -m bench.scale --data_dir $RNR_DATA --workdir runs/scale            # 30k, 100k, 300k and 1M passages

Synthetic corpora of the real one's sentences around the real questions' gold documents; each step runs in its own
process, measured by wall time, CPU time, peak RSS (``wait4``) and peak anonymous memory (sampled). Results are kept
per step in ``W/<size>/results.json``, so a rerun measures only what is missing (``--redo`` steps to measure again).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any
from unittest import mock

import numpy as np
from absl import app, flags

from bench import report
from rnr_jax.data.passages import split_words

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.environ.get("RNR_DATA", "../shared/data"), "The shared data directory.")
flags.DEFINE_string("workdir", "runs/scale", "Synthetic corpora, prepared data, bundles and results.")
flags.DEFINE_list("sizes", ["30000", "100000", "300000", "1000000"], "Corpus sizes in passages.")
flags.DEFINE_list("steps", [], "Only these steps (default: all).")
flags.DEFINE_list("redo", [], "Steps to measure again even if measured.")
flags.DEFINE_bool("no_record", False, "Only print the table.")
flags.DEFINE_string("note", "", "Appended to the recorded note (e.g. the machine's load).")
flags.DEFINE_string("step", None, "(internal) run one step in this process.")
flags.DEFINE_string("dir", None, "(internal) the size's work directory.")

SPLITS = ("nq_train", "nq_dev", "squadshifts_train", "squadshifts_dev")
TRAIN_SPLITS = ("nq_train", "squadshifts_train")
TARGET = 21_000_000
K1, M, TEACHER_QUESTIONS = 200, 24, 250  # the last per training split
ENCODER = dict(model_type="bert", vocab_size=30522, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=128, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
               layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
FILTER_ENCODER = {**ENCODER, "hidden_size": 32, "intermediate_size": 32}  # a score needs no 128-d vector
PASSAGE_LEN, BATCH = 32, 256
STEPS = ("prepare", "filter_score", "filter_score_host", "encode", "encode_host", "teacher_cache", "index_int8_row",
         "index_ah", "bundle_write", "bundle_load", "query", "edit")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# ---- the synthetic corpus ----------------------------------------------------------------


def make_corpus(data_dir: str, out: str, passages: int, seed: int = 0) -> dict[str, int]:
  """A data directory of ``passages`` passages: the real questions' gold documents, then synthetic one-passage
  documents of the real corpus's sentences recombined (40-100 words) under real titles."""
  questions = {}
  for split in SPLITS:
    with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
      questions[split] = f.read()
  gold = {json.loads(line)["gold_pid"] for text in questions.values() for line in text.splitlines() if line.strip()}
  titles, sentences, gold_docs = [], [], []
  with open(os.path.join(data_dir, "corpus.jsonl"), encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      titles.append(doc["title"])
      sentences += [s for s in _SENTENCE.split(doc["text"]) if s]
      if doc["id"] in gold:
        gold_docs.append(doc)
  real = sum(len(split_words(d["text"])) for d in gold_docs)
  if real > passages:
    raise ValueError(f"the gold documents alone have {real} passages, more than {passages}")
  rng = np.random.default_rng(seed)
  next_id = max(d["id"] for d in gold_docs) + 1
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in gold_docs)
    for first in range(0, passages - real, 10_000):
      n = min(10_000, passages - real - first)
      lengths, picks = rng.integers(40, 101, n), rng.integers(0, len(sentences), (n, 12))
      title_ids = rng.integers(0, len(titles), n)
      for i in range(n):
        words = " ".join(sentences[j] for j in picks[i]).split()[:lengths[i]]
        f.write(json.dumps({"id": next_id + first + i, "title": titles[title_ids[i]], "text": " ".join(words),
                            "source": "synthetic"}, ensure_ascii=False) + "\n")
  for split, text in questions.items():
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      f.write(text)
  return {"gold_documents": len(gold_docs), "gold_passages": real, "synthetic": passages - real}


# ---- the steps (each runs in its own process) -----------------------------------------------


def _system(prepared: Any) -> tuple[Any, Any]:
  """The random-init one-layer unified student (spec, params) every model step uses."""
  import jax  # pylint: disable=import-outside-toplevel

  from rnr_jax import qa_model  # pylint: disable=import-outside-toplevel
  from rnr_jax.specs import ReaderSpec, SystemSpec  # pylint: disable=import-outside-toplevel

  # Mean pooling: a random-init encoder's [CLS] vector hardly depends on the passage, its mean does.
  reader = ReaderSpec(encoder=ENCODER, pooling="mean", retrieval_dim=128,
                      tokenizer_fingerprint=prepared.manifest["settings"]["tokenizer"], question_len=32,
                      reader_len=128, max_answer_len=10, buckets=(32, 128))
  spec = SystemSpec.unified_model(reader, passage_len=PASSAGE_LEN)
  return spec, jax.device_get(qa_model.init_params(spec.reader.build(), jax.random.key(0)))


def _host_only(spec: Any) -> Any:
  """A patch making the model compute nothing, so a step measures its host-side part alone."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def nothing(params: Any, batch: dict) -> Any:
    del params
    return jnp.zeros((batch["input_ids"].shape[0], spec.dim), jnp.float32) + batch["input_ids"][:, :1] * 0

  return mock.patch.object(type(spec), "embed_fns", lambda self: (nothing, nothing))


def run_step(step: str, d: str) -> dict[str, Any]:
  """Runs one step in the size's directory ``d``; returns its metrics."""
  # pylint: disable=import-outside-toplevel
  import jax

  from rnr_jax import deploy, embeddings, knowledge, passage_filter, retrieval
  from rnr_jax import tokenization as tk
  from rnr_jax.data import PreparedData
  from rnr_jax.index import DenseIndex
  from rnr_jax.models import config_from_hf_dict
  from rnr_jax.qa_system import InferenceSettings, QASystem
  from rnr_jax.training import mesh as mesh_lib

  data = PreparedData.load(os.path.join(d, "prepared"))
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  mesh = mesh_lib.data_mesh()
  spec, params = _system(data)
  n = data.num_passages
  if step.startswith("filter_score"):
    model = passage_filter.PassageFilter(config_from_hf_dict(FILTER_ENCODER))
    fparams = jax.device_get(model.init(jax.random.key(0), {k: np.ones((1, 8), np.int32) for k in
                                                             ("input_ids", "attention_mask", "token_type_ids")}))
    fn = passage_filter.score_fn(model)
    if step.endswith("_host"):
      fn = lambda p, b: b["input_ids"][:, :1] * 0.0  # noqa: E731
    start = time.perf_counter()
    scores = passage_filter.score_passages(retrieval.BatchEncoder(fn, mesh, BATCH), fparams["params"], tokenizer,
                                           data.token_corpus(), np.arange(n), max_len=PASSAGE_LEN, buckets=(32,))
    np.save(os.path.join(d, f"{step}.npy"), scores)
    return {"passages_per_s": round(n / (time.perf_counter() - start), 1)}
  if step.startswith("encode"):
    out = os.path.join(d, "embeddings_host" if step.endswith("_host") else "embeddings")
    shutil.rmtree(out, ignore_errors=True)  # encoding resumes finished chunks: measure it from scratch
    with _host_only(spec) if step.endswith("_host") else contextlib.nullcontext():
      info = embeddings.encode_prepared(out=out, prepared=data.path, spec=spec, params=params, fingerprint="bench",
                                        mesh=mesh, batch_size=BATCH)
    return {"passages_per_s": info["passages_per_s"]}
  if step == "teacher_cache":
    return _teacher_cache(d, data, tokenizer, spec, params, mesh)
  if step.startswith("index_"):
    kind = step.removeprefix("index_")
    vectors, _ = embeddings.load(os.path.join(d, "embeddings"))
    index = DenseIndex.build(vectors, kind)
    index.save(os.path.join(d, f"index_{kind}"))
    return {k: index.build_report[k] for k in ("recall@10", "build_seconds") if k in index.build_report}
  bundle = os.path.join(d, "bundle")
  if step == "bundle_write":
    records, pids = deploy.corpus_records(data, None)
    index = DenseIndex.load(os.path.join(d, "index_int8_row"))
    manifest = deploy.write_system_bundle(bundle, data, spec, params, index, records, pids, InferenceSettings(),
                                          overwrite=True)
    return {"bundle_mb": manifest["footprint"][-1]["stored_mb"]}
  if step == "bundle_load":
    start = time.perf_counter()
    system = QASystem.from_bundle(bundle)
    return {"load_s": round(time.perf_counter() - start, 2), "passages": len(system.index)}
  if step == "query":
    system = QASystem.from_bundle(bundle)
    questions = [q.question for q in data.questions("nq_dev")[:40]]
    system.answer(questions[:4], top_k=10, read_passages=1)  # compiles
    latency = []
    for q in questions[4:]:
      start = time.perf_counter()
      system.answer([q], top_k=10, read_passages=1)
      latency.append(time.perf_counter() - start)
    ah = DenseIndex.load(os.path.join(d, "index_ah"))
    queries = system.embed_questions(questions)
    ah_latency = []
    for q in queries:
      start = time.perf_counter()
      ah.search(q[None], 10)
      ah_latency.append(time.perf_counter() - start)
    return {"query_ms_median": round(1000 * float(np.median(latency)), 1),
            "ah_search_ms_median": round(1000 * float(np.median(ah_latency)), 2)}
  if step == "edit":
    system = QASystem.from_bundle(bundle)
    knowledge.add_passages(system, [knowledge.Passage("Scale", "A passage added by a knowledge edit.")])
    knowledge.save_edits(system, bundle)
    return {"passages": len(system.index)}
  raise ValueError(f"unknown step {step!r}")


def _teacher_cache(d: str, data: Any, tokenizer: Any, spec: Any, params: Any, mesh: Any) -> dict[str, Any]:
  """J_read from a ranked candidates file (here the prepared BM25 top-200, where a pipeline gives the teacher
  retriever's), then the teacher's outputs on m passages of the first questions, as train.distill builds them."""
  # pylint: disable=import-outside-toplevel
  import ml_collections

  from rnr_jax import retrieval
  from rnr_jax import reader_data as rd
  from rnr_jax import tokenization as tk
  from rnr_jax.pool import UnifiedBatches, load_pool
  from rnr_jax.teacher import TeacherCache

  candidates = os.path.join(d, "candidates.npz")
  rd.save_ranked(candidates, {s: data.candidates(s).bm25_pids for s in TRAIN_SPLITS})
  pool_cfg = ml_collections.ConfigDict({"train_splits": TRAIN_SPLITS, "max_train_questions": TEACHER_QUESTIONS,
                                        "candidates": candidates, "retriever": "", "k1": K1, "subset": "",
                                        "encode_batch_size": BATCH, "positives": "gold_article"})
  workdir = os.path.join(d, "distill")
  shutil.rmtree(workdir, ignore_errors=True)  # the pool and the cache are reused when found: build them anew
  pool = load_pool(pool_cfg, data, tokenizer, workdir, mesh)
  read = retrieval.BatchEncoder(spec.read_fn(), mesh, 8 * M)

  def teacher(batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, length = batch["input_ids"].shape
    out = read(params, [(np.arange(rows), tk.EncodedBatch(*(batch[k] for k in tk.ENCODER_INPUTS)))], rows)
    return out[:, :length], out[:, length:2 * length], out[:, 2 * length]

  def cache(pids: np.ndarray, inputs: Any) -> TeacherCache:
    return TeacherCache.open_or_build(os.path.join(workdir, "teacher_cache"), {"bench": 1}, pids,
                                      spec.reader.reader_len, inputs, teacher, 8)

  batches = UnifiedBatches(pool, tokenizer, data.token_corpus(), spec, m=M, batch_size=16, seed=0, samples=1,
                           teacher_cache=cache)
  next(iter(batches))
  return {"questions": len(pool), "k1": K1, "m": M}


# ---- measuring -----------------------------------------------------------------------------


def _anon_kb(pid: int) -> tuple[int, int]:
  """``(RssAnon, VmRSS)`` of a process in KiB (0 once it has gone)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      fields = dict(line.split(":", 1) for line in f if ":" in line)
  except OSError:
    return 0, 0
  return tuple(int(fields.get(k, "0 kB").split()[0]) for k in ("RssAnon", "VmRSS"))  # type: ignore[return-value]


def measure(cmd: list[str], log: str) -> dict[str, Any]:
  """Runs ``cmd``; its wall time, CPU time and peak RSS (``wait4``, mapped file pages included), peak anonymous RSS
  (sampled every 0.2 s), and the JSON object its last output line holds, if any."""
  start = time.perf_counter()
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
    peak_anon = [0]

    def sample() -> None:
      while proc.returncode is None:
        peak_anon[0] = max(peak_anon[0], _anon_kb(proc.pid)[0])
        time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  if proc.returncode:
    with open(log, encoding="utf-8") as f:
      raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{f.read()[-3000:]}")
  with open(log, encoding="utf-8") as f:
    lines = [line for line in f.read().splitlines() if line.startswith("{")]
  extra = json.loads(lines[-1]) if lines else {}
  return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
          "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3), "peak_anon_gb": round(peak_anon[0] / 2**20, 3),
          "load_average": round(os.getloadavg()[1], 1), **extra}


def measure_size(size: int) -> dict[str, Any]:
  d = os.path.abspath(os.path.join(FLAGS.workdir, str(size)))
  path = os.path.join(d, "results.json")
  results = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}  # noqa: SIM115
  steps = [s for s in (FLAGS.steps or STEPS) if s not in results or s in FLAGS.redo]
  if not steps:
    return results
  if not os.path.exists(os.path.join(d, "prepared", "manifest.json")) or "prepare" in steps:
    results["corpus"] = make_corpus(FLAGS.data_dir, os.path.join(d, "data"), size)
  for step in steps:
    if step == "prepare":
      cmd = [sys.executable, "-m", "train.prepare", "--data_dir", os.path.join(d, "data"), "--out",
             os.path.join(d, "prepared"), "--bm25_topk", str(K1), "--force"]
    else:
      cmd = [sys.executable, "-m", "bench.scale", "--step", step, "--dir", d]
    print(f"{size}: {step} ...", flush=True)
    results[step] = measure(cmd, os.path.join(d, f"{step}.log"))
    print(f"{size}: {step} {results[step]}", flush=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  return results


# ---- the table -----------------------------------------------------------------------------


def growth(results: dict[int, dict[str, Any]], step: str, key: str) -> tuple[float, float] | None:
  """``(exponent, projection to 21M)`` of one quantity between the two largest sizes. The projection extends the
  line through them (a fixed part, such as importing JAX, plus a part per passage), never falling below it."""
  sizes = sorted(n for n in results if step in results[n])
  if len(sizes) < 2:
    return None
  (a, b), (va, vb) = sizes[-2:], (results[sizes[-2]][step][key], results[sizes[-1]][step][key])
  exponent = math.log(max(vb, 1e-9) / max(va, 1e-9)) / math.log(b / a)
  return exponent, vb + max(vb - va, 0.0) / (b - a) * (TARGET - b)


def _duration(s: float) -> str:
  return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def table(results: dict[int, dict[str, Any]]) -> str:
  """Per step and size: wall time, CPU time and peak RSS; exponents and 21M projections of all three."""
  sizes = sorted(results)
  span = f"{sizes[-2] / 1e6:g}M to {sizes[-1] / 1e6:g}M" if len(sizes) > 1 else ""
  header = ["step", *(f"{n / 1e6:g}M passages" for n in sizes), f"exponent wall / CPU / RSS ({span})",
            "21M: wall / CPU / peak RSS"]
  rows = []
  for step in STEPS:
    if not any(step in results[n] for n in sizes):
      continue
    cells = [f"{_duration(r['seconds'])} / {_duration(r['cpu_seconds'])} / {r['peak_rss_gb']:.2f} GB"
             if (r := results[n].get(step)) else "" for n in sizes]
    fits = [growth(results, step, key) for key in ("seconds", "cpu_seconds", "peak_rss_gb")]
    rows.append([step, *cells, " / ".join(f"{f[0]:.2f}" for f in fits) if all(fits) else "",
                 f"{_duration(fits[0][1])} / {_duration(fits[1][1])} / {fits[2][1]:.1f} GB" if all(fits) else ""])
  return report.markdown_table(header, rows)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.step:
    print(json.dumps(run_step(FLAGS.step, FLAGS.dir)))
    return
  results = {}
  for size in map(int, FLAGS.sizes):
    results[size] = measure_size(size)
  text = table(results)
  print(text)
  if not FLAGS.no_record:
    sizes = "" if FLAGS.sizes == flags.FLAGS["sizes"].default else f" --sizes {','.join(FLAGS.sizes)}"
    report.record("scale", "Cost by corpus size", text, FLAGS.note,
                  command=f"python -m bench.scale --data_dir $RNR_DATA --workdir runs/scale{sizes}")


if __name__ == "__main__":
  app.run(main)
