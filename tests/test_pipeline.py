"""The whole pipeline (``train.pipeline``) with ``configs/smoke.py``: every stage, the report, skip and resume.

Runs on a slice of the shared data (``RNR_DATA`` or ``../shared/data``); without it, on a toy data directory of
the same layout.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_retriever import write_toy_data

from infer import export as export_lib
from rnr_jax import reader_data as rd
from rnr_jax import retrieval
from rnr_jax.config import load_config
from rnr_jax.qa_system import QASystem
from train import pipeline

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
  assert list(records) == list(pipeline.STAGES)
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  systems = report["systems"]
  assert [s["stage"] for s in systems] == ["eval_teacher", "eval_filtered", "eval_distill", "eval_finetune",
                                           "eval_merge", "bundle"]
  for s in systems:
    assert set(s["em"]) == {"nq_dev", "squadshifts_dev"}
    assert all(0.0 <= v <= 1.0 for v in s["em"].values())
    assert s["footprint"]["total"] > 0
  teacher, filtered, bundle = systems[0]["footprint"], systems[1]["footprint"], systems[-1]["footprint"]
  # The filter halves the index and the text corpus; the bundle (one encoder, FP16, compressed) is smaller still.
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
  assert os.path.exists(os.path.join(workdir, "bundle", "manifest.json"))
  bundle = QASystem.from_bundle(os.path.join(workdir, "bundle"))
  assert bundle.index.kind == config.bundle.index_kind
  # The bundle retrieves by dense + BM25 (configs/smoke.py sets lexical_weight, as mini does), and its evaluation
  # in the report used that setting.
  assert bundle.settings.lexical_weight == config.bundle.lexical_weight > 0
  assert all(r["lexical_weight"] == config.bundle.lexical_weight
             for r in records["bundle"]["summary"]["results"].values())
  assert all(r["lexical_weight"] == 0.0 for r in records["eval_finetune"]["summary"]["results"].values())
  assert bundle.settings.rule == config.bundle.rule == "fused"
  assert all(r["rule"] == "fused" for r in records["bundle"]["summary"]["results"].values())
  assert systems[-1]["name"].endswith(", fused answer rule")
  # No retrieval-only stage (student_retriever_stage=False): distillation started from the teacher reader, learned
  # retrieval over the batch's passages and distilled the teacher retriever's scores (student_retriever_teacher).
  assert "skipped" in records["student_retriever"]["summary"]
  assert not os.path.exists(os.path.join(workdir, "student_retriever"))
  assert [r["name"] for r in report["retrieval"]] == [
      "BM25", "teacher: two encoders, full width", "unified after KD (over the subset)",
      "unified after finetuning (over the subset)", "unified after the merge (over the subset)",
      f"bundle: INT8 index, + BM25 fusion (weight {config.bundle.lexical_weight:g}) (over the subset)"]
  with open(os.path.join(workdir, "distill", "config.json"), encoding="utf-8") as f:
    distill_config = json.load(f)
  # merge.init_scale (configs/smoke.py): the student starts from the teacher reader + the retriever's task vector.
  assert distill_config["model"]["init"] == distill_config["unified"]["init_heads"] == os.path.join(
      workdir, "student_init", "best")
  assert records["distill"]["summary"]["init_scale"] == config.merge.init_scale
  assert not distill_config["unified"]["init_retriever"]
  with open(os.path.join(workdir, "distill", "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert any("retriever_kd" in line and "in_batch_acc" in line for line in logged)


def test_merge_adds_the_chosen_scale_of_the_retriever_task_vector(smoke_run):
  config, workdir, _, records = smoke_run
  summary = records["merge"]["summary"]
  assert len(summary["trials"]) == len(config.merge.scales) * len(config.merge.base_weights)
  assert summary["scale"] in config.merge.scales and summary["base_weight"] in config.merge.base_weights
  assert set(summary["questions"]) == set(config.merge.splits)
  # The merge retriever never trained on the held-out tail of each split that chose the scale.
  with open(os.path.join(workdir, "merge_retriever", "config.json"), encoding="utf-8") as f:
    retriever_config = json.load(f)
  assert retriever_config["retriever"]["holdout_tail"] == config.merge.select_questions
  assert retriever_config["model"]["init"] == os.path.join(workdir, "teacher_reader", "best")
  # merge/best = finetune/best + base_weight x (base - finetune/best) + scale x (merge retriever - base), the heads
  # untouched (base: the teacher reader's encoder, merge.base in configs/smoke.py).
  _, finetuned = export_lib.load_system(os.path.join(workdir, "finetune", "best"), None, None)
  _, merged = export_lib.load_system(os.path.join(workdir, "merge", "best"), None, None)
  _, ret, _ = retrieval.load_retriever(os.path.join(workdir, "merge_retriever", "best"))
  _, base, _ = rd.load_reader_encoder(os.path.join(workdir, "teacher_reader", "best"))
  a, x = summary["base_weight"], summary["scale"]
  expected = jax.tree.map(lambda f, r, b: f + a * (np.asarray(b) - f) + x * (np.asarray(r) - np.asarray(b)),
                          jax.device_get(finetuned["encoder"]), jax.device_get(ret["encoder"]), base)
  for got, want in zip(jax.tree.leaves(jax.device_get(merged["encoder"])), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for head in ("qa_outputs", "qa_classifier"):
    for got, want in zip(jax.tree.leaves(jax.device_get(merged[head])), jax.tree.leaves(jax.device_get(finetuned[head]))):
      np.testing.assert_array_equal(got, want)
  # The student's init (merge.init_scale): teacher reader + init_scale x (merge retriever - base), heads the teacher's.
  _, _, teacher, _ = rd.load_reader(os.path.join(workdir, "teacher_reader", "best"))
  _, _, init, _ = rd.load_reader(os.path.join(workdir, "student_init", "best"))
  expected = jax.tree.map(lambda t, r, b: t + config.merge.init_scale * (r - b), jax.device_get(teacher["encoder"]),
                          jax.device_get(ret["encoder"]), jax.device_get(base))
  for got, want in zip(jax.tree.leaves(jax.device_get(init["encoder"])), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for head in ("qa_outputs", "qa_classifier"):
    for got, want in zip(jax.tree.leaves(jax.device_get(init[head])), jax.tree.leaves(jax.device_get(teacher[head]))):
      np.testing.assert_array_equal(got, want)
  # The bundle holds the merged student (FP16 weights), not the finetuned one.
  bundle = QASystem.from_bundle(os.path.join(workdir, "bundle"))
  shipped = jax.tree.leaves(jax.device_get(bundle.params["encoder"]))
  for got, want in zip(shipped, jax.tree.leaves(jax.device_get(merged["encoder"]))):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-3, atol=2e-3)
  if a > 0 or x > 0:
    assert max(float(np.abs(np.asarray(g, np.float32) - f).max()) for g, f in
               zip(shipped, jax.tree.leaves(jax.device_get(finetuned["encoder"])))) > 1e-2


def test_finished_stages_are_skipped_and_removed_ones_rerun(smoke_run):
  config, workdir, data, records = smoke_run
  os.remove(os.path.join(workdir, "stages", "report.json"))
  again = pipeline.run_pipeline(config, workdir, data_dir=data, redo=("bundle",))
  for stage in pipeline.STAGES:
    if stage in ("bundle", "report"):
      assert again[stage]["finished"] >= records[stage]["finished"]
      assert again[stage]["summary"].keys() == records[stage]["summary"].keys()
    else:
      assert again[stage] == records[stage], stage  # skipped: the record read back unchanged
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


def test_merge_soup_averages_students_before_the_task_vector(smoke_run, tmp_path, monkeypatch):
  """merge.soup: the grid is tried from the student alone and from its average with other students (here the KD
  student of the same run); merge/best is the chosen start + the chosen base_weight and scale, heads averaged too.
  Which trial wins on the smoke data is chance, so the choice is pinned to the soup with the largest weights (the
  rule itself: tests/test_merge.py)."""
  monkeypatch.setattr(pipeline.merge_lib, "choose", max)
  _, workdir, data, _ = smoke_run
  work = str(tmp_path / "w")
  shutil.copytree(workdir, work)
  config = load_config(os.path.join(ROOT, "configs/smoke.py"))
  config.merge.soup = ("/no/such/student",)
  with pytest.raises(FileNotFoundError, match="merge.soup: /no/such/student"):
    pipeline.run_pipeline(config, work, data_dir=data, until="merge", redo=("merge",))
  config.merge.soup = (os.path.join(work, "distill", "best"),)
  summary = pipeline.run_pipeline(config, work, data_dir=data, until="merge", redo=("merge",))["merge"]["summary"]
  n = len(config.merge.scales) * len(config.merge.base_weights)
  assert len(summary["trials"]) == 2 * n and sum(k.endswith(", soup") for k in summary["trials"]) == n
  assert summary["soup"] == [os.path.join(work, "distill", "best")]
  assert (summary["base_weight"], summary["scale"]) == (max(config.merge.base_weights), max(config.merge.scales))
  load = lambda name: jax.device_get(export_lib.load_system(os.path.join(work, name, "best"), None, None)[1])
  finetuned, distilled, merged = load("finetune"), load("distill"), load("merge")
  start = jax.tree.map(lambda f, d: (f + d) / 2, finetuned, distilled)
  _, ret, _ = retrieval.load_retriever(os.path.join(work, "merge_retriever", "best"))
  _, base, _ = rd.load_reader_encoder(os.path.join(work, "teacher_reader", "best"))
  a, x = summary["base_weight"], summary["scale"]
  expected = jax.tree.map(lambda s, r, b: s + a * (np.asarray(b) - s) + x * (np.asarray(r) - np.asarray(b)),
                          start["encoder"], jax.device_get(ret["encoder"]), base)
  for got, want in zip(jax.tree.leaves(merged["encoder"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for head in ("qa_outputs", "qa_classifier"):
    for got, want in zip(jax.tree.leaves(merged[head]), jax.tree.leaves(start[head])):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The soup itself differs from the student (the KD and finetuned students are not the same weights).
  assert any(not np.array_equal(f, d) for f, d in zip(jax.tree.leaves(finetuned), jax.tree.leaves(distilled)))


def test_slice_keeps_gold_documents(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  docs = [{"id": i, "title": f"t{i}", "text": f"text {i}", "source": "x"} for i in range(50)]
  (source / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  questions = [{"id": f"q{i}", "question": f"q {i}", "answers": ["a"], "gold_pid": 3 * i} for i in range(10)]
  (source / "nq_dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
  out = pipeline.write_slice(str(source), str(tmp_path / "slice"), questions=4, distractors=5)
  with open(os.path.join(out, "corpus.jsonl"), encoding="utf-8") as f:
    ids = [json.loads(line)["id"] for line in f]
  with open(os.path.join(out, "nq_dev.jsonl"), encoding="utf-8") as f:
    kept = [json.loads(line) for line in f]
  assert [q["id"] for q in kept] == ["q0", "q1", "q2", "q3"]
  assert {0, 3, 6, 9} <= set(ids) and len(ids) == 4 + 5 and len(set(ids)) == len(ids)


def test_tfds_squad_source_writes_open_domain_jsonl(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    out = pipeline.write_tfds_squad(str(tmp_path / "squad"), str(tmp_path / "tfds"))
  with open(os.path.join(out, "corpus.jsonl"), encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
  ids = [d["id"] for d in docs]
  assert ids == list(range(len(ids))) and all(d["text"] for d in docs)
  for name in ("squad_train.jsonl", "squad_dev.jsonl"):
    with open(os.path.join(out, name), encoding="utf-8") as f:
      questions = [json.loads(line) for line in f]
    assert len(questions) == 5 and all(q["gold_pid"] in ids and q["answers"] and q["question"] for q in questions)
