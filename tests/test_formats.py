"""Retrieval formats (``infer.formats``): the DPR retrieval JSON and TREC run that ``infer.evaluate`` writes score, by
our reader and by ir_measures, exactly as ``infer.evaluate`` scored itself; external files are read as tools write
them."""

import json
import subprocess
import sys

import pytest

from infer import formats
from rnr_jax.data.readers import read_questions
from test_export_infer import ROOT, bundle, workdir  # noqa: F401 - fixtures


def _run(*args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluate_retrieval_files_score_as_evaluate_does(bundle, workdir, tmp_path):  # noqa: F811 - fixtures
  questions = workdir / "data" / "toy_dev.jsonl"
  out, dpr, trec = tmp_path / "pred.jsonl", tmp_path / "retrieval.json", tmp_path / "run.trec"
  summary = _run("infer.evaluate", f"--bundle={bundle[0]}", f"--questions={questions}", "--top_k=8", "--n_best=3",
                 f"--out={out}", f"--retrieval_out={dpr}", f"--trec_out={trec}")
  want = summary["top_k_accuracy"]
  assert set(want) == {"top1", "top5", "top8"} and 0 < want["top8"] < 1  # a random model: some hits, not all
  records = formats.read_dpr(str(dpr))
  gold = list(read_questions(questions))
  assert [r["question"] for r in records] == [q.question for q in gold] and len(records[0]["ctxs"]) == 8
  assert set(records[0]["ctxs"][0]) == {"id", "title", "text", "score", "has_answer"}
  for flags in (False, True):
    got = formats.dpr_top_k_accuracy(records, (1, 5, 8), use_file_flags=flags)
    assert {f"top{k}": v for k, v in got.items()} == want
  assert _run("infer.score_retrieval", f"--dpr={dpr}", "--ks=1,5,8")["top_k_accuracy"] == want
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [[c["id"] for c in r["retrieved"]] for r in lines] == [[int(c["id"]) for c in r["ctxs"]] for r in records]
  assert all(1 <= len(r["n_best"]) <= 3 and r["n_best"][0]["text"] == r["prediction"] for r in lines)

  # The TREC run, scored by a well-kept evaluator on its has_answer qrels, and by ours from the bundle's passages.
  ir_measures = pytest.importorskip("ir_measures")
  measures = [ir_measures.Success @ k for k in (1, 5, 8)]
  scores = ir_measures.calc_aggregate(measures, list(ir_measures.read_trec_qrels(f"{trec}.qrels")),
                                      list(ir_measures.read_trec_run(str(trec))))
  assert {f"top{m['cutoff']}": pytest.approx(v, abs=1e-9) for m, v in scores.items()} == want
  assert _run("infer.score_retrieval", f"--trec={trec}", f"--questions={questions}", f"--bundle={bundle[0]}",
              "--ks=1,5,8")["top_k_accuracy"] == want


def test_external_files_are_read_as_tools_write_them(tmp_path):
  dpr = tmp_path / "fid.json"  # FiD / pyserini style: string ids and scores, extra fields
  dpr.write_text(json.dumps([
      {"question": "q1", "answers": ["Black Sea"], "ctxs": [
          {"id": "wiki:7", "title": "Danube", "text": "It ends in the black sea.", "score": "71.2",
           "has_answer": False},
          {"id": "wiki:9", "title": "Rhine", "text": "It ends in the North Sea.", "score": "70.1"}]},
      {"question": "q2", "answers": ["x"], "ctxs": []}]))
  records = formats.read_dpr(str(dpr))
  assert formats.dpr_top_k_accuracy(records, (1, 2)) == {1: 0.5, 2: 0.5}  # recomputed from the text
  with pytest.raises(KeyError):
    formats.dpr_top_k_accuracy(records, (1,), use_file_flags=True)  # the second ctx has no flag
  (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "ctxs": []}]))
  with pytest.raises(ValueError, match="record 0"):
    formats.read_dpr(str(tmp_path / "bad.json"))

  run = tmp_path / "run.trec"
  run.write_text("q1 Q0 3 1 2.5 x\nq1 Q0 4 2 2.5 x\nq1 Q0 1 3 9.0 x\n\nq2 Q0 8 1 1 x\n")
  assert formats.read_trec(str(run)) == {"q1": [("1", 9.0), ("4", 2.5), ("3", 2.5)], "q2": [("8", 1.0)]}
  texts = {"1": "nothing", "3": "the black sea", "4": "also nothing", "8": "x marks"}
  answers = {"q1": ["Black Sea"], "q2": ["x"], "q3": ["y"]}
  accuracy = formats.trec_top_k_accuracy(formats.read_trec(str(run)), answers, texts.__getitem__, (1, 3))
  assert accuracy == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
  run.write_text("q1 Q0 3 1 not-a-score x\n")
  with pytest.raises(ValueError, match="run.trec:1"):
    formats.read_trec(str(run))
