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
  # "jsonl": our jsonl files in data_dir (--data_dir / RNR_DATA); "tfds_squad": SQuAD v1.1 from TensorFlow Datasets
  # as an open-domain setting (its contexts as the corpus; set dev_splits=("squad_dev",) and train splits to
  # ("squad_train",) in the stages), read from tfds.data_dir (prepared there in array_record format, or downloaded
  # with tfds.download=True when online).
  c.source = "jsonl"
  c.data_dir = os.environ.get("RNR_DATA", "../shared/data")
  c.tfds = ml_collections.ConfigDict({"data_dir": "", "download": False, "limit": 0})
  # A slice of the data (smoke runs): the first N questions of each split, their gold documents and this many
  # random distractor documents. 0 = the whole data.
  c.slice = ml_collections.ConfigDict({"questions": 0, "distractors": 0})
  c.prepare = ml_collections.ConfigDict({"words_per_passage": 100, "bm25_topk": 100, "hard_negatives": 30,
                                         "max_train_questions": 0, "compress": ("bz2", "lzma")})
  c.dev_splits = ("nq_dev", "squadshifts_dev")
  # What the student's encoder starts from: "minilm" (student_retriever's model.init) or "teacher_reader" (the
  # teacher reader's encoder, cut to the student's model.num_layers, and its span and ranking heads in distill).
  c.student_init = "minilm"
  # Beyond the paper: the student's retrieval training also distils the teacher retriever's scores over each
  # batch's passages (train.retriever's retriever.teacher*, and train.distill's distill.retriever_teacher*), read
  # from the teacher's kept corpus embeddings.
  c.student_retriever_teacher = False
  # Whether the student first trains retrieval alone (stage student_retriever, the paper's §2.2.2). False: that
  # stage is skipped and distillation starts from the student_init encoder itself (the teacher reader's, or
  # MiniLM), learning retrieval there under the reading KL (set its retrieval settings, model.pooling,
  # model.retrieval_dim, unified.normalize, unified.passage_token_type, in the distill stage); with
  # student_retriever_teacher, distillation then also distils the teacher retriever's scores.
  c.student_retriever_stage = True
  # Beyond the paper: weight-space merge (rnr_jax.merge) of the finetuned student: part of the way back to its
  # pretrained encoder (base_weight, WiSE-FT) plus scale x the task vector of a shared retriever trained on its own
  # from that encoder (stage merge_retriever, config stages.merge_retriever; trained only when a scale > 0):
  #   theta = theta_student + base_weight (theta_pretrained - theta_student) + scale (theta_retriever - theta_pretrained)
  # Every (base_weight, scale) of the grid is tried; the pair with the best mean EM (DPR rule, top-1 read) on the last
  # merge.select_questions questions of each merge.splits split (never trained on by the merge retriever), retrieving
  # among the union of their teacher top-select_k passages, is kept ((0, 0) = the student unchanged). The bundle is
  # built from the merged student. merge.base: "" = the pretrained encoder the student started from (MiniLM);
  # "teacher_reader" = the teacher reader's export (for randomly initialised models, as in smoke).
  # merge.soup: export directories of other unified students finetuned from the same start (same architecture and
  # retrieval settings, e.g. other workdirs' finetune/best); the grid is then tried from this student alone and from
  # the uniform average of it and them (a model soup, every parameter, heads included), the best kept.
  # merge.init_scale > 0 (independent of merge.enabled): the same retriever's task vector at that scale is added to
  # the student's initial encoder before distillation (student_init="teacher_reader" without a retrieval-only stage).
  c.merge = ml_collections.ConfigDict({"enabled": False, "base_weights": (0.0, 0.25, 0.5), "scales": (0.0, 0.5, 1.0),
                                       "select_questions": 200, "select_k": 10,
                                       "splits": ("nq_train", "squadshifts_train"), "base": "", "init_scale": 0.0,
                                       "soup": ()})
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
