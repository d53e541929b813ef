r"""The whole method in one command: data -> teacher system -> filter -> student -> KD -> finetuning -> bundle.

  python -m train.pipeline --config configs/mini.py --workdir W [--data_dir ../shared/data]
  python -m train.pipeline --config configs/smoke.py --workdir W          # minutes: tiny models, a data slice
  python -m train.pipeline --config configs/mini.py --workdir W --results_md docs/results.md

Stages, in order (each writes ``W/<stage>/`` and, when finished, ``W/stages/<stage>.json`` with its wall time and
summary; a finished stage is skipped, an interrupted one resumes from its checkpoints, so running the same
command again continues an interrupted pipeline):

  prepare            DPR passages, token-ID corpus, BM25 candidates (``W/prepared``; a slice with ``slice.*``)
  teacher_retriever  two encoders at full width (train.retriever), corpus embeddings, top-k candidates of every split
  teacher_reader     the reader with passage ranker over the teacher retriever's candidates (train.reader)
  eval_teacher       EM of the teacher system (retriever + reader, float32 exact index) on the dev splits
  filter             the passage filter (train.filter) and its subset; answer survival and top-20 change
  eval_filtered      the teacher system over the kept passages only
  merge_retriever    (merge.enabled, a merge.scales > 0) a shared retriever from the student's pretrained encoder
  student_retriever  one shared encoder, first d dims (train.retriever over the subset; from MiniLM, fewer layers, or
                     from the teacher reader's encoder: student_init; optionally distilling the teacher retriever's
                     scores: student_retriever_teacher); skipped with student_retriever_stage=False
  distill            the unified retriever-reader distilled from the teacher reader (train.distill); from the
                     student retriever, or (student_retriever_stage=False) from the student_init encoder, learning
                     retrieval here (student_retriever_teacher: also from the teacher retriever's scores)
  eval_distill       its EM (float32 weights, exact index of the subset)
  finetune           iterative finetuning, Algorithm 1 (train.finetune)
  eval_finetune      its EM (float32 weights, exact index of the subset)
  merge              (merge.enabled) the finetuned student moved part of the way back to its pretrained weights
                     and + scale x the merge retriever's task vector, both weights chosen on held-out training
                     questions (rnr_jax.merge)
  eval_merge         its EM (float32 weights, exact index of the subset)
  bundle             INT8 index, FP16 (or int8) weights, token ids, bz2/lzma (infer.export) and the bundle's EM
  report             W/report.json, W/report.md, W/figure1.png (Tables 3 and 4, Figure 1 of the paper)

Every stage reads its settings from the stage config named in the pipeline config (``configs/retriever.py`` ...),
changed by that config's overrides; the pipeline wires the stages' inputs and outputs together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from infer import encode as encode_lib
from infer import evaluate as evaluate_lib
from infer import export as export_lib
from rnr_jax import distill as distill_lib
from rnr_jax import merge as merge_lib
from rnr_jax import passage_filter, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import report as report_lib
from rnr_jax import tokenization as tk
from rnr_jax.config import apply_override, load_config
from rnr_jax.data import PreparedData
from rnr_jax.data.prepared import PrepareSettings, prepare
from rnr_jax.index import DenseIndex
from rnr_jax.io import atomic_write_json, atomic_write_text
from rnr_jax.metrics import answer_top_k_accuracy
from rnr_jax.models import Params
from rnr_jax.qa_system import InferenceSettings, QASystem, SystemSpec, encode_passages
from train import distill as distill_stage
from train import filter as filter_stage
from train import finetune as finetune_stage
from train import reader as reader_stage
from train import retriever as retriever_stage

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIEVAL_SETTINGS = ("pooling", "retrieval_dim", "normalize", "passage_token_type")  # must match to merge encoders
STAGES = ("prepare", "teacher_retriever", "teacher_reader", "eval_teacher", "filter", "eval_filtered",
          "merge_retriever", "student_retriever", "distill", "eval_distill", "finetune", "eval_finetune", "merge",
          "eval_merge", "bundle", "report")


def _differing_settings(retriever_spec: Any, want: Mapping[str, Any]) -> list[str]:
  """The names of ``want``'s retrieval settings that ``retriever_spec`` holds with another value."""
  return [k for k, v in want.items() if getattr(retriever_spec, k) != v]


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  config_flags.DEFINE_config_file("config", "configs/mini.py", "Pipeline config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory: every stage's outputs, the bundle and the report.")
  flags.DEFINE_string("data_dir", None, "Our jsonl files (corpus.jsonl, *_train.jsonl, *_dev.jsonl); default: the "
                      "config's data_dir (RNR_DATA or ../shared/data).")
  flags.DEFINE_string("until", None, "Stop after this stage.")
  flags.DEFINE_list("redo", [], "Stages to run again even if finished (their later stages are not redone).")
  flags.DEFINE_string("results_md", None, "Also write the report's markdown here (e.g. docs/results.md).")
  flags.mark_flag_as_required("workdir")


_WEIGHTS_LABEL = {"float16": "FP16", "float32": "FP32", "float16+int8-embeddings": "FP16 + int8 embeddings",
                  "int8": "int8"}


def _reads(max_read: int) -> str:
  """How many retrieved passages an evaluation reads (``eval.max_read`` / ``bundle.max_read``)."""
  if max_read == 1:
    return "the top passage (m'=1)"
  return "m' = 1 up to all retrieved" if max_read <= 0 else f"m' = 1 up to {max_read}"


