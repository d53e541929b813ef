"""Fields shared by the pipeline configs (``configs/mini.py``, ``configs/smoke.py``); see ``train/pipeline.py``."""

import os

import ml_collections


def stage(config: str, *overrides: str) -> ml_collections.ConfigDict:
  """A stage: its config file (relative to the repository root, ``:arg`` allowed) and ``key=value`` overrides."""
  return ml_collections.ConfigDict({"config": config, "overrides": tuple(overrides)})


def pipeline_config(name: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  # The data, as train.prepare takes it: corpus specs and "NAME=SPEC" question splits (files in any format
  # train.sources recognises, or tfds:NAME/SPLIT read from tfds.data_dir, downloaded with tfds.download=True when
  # online); both empty: our jsonl files in data_dir (--data_dir / RNR_DATA). SQuAD from TFDS as an open-domain
  # setting: corpus ("tfds:squad/train", "tfds:squad/validation") and the same specs as squad_train / squad_dev.
  c.corpus = ()
  c.questions = ()
  c.data_dir = os.environ.get("RNR_DATA", "../shared/data")
  c.tfds = ml_collections.ConfigDict({"data_dir": "", "download": False, "limit": 0})
  # A slice of the data (smoke runs): the first N questions of each split, their gold documents and this many
  # random distractor documents. 0 = the whole data.
  c.slice = ml_collections.ConfigDict({"questions": 0, "distractors": 0})
  c.prepare = ml_collections.ConfigDict({"words_per_passage": 100, "bm25_topk": 100, "hard_negatives": 30,
                                         "max_train_questions": 0, "holdout": 0, "compress": ("bz2", "lzma"), "skip_bad": False})
  c.dev_splits = ("nq_dev", "squadshifts_dev")
  # The student's topology: "paper" trains a shared encoder for retrieval alone (stage student_retriever, §2.2.2)
  # and distils the reader into it; "from_teacher_reader" starts distillation from the teacher reader (its encoder,
  # cut to the distill stage's model.num_layers, and its heads), which then learns retrieval from the positive's
  # NLL and the teacher retriever's scores while the reading KL keeps what it reads.
  c.student = "paper"
  # Whether the distilled student is evaluated as a system of its own (stage eval_distill, the report's "+ unified
  # (KD)" row): that evaluation encodes the kept passages once more, for a system no later stage reads.
  c.eval_distilled = True
  c.candidates_k = 100  # teacher retriever passages kept per question (reader negatives, filter, J_read)
  c.encode_batch_size = 64
  c.common_overrides = ()  # applied to every stage config first (e.g. "mesh.shape=(-1, 1)")
  c.stages = ml_collections.ConfigDict()
  # System evaluations (teacher, filtered, KD, finetuned, bundle): top_k passages retrieved and read (at most
  # max_read of them when > 0: EM only for m' <= max_read, top-k accuracy for all top_k).
  c.eval = ml_collections.ConfigDict({"top_k": 10, "rule": "dpr", "passage_score_weight": 0.8, "questions": 0,
                                      "batch_size": 64, "max_read": 0})
  # lexical_weight > 0: the bundle retrieves by dense + weight * BM25 (rnr_jax.lexical; BM25 built at load from the
  # shipped passages, no bundle bytes); choose it on held-out questions with bench.hybrid_sweep. rule / max_read:
  # the bundle's default answer rule and the passages read when the pipeline evaluates it ("" / -1: eval's).
  c.bundle = ml_collections.ConfigDict({"index_kind": "int8", "weights_dtype": "float16", "lexical_weight": 0.0,
                                        "rule": "", "max_read": -1})
  return c
