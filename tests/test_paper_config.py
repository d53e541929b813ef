"""``configs/paper.py``: the paper's recipe validates on CPU, and its ``slice`` variant runs every stage end to end."""

import json
import os

import pytest
from test_pipeline import data_dir

from configs import paper
from rnr_jax.config import load_config
from rnr_jax.qa_system import QASystem
from train import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage(config, name, tmp_path):
  return pipeline.Pipeline(config, str(tmp_path / "w")).stage_config(name, {})


def test_paper_config_holds_the_appendix_recipe_and_validates(tmp_path):
  config = load_config(os.path.join(ROOT, "configs/paper.py"))
  pipeline.Pipeline(config, str(tmp_path / "w")).validate()  # every stage config loads with its overrides
  assert config.student == "paper" and config.candidates_k == 200
  assert (config.bundle.index_kind, config.bundle.weights_dtype) == ("int8", "float16")
  reader, distill = _stage(config, "teacher_reader", tmp_path), _stage(config, "distill", tmp_path)
  assert (reader.reader.m, reader.tokens.reader_len, reader.optim.lr) == (24, 350, 1e-5)
  d = distill.distill
  assert (distill.pool.k1, d.m, d.temperature, distill.tokens.reader_len) == (200, 24, 3, 350)
  assert distill.optim.warmup_steps == 0 and distill.train.batch_size == 16
  teacher, student = _stage(config, "teacher_retriever", tmp_path), _stage(config, "student_retriever", tmp_path)
  assert not teacher.retriever.shared and teacher.model.retrieval_dim == 0 and teacher.model.init == "bert-base-uncased"
  assert student.retriever.shared and student.model.retrieval_dim == 128 and student.model.num_layers == 4
  assert (student.optim.lr, student.optim.warmup_steps, student.train.batch_size) == (2e-5, 1237, 128)
  filt = _stage(config, "filter", tmp_path)
  assert (filt.filter.top_k, filt.filter.keep, filt.filter.val_negatives, filt.optim.warmup_steps) == (200, 1224000,
                                                                                                       9107, 1000)
  finetune = _stage(config, "finetune", tmp_path)
  assert finetune.train.num_steps == paper.epochs(6, 16) and finetune.finetune.temperature == 3
  # Every batch splits over the slice's chips (the filter's pairs too).
  for name in pipeline.TRAINED:
    cfg = _stage(config, name, tmp_path)
    batches = [cfg.train.batch_size // (2 if name == "filter" else 1)]
    batches += [v for section in ("retriever", "pool", "filter") if section in cfg
                for k, v in cfg[section].items() if k.endswith("batch_size")]
    assert all(b % paper.CHIPS == 0 for b in batches), (name, batches)
  light = load_config(os.path.join(ROOT, "configs/paper.py:mobilebert=/weights/mobilebert"))
  student = _stage(light, "student_retriever", tmp_path)
  assert student.model.init == "/weights/mobilebert" and student.model.num_layers is None
  with pytest.raises(ValueError, match="unknown configs/paper.py argument"):
    load_config(os.path.join(ROOT, "configs/paper.py:tiny"))


def test_paper_slice_runs_every_stage(tmp_path_factory):
  config = load_config(os.path.join(ROOT, "configs/paper.py:slice"))
  workdir = str(tmp_path_factory.mktemp("paper") / "w")
  records = pipeline.run_pipeline(config, workdir, data_dir=data_dir(tmp_path_factory))
  assert list(records) == list(pipeline.STAGES)  # the paper topology: student_retriever included
  with open(os.path.join(workdir, "distill", "config.json"), encoding="utf-8") as f:
    distill = json.load(f)
  assert distill["unified"]["init_retriever"] == os.path.join(workdir, "student_retriever", "best")
  assert distill["distill"]["retrieval_loss"] == "kd" and distill["distill"]["temperature"] == 3
  assert not distill["distill"]["retriever_teacher"]  # the student retriever starts it; the teacher reader teaches
  bundle = QASystem.from_bundle(os.path.join(workdir, "bundle"))
  assert bundle.index.kind == "int8"
  with open(os.path.join(workdir, "bundle", "manifest.json"), encoding="utf-8") as f:
    assert json.load(f)["weights_dtype"] == "float16"
  assert os.path.exists(os.path.join(workdir, "report.md"))
