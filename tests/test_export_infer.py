"""Export and inference entry points: ``infer.export``, ``infer.evaluate``, ``infer.ask`` on a tiny unified model.

A random-init tiny retriever-reader is exported the way a training stage does
(``W/best``) next to the toy prepared data (``W/prepared``), then bundled with
the real command line and evaluated with it; corrupted bundles must fail with
an error naming the bad file.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from infer import ask
from infer import encode as encode_cli
from rnr_jax import embeddings, exports, passage_filter, qa_model
from rnr_jax import reader_data as rd
from rnr_jax.bundle import BundleError, load_bundle, update_bundle
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData
from rnr_jax.data.readers import read_questions
from rnr_jax.metrics import exact_match
from rnr_jax.qa_system import Answer, Prediction, QASystem, RetrievedPassage, evaluate_system, read_counts
from rnr_jax.retrieval import encode_passages
from rnr_jax.runtime import GRAPH_FILE, INPUTS, OnnxStudent
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training.mesh import data_mesh
from test_reader_train import build_toy_prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPPED = tuple(range(5, 160, 16))  # passages the (pretend) passage filter drops


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory: a random-init unified retriever-reader in ``best/`` (exported with its system spec, as
  ``train.distill`` does), the toy task in ``prepared/``, and a passage subset ``subset.npz`` without ``DROPPED``."""
  root = tmp_path_factory.mktemp("export_run")
  prepared = build_toy_prepared(str(root))
  config = load_config(os.path.join(ROOT, "configs/reader.py:tiny"), ["model.pooling=mean"])
  spec = ReaderSpec.from_config(config, exports.initial_encoder(config.model)[0],
                                PreparedData.load(prepared).manifest["settings"]["tokenizer"])
  system = SystemSpec.unified_model(spec, passage_len=48)  # as train.distill exports it: with its system spec
  export = exports.Export(str(root / "best"))
  export.save(1, qa_model.init_params(spec.build(), jax.random.key(0)), exports.unified_info(system, 20.0))
  export.close()
  kept = np.asarray([p for p in range(160) if p not in DROPPED])
  passage_filter.save_subset(root / "subset.npz", kept, np.zeros(len(kept)), 160)
  return root


@pytest.fixture(scope="module")
def bundle(workdir):
  """``(bundle dir, stdout)`` of ``python -m infer.export --workdir W``."""
  out = workdir / "bundle"
  proc = _run("infer.export", f"--workdir={workdir}", f"--out={out}", f"--subset={workdir / 'subset.npz'}",
              "--top_k=8", "--read_passages=4", "--recall_split=toy_dev")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(out), proc.stdout


def test_export_writes_compressed_bundle_and_footprint(bundle, workdir):
  path, stdout = bundle
  lines = stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert summary["passages"] == 160 - len(DROPPED) and summary["unified"] and summary["index"]["kind"] == "int8"
  assert summary["index"]["eval_source"] == "given"  # recall measured on the toy_dev questions
  for component in ("model", "index", "corpus", "other", "total"):
    assert any(line.startswith(f"| {component} |") for line in lines), stdout
  manifest = json.load(open(os.path.join(path, "manifest.json"), encoding="utf-8"))
  stored = {e["unpacked_path"]: e for e in manifest["files"]}
  assert manifest["weights_dtype"] == "float16"
  assert stored["model/params.safetensors"]["compression"] == "bz2"
  assert stored["corpus/tokens.npy"]["compression"] == "bz2" and "corpus/passage_ids.npy" in stored
  assert stored["tokenizer/tokenizer.json"]["compression"] == "lzma"
  assert not any(p.endswith(".jsonl") for p in stored)  # token ids only, no passage text
  config = json.load(open(os.path.join(path, "config.json"), encoding="utf-8"))
  assert config["inference"]["top_k"] == 8 and config["model"]["retriever"]["passage_len"] == 48

  system = QASystem.from_bundle(path)
  kept = [p for p in range(160) if p not in DROPPED]
  assert sorted(system.index.ids.tolist()) == sorted(system.store.ids.tolist()) == kept
  corpus = PreparedData.load(workdir / "prepared").token_corpus()
  for pid in (0, 6, 159):
    np.testing.assert_array_equal(system.store[pid], corpus[pid])  # passage ids kept through the subset
  ids = system.predict(["which word follows zebra near lion"], top_k=200).passage_ids
  assert ids.shape == (1, len(kept)) and not set(DROPPED) & set(ids[0].tolist())