class Pipeline:
  """Runs the stages of a pipeline config in a work directory (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, data_dir: str | None = None,
               results_md: str | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.data_dir = os.path.abspath(data_dir or config.data_dir)
    self.results_md = results_md
    self.prepared = os.path.join(self.workdir, "prepared")
    self.dev_splits = tuple(config.dev_splits)
    self._data: PreparedData | None = None
    self._mesh = None
    os.makedirs(os.path.join(self.workdir, "stages"), exist_ok=True)

  # ---- bookkeeping ----------------------------------------------------------------------

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def _marker(self, stage: str) -> str:
    return self.path("stages", f"{stage}.json")

  def finished(self, stage: str) -> dict[str, Any] | None:
    """The summary a finished stage recorded, or None."""
    try:
      with open(self._marker(stage), encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except json.JSONDecodeError as e:
      raise ValueError(f"{self._marker(stage)}: corrupt stage record ({e}); delete it to run the stage again") from e

  def run(self, until: str | None = None, redo: Sequence[str] = ()) -> dict[str, Any]:
    """Runs every unfinished stage (and those in ``redo``) up to ``until``; returns ``{stage: record}``."""
    unknown = sorted((set(redo) | ({until} if until else set())) - set(STAGES))
    if unknown:
      raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    self.validate()
    records = {}
    for stage in STAGES:
      record = None if stage in redo else self.finished(stage)
      if record is None:
        logging.info("=== stage %s ===", stage)
        start = time.perf_counter()
        summary = getattr(self, f"stage_{stage}")()
        record = {"stage": stage, "seconds": round(time.perf_counter() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary}
        if jax.process_index() == 0:
          atomic_write_json(self._marker(stage), record)
        logging.info("=== stage %s finished in %.0f s ===", stage, record["seconds"])
      else:
        logging.info("=== stage %s: finished earlier (%s), skipped ===", stage, record["finished"])
      records[stage] = record
      if stage == until:
        break
    return records

  def validate(self) -> None:
    """Loads every stage config with its overrides, so a typo fails now rather than an hour in."""
    if self.config.student_init not in ("minilm", "teacher_reader"):
      raise ValueError(f"student_init must be 'minilm' or 'teacher_reader', got {self.config.student_init!r}")
    names = ["teacher_retriever", "teacher_reader", "filter", "student_retriever", "distill", "finetune"]
    init_scale = float(self.config.merge.init_scale)
    if init_scale < 0:
      raise ValueError(f"merge.init_scale must be >= 0, got {init_scale}")
    if init_scale and (self.config.student_init != "teacher_reader" or self.config.student_retriever_stage):
      raise ValueError("merge.init_scale needs student_init='teacher_reader' and student_retriever_stage=False")
    if self.config.merge.enabled or init_scale:
      names.append("merge_retriever")
      for key in ("scales", "base_weights"):
        values = tuple(self.config.merge[key])
        if not values or any(not 0 <= float(x) <= (1 if key == "base_weights" else float("inf")) for x in values):
          raise ValueError(f"merge.{key} must be non-empty, in [0, 1] for base_weights, >= 0 for scales; got {values}")
      if self.config.merge.base not in ("", "teacher_reader"):
        raise ValueError(f"merge.base must be '' or 'teacher_reader', got {self.config.merge.base!r}")
      if int(self.config.merge.select_questions) <= 0:
        raise ValueError("merge.select_questions must be positive (the held-out questions that choose the scale)")
      for path in self.config.merge.soup:
        if not os.path.isdir(str(path)):
          raise FileNotFoundError(f"merge.soup: {path} is not a directory (a unified student's export, e.g. another "
                                  "workdir's finetune/best)")
    for name in names:
      if name not in self.config.stages:
        raise KeyError(f"the pipeline config has no stages.{name}")
      try:
        self.stage_config(name, {})
      except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"stages.{name} of the pipeline config: {e}") from e

  # ---- shared helpers -------------------------------------------------------------------

  @property
  def data(self) -> PreparedData:
    if self._data is None:
      self._data = PreparedData.load(self.prepared)
    return self._data

  @property
  def mesh(self) -> jax.sharding.Mesh:
    if self._mesh is None:
      self._mesh = retrieval.data_mesh()
    return self._mesh

  def stage_config(self, name: str, wiring: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The stage's config file with the pipeline's overrides, then the wiring (inputs and outputs)."""
    section = self.config.stages[name]
    path = section.config if os.path.isabs(section.config.split(":")[0]) else os.path.join(ROOT, section.config)
    cfg = load_config(path, tuple(self.config.common_overrides) + tuple(section.overrides))
    for key, value in {"prepared_dir": self.prepared, "data_dir": self.data_dir, **wiring}.items():
      apply_override(cfg, key, repr(value))
    return cfg

  def questions(self, split: str) -> list:
    n = int(self.config.eval.questions)
    return self.data.questions(split)[:n or None]

  def evaluate(self, system: QASystem, *, rule: str | None = None, max_read: int | None = None
               ) -> dict[str, dict[str, Any]]:
    """infer.evaluate's summary of ``system`` on each dev split (the pipeline's eval settings, unless given)."""
    e = self.config.eval
    rule = rule or e.rule
    max_read = int(e.max_read) if max_read is None else max_read
    results = {}
    for split in self.dev_splits:
      summary, _ = evaluate_lib.evaluate(system, self.questions(split), top_k=int(e.top_k), rule=rule,
                                         passage_score_weight=float(e.passage_score_weight),
                                         batch_size=int(e.batch_size), max_read=max_read)
      logging.info("%s: EM %.4f (m'=%d), %.2f questions/s", split, summary["em"], summary["best_read_passages"],
                   summary["questions_per_s"])
      results[split] = summary
    return results

  def settings(self) -> InferenceSettings:
    e = self.config.eval
    return InferenceSettings(top_k=int(e.top_k), read_passages=int(e.top_k), rule=e.rule,
                             passage_score_weight=float(e.passage_score_weight))

  def subset_pids(self) -> np.ndarray:
    return passage_filter.subset_ids(self.path("filter", "subset.npz"), self.data.num_passages)

  def corpus_text_bytes(self, pids: np.ndarray) -> int:
    """UTF-8 bytes of the passages' title and text (the uncompressed text corpus a DPR system ships)."""
    table = self.data.passages
    return int(sum(len(table.titles[p].encode()) + len(table.texts[p].encode()) + 2 for p in pids.tolist()))

  # ---- stages ---------------------------------------------------------------------------

  def stage_prepare(self) -> dict[str, Any]:
    p = self.config.prepare
    data_dir = self.data_dir
    if self.config.source == "tfds_squad":
      data_dir = write_tfds_squad(self.path("data_tfds"), self.config.tfds.data_dir or None,
                                  download=bool(self.config.tfds.download), limit=int(self.config.tfds.limit) or None)
    elif self.config.source != "jsonl":
      raise ValueError(f"source must be 'jsonl' or 'tfds_squad', got {self.config.source!r}")
    if int(self.config.slice.questions):
      data_dir = write_slice(self.data_dir, self.path("data_slice"), int(self.config.slice.questions),
                             int(self.config.slice.distractors), seed=int(self.config.seed))
    settings = PrepareSettings(words_per_passage=int(p.words_per_passage), bm25_topk=int(p.bm25_topk),
                               hard_negatives=int(p.hard_negatives),
                               max_train_questions=int(p.max_train_questions) or None, compress=tuple(p.compress))
    result = prepare(data_dir, self.prepared, settings, echo=logging.info)
    m = result.manifest
    return {"data_dir": data_dir, "counts": m["counts"], "bytes_per_passage": m["bytes_per_passage"],
            "bm25": {s: m["splits"][s]["metrics"] for s in self.dev_splits}}

  def _retriever_candidates(self, run: str, k: int) -> str:
    """Top-k candidates of every prepared split by a run's exported retriever over its saved embeddings."""
    out = self.path(run, "candidates.npz")
    spec, params, model = retrieval.load_retriever(self.path(run, "best"), self.mesh)
    embeddings = self.path(run, "embeddings")
    # Reuses the embeddings the trainer kept of its best evaluation (encodes only if they are missing).
    encode_lib.encode(out=embeddings, prepared=self.prepared, spec=spec, params=params,
                      fingerprint=model["fingerprint"], mesh=self.mesh,
                      batch_size=int(self.config.encode_batch_size), chunk_size=4096)
    vectors, _ = retrieval.load_embeddings(embeddings)
    tokenizer = tk.Tokenizer.from_pretrained(self.data.tokenizer_path)
    encoder = retrieval.BatchEncoder(spec.embed_fns()[0], self.mesh, int(self.config.encode_batch_size))
    ranked = {}
    for split in self.data.splits:
      q = retrieval.encode_questions(encoder, params, tokenizer, [x.question for x in self.data.questions(split)],
                                     max_len=spec.question_len, buckets=spec.buckets)
      ranked[split] = retrieval.search_exact(q, np.asarray(vectors), k)[0].astype(np.int32)
    rd.save_ranked(out, ranked)
    return out

  def stage_teacher_retriever(self) -> dict[str, Any]:
    run = self.path("teacher_retriever")
    cfg = self.stage_config("teacher_retriever", {"retriever.save_embeddings": True,
                                                  "retriever.eval_splits": self.dev_splits})
    retriever_stage.train_and_evaluate(cfg, run)
    self._retriever_candidates("teacher_retriever", int(self.config.candidates_k))
    return self._retriever_summary("teacher_retriever")

  def _retriever_summary(self, run: str) -> dict[str, Any]:
    best = retrieval.RetrieverExport(self.path(run, "best"))
    info = best.latest_info()
    best.close()
    return {"best_step": info["step"], "metrics": info["info"]["metrics"]}

  def stage_teacher_reader(self) -> dict[str, Any]:
    cfg = self.stage_config("teacher_reader", {"reader.candidates": self.path("teacher_retriever", "candidates.npz")})
    reader_stage.train_and_evaluate(cfg, self.path("teacher_reader"))
    return {"eval": _last_best(self.path("teacher_reader", "eval.jsonl"))}

  def exact_system(self, spec: SystemSpec, params: Params, vectors: np.ndarray, pids: np.ndarray) -> QASystem:
    """A system over an exact index of ``vectors`` (rows: passages ``pids``), the pipeline's eval settings."""
    index = DenseIndex.build(np.asarray(vectors, np.float32), "exact", ids=pids, num_eval_queries=0)
    tokenizer = tk.Tokenizer.from_pretrained(self.data.tokenizer_path)
    return QASystem.from_parts(spec, params, index, self.data.token_corpus(), tokenizer, settings=self.settings(),
                               mesh=self.mesh)

  def teacher_system(self, pids: np.ndarray | None) -> tuple[QASystem, dict[str, Any]]:
    """The teacher system (float32, exact index over ``pids``, default all) and its footprint."""
    spec, params = export_lib.load_system(self.path("teacher_reader", "best"),
                                          self.path("teacher_retriever", "best"), self.mesh)
    vectors, _ = retrieval.load_embeddings(self.path("teacher_retriever", "embeddings"))
    pids = np.arange(self.data.num_passages) if pids is None else pids
    system = self.exact_system(spec, params, vectors[pids], pids)
    footprint = {"retriever": _nbytes(params["retriever"]), "reader": _nbytes(params["reader"]),
                 "index": int(len(pids) * vectors.shape[1] * 4), "corpus": self.corpus_text_bytes(pids)}
    footprint["total"] = report_lib.total(footprint)
    return system, footprint

  def stage_eval_teacher(self) -> dict[str, Any]:
    system, footprint = self.teacher_system(None)
    return {"footprint": footprint, "results": self.evaluate(system)}

  def stage_filter(self) -> dict[str, Any]:
    candidates = self.path("teacher_retriever", "candidates.npz")
    cfg = self.stage_config("filter", {"filter.candidates": candidates})
    filter_stage.train_and_evaluate(cfg, self.path("filter"))
    pids = self.subset_pids()
    keep = np.zeros(self.data.num_passages, bool)
    keep[pids] = True
    # The teacher's candidates restricted to the kept passages: J_read of distillation and finetuning.
    with np.load(candidates) as f:
      ranked = {split: restrict_ranking(f[split], keep) for split in f.files}
    rd.save_ranked(self.path("filter", "candidates.npz"), ranked)
    # Survival of the dev questions' answer-holding passages and the teacher's top-20 before and after.
    vectors, _ = retrieval.load_embeddings(self.path("teacher_retriever", "embeddings"))
    spec, params, _ = retrieval.load_retriever(self.path("teacher_retriever", "best"), self.mesh)
    tokenizer = tk.Tokenizer.from_pretrained(self.data.tokenizer_path)
    encoder = retrieval.BatchEncoder(spec.embed_fns()[0], self.mesh, int(self.config.encode_batch_size))
    survival, top20 = {}, {}
    for split in self.dev_splits:
      questions = self.data.questions(split)
      positives = self.data.candidates(split).gold
      with_gold = [q for q in range(len(questions)) if len(positives[q])]
      survival[split] = float(np.mean([keep[np.asarray(positives[q])].any() for q in with_gold])) if with_gold else 0.0
      q = retrieval.encode_questions(encoder, params, tokenizer, [x.question for x in questions],
                                     max_len=spec.question_len, buckets=spec.buckets)
      answers = [x.answers for x in questions]
      before = retrieval.evaluate_retrieval(q, vectors, answers, self.data.matcher(), (20,))["top20"]
      after = retrieval.evaluate_retrieval(q, np.asarray(vectors)[pids], answers, self.data.matcher(), (20,),
                                           passage_ids=pids)["top20"]
      top20[split] = {"before": before, "after": after}
    with open(self.path("filter", "subset.json"), encoding="utf-8") as f:
      subset = json.load(f)
    return {**subset, "survival": survival, "top20": top20,
            "sweep": keep_sweep(self.data, np.load(self.path("filter", "passage_scores.npy")), candidates,
                                self.dev_splits)}

  def stage_eval_filtered(self) -> dict[str, Any]:
    system, footprint = self.teacher_system(self.subset_pids())
    return {"footprint": footprint, "results": self.evaluate(system)}

  def stage_student_retriever(self) -> dict[str, Any]:
    if not self.config.student_retriever_stage:
      return {"skipped": "student_retriever_stage=False: distillation starts from the student_init encoder"}
    wiring = {"retriever.subset": self.path("filter", "subset.npz"), "retriever.eval_splits": self.dev_splits}
    if self.config.student_init == "teacher_reader":
      wiring["model.init"] = self.path("teacher_reader", "best")
    if self.config.student_retriever_teacher:
      wiring.update(self._retriever_teacher_wiring("retriever.teacher"))
    cfg = self.stage_config("student_retriever", wiring)
    retriever_stage.train_and_evaluate(cfg, self.path("student_retriever"))
    return self._retriever_summary("student_retriever")

  def _retriever_teacher_wiring(self, field: str) -> dict[str, str]:
    """The teacher system's retriever and its corpus embeddings as ``<field>`` and ``<field>_embeddings``."""
    return {field: self.path("teacher_retriever", "best"),
            f"{field}_embeddings": self.path("teacher_retriever", "embeddings")}

  def _pool_wiring(self) -> dict[str, Any]:
    return {"pool.candidates": self.path("filter", "candidates.npz"), "pool.subset": self.path("filter", "subset.npz"),
            "eval.split": self.dev_splits[0]}

  def _heads_wiring(self) -> dict[str, Any]:
    if self.config.student_init == "teacher_reader":
      return {"unified.init_heads": self.path("teacher_reader", "best")}
    return {}

  def stage_distill(self) -> dict[str, Any]:
    wiring = {"distill.teacher": self.path("teacher_reader", "best"), **self._pool_wiring(), **self._heads_wiring()}
    if self.config.student_retriever_stage:
      wiring["unified.init_retriever"] = self.path("student_retriever", "best")
    elif self.config.student_init == "teacher_reader":
      wiring["model.init"] = self.path("teacher_reader", "best")
    init_scale = float(self.config.merge.init_scale)
    if init_scale:
      # The student starts from the teacher reader plus init_scale x the merge retriever's task vector (its heads
      # are the teacher's): a head start on retrieval that distillation then keeps reading well.
      wiring["model.init"] = wiring["unified.init_heads"] = self._merged_student_init(init_scale, wiring)
    if self.config.student_retriever_teacher:
      wiring.update(self._retriever_teacher_wiring("distill.retriever_teacher"))
    cfg = self.stage_config("distill", wiring)
    distill_stage.train_and_evaluate(cfg, self.path("distill"))
    summary = {"eval": _last_best(self.path("distill", "eval.jsonl"))}
    return {**summary, "init_scale": init_scale} if init_scale else summary

  def _merged_student_init(self, scale: float, wiring: Mapping[str, Any]) -> str:
    """Writes ``W/student_init/best``: the teacher reader's export with ``scale`` x the merge retriever's task vector
    added to its encoder (heads unchanged); returns that path (``merge.init_scale``, beyond the paper)."""
    if self.config.student_init != "teacher_reader" or self.config.student_retriever_stage:
      raise ValueError("merge.init_scale needs student_init='teacher_reader' and student_retriever_stage=False "
                       f"(got {self.config.student_init!r}, {self.config.student_retriever_stage})")
    source = self.path("teacher_reader", "best")
    _, _, params, info = rd.load_reader(source)
    params = jax.device_get(params)
    _, pretrained = retrieval.initial_encoder(self._student_base_model())
    if pretrained is None:
      raise ValueError("merge.init_scale: the student's base encoder is a random initialisation (set merge.base)")
    student = self.stage_config("distill", wiring)
    want = {"pooling": student.model.pooling, "retrieval_dim": int(student.model.retrieval_dim),
            "normalize": bool(student.unified.normalize),
            "passage_token_type": int(student.unified.passage_token_type)}
    merged = merge_lib.merge_encoder(params, [(scale, self._retriever_task_vector(want, pretrained))])
    path = self.path("student_init", "best")
    export = rd.ParamsExport(path)
    try:
      export.save(int(info.pop("step", 0)), jax.device_put(merged), {**info, "merge": {"init_scale": scale}})
    finally:
      export.close()
    return path

  def stage_finetune(self) -> dict[str, Any]:
    cfg = self.stage_config("finetune", {"finetune.init": self.path("distill", "best"), **self._pool_wiring()})
    finetune_stage.train_and_evaluate(cfg, self.path("finetune"))
    return {"eval": _last_best(self.path("finetune", "eval.jsonl"))}

  def unified_vectors(self, run: str, spec: SystemSpec, params: Any, pids: np.ndarray) -> np.ndarray:
    """The kept passages encoded by a unified run's exported model: the run's last fresh index when it encoded
    exactly these parameters and passages (its final evaluation), else encoded now (and kept for the bundle)."""
    cache = self.path(run, "index")
    vectors = distill_lib.load_cached_vectors(cache, params, pids)
    if vectors is not None:
      logging.info("Reusing %s's encoding of the %d kept passages.", run, len(pids))
      return vectors
    corpus = self.data.token_corpus()
    tokenizer = tk.Tokenizer.from_pretrained(self.data.tokenizer_path)
    vectors = encode_passages(spec, params, tokenizer, [corpus[p] for p in pids.tolist()], self.mesh,
                              batch_size=int(self.config.encode_batch_size), progress=True)
    distill_lib.save_cached_vectors(cache, vectors, params, pids)
    return vectors

  def unified_system(self, run: str) -> tuple[QASystem, dict[str, Any]]:
    """A unified run's exported model (float32, exact index of the subset) and its footprint."""
    spec, params = export_lib.load_system(self.path(run, "best"), None, self.mesh)
    pids = self.subset_pids()
    vectors = self.unified_vectors(run, spec, params, pids)
    system = self.exact_system(spec, params, vectors, pids)
    footprint = {"retriever": 0, "reader": _nbytes(params), "shared_encoder": True,
                 "index": int(vectors.size * 4), "corpus": self.corpus_text_bytes(pids)}
    footprint["total"] = report_lib.total(footprint)
    return system, footprint

  def _evaluate_unified(self, run: str) -> dict[str, Any]:
    system, footprint = self.unified_system(run)
    return {"footprint": footprint, "results": self.evaluate(system)}

  def stage_eval_distill(self) -> dict[str, Any]:
    return self._evaluate_unified("distill")

  def stage_eval_finetune(self) -> dict[str, Any]:
    return self._evaluate_unified("finetune")

  # ---- merge (beyond the paper: rnr_jax.merge) ---------------------------------------------

  def _student_base_model(self) -> ml_collections.ConfigDict:
    """The model config of the merge's base: the pretrained encoder the student started from (merge.base ""), or
    the teacher reader's export (merge.base "teacher_reader": the student's and merge retriever's common ancestor,
    for randomly initialised models)."""
    if self.config.merge.base == "teacher_reader":
      model = self.stage_config("teacher_reader", {}).model
      model.init = self.path("teacher_reader", "best")
      return model
    if self.config.student_init == "teacher_reader":
      return self.stage_config("teacher_reader", {}).model
    return self.stage_config("student_retriever" if self.config.student_retriever_stage else "distill", {}).model

  def _merge_retriever_needed(self) -> bool:
    m = self.config.merge
    return (bool(m.enabled) and any(float(x) > 0 for x in m.scales)) or float(m.init_scale) > 0

  def stage_merge_retriever(self) -> dict[str, Any]:
    m = self.config.merge
    if not self._merge_retriever_needed():
      return {"skipped": "merge.enabled=False" if not m.enabled else
              "merge.scales are all 0 and merge.init_scale is 0: no retriever task vector"}
    base = self._student_base_model()
    wiring = {"model.init": base.init, "model.num_layers": base.num_layers, "retriever.shared": True,
              "retriever.eval_splits": (), "retriever.holdout_tail": int(m.select_questions)}
    if self.config.student_retriever_teacher:
      wiring.update(self._retriever_teacher_wiring("retriever.teacher"))
    cfg = self.stage_config("merge_retriever", wiring)
    retriever_stage.train_and_evaluate(cfg, self.path("merge_retriever"))
    return {"steps": int(cfg.train.num_steps), "base": str(base.init)}

  def merge_questions(self) -> dict[str, list]:
    """The last merge.select_questions questions of each merge split (held out from the merge retriever)."""
    n = int(self.config.merge.select_questions)
    return {split: self.data.questions(split)[-n:] for split in self.config.merge.splits}

  def _retriever_task_vector(self, want: Mapping[str, Any], pretrained: Params) -> Params | None:
    """The merge retriever's encoder minus ``pretrained``, after checking its retrieval settings are ``want``'s
    (the student's ``pooling``, ``retrieval_dim``, ``normalize``, ``passage_token_type``); None when not trained."""
    if not self._merge_retriever_needed():
      return None
    path = self.path("merge_retriever", "best")
    rspec, rparams, _ = retrieval.load_retriever(path)
    differing = _differing_settings(rspec, want)
    if not rspec.shared or differing:
      raise ValueError(f"{path}: the merge retriever must be a shared encoder with the student's retrieval "
                       f"settings (differing: {differing or ['shared']})")
    return merge_lib.task_vector(jax.device_get(rparams["encoder"]), pretrained, what="the merge retriever")

  def stage_merge(self) -> dict[str, Any]:
    m = self.config.merge
    if not m.enabled:
      return {"skipped": "merge.enabled=False"}
    spec, params = export_lib.load_system(self.path("finetune", "best"), None, self.mesh)
    params = jax.device_get(params)
    _, pretrained = retrieval.initial_encoder(self._student_base_model())
    if pretrained is None:
      raise ValueError("merge: the student's base encoder is a random initialisation (set merge.base)")
    want = {k: getattr(spec.retriever, k) for k in RETRIEVAL_SETTINGS}
    vector = self._retriever_task_vector(want, pretrained)
    # merge.soup: the uniform average of this student and other students finetuned from the same start, tried as a
    # second starting point of the same grid (key 1.0; 0.0 = this student alone).
    starts = {0.0: params}
    soup = [str(p) for p in m.soup]
    if soup:
      ingredients = [params]
      for path in soup:
        ispec, iparams = export_lib.load_system(path, None, self.mesh)
        differing = _differing_settings(ispec.retriever, want)
        if differing:
          raise ValueError(f"merge.soup: {path} retrieves with other settings than the student ({differing})")
        ingredients.append(jax.device_get(iparams))
      starts[1.0] = merge_lib.average(ingredients, [self.path("finetune", "best"), *soup])
      del ingredients
    # Held-out questions and their candidate passages: the teacher's top select_k over the kept passages.
    questions = self.merge_questions()
    teacher, _ = self.teacher_system(self.subset_pids())
    cands: set[int] = set()
    for qs in questions.values():
      ids, _ = teacher.search([q.question for q in qs], int(m.select_k))
      cands.update(int(i) for i in np.asarray(ids).ravel() if i >= 0)
    del teacher
    pids = np.array(sorted(cands), np.int64)
    corpus = self.data.token_corpus()
    tokenizer = tk.Tokenizer.from_pretrained(self.data.tokenizer_path)
    records = [corpus[p] for p in pids.tolist()]
    trials, scores = {}, {}
    grid = sorted({(s, float(a), float(x)) for s in starts for a in m.base_weights for x in m.scales})
    for key in grid:
      start, weights = starts[key[0]], key[1:]
      merged = jax.device_put(merge_lib.merge_encoder(start, merge_lib.student_terms(
          start["encoder"], pretrained, vector, *weights)))
      vectors = encode_passages(spec, merged, tokenizer, records, self.mesh,
                                batch_size=int(self.config.encode_batch_size))
      system = self.exact_system(spec, merged, vectors, pids)
      trial = {}
      for split, qs in questions.items():
        summary, _ = evaluate_lib.evaluate(system, qs, top_k=1, rule="dpr", passage_score_weight=0.0, max_read=1,
                                           progress=False)
        trial[split] = {"em": summary["em"], "top1": summary["top_k_accuracy"]["top1"]}
      label = "base_weight %g, scale %g" % weights + (", soup" if key[0] else "")
      trials[label] = trial
      scores[key] = float(np.mean([t["em"] for t in trial.values()]))
      logging.info("merge %s: %s", label, trial)
    use_soup, base_weight, scale = merge_lib.choose(scores)
    start, chosen_soup = starts[use_soup], (soup if use_soup else [])
    merged = merge_lib.merge_encoder(start, merge_lib.student_terms(start["encoder"], pretrained, vector,
                                                                    base_weight, scale))
    source = rd.ParamsExport(self.path("finetune", "best"))
    try:
      info = source.latest_info()
    finally:
      source.close()
    export = rd.ParamsExport(self.path("merge", "best"))
    try:
      step = int(info.pop("step", 0))
      export.save(step, jax.device_put(merged), {**info, "merge": {"base_weight": base_weight, "scale": scale,
                                                                   "soup": chosen_soup}})
    finally:
      export.close()
    return {"base_weight": base_weight, "scale": scale, "soup": chosen_soup, "trials": trials,
            "candidates": len(pids),
            "questions": {s: len(q) for s, q in questions.items()}}

  def stage_eval_merge(self) -> dict[str, Any]:
    if not self.config.merge.enabled:
      return {"skipped": "merge.enabled=False"}
    return self._evaluate_unified("merge")

  def _final_run(self) -> str:
    """The unified run the bundle is built from."""
    return "merge" if self.config.merge.enabled else "finetune"

  def stage_bundle(self) -> dict[str, Any]:
    b = self.config.bundle
    run = self._final_run()
    spec, params = export_lib.load_system(self.path(run, "best"), None, self.mesh)
    out = self.path("bundle")
    summary = export_lib.export(out=out, prepared=self.prepared, spec=spec, params=params, mesh=self.mesh,
                                settings=dataclasses.replace(self.settings(), rule=self._bundle_rule(),
                                                             lexical_weight=float(b.lexical_weight)),
                                subset=self.path("filter", "subset.npz"),
                                index_kind=b.index_kind, weights_dtype=b.weights_dtype,
                                batch_size=int(self.config.encode_batch_size), recall_split=self.dev_splits[0],
                                overwrite=True, vectors=self.unified_vectors(run, spec, params,
                                                                             self.subset_pids()))
    rows = {r["component"]: r for r in summary["footprint"]}
    footprint = {"retriever": 0, "shared_encoder": True, "reader": _row_bytes(rows, "model"),
                 "index": _row_bytes(rows, "index"), "corpus": _row_bytes(rows, "corpus"),
                 "other": _row_bytes(rows, "other")}
    footprint["total"] = report_lib.total(footprint, (*report_lib.COMPONENTS, "other"))
    system = QASystem.from_bundle(out, mesh=self.mesh)
    max_read = int(b.max_read) if int(b.max_read) >= 0 else None
    return {"footprint": footprint, "index": summary["index"], "bundle_footprint": summary["footprint"],
            "results": self.evaluate(system, rule=self._bundle_rule(), max_read=max_read)}

  def _bundle_rule(self) -> str:
    return self.config.bundle.rule or self.config.eval.rule

  def _lexical_label(self) -> str:
    w = float(self.config.bundle.lexical_weight)
    return f", + BM25 fusion (weight {w:g})" if w > 0 else ""

  def _rule_label(self) -> str:
    rule = self._bundle_rule()
    return f", {rule} answer rule" if rule != self.config.eval.rule else ""

  def stage_report(self) -> dict[str, Any]:
    records = {s: self.finished(s) for s in STAGES[:-1]}
    rows = []
    names = {"eval_teacher": "teacher (two encoders + reader)", "eval_filtered": "+ passage filter",
             "eval_distill": "+ unified retriever-reader (KD)", "eval_finetune": "+ iterative finetuning",
             "eval_merge": "+ weight-space merge",
             "bundle": f"+ INT8 index, {_WEIGHTS_LABEL.get(self.config.bundle.weights_dtype, 'FP16')} weights, "
                       "token ids, bz2/lzma" + self._lexical_label() + self._rule_label()}
    for stage, name in names.items():
      s = records[stage]["summary"]
      if "skipped" in s:
        continue
      if stage == "eval_merge":
        chosen = records["merge"]["summary"]
        name += f" (pretrained weight {chosen['base_weight']:g}, retriever task vector {chosen['scale']:g})"
      rows.append(report_lib.system_row(name, stage, s["footprint"], s["results"]))
    retrieval_rows = [{"name": "BM25", "accuracy": {
        sp: {f"top{k}": m[f"bm25_top{k}_answer_acc"] for k in (1, 5, 20, 100)}
        for sp, m in records["prepare"]["summary"]["bm25"].items()}}]
    for stage, name in (("teacher_retriever", "teacher: two encoders, full width"),
                        ("student_retriever", "student: shared encoder, first d dims (over the subset)")):
      if "skipped" in records[stage]["summary"]:
        continue
      metrics = records[stage]["summary"]["metrics"]
      retrieval_rows.append({"name": name, "accuracy": {
          sp: {k.split("/")[1]: v for k, v in metrics.items() if k.startswith(sp + "/")} for sp in self.dev_splits}})
    for stage, name in (("eval_distill", "unified after KD (over the subset)"),
                        ("eval_finetune", "unified after finetuning (over the subset)"),
                        ("eval_merge", "unified after the merge (over the subset)"),
                        ("bundle", "bundle: INT8 index" + self._lexical_label() + " (over the subset)")):
      if "skipped" in records[stage]["summary"]:
        continue
      results = records[stage]["summary"]["results"]
      retrieval_rows.append({"name": name, "accuracy": {sp: r["top_k_accuracy"] for sp, r in results.items()}})
    f = records["filter"]["summary"]
    e, b = self.config.eval, self.config.bundle
    reading = f"answers by the {e.rule} rule from {_reads(int(e.max_read))}"
    if (self._bundle_rule(), int(b.max_read)) != (e.rule, -1):
      bundle_read = int(b.max_read) if int(b.max_read) >= 0 else int(e.max_read)
      chosen = ", ".join(f"{sp} {r['best_read_passages']}" for sp, r in records["bundle"]["summary"]["results"].items())
      reading += f" (the bundle: {self._bundle_rule()} rule from {_reads(bundle_read)}; best m': {chosen})"
    report = {
        "title": f"rnr-jax pipeline ({os.path.basename(self.config.name)})",
        "description": (f"Data {self.data_dir}: {self.data.num_passages} passages; dev EM on "
                        + ", ".join(f"{s} ({len(self.questions(s))} questions)" for s in self.dev_splits)
                        + f"; {e.top_k} passages retrieved, {reading}; EM at the best of those m' per split, as "
                        "the paper reports. Footprints count the files a system needs: weights, index and "
                        "passages (text for the uncompressed systems, the bundle's compressed files for the last "
                        "row)."),
        "dev_splits": list(self.dev_splits), "systems": rows, "retrieval": retrieval_rows,
        "filter": {k: f[k] for k in ("kept", "num_passages", "fraction", "survival", "top20", "sweep") if k in f},
        "stages": {s: {"seconds": r["seconds"]} for s, r in records.items()},
        "config": self.config.to_dict(),
    }
    first, last = rows[0], rows[-1]
    report["final_vs_teacher"] = {
        "footprint_ratio": first["footprint"]["total"] / last["footprint"]["total"],
        "em_fraction": {s: (last["em"][s] / first["em"][s]) if first["em"][s] else None for s in self.dev_splits}}
    paths = report_lib.write(report, self.workdir)
    if self.results_md and jax.process_index() == 0:
      atomic_write_text(self.results_md, report_lib.markdown(report, figure="results_figure1.png"))
      shutil.copyfile(paths["figure"], os.path.join(os.path.dirname(os.path.abspath(self.results_md)),
                                                    "results_figure1.png"))
    print(report_lib.markdown(report))
    return {"paths": paths, "final_vs_teacher": report["final_vs_teacher"]}


