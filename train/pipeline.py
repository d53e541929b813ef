r"""The whole method in one command: data -> teacher system -> filter -> student -> KD -> finetuning -> bundle.

  python -m train.pipeline --config configs/mini.py --workdir W [--data_dir ../shared/data]
  python -m train.pipeline --config configs/smoke.py --workdir W          # minutes: tiny models, a data slice
  python -m train.pipeline --config configs/paper.py --workdir W --corpus psgs_w100.tsv \
      --questions nq_train=biencoder-nq-train.json nq_dev=nq-dev.qa.csv      # any data train.prepare reads

Each stage (:data:`STAGES`) calls a stage trainer with its stage config from the pipeline config plus the wiring below
(the teacher retriever's candidates feed the reader, the filter and J_read; the filter's subset is the student's
corpus), writes ``W/<stage>/`` and, when finished, ``W/stages/<stage>.json`` (wall time, summary). A finished stage is
skipped and an interrupted one resumes from its checkpoints, so the same command continues an interrupted pipeline. The
student's topology is ``config.student``: ``paper`` (a retrieval-only shared encoder first, §2.2.2) or
``from_teacher_reader`` (distillation starts from the teacher reader, learning retrieval from the teacher retriever's
scores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from rnr_jax import deploy, embeddings, exports, passage_filter, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.config import apply_override, load_config
from rnr_jax.data import PreparedData
from rnr_jax.data.prepared import PrepareSettings, prepare
from rnr_jax.index import DenseIndex
from rnr_jax.io import atomic_write_json, atomic_write_text
from rnr_jax.metrics import answer_top_k_accuracy
from rnr_jax.qa_system import InferenceSettings, QASystem, evaluate_system
from rnr_jax.specs import SystemSpec
from rnr_jax.training import mesh as mesh_lib
from train import define_flags, input_errors_exit, setup
from train import distill as distill_stage
from train import filter as filter_stage
from train import finetune as finetune_stage
from train import reader as reader_stage
from train import report as report_lib
from train import retriever as retriever_stage
from train import sources

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ("paper", "from_teacher_reader")
TRAINED = ("teacher_retriever", "teacher_reader", "filter", "student_retriever", "distill", "finetune")
WEIGHTS_LABEL = {"float16": "FP16", "float32": "FP32", "float16+int8-embeddings": "FP16 + int8 embeddings",
                 "int8": "int8"}


class Pipeline:
  """Runs the stages of a pipeline config in a work directory (module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, data_dir: str | None = None,
               corpus: Sequence[str] = (), questions: Sequence[str] = (), results_md: str | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.data_dir = os.path.abspath(data_dir or config.data_dir)
    # --corpus / --questions, else the config's; both empty: the data directory's jsonl files.
    corpus, questions = (corpus, questions) if corpus else (tuple(config.corpus), tuple(config.questions))
    if questions and not corpus:
      raise ValueError("questions given without a corpus")
    self.inputs = (list(corpus), sources.parse_questions(questions))
    self.results_md = results_md
    self.prepared = self.path("prepared")
    self.dev_splits = tuple(config.dev_splits)
    self._data: PreparedData | None = None
    self._mesh = None
    os.makedirs(self.path("stages"), exist_ok=True)

  # ---- bookkeeping ----------------------------------------------------------------------

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def stages(self) -> list[str]:
    """The stages of this config, in order (``student_retriever`` only in the ``paper`` topology, ``eval_distill``
    only with ``eval_distilled``)."""
    return [s for s in STAGES if (s != "student_retriever" or self.config.student == "paper")
            and (s != "eval_distill" or self.config.eval_distilled)]

  def finished(self, stage: str) -> dict[str, Any] | None:
    """The record a finished stage wrote, or None."""
    marker = self.path("stages", f"{stage}.json")
    try:
      with open(marker, encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except json.JSONDecodeError as e:
      raise ValueError(f"{marker}: corrupt stage record ({e}); delete it to run the stage again") from e

  def run(self, until: str | None = None, redo: Sequence[str] = ()) -> dict[str, Any]:
    """Runs every unfinished stage (and those in ``redo``) up to ``until``; returns ``{stage: record}``."""
    names = self.stages()
    unknown = sorted((set(redo) | ({until} if until else set())) - set(names))
    if unknown:
      raise ValueError(f"unknown stage(s) {unknown}; stages: {names}")
    self.validate()
    records = {}
    for stage in names:
      if stage in redo:  # from scratch: a stage's checkpoints would otherwise resume its earlier run
        shutil.rmtree(self.path("prepared" if stage == "prepare" else stage), ignore_errors=True)
      record = None if stage in redo else self.finished(stage)
      if record is None:
        logging.info("=== stage %s ===", stage)
        start = time.perf_counter()
        summary = STAGES[stage](self)
        record = {"stage": stage, "seconds": round(time.perf_counter() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary}
        if jax.process_index() == 0:
          atomic_write_json(self.path("stages", f"{stage}.json"), record)
        logging.info("=== stage %s finished in %.0f s ===", stage, record["seconds"])
      else:
        logging.info("=== stage %s: finished earlier (%s), skipped ===", stage, record["finished"])
      records[stage] = record
      if stage == until:
        break
    return records

  def validate(self) -> None:
    """Loads every stage config with its overrides, so a typo fails now rather than an hour in."""
    if self.config.student not in TOPOLOGIES:
      raise ValueError(f"student must be one of {TOPOLOGIES}, got {self.config.student!r}")
    for name in TRAINED:
      if name == "student_retriever" and self.config.student != "paper":
        continue
      if name not in self.config.stages:
        raise KeyError(f"the pipeline config has no stages.{name}")
      try:
        self.stage_config(name, {})
      except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"stages.{name} of the pipeline config: {e}") from e

  @property
  def data(self) -> PreparedData:
    if self._data is None:
      self._data = PreparedData.load(self.prepared)
    return self._data

  @property
  def mesh(self) -> jax.sharding.Mesh:
    if self._mesh is None:
      self._mesh = mesh_lib.data_mesh()
    return self._mesh

  def stage_config(self, name: str, wiring: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The stage's config file with the pipeline's overrides, then the wiring (inputs and outputs)."""
    section = self.config.stages[name]
    path = section.config if os.path.isabs(section.config.split(":")[0]) else os.path.join(ROOT, section.config)
    cfg = load_config(path, tuple(self.config.common_overrides) + tuple(section.overrides))
    for key, value in {"prepared_dir": self.prepared, "data_dir": self.data_dir, **wiring}.items():
      apply_override(cfg, key, repr(value))
    return cfg

  def retriever_stage_config(self, name: str, wiring: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A retriever stage that evaluates the held-out and the dev splits and picks its best step on the held-out
    one, so no checkpoint is chosen on a dev set."""
    held_out = self.held_out_splits()
    cfg = self.stage_config(name, {"retriever.eval_splits": (*held_out, *self.dev_splits), **wiring})
    if held_out:
      top_k = cfg.retriever.select_metric.split("/")[1]
      apply_override(cfg, "retriever.select_metric", repr(f"{self.select_split()}/{top_k}"))
    return cfg

  def subset_pids(self) -> np.ndarray:
    return passage_filter.subset_ids(self.path("filter", "subset.npz"), self.data.num_passages)

  def tokenizer(self) -> tk.Tokenizer:
    return tk.Tokenizer.from_pretrained(self.data.tokenizer_path)

  # ---- systems and their evaluation --------------------------------------------------------

  def settings(self) -> InferenceSettings:
    e = self.config.eval
    return InferenceSettings(top_k=int(e.top_k), read_passages=int(e.top_k), rule=e.rule,
                             passage_score_weight=float(e.passage_score_weight))

  def evaluate(self, system: QASystem, *, rule: str | None = None, max_read: int | None = None
               ) -> dict[str, dict[str, Any]]:
    """EM and top-k accuracy of ``system`` on each dev split (the pipeline's eval settings, unless given). When more
    than one m' is read and the data has held-out training questions, m' is the one with the best mean EM on them,
    never chosen on a dev split."""
    e = self.config.eval
    max_read = int(e.max_read) if max_read is None else max_read

    def run(split: str) -> dict[str, Any]:
      summary, _ = evaluate_system(system, self.data.questions(split)[:int(e.questions) or None],
                                   top_k=int(e.top_k), rule=rule or e.rule,
                                   passage_score_weight=float(e.passage_score_weight), batch_size=int(e.batch_size),
                                   max_read=max_read)
      return summary

    held_out = self.held_out_splits() if max_read != 1 else []
    chosen = None
    if held_out:
      em_at = [run(s)["em_at"] for s in held_out]
      chosen = max(em_at[0], key=lambda n: (np.mean([em[n] for em in em_at]), -int(n)))
      logging.info("m' = %s: the best mean EM on %s", chosen, held_out)
    results = {}
    for split in self.dev_splits:
      summary = run(split)
      if chosen is not None:
        summary.update(em=summary["em_at"][chosen], f1=summary["f1_at"][chosen], best_read_passages=int(chosen),
                       read_passages_chosen_on=held_out)
      logging.info("%s: EM %.4f (m'=%d), %.2f questions/s", split, summary["em"], summary["best_read_passages"],
                   summary["questions_per_s"])
      results[split] = summary
    return results

  def exact_system(self, spec: SystemSpec, params: Any, vectors: np.ndarray, pids: np.ndarray) -> QASystem:
    """A system over an exact index of ``vectors`` (rows: passages ``pids``), the pipeline's eval settings."""
    index = DenseIndex.build(np.asarray(vectors, np.float32), "exact", ids=pids, num_eval_queries=0)
    return QASystem.from_parts(spec, params, index, self.data.token_corpus(), self.tokenizer(),
                               settings=self.settings(), mesh=self.mesh)

  def teacher_system(self, pids: np.ndarray | None) -> tuple[QASystem, dict[str, Any]]:
    """The teacher system (float32, exact index over ``pids``, default all) and its footprint."""
    spec, params = exports.load_system(self.path("teacher_reader", "best"), self.path("teacher_retriever", "best"),
                                       self.mesh)
    vectors, _ = embeddings.load(self.path("teacher_retriever", "embeddings"))
    pids = np.arange(self.data.num_passages) if pids is None else pids
    footprint = {"retriever": report_lib.nbytes(params["retriever"]), "reader": report_lib.nbytes(params["reader"]),
                 "index": int(len(pids) * vectors.shape[1] * 4), "corpus": self.corpus_text_bytes(pids)}
    return self.exact_system(spec, params, vectors[pids], pids), {**footprint, "total": report_lib.total(footprint)}

  def corpus_text_bytes(self, pids: np.ndarray) -> int:
    """UTF-8 bytes of the passages' title and text (the uncompressed text corpus a DPR system ships)."""
    table = self.data.passages
    return int(sum(len(table.titles[p].encode()) + len(table.texts[p].encode()) + 2 for p in pids.tolist()))

  def unified_vectors(self, run: str, spec: SystemSpec, params: Any, pids: np.ndarray) -> np.ndarray:
    """The kept passages encoded by a unified run's exported student: its last fresh index when that encoded
    exactly these parameters and passages (its final evaluation), else encoded now (and kept for the bundle)."""
    cache = self.path(run, "index")
    vectors = embeddings.load_fresh(cache, params, pids)
    if vectors is not None:
      logging.info("Reusing %s's encoding of the %d kept passages.", run, len(pids))
      return vectors
    corpus = self.data.token_corpus()
    vectors = retrieval.encode_passages(spec, params, self.tokenizer(), [corpus[p] for p in pids.tolist()], self.mesh,
                              batch_size=int(self.config.encode_batch_size), progress=True)
    if jax.process_index() == 0:
      embeddings.save(cache, vectors, embeddings.fresh_key(params, pids))
    return vectors

  def unified_system(self, run: str) -> tuple[QASystem, dict[str, Any]]:
    """A unified run's exported student (float32, exact index of the subset) and its footprint."""
    spec, params = exports.load_system(self.path(run, "best"), None, self.mesh)
    pids = self.subset_pids()
    vectors = self.unified_vectors(run, spec, params, pids)
    footprint = {"retriever": 0, "reader": report_lib.nbytes(params), "shared_encoder": True,
                 "index": int(vectors.size * 4), "corpus": self.corpus_text_bytes(pids)}
    return self.exact_system(spec, params, vectors, pids), {**footprint, "total": report_lib.total(footprint)}

  def evaluate_unified(self, run: str) -> dict[str, Any]:
    system, footprint = self.unified_system(run)
    return {"footprint": footprint, "results": self.evaluate(system)}

  def trained_summary(self, run: str) -> dict[str, Any]:
    """The metrics of a run's best export and the step they came from."""
    info = exports.read_info(self.path(run, "best"))
    return {"best_step": info["step"], "metrics": info["metrics"]}

  def teacher_retriever_wiring(self) -> dict[str, str]:
    return {"distill.retriever_teacher": self.path("teacher_retriever", "best"),
            "distill.retriever_teacher_embeddings": self.path("teacher_retriever", "embeddings")}

  def held_out_splits(self) -> list[str]:
    """The held-out splits of training questions (``prepare.holdout``), in name order."""
    return [s for s in self.data.splits if s.endswith("_holdout")]

  def select_split(self) -> str:
    """Where the trainers evaluate and choose their best step: the first held-out split, else the first dev split."""
    return (self.held_out_splits() or [self.dev_splits[0]])[0]

  def pool_wiring(self) -> dict[str, Any]:
    return {"pool.candidates": self.path("filter", "candidates.npz"), "pool.subset": self.path("filter", "subset.npz"),
            "eval.split": self.select_split()}


# ---- the trained stages' configs: the pipeline's stage config plus the wiring to earlier stages --------------------


def teacher_retriever_config(p: Pipeline) -> ml_collections.ConfigDict:
  return p.retriever_stage_config("teacher_retriever", {"retriever.save_embeddings": True})


def teacher_reader_config(p: Pipeline) -> ml_collections.ConfigDict:
  return p.stage_config("teacher_reader", {"reader.candidates": p.path("teacher_retriever", "candidates.npz"),
                                           "reader.eval_split": p.select_split()})


def filter_config(p: Pipeline) -> ml_collections.ConfigDict:
  # J+val, on which the filter's best step is chosen, comes from held-out training questions.
  return p.stage_config("filter", {"filter.candidates": p.path("teacher_retriever", "candidates.npz"),
                                   "filter.val_split": p.select_split()})


def student_retriever_config(p: Pipeline) -> ml_collections.ConfigDict:
  return p.retriever_stage_config("student_retriever", {"retriever.subset": p.path("filter", "subset.npz")})


def distill_config(p: Pipeline) -> ml_collections.ConfigDict:
  wiring = {"distill.teacher": p.path("teacher_reader", "best"), **p.pool_wiring()}
  if not p.config.eval_distilled:  # its evaluation would encode the corpus for a system nothing else reads
    wiring["train.eval_every"] = 0
  if p.config.student == "paper":
    wiring["unified.init_retriever"] = p.path("student_retriever", "best")
  else:
    wiring.update({"model.init": p.path("teacher_reader", "best"), **p.teacher_retriever_wiring()})
  return p.stage_config("distill", wiring)


def finetune_config(p: Pipeline) -> ml_collections.ConfigDict:
  return p.stage_config("finetune", {"finetune.init": p.path("distill", "best"), **p.pool_wiring()})


# Trained stage -> (its config in a pipeline, its trainer); bench.learning_curves reruns them.
TRAINERS: dict[str, tuple[Callable[[Pipeline], ml_collections.ConfigDict], Callable[..., Any]]] = {
    "teacher_retriever": (teacher_retriever_config, retriever_stage.train_and_evaluate),
    "teacher_reader": (teacher_reader_config, reader_stage.train_and_evaluate),
    "filter": (filter_config, filter_stage.train_and_evaluate),
    "student_retriever": (student_retriever_config, retriever_stage.train_and_evaluate),
    "distill": (distill_config, distill_stage.train_and_evaluate),
    "finetune": (finetune_config, finetune_stage.train_and_evaluate),
}


def train_stage(p: Pipeline, name: str) -> ml_collections.ConfigDict:
  """Runs the trained stage ``name`` into ``W/<name>`` with its pipeline config (resuming if it can); returns it."""
  config_fn, trainer = TRAINERS[name]
  cfg = config_fn(p)
  trainer(cfg, p.path(name))
  return cfg


# ---- the stages ----------------------------------------------------------------------------


def prepare_data(p: Pipeline) -> dict[str, Any]:
  """DPR passages, token-ID corpus, BM25 candidates (``W/prepared``; a data slice with ``slice.*``)."""
  c = p.config
  corpus, questions = p.inputs
  if not corpus:
    corpus, questions = sources.data_dir_specs(p.data_dir)
  tfds = sources.TfdsOptions(c.tfds.data_dir or None, bool(c.tfds.download), int(c.tfds.limit) or None)
  inputs = sources.build(corpus, questions, tfds)
  if int(c.slice.questions):
    corpus, questions = sources.write_slice(*inputs, p.path("data_slice"), int(c.slice.questions),
                                            int(c.slice.distractors), seed=int(c.seed))
    inputs = sources.build(corpus, questions)
  settings = PrepareSettings(words_per_passage=int(c.prepare.words_per_passage), bm25_topk=int(c.prepare.bm25_topk),
                             hard_negatives=int(c.prepare.hard_negatives),
                             max_train_questions=int(c.prepare.max_train_questions) or None,
                             holdout=int(c.prepare.holdout),
                             compress=tuple(c.prepare.compress), skip_bad=bool(c.prepare.skip_bad))
  m = prepare(*inputs, p.prepared, settings, echo=logging.info).manifest
  return {"corpus": list(corpus), "questions": dict(questions), "counts": m["counts"],
          "bytes_per_passage": m["bytes_per_passage"], "bm25": {s: m["splits"][s]["metrics"] for s in p.dev_splits}}


def teacher_retriever(p: Pipeline) -> dict[str, Any]:
  """The two-encoder retriever, then its top ``candidates_k`` passages of every question."""
  train_stage(p, "teacher_retriever")
  spec, params, _ = exports.load_retriever(p.path("teacher_retriever", "best"), p.mesh)
  vectors, _ = embeddings.load(p.path("teacher_retriever", "embeddings"))
  encoder = retrieval.BatchEncoder(spec.embed_fns()[0], p.mesh, int(p.config.encode_batch_size))
  ranked = {}
  for split in p.data.splits:
    q = retrieval.encode_questions(encoder, params, p.tokenizer(), [x.question for x in p.data.questions(split)],
                                   max_len=spec.question_len, buckets=spec.buckets)
    ranked[split] = retrieval.search_exact(q, np.asarray(vectors), int(p.config.candidates_k))[0].astype(np.int32)
  rd.save_ranked(p.path("teacher_retriever", "candidates.npz"), ranked)
  return p.trained_summary("teacher_retriever")


def teacher_reader(p: Pipeline) -> dict[str, Any]:
  """The reader with passage ranker, on the teacher retriever's candidates."""
  cfg = train_stage(p, "teacher_reader")
  evals = read_evals(p.path("teacher_reader", "eval.jsonl"))
  curve = [{"step": e["step"], "questions": e["step"] * int(cfg.train.batch_size),
            **{k: v for k, v in e.items() if k.startswith("em_")}} for e in evals]
  return {"eval": best_of(evals), "split": cfg.reader.eval_split, "curve": curve}


def eval_teacher(p: Pipeline) -> dict[str, Any]:
  """The teacher system end to end (float32 weights, exact index of every passage)."""
  system, footprint = p.teacher_system(None)
  return {"footprint": footprint, "results": p.evaluate(system)}


def filter_passages(p: Pipeline) -> dict[str, Any]:
  """The passage filter, its subset, the teacher's candidates restricted to it (J_read) and a keep-fraction sweep."""
  candidates = p.path("teacher_retriever", "candidates.npz")
  train_stage(p, "filter")
  pids = p.subset_pids()
  keep = np.zeros(p.data.num_passages, bool)
  keep[pids] = True
  with np.load(candidates) as f:
    rd.save_ranked(p.path("filter", "candidates.npz"),
                   {split: passage_filter.restrict_ranking(f[split], keep) for split in f.files})
  # Survival of the dev questions' answer-holding passages and the teacher's top-20 before and after.
  vectors, _ = embeddings.load(p.path("teacher_retriever", "embeddings"))
  spec, params, _ = exports.load_retriever(p.path("teacher_retriever", "best"), p.mesh)
  encoder = retrieval.BatchEncoder(spec.embed_fns()[0], p.mesh, int(p.config.encode_batch_size))
  survival, top20 = {}, {}
  for split in p.dev_splits:
    questions = p.data.questions(split)
    survival[split] = gold_survival(keep, p.data.candidates(split).gold)
    q = retrieval.encode_questions(encoder, params, p.tokenizer(), [x.question for x in questions],
                                   max_len=spec.question_len, buckets=spec.buckets)
    answers = [x.answers for x in questions]
    before = retrieval.evaluate_retrieval(q, vectors, answers, p.data.matcher(), (20,))["top20"]
    after = retrieval.evaluate_retrieval(q, np.asarray(vectors)[pids], answers, p.data.matcher(), (20,),
                                         passage_ids=pids)["top20"]
    top20[split] = {"before": before, "after": after}
  with open(p.path("filter", "subset.json"), encoding="utf-8") as f:
    subset = json.load(f)
  # The held-out splits say which fraction to keep; the dev splits are only reported.
  sweep = keep_sweep(p.data, np.load(p.path("filter", "passage_scores.npy")), candidates,
                     p.held_out_splits() + list(p.dev_splits))
  return {**subset, "survival": survival, "top20": top20, "sweep": sweep}


def gold_survival(keep: np.ndarray, gold: Any) -> float:
  """The share of questions with a gold answer-holding passage that keep one (bool ``keep`` per passage)."""
  with_gold = [np.asarray(g) for g in gold if len(g)]
  return float(np.mean([keep[g].any() for g in with_gold])) if with_gold else 0.0


def keep_sweep(data: PreparedData, scores: np.ndarray, candidates: str, splits: Sequence[str],
               fractions: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)) -> dict[str, Any]:
  """Per kept fraction and split: ``survival`` (:func:`gold_survival`) and the top-1 / top-20 answer accuracy of the
  ranked candidates restricted to the kept passages."""
  order = np.argsort(-scores, kind="stable")
  with np.load(candidates) as ranked:
    rankings = {s: ranked[s] for s in splits}
  answers = {s: [q.answers for q in data.questions(s)] for s in splits}
  gold = {s: data.candidates(s).gold for s in splits}
  out: dict[str, Any] = {}
  for fraction in fractions:
    keep = np.zeros(len(scores), bool)
    keep[order[:int(round(fraction * len(scores)))]] = True
    row = {}
    for split in splits:
      kept = passage_filter.restrict_ranking(rankings[split], keep, width=20)
      accuracy = answer_top_k_accuracy(kept, answers[split], data.matcher(), (1, 20))
      row[split] = {"survival": gold_survival(keep, gold[split]), "top1": accuracy[1], "top20": accuracy[20]}
    out[f"{fraction:g}"] = row
  return out


def eval_filtered(p: Pipeline) -> dict[str, Any]:
  """The teacher system over the kept passages."""
  system, footprint = p.teacher_system(p.subset_pids())
  return {"footprint": footprint, "results": p.evaluate(system)}


def student_retriever(p: Pipeline) -> dict[str, Any]:
  """(``paper`` topology) the student's shared encoder trained for retrieval alone (§2.2.2)."""
  train_stage(p, "student_retriever")
  return p.trained_summary("student_retriever")


def distill(p: Pipeline) -> dict[str, Any]:
  """The unified retriever-reader distilled from the teacher reader (from the student retriever, ``paper``; or from the
  teacher reader itself, learning retrieval from the teacher retriever's scores, ``from_teacher_reader``)."""
  train_stage(p, "distill")
  return {"eval": best_of(read_evals(p.path("distill", "eval.jsonl")))}


def finetune(p: Pipeline) -> dict[str, Any]:
  """Iterative finetuning, Algorithm 1."""
  train_stage(p, "finetune")
  return {"eval": best_of(read_evals(p.path("finetune", "eval.jsonl")))}


def bundle(p: Pipeline) -> dict[str, Any]:
  """INT8 index, FP16 (or int8) weights, token ids, bz2/lzma, and the bundle's EM."""
  b = p.config.bundle
  spec, params = exports.load_system(p.path("finetune", "best"), None, p.mesh)
  out = p.path("bundle")
  summary = deploy.export(out=out, prepared=p.prepared, spec=spec, params=params, mesh=p.mesh,
                          settings=dataclasses.replace(p.settings(), rule=bundle_rule(p),
                                                       lexical_weight=float(b.lexical_weight)),
                          subset=p.path("filter", "subset.npz"), index_kind=b.index_kind,
                          weights_dtype=b.weights_dtype, batch_size=int(p.config.encode_batch_size),
                          recall_split=p.dev_splits[0], overwrite=True,
                          vectors=p.unified_vectors("finetune", spec, params, p.subset_pids()))
  rows = {r["component"]: int(r["stored_bytes"]) for r in summary["footprint"]}
  footprint = {"retriever": 0, "shared_encoder": True, "reader": rows.get("model", 0), "index": rows.get("index", 0),
               "corpus": rows.get("corpus", 0), "other": rows.get("other", 0)}
  footprint["total"] = report_lib.total(footprint, (*report_lib.COMPONENTS, "other"))
  max_read = int(b.max_read) if int(b.max_read) >= 0 else None
  return {"footprint": footprint, "index": summary["index"], "bundle_footprint": summary["footprint"],
          "results": p.evaluate(QASystem.from_bundle(out, mesh=p.mesh), rule=bundle_rule(p), max_read=max_read)}


def report(p: Pipeline) -> dict[str, Any]:
  """``W/report.json``, ``W/report.md``, ``W/figure1.png``: the paper's Tables 3 and 4 and Figure 1."""
  records = {s: p.finished(s) for s in p.stages()[:-1]}
  c, e, b = p.config, p.config.eval, p.config.bundle
  fusion = f", + BM25 fusion (weight {float(b.lexical_weight):g})" if float(b.lexical_weight) > 0 else ""
  rule = f", {bundle_rule(p)} answer rule" if bundle_rule(p) != e.rule else ""
  names = {"eval_teacher": "teacher (two encoders + reader)", "eval_filtered": "+ passage filter",
           "eval_distill": "+ unified retriever-reader (KD)", "eval_finetune": "+ iterative finetuning",
           "bundle": f"+ INT8 index, {WEIGHTS_LABEL.get(b.weights_dtype, 'FP16')} weights, token ids, bz2/lzma"
                     + fusion + rule}
  short = {"eval_teacher": "teacher", "eval_filtered": "+ filter", "eval_distill": "+ unified (KD)",
           "eval_finetune": "+ Algorithm 1", "bundle": "bundle"}
  rows = [report_lib.system_row(name, stage, records[stage]["summary"]["footprint"],
                                records[stage]["summary"]["results"], short=short[stage])
          for stage, name in names.items() if stage in records]
  bundle_name = "bundle: INT8 index" + fusion + " (over the subset)"
  reading = f"answers by the {e.rule} rule from {report_lib.reads(int(e.max_read))}"
  if (bundle_rule(p), int(b.max_read)) != (e.rule, -1):
    bundle_read = int(b.max_read) if int(b.max_read) >= 0 else int(e.max_read)
    results = records["bundle"]["summary"]["results"]
    held_out = next(iter(results.values())).get("read_passages_chosen_on")
    chosen = (f"m' = {next(iter(results.values()))['best_read_passages']}, chosen on the held-out training questions "
              f"({', '.join(held_out)})" if held_out else
              "best m': " + ", ".join(f"{sp} {r['best_read_passages']}" for sp, r in results.items()))
    reading += f" (the bundle: {bundle_rule(p)} rule from {report_lib.reads(bundle_read)}; {chosen})"
  f = records["filter"]["summary"]
  result = {
      "title": f"rnr-jax pipeline ({os.path.basename(c.name)})",
      "description": (f"{p.data.num_passages} passages; dev EM on "
                      + ", ".join(f"{s} ({len(p.data.questions(s)[:int(e.questions) or None])} questions)"
                                  for s in p.dev_splits)
                      + f"; {e.top_k} passages retrieved, {reading}. Footprints count the files a system needs: "
                      "weights, index and passages (text for the uncompressed systems, the bundle's compressed "
                      "files for the last row)."
                      + ("" if c.eval_distilled else " The distilled student is finetuned without being evaluated "
                         "(eval_distilled=False), so it has no row of its own.")),
      "dev_splits": list(p.dev_splits), "systems": rows,
      "retrieval": report_lib.retrieval_rows(records, p.dev_splits, bundle_name),
      "filter": {k: f[k] for k in ("kept", "num_passages", "fraction", "survival", "top20", "sweep") if k in f},
      "stages": {s: {"seconds": r["seconds"]} for s, r in records.items()}, "config": c.to_dict(),
      "reader": {"split": records["teacher_reader"]["summary"].get("split", p.select_split()),
                 "metrics": {k: v for k, v in (records["teacher_reader"]["summary"]["eval"] or {}).items()
                             if k.startswith("em_")},
                 "curve": records["teacher_reader"]["summary"].get("curve", []),
                 "max_answer_len": answer_limit(p), "answerable": answerable(p, answer_limit(p))},
  }
  first, last = rows[0], rows[-1]
  result["final_vs_teacher"] = {
      "footprint_ratio": first["footprint"]["total"] / last["footprint"]["total"],
      "em_fraction": {s: (last["em"][s] / first["em"][s]) if first["em"][s] else None for s in p.dev_splits}}
  paths = report_lib.write(result, p.workdir)
  if p.results_md and jax.process_index() == 0:
    atomic_write_text(p.results_md, report_lib.markdown(result, figure="results_figure1.png"))
    shutil.copyfile(paths["figure"], os.path.join(os.path.dirname(os.path.abspath(p.results_md)),
                                                  "results_figure1.png"))
  print(report_lib.markdown(result))
  return {"paths": paths, "final_vs_teacher": result["final_vs_teacher"]}


STAGES: dict[str, Callable[[Pipeline], dict[str, Any]]] = {
    "prepare": prepare_data, "teacher_retriever": teacher_retriever, "teacher_reader": teacher_reader,
    "eval_teacher": eval_teacher, "filter": filter_passages, "eval_filtered": eval_filtered,
    "student_retriever": student_retriever, "distill": distill, "eval_distill": lambda p: p.evaluate_unified("distill"),
    "finetune": finetune, "eval_finetune": lambda p: p.evaluate_unified("finetune"), "bundle": bundle,
    "report": report,
}


def answer_limit(p: Pipeline) -> int:
  """The teacher reader's longest answer span in tokens."""
  return int(exports.read_info(p.path("teacher_reader", "best"))["reader"]["max_answer_len"])


def answerable(p: Pipeline, limit: int) -> dict[str, float]:
  """Share of each split's questions with an answer of at most ``limit`` tokens (the others cannot match exactly)."""
  tokenizer, out = p.tokenizer(), {}
  for split in p.data.splits:
    questions = p.data.questions(split)
    lengths = [min(len(ids) for ids in tokenizer.encode_texts(list(q.answers))) for q in questions if q.answers]
    out[split] = float(np.mean(np.asarray(lengths) <= limit)) if lengths else 0.0
  return out


def bundle_rule(p: Pipeline) -> str:
  return p.config.bundle.rule or p.config.eval.rule


def read_evals(path: str) -> list[dict[str, Any]]:
  """The evaluations of an eval.jsonl, in order ([] when there is none)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def best_of(evals: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """The last of ``evals`` marked best (or the last one)."""
  best = [e for e in evals if e.get("best")]
  return (best or evals or [None])[-1]


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, *, data_dir: str | None = None,
                 corpus: Sequence[str] = (), questions: Sequence[str] = (), until: str | None = None,
                 redo: Sequence[str] = (), results_md: str | None = None) -> dict[str, Any]:
  """Runs (or continues) the pipeline of ``config`` in ``workdir``; returns ``{stage: record}``."""
  return Pipeline(config, workdir, data_dir=data_dir, corpus=corpus, questions=questions,
                  results_md=results_md).run(until=until, redo=redo)


def main(argv: Sequence[str]) -> None:
  if bad := [a for a in argv[1:] if "=" not in a]:  # NAME=SPEC items after "--questions A=x" are arguments
    raise app.UsageError(f"unexpected arguments: {bad}")
  logging.set_verbosity(logging.INFO)
  setup()
  start = time.perf_counter()
  with input_errors_exit("train.pipeline"):
    records = run_pipeline(FLAGS.config, FLAGS.workdir, data_dir=FLAGS.data_dir, corpus=FLAGS.corpus,
                           questions=FLAGS.questions + list(argv[1:]), until=FLAGS.until, redo=FLAGS.redo,
                           results_md=FLAGS.results_md)
  print(json.dumps({"workdir": os.path.abspath(FLAGS.workdir), "wall_s": round(time.perf_counter() - start, 1),
                    "stage_seconds": {s: r["seconds"] for s, r in records.items()},
                    "final_vs_teacher": records.get("report", {}).get("summary", {}).get("final_vs_teacher")}))


if __name__ == "__main__":
  define_flags("configs/mini.py", "Pipeline")
  flags.DEFINE_string("workdir", None, "Pipeline directory: every stage's outputs, the bundle and the report.")
  flags.DEFINE_string("data_dir", None, "Our jsonl files (corpus.jsonl, *_train.jsonl, *_dev.jsonl); default: the "
                      "config's data_dir (RNR_DATA or ../shared/data). Unused with --corpus.")
  flags.DEFINE_multi_string("corpus", [], "Corpus specs, as train.prepare takes them (default: the config's).")
  flags.DEFINE_multi_string("questions", [], "NAME=SPEC question splits, as train.prepare takes them.")
  flags.DEFINE_string("until", None, "Stop after this stage.")
  flags.DEFINE_list("redo", [], "Stages to run again from scratch, their outputs deleted first (later stages are "
                    "not redone).")
  flags.DEFINE_string("results_md", None, "Also write the report's markdown here (e.g. docs/results.md).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