def test_encode_takes_a_unified_export_and_export_reuses_its_vectors(workdir, tmp_path):
  """infer.encode on a unified student's export encodes with the student's own retrieval settings: the vectors are
  those the export encodes itself, infer.export --embeddings accepts them, and a reader export without a system
  spec is refused by name."""
  data = PreparedData.load(workdir / "prepared")
  fingerprint_tok = data.manifest["settings"]["tokenizer"]
  mesh = data_mesh()
  spec, params, fingerprint = encode_cli.resolve_model(None, str(workdir / "best"), None, fingerprint_tok, mesh)
  assert isinstance(spec, SystemSpec) and spec.unified and spec.retriever.passage_len == 48
  info = embeddings.encode_prepared(out=str(tmp_path / "emb"), prepared=str(workdir / "prepared"), spec=spec,
                                    params=params, fingerprint=fingerprint, mesh=mesh, batch_size=8, chunk_size=64,
                                    eval_splits=["toy_dev"])
  assert info["passage_len"] == 48 and info["dim"] == spec.dim and 0 <= info["eval"]["toy_dev"]["top1"] <= 1
  corpus = data.token_corpus()
  expected = encode_passages(spec, params, Tokenizer.from_pretrained(data.tokenizer_path),
                             [corpus[p] for p in range(len(corpus))], mesh, batch_size=8)
  reused = embeddings.reuse(str(tmp_path / "emb"), spec, params, len(corpus))
  np.testing.assert_allclose(reused, expected, rtol=1e-5, atol=1e-5)

  plain = exports.Export(str(tmp_path / "reader_only"))
  plain.save(1, params, {"reader": spec.reader.to_json()})
  plain.close()
  with pytest.raises(ValueError, match="reader_only: a reader export without a system spec"):
    encode_cli.resolve_model(None, str(tmp_path / "reader_only"), None, fingerprint_tok, mesh)


def test_edit_cli_adds_and_removes_passages(bundle, tmp_path):
  edited = tmp_path / "edited"
  shutil.copytree(bundle[0], edited, ignore=shutil.ignore_patterns(".cache"))
  new = tmp_path / "new.jsonl"
  new.write_text(json.dumps({"title": "kiwi notes", "text": "stone zebra Kiwi river."}) + "\n"
                 + json.dumps({"title": "fig notes", "text": "garden zebra Fig meadow.", "id": 1000}) + "\n")
  proc = _run("infer.edit", f"--bundle={edited}", "add", f"--passages={new}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"added": [160, 1000], "removed": [], "replaced": [],
                                                              "passages": 152}
  system = QASystem.from_bundle(edited)
  assert {160, 1000} <= set(system.index.ids.tolist()) and system.index.pending_edits == 0
  assert system.passage(1000) == ("fig notes", "garden zebra fig meadow.")  # decoded from the token ids


def test_fp16_weights_give_nearly_the_same_logits(bundle, workdir):
  spec, params, _ = exports.load_reader(str(workdir / "best"))
  model = spec.build()
  loaded = load_bundle(bundle[0])
  data = PreparedData.load(workdir / "prepared")
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  questions = [q.question for q in data.questions("toy_dev")[:4]]
  batch = rd.reader_batch(tokenizer, data.token_corpus(), tokenizer.encode_texts(questions),
                          np.arange(16).reshape(4, 4), max_len=spec.reader_len, buckets=spec.buckets,
                          question_len=spec.question_len, max_answer_len=spec.max_answer_len, max_spans=1)
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  assert isinstance(model, qa_model.RetrieverReader)
  for method in ("read", "embed"):
    apply = jax.jit(lambda p, x, method=method: model.apply({"params": p}, x, method=method))
    full = jax.tree.leaves(apply(params, inputs))
    half = jax.tree.leaves(apply(loaded.params, inputs))
    for a, b in zip(full, half):
      scale = float(np.abs(a).max())
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-2 * scale)
      assert not np.array_equal(np.asarray(a), np.asarray(b))  # the values really went through float16