# ---- helpers ----------------------------------------------------------------------------


def _nbytes(params: Params) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def _row_bytes(rows: Mapping[str, Mapping[str, Any]], component: str) -> int:
  row = rows.get(component)
  return int(row["stored_bytes"]) if row else 0


def _last_best(path: str) -> dict[str, Any] | None:
  """The last evaluation marked best in an eval.jsonl (or the last one)."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    evals = [json.loads(line) for line in f if line.strip()]
  best = [e for e in evals if e.get("best")]
  return (best or evals or [None])[-1]


def write_slice(data_dir: str, out: str, questions: int, distractors: int, seed: int = 0) -> str:
  """A small data directory: the first ``questions`` of each split, their gold documents and random distractors."""
  rng = np.random.default_rng(seed)
  os.makedirs(out, exist_ok=True)
  splits = {}
  for name in sorted(os.listdir(data_dir)):
    if name.endswith(("_train.jsonl", "_dev.jsonl")):
      with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        rows = []
        for line in f:
          if line.strip():
            rows.append(json.loads(line))
          if len(rows) == questions:
            break
      splits[name] = rows
  gold = {r.get("gold_pid") for rows in splits.values() for r in rows} - {None}
  with open(os.path.join(data_dir, "corpus.jsonl"), encoding="utf-8") as f:
    docs = [json.loads(line) for line in f if line.strip()]
  others = [d for d in docs if d["id"] not in gold]
  picked = set(rng.choice(len(others), size=min(distractors, len(others)), replace=False).tolist())
  corpus = [d for d in docs if d["id"] in gold] + [d for i, d in enumerate(others) if i in picked]
  atomic_write_text(os.path.join(out, "corpus.jsonl"), "".join(json.dumps(d) + "\n" for d in corpus))
  for name, rows in splits.items():
    atomic_write_text(os.path.join(out, name), "".join(json.dumps(r) + "\n" for r in rows))
  return out


def restrict_ranking(rows: np.ndarray, keep: np.ndarray, width: int | None = None) -> np.ndarray:
  """Each row's passage ids that ``keep`` (bool per passage) keeps, in order, padded with -1 to ``width``."""
  out = np.full((len(rows), width or rows.shape[1]), rd.NO_PASSAGE, np.int32)
  for i, row in enumerate(rows):
    row = row[(row >= 0) & keep[np.maximum(row, 0)]][:out.shape[1]]
    out[i, :len(row)] = row
  return out


