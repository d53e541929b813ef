"""The whole pipeline (``train.pipeline``) with ``configs/smoke.py``: every stage, the report, skip and resume.

Runs on a slice of the shared data (``RNR_DATA`` or ``../shared/data``); without it, on a toy data directory of
the same layout.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from test_retriever import write_toy_data

from bench import learning_curves
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData
from rnr_jax.qa_system import QASystem
from train import pipeline, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_dir(tmp_path_factory) -> str:
  shared = os.environ.get("RNR_DATA") or os.path.join(ROOT, "..", "shared", "data")
  if os.path.exists(os.path.join(shared, "corpus.jsonl")):
    return shared
  toy = str(tmp_path_factory.mktemp("toy_data"))
  write_toy_data(toy)
  for split in ("train", "dev"):
    with open(os.path.join(toy, f"toy_{split}.jsonl"), encoding="utf-8") as f:
      rows = f.read()
    os.remove(os.path.join(toy, f"toy_{split}.jsonl"))
    for name in ("nq", "squadshifts"):
      with open(os.path.join(toy, f"{name}_{split}.jsonl"), "w", encoding="utf-8") as f:
        f.write(rows)
  return toy


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline") / "w")
  data = data_dir(tmp_path_factory)
  config = load_config(os.path.join(ROOT, "configs/smoke.py"))
  records = pipeline.run_pipeline(config, workdir, data_dir=data,
                                  results_md=os.path.join(workdir, "docs", "results.md"))
  return config, workdir, data, records


def test_every_stage_runs_and_reports(smoke_run):
  config, workdir, _, records = smoke_run
  assert list(records) == [s for s in pipeline.STAGES if s != "student_retriever"]
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  systems = report["systems"]
  assert [s["stage"] for s in systems] == ["eval_teacher", "eval_filtered", "eval_distill", "eval_finetune", "bundle"]
  for s in systems:
    assert set(s["em"]) == {"nq_dev", "squadshifts_dev"}
    assert all(0.0 <= v <= 1.0 for v in s["em"].values())
    assert s["footprint"]["total"] > 0
  teacher, filtered, bundle = systems[0]["footprint"], systems[1]["footprint"], systems[-1]["footprint"]
  # The filter halves the index and the text corpus; the bundle (one encoder, int8, compressed) is smaller still.
  assert filtered["index"] < teacher["index"] and filtered["corpus"] < teacher["corpus"]
  assert bundle["total"] < filtered["total"]
  assert report["final_vs_teacher"]["footprint_ratio"] == pytest.approx(teacher["total"] / bundle["total"])
  f = report["filter"]
  assert f["kept"] == round(0.5 * f["num_passages"])
  with open(os.path.join(workdir, "figure1.png"), "rb") as png:
    assert png.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "docs", "results.md"), encoding="utf-8") as md:
    text = md.read()
  assert "Table 3 analogue" in text and "Table 4 analogue" in text
  bundle = QASystem.from_bundle(os.path.join(workdir, "bundle"))
  assert bundle.index.kind == config.bundle.index_kind
  # The bundle retrieves by dense + BM25 and answers by the fused rule (mini's settings), and the report's
  # evaluation of it used them.
  assert bundle.settings.lexical_weight == config.bundle.lexical_weight > 0
  assert all(r["lexical_weight"] == config.bundle.lexical_weight
             for r in records["bundle"]["summary"]["results"].values())
  assert all(r["lexical_weight"] == 0.0 for r in records["eval_finetune"]["summary"]["results"].values())
  assert bundle.settings.rule == config.bundle.rule == "fused"
  assert all(r["rule"] == "fused" for r in records["bundle"]["summary"]["results"].values())
  assert systems[-1]["name"].endswith(", fused answer rule")
  # Held-out training questions: the reader evaluates on them (one curve row per evaluation) and the bundle's m' is
  # chosen on them, the same for every dev split.
  data = PreparedData.load(os.path.join(workdir, "prepared"))
  assert {"nq_holdout", "squadshifts_holdout"} <= set(data.splits)
  assert len(data.questions("nq_holdout")) == config.prepare.holdout
  assert not {q.id for q in data.questions("nq_holdout")} & {q.id for q in data.questions("nq_train")}
  reading = report["reader"]
  assert reading["split"] == "nq_holdout" and [e["step"] for e in reading["curve"]] == [2, 4]
  assert reading["curve"][0]["questions"] == 2 * 8
  assert "questions seen" in text
  # The retriever and the filter choose their best step on held-out questions too; the dev sets are only reported.
  with open(os.path.join(workdir, "teacher_retriever", "config.json"), encoding="utf-8") as f:
    retriever = json.load(f)["retriever"]
  assert retriever["select_metric"].startswith("nq_holdout/")
  assert retriever["eval_splits"] == ["nq_holdout", "squadshifts_holdout", "nq_dev", "squadshifts_dev"]
  assert {"nq_holdout/top1", "nq_dev/top1"} <= set(records["teacher_retriever"]["summary"]["metrics"])
  with open(os.path.join(workdir, "filter", "config.json"), encoding="utf-8") as f:
    assert json.load(f)["filter"]["val_split"] == "nq_holdout"
  results = records["bundle"]["summary"]["results"]
  assert all(r["read_passages_chosen_on"] == ["nq_holdout", "squadshifts_holdout"] for r in results.values())
  assert len({r["best_read_passages"] for r in results.values()}) == 1
  assert all(r["em"] == r["em_at"][str(r["best_read_passages"])] for r in results.values())
  assert [r["name"] for r in report["retrieval"]] == [
      "BM25", "teacher: two encoders, full width", "unified after KD (over the subset)",
      "unified after finetuning (over the subset)",
      f"bundle: INT8 index, + BM25 fusion (weight {config.bundle.lexical_weight:g}) (over the subset)"]


def test_without_eval_distilled_the_distilled_student_has_no_row(smoke_run, tmp_path):
  _, workdir, data, _ = smoke_run
  copy = str(tmp_path / "w")  # the report is rewritten; the module's run stays as it was
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
  config = load_config(os.path.join(ROOT, "configs/smoke.py"))
  config.eval_distilled = False
  p = pipeline.Pipeline(config, copy, data_dir=data, results_md=str(tmp_path / "results.md"))
  assert "eval_distill" not in p.stages() and "distill" in p.stages()
  assert int(pipeline.distill_config(p).train.eval_every) == 0  # no corpus encoding in the distill stage
  report = pipeline.report(p)
  with open(report["paths"]["json"], encoding="utf-8") as f:
    written = json.load(f)
  assert [s["stage"] for s in written["systems"]] == ["eval_teacher", "eval_filtered", "eval_finetune", "bundle"]
  assert "unified after KD (over the subset)" not in [r["name"] for r in written["retrieval"]]
  with open(tmp_path / "results.md", encoding="utf-8") as f:
    text = f.read()
  assert "+ unified retriever-reader (KD)" not in text and "eval_distilled=False" in text


def test_gold_survival_counts_questions_with_a_kept_gold_passage():
  keep = np.array([True, False, False, True])
  # Questions 0 and 3 keep a gold passage, 1 keeps none, 2 has none and does not count.
  assert pipeline.gold_survival(keep, [[0], [1, 2], [], [2, 3]]) == 2 / 3
  assert pipeline.gold_survival(keep, [[], []]) == 0.0


def test_smoke_runs_mini_topology(smoke_run):
  """configs/smoke.py is configs/mini.py's system on a slice: the same topology and bundle settings, so CI tests
  what ships. from_teacher_reader: no retrieval-only stage; distillation starts from the teacher reader (encoder
  and heads) and distils the teacher retriever's scores."""
  config, workdir, _, records = smoke_run
  mini = load_config(os.path.join(ROOT, "configs/mini.py"))
  assert config.student == mini.student == "from_teacher_reader"
  assert config.bundle.to_dict() == mini.bundle.to_dict()
  assert "student_retriever" not in records and not os.path.exists(os.path.join(workdir, "student_retriever"))
  with open(os.path.join(workdir, "distill", "config.json"), encoding="utf-8") as f:
    distill_config = json.load(f)
  assert distill_config["model"]["init"] == os.path.join(workdir, "teacher_reader", "best")
  assert distill_config["distill"]["retriever_teacher"] == os.path.join(workdir, "teacher_retriever", "best")
  assert not distill_config["unified"]["init_retriever"]
  with open(os.path.join(workdir, "distill", "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert any("retriever_kd" in line and "in_batch_acc" in line for line in logged)


def test_finished_stages_are_skipped_and_removed_ones_rerun(smoke_run):
  config, workdir, data, records = smoke_run
  os.remove(os.path.join(workdir, "stages", "report.json"))
  again = pipeline.run_pipeline(config, workdir, data_dir=data, redo=("bundle",))
  for name in records:
    if name in ("bundle", "report"):
      assert again[name]["finished"] >= records[name]["finished"]
      assert again[name]["summary"].keys() == records[name]["summary"].keys()
    else:
      assert again[name] == records[name], name  # skipped: the record read back unchanged
  for split, result in records["bundle"]["summary"]["results"].items():  # same model, same answers (timings aside)
    for key in ("n", "em", "f1", "em_at", "f1_at", "top_k_accuracy"):
      assert again["bundle"]["summary"]["results"][split][key] == result[key], (split, key)


def test_config_errors_name_the_stage_before_running(tmp_path):
  config = load_config(os.path.join(ROOT, "configs/smoke.py"))
  config.stages.distill.overrides = (*config.stages.distill.overrides, "distill.no_such_field=1")
  with pytest.raises(ValueError, match="stages.distill"):
    pipeline.run_pipeline(config, str(tmp_path / "w"), data_dir=str(tmp_path))
  assert not os.path.exists(tmp_path / "w" / "prepared")
  with pytest.raises(ValueError, match="unknown stage"):
    pipeline.run_pipeline(load_config(os.path.join(ROOT, "configs/smoke.py")), str(tmp_path / "w"),
                          until="no_such_stage")


def test_slice_keeps_gold_documents(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  docs = [{"id": i, "title": f"t{i}", "text": f"text {i}", "source": "x"} for i in range(50)]
  (source / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  questions = [{"id": f"q{i}", "question": f"q {i}", "answers": ["a"], "gold_pid": 3 * i} for i in range(10)]
  (source / "nq_dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
  inputs = sources.build(*sources.data_dir_specs(str(source)))
  corpus, specs = sources.write_slice(*inputs, str(tmp_path / "slice"), num_questions=4, distractors=5)
  with open(corpus[0], encoding="utf-8") as f:
    ids = [json.loads(line)["id"] for line in f]
  with open(specs["nq_dev"], encoding="utf-8") as f:
    kept = [json.loads(line) for line in f]
  assert [q["id"] for q in kept] == ["q0", "q1", "q2", "q3"]
  assert {0, 3, 6, 9} <= set(ids) and len(ids) == 4 + 5 and len(set(ids)) == len(ids)


def test_learning_curve_reruns_a_stage_changing_only_its_evaluations(smoke_run, tmp_path, monkeypatch):
  config, workdir, _, _ = smoke_run
  p = pipeline.Pipeline(config, workdir)
  kept, pids = set(p.subset_pids().tolist()), learning_curves.curve_subset(p, 4, 3, distractors=5)
  assert set(pids.tolist()) <= kept
  chosen = set()
  with np.load(p.path("filter", "candidates.npz")) as ranked:
    for split in p.held_out_splits():
      top = ranked[split][:4, :3]
      chosen |= set(top[top >= 0].tolist())
      gold = p.data.candidates(split).gold
      chosen |= {int(g) for i in range(min(4, len(gold))) for g in gold[i] if int(g) in kept}
  assert chosen <= set(pids.tolist()) and len(pids) == min(len(chosen) + 5, len(kept))

  out = str(tmp_path / "curves")
  monkeypatch.setattr("sys.argv", ["learning_curves", "--workdir", workdir, "--out", out, "--config",
                                   os.path.join(ROOT, "configs/smoke.py"), "--stages", "distill", "--every",
                                   "distill=2", "--questions", "4", "--top_k", "3", "--distractors", "5"])
  learning_curves.main()
  evals = pipeline.read_evals(os.path.join(out, "distill", "eval.jsonl"))
  assert [e["step"] for e in evals] == [0, 2, 4]  # the starting parameters, then every 2 steps
  assert all(0.0 <= e["em_open@1"] <= 1.0 for e in evals)

  def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
      return [(m["step"], m["loss"]) for m in map(json.loads, f) if "loss" in m]

  # The same training as the pipeline's stage, step for step: only evaluation differs.
  assert losses(os.path.join(out, "distill")) == losses(os.path.join(workdir, "distill"))
  # Run again with the same settings: the finished stage is read back, not trained again.
  logged = os.path.getmtime(os.path.join(out, "distill", "metrics.jsonl"))
  learning_curves.main()
  assert os.path.getmtime(os.path.join(out, "distill", "metrics.jsonl")) == logged
  with open(os.path.join(out, "distill.json"), encoding="utf-8") as f:
    record = json.load(f)
  assert record["evals"] == evals
  assert record["config"]["distill"]["teacher"] == "{workdir}/teacher_reader/best"
  # The same pipeline reached by another path (a symlink) is read back too.
  os.symlink(workdir, tmp_path / "linked")
  monkeypatch.setattr("sys.argv", [str(tmp_path / "linked") if a == workdir else a for a in sys.argv])
  learning_curves.main()
  assert os.path.getmtime(os.path.join(out, "distill", "metrics.jsonl")) == logged
  # A longer schedule (--override) trains the stage again from its start, not from the shorter run's checkpoints.
  monkeypatch.setattr("sys.argv", [*sys.argv, "--override", "distill:train.num_steps=6"])
  learning_curves.main()
  assert [e["step"] for e in pipeline.read_evals(os.path.join(out, "distill", "eval.jsonl"))] == [0, 2, 4, 6]
  with open(os.path.join(out, "distill.json"), encoding="utf-8") as f:
    assert json.load(f)["config"]["train"]["num_steps"] == 6
  monkeypatch.setattr("sys.argv", [*sys.argv, "--override", "distill:num_steps"])
  with pytest.raises(SystemExit):
    learning_curves.main()