def test_export_ships_the_onnx_graph_that_serves_the_student(bundle):
  """The bundle carries the student's graph (checked by the manifest, kilobytes: the weights are the bundle's own),
  and ONNX Runtime on it embeds questions and reads passages as the JAX system does."""
  path = bundle[0]
  manifest = json.load(open(os.path.join(path, "manifest.json"), encoding="utf-8"))
  graph = {e["unpacked_path"]: e for e in manifest["files"]}[f"extra/{GRAPH_FILE}"]
  assert graph["raw_bytes"] < 100_000
  system = QASystem.from_bundle(path)
  student = OnnxStudent.from_bundle(load_bundle(path))
  questions = ["which word follows zebra near lion", "what is next to the river"]
  r = system.spec.retriever
  batch = system.tokenizer.questions(questions, r.question_len, r.buckets).as_dict()
  np.testing.assert_allclose(student.embed(batch), system.embed_questions(questions), atol=1e-5)
  pids = system.index.ids[:4]
  reader = system.tokenizer.reader_from_records(questions[0], [system.store[p] for p in pids],
                                                system.spec.reader.reader_len, system.spec.reader.buckets).as_dict()
  want = np.asarray(system.spec.read_fn()(system.engine.params, {k: reader[k] for k in INPUTS}))
  np.testing.assert_allclose(student.read(reader), want, atol=1e-4 * float(np.abs(want).max()))