def keep_sweep(data: PreparedData, scores: np.ndarray, candidates: str, splits: Sequence[str],
               fractions: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> dict[str, Any]:
  """What keeping the top fraction of passages by filter score does, for each fraction.

  Per split: ``survival`` (questions with a gold answer-holding passage that keep at least one) and the top-1 /
  top-20 answer accuracy of the ranked candidates restricted to the kept passages.
  """
  order = np.argsort(-scores, kind="stable")
  out: dict[str, Any] = {}
  with np.load(candidates) as ranked:
    rankings = {s: ranked[s] for s in splits}
  for fraction in fractions:
    keep = np.zeros(len(scores), bool)
    keep[order[:int(round(fraction * len(scores)))]] = True
    row = {}
    for split in splits:
      questions, gold = data.questions(split), data.candidates(split).gold
      with_gold = [q for q in range(len(questions)) if len(gold[q])]
      kept = restrict_ranking(rankings[split], keep, width=20)
      accuracy = answer_top_k_accuracy(kept, [q.answers for q in questions], data.matcher(), (1, 20))
      row[split] = {"survival": float(np.mean([keep[np.asarray(gold[q])].any() for q in with_gold])),
                    "top1": accuracy[1], "top20": accuracy[20]}
    out[f"{fraction:g}"] = row
  return out


def write_tfds_squad(out: str, tfds_dir: str | None, *, download: bool = False, limit: int | None = None) -> str:
  """SQuAD v1.1 from TensorFlow Datasets as an open-domain data directory (our jsonl files) in ``out``.

  Its contexts become ``corpus.jsonl`` (train and validation contexts together), its questions
  ``squad_train.jsonl`` and ``squad_dev.jsonl`` with the gold context as ``gold_pid``.
  """
  from rnr_jax.data import tfds_sources  # pylint: disable=import-outside-toplevel  (tfds is heavy)

  train_docs, train_questions = tfds_sources.squad_open_domain("train", data_dir=tfds_dir, download=download,
                                                                limit=limit)
  dev_docs, dev_questions = tfds_sources.squad_open_domain("validation", data_dir=tfds_dir, download=download,
                                                            first_doc_id=len(train_docs), limit=limit)
  os.makedirs(out, exist_ok=True)
  atomic_write_text(os.path.join(out, "corpus.jsonl"), "".join(
      json.dumps({"id": d.id, "title": d.title, "text": d.text, "source": d.source}) + "\n"
      for d in (*train_docs, *dev_docs)))
  for name, questions in (("squad_train.jsonl", train_questions), ("squad_dev.jsonl", dev_questions)):
    atomic_write_text(os.path.join(out, name), "".join(
        json.dumps({"id": q.id, "question": q.question, "answers": list(q.answers), "gold_pid": q.gold_pid}) + "\n"
        for q in questions))
  return out


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, *, data_dir: str | None = None,
                 until: str | None = None, redo: Sequence[str] = (), results_md: str | None = None
                 ) -> dict[str, Any]:
  """Runs (or continues) the pipeline of ``config`` in ``workdir``; returns ``{stage: record}``."""
  return Pipeline(config, workdir, data_dir=data_dir, results_md=results_md).run(until=until, redo=redo)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  start = time.perf_counter()
  records = run_pipeline(FLAGS.config, FLAGS.workdir, data_dir=FLAGS.data_dir, until=FLAGS.until,
                         redo=FLAGS.redo, results_md=FLAGS.results_md)
  print(json.dumps({"workdir": os.path.abspath(FLAGS.workdir), "wall_s": round(time.perf_counter() - start, 1),
                    "stage_seconds": {s: r["seconds"] for s, r in records.items()},
                    "final_vs_teacher": records.get("report", {}).get("summary", {}).get("final_vs_teacher")}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