# Runs a module as ``python -m`` does, where the training stack cannot be imported (a runtime-only install).
_WITHOUT_JAX = """
import runpy, sys
BLOCKED = {"jax", "jaxlib", "flax", "optax", "orbax", "scipy", "scann", "ml_dtypes", "tensorstore", "torch", "onnx",
           "transformers", "ml_collections"}
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_runtime_engine_answers_as_jax_in_a_process_without_jax(bundle, workdir):
  """ONNX Runtime gives the JAX engine's answers, passages and probabilities; ``infer.evaluate`` and ``infer.ask`` run
  on it (chosen automatically) where JAX, Flax, scipy, ScaNN and onnx cannot be imported, with the same results."""
  questions = list(read_questions(workdir / "data" / "toy_dev.jsonl"))
  texts = [q.question for q in questions]
  on_jax, on_onnx = QASystem.from_bundle(bundle[0], engine="jax"), QASystem.from_bundle(bundle[0], engine="onnx")
  assert (on_jax.engine.name, on_onnx.engine.name, on_onnx.mesh) == ("jax", "onnx", None)
  for rule in ("dpr", "fused"):
    for a, b in zip(on_jax.answer(texts, n_best=3, rule=rule), on_onnx.answer(texts, n_best=3, rule=rule)):
      assert [x.text for x in a.answers] == [x.text for x in b.answers]
      assert [p.id for p in a.passages] == [p.id for p in b.passages]
      np.testing.assert_allclose([x.probability for x in a.answers], [x.probability for x in b.answers], atol=1e-4)
  np.testing.assert_allclose(on_onnx.embed_passages([on_jax.store[p] for p in on_jax.index.ids[:5]]),
                             on_jax.embed_passages([on_jax.store[p] for p in on_jax.index.ids[:5]]), atol=1e-5)

  run = lambda *args: subprocess.run([sys.executable, "-c", _WITHOUT_JAX, *args], cwd=ROOT, capture_output=True,
                                     text=True, timeout=300, check=False)
  proc = run("infer.evaluate", f"--bundle={bundle[0]}", f"--questions={workdir / 'data' / 'toy_dev.jsonl'}",
             "--limit=6", "--rule=dpr")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  want, _ = evaluate_system(on_jax, questions[:6], top_k=8, rule="dpr", passage_score_weight=0.8, progress=False)
  assert summary["engine"] == "onnx" and want["engine"] == "jax"
  assert (summary["em_at"], summary["top_k_accuracy"]) == (want["em_at"], want["top_k_accuracy"])
  proc = run("infer.ask", f"--bundle={bundle[0]}", "--json", "--n_best=2", texts[0])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["answer"] == on_jax.answer(texts[:1])[0].answer


def test_runtime_engine_needs_the_bundles_graph(bundle, tmp_path):
  plain = tmp_path / "plain"
  shutil.copytree(bundle[0], plain, ignore=shutil.ignore_patterns(".cache"))
  update_bundle(plain, extra_files={})  # a bundle written without its ONNX graph
  with pytest.raises(BundleError, match=r"no extra/student.onnx.*re-export it with `python -m infer.export`"):
    QASystem.from_bundle(plain, engine="onnx")
  assert QASystem.from_bundle(plain).engine.name == "jax"  # auto: JAX is installed here
  with pytest.raises(ValueError, match="engine must be one of"):
    QASystem.from_bundle(plain, engine="torch")


def test_evaluate_cli_last_line_is_json(bundle, workdir, tmp_path):
  nq_open = tmp_path / "nq_open.jsonl"
  questions = list(read_questions(workdir / "data" / "toy_dev.jsonl"))
  nq_open.write_text("".join(json.dumps({"question": q.question, "answer": list(q.answers)}) + "\n"
                             for q in questions))
  predictions = tmp_path / "pred.jsonl"
  proc = _run("infer.evaluate", f"--bundle={bundle[0]}", f"--questions={nq_open}", "--limit=6",
              f"--out={predictions}", "--rule=weighted")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["n"] == 6 and 0.0 <= summary["em"] <= summary["f1"] + 1e-9 <= 1.0 + 1e-9
  assert summary["questions_per_s"] > 0 and summary["rule"] == "weighted" and summary["top_k"] == 8
  assert set(summary["em_at"]) == {"1", "8"} and summary["em"] == max(summary["em_at"].values())
  assert summary["em_at"][str(summary["best_read_passages"])] == summary["em"]
  assert set(summary["top_k_accuracy"]) == {"top1", "top5", "top8"}
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert [r["question"] for r in rows] == [q.question for q in questions[:6]]
  assert all({"id", "prediction", "passage_id", "title", "score", "answers", "correct"} <= set(r) for r in rows)
  assert [r["correct"] for r in rows] == [bool(exact_match(r["prediction"], r["answers"])) for r in rows]
  assert np.mean([r["correct"] for r in rows]) == summary["em"]  # the lines hold the best m' predictions
  assert "evaluate" in proc.stderr  # the progress bar
  assert read_counts(8) == [1, 8] and read_counts(25) == [1, 10, 20, 25]
  assert read_counts(25, max_read=10) == [1, 10] and read_counts(25, max_read=1) == [1]

  # Reading only the top passage: the same m'=1 answers, the top-k accuracy of all 8 retrieved.
  system = QASystem.from_bundle(bundle[0])
  one, _ = evaluate_system(system, questions[:6], top_k=8, rule="weighted",
                           passage_score_weight=system.settings.passage_score_weight, progress=False, max_read=1)
  assert set(one["em_at"]) == {"1"} and one["em"] == summary["em_at"]["1"] and one["best_read_passages"] == 1
  assert one["top_k_accuracy"] == summary["top_k_accuracy"]


def test_corrupted_bundle_is_refused_naming_the_file(bundle, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(bundle[0], broken, ignore=shutil.ignore_patterns(".cache"))
  params = broken / "model" / "params.safetensors.bz2"
  data = bytearray(params.read_bytes())
  data[len(data) // 2] ^= 0xFF
  params.write_bytes(bytes(data))
  with pytest.raises(BundleError, match="params.safetensors.bz2"):
    QASystem.from_bundle(broken)
  (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "answer": ["a"]}) + "\n")
  proc = _run("infer.evaluate", f"--bundle={broken}", f"--questions={tmp_path / 'q.jsonl'}")
  assert proc.returncode != 0 and "params.safetensors.bz2" in proc.stderr and "Traceback" not in proc.stderr

  truncated = tmp_path / "truncated"
  shutil.copytree(bundle[0], truncated, ignore=shutil.ignore_patterns(".cache"))
  tokens = truncated / "corpus" / "tokens.npy.bz2"
  tokens.write_bytes(tokens.read_bytes()[:-10])
  with pytest.raises(BundleError, match="tokens.npy.bz2.*truncated"):
    QASystem.from_bundle(truncated)


def test_ask_highlights_the_answer():
  passage = RetrievedPassage(3, "Danube", "It ends in the Black Sea.", 2.0, 0)
  p = Prediction("q", (Answer("Black Sea", 0.75, 1.0, 15, 24, passage),), (passage,))
  assert ask.highlight(passage.text, 15, 24, tty=False) == "It ends in the **Black Sea**."
  assert ask.highlight(passage.text, 15, 24, tty=True) == "It ends in the \033[1mBlack Sea\033[0m."
  assert ask.highlight(passage.text, -1, -1, tty=False) == passage.text
  text = ask.render(p, tty=False)
  assert "A: Black Sea" in text and "Danube" in text and "**Black Sea**" in text and "p=0.750" in text
