"""Inference without JAX: the ONNX graph of a unified student against the JAX functions, the numpy INT8 index search
against ScaNN, BM25 without scipy, and a bundle loaded and served in a process where JAX cannot be imported."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rnr_jax import onnx_export, qa_model
from rnr_jax.bundle import flatten_params, load_bundle, stored_values, write_bundle
from rnr_jax.data.bm25 import BM25Index
from rnr_jax.index import DenseIndex
from rnr_jax.index_search import NumpySearcher
from rnr_jax.runtime import GRAPH_FILE, INPUTS, OnnxStudent
from rnr_jax.specs import ReaderSpec, SystemSpec
from unified_fixtures import TINY_BERT, random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _system(encoder, pooling: str, normalize: bool, retrieval_dim: int = 8) -> SystemSpec:
  spec = ReaderSpec(encoder=encoder, pooling=pooling, retrieval_dim=retrieval_dim, tokenizer_fingerprint="t",
                    question_len=16, reader_len=32, max_answer_len=5, buckets=(16, 32))
  return SystemSpec.unified_model(spec, normalize=normalize)


def _jax_outputs(spec: SystemSpec, params, batch) -> tuple[np.ndarray, np.ndarray]:
  inputs = {k: batch[k] for k in INPUTS}
  return np.asarray(spec.embed_fns()[0](params, inputs)), np.asarray(spec.read_fn()(params, inputs))


def _assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * float(np.abs(want).max()))


@pytest.mark.parametrize("pooling,normalize,external", [("cls", False, False), ("mean", True, True)])
def test_graph_computes_the_students_embed_and_read(pooling, normalize, external):
  spec = _system(TINY_BERT, pooling, normalize)
  batch = random_batch(length=12)  # rows of different lengths: padding must not leak into any output
  params = qa_model.init_params(spec.reader.build(), jax.random.key(1))
  flat = flatten_params(jax.device_get(params))
  model = onnx_export.build_model(spec.to_json(), flat, external=external)
  student = OnnxStudent.load(model.SerializeToString(), flat if external else None)
  embedding, logits = _jax_outputs(spec, params, batch)
  _assert_close(student.embed(batch), embedding, 1e-5)
  _assert_close(student.read(batch), logits, 1e-5)
  if normalize:
    np.testing.assert_allclose(np.linalg.norm(student.embed(batch), axis=1), 1.0, atol=1e-5)
  half = {k: v[:2, :7] for k, v in batch.items() if k in INPUTS}  # another batch size and length, same student
  _assert_close(student.read(half), _jax_outputs(spec, params, half)[1], 1e-5)


def test_external_graph_holds_no_weights_and_refuses_missing_ones():
  spec = _system(TINY_BERT, "mean", True)
  flat = flatten_params(jax.device_get(qa_model.init_params(spec.reader.build(), jax.random.key(0))))
  graph = onnx_export.build_model(spec.to_json(), flat, external=True).SerializeToString()
  assert len(graph) < sum(v.nbytes for v in flat.values()) / 2
  copies = {k: np.array(v, np.float32) for k, v in flat.items()}
  student, batch = OnnxStudent.load(graph, copies), random_batch()
  want = student.read(batch)
  for value in copies.values():
    value[...] = np.nan  # ONNX Runtime holds its own copy: a loader may free the bundle's arrays
  np.testing.assert_array_equal(student.read(batch), want)
  with pytest.raises(Exception, match="qa_outputs/kernel"):
    OnnxStudent.load(graph, {k: v for k, v in flat.items() if k != "qa_outputs/kernel"})
  with pytest.raises(ValueError, match="unified"):
    onnx_export.build_model({**spec.to_json(), "unified": False}, flat)


@pytest.mark.slow
def test_graph_matches_minilm():
  """all-MiniLM-L6-v2 (6 layers, hidden 384) with reader heads, mean pooling, 128-d normalised vectors."""
  from rnr_jax.models import load_minilm  # pylint: disable=import-outside-toplevel
  config, encoder = load_minilm()
  spec = _system(config.to_hf_dict(), "mean", True, retrieval_dim=128)
  params = qa_model.with_pretrained(qa_model.init_params(spec.reader.build(), jax.random.key(0)), encoder=encoder)
  flat = flatten_params(jax.device_get(params))
  student = OnnxStudent.load(onnx_export.build_model(spec.to_json(), flat, external=True).SerializeToString(), flat)
  rng = np.random.default_rng(0)
  lengths = np.array([40, 64, 17])
  mask = (np.arange(64)[None] < lengths[:, None]).astype(np.int32)
  batch = {"input_ids": rng.integers(1000, 30000, (3, 64)).astype(np.int32) * mask, "attention_mask": mask,
           "token_type_ids": (np.arange(64)[None] >= 20).astype(np.int32) * mask}
  embedding, logits = _jax_outputs(spec, params, batch)
  _assert_close(student.embed(batch), embedding, 1e-4)
  _assert_close(student.read(batch), logits, 1e-4)


def _block(monkeypatch, *packages: str) -> None:
  """Makes ``packages`` (and their submodules) unimportable in this process."""
  for name in [m for m in sys.modules if m.split(".")[0] in packages] + list(packages):
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("kind", ["int8", "int8_row"])
def test_numpy_int8_search_matches_scann(kind, monkeypatch):
  pytest.importorskip("scann")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3000, 16)).astype(np.float32) * rng.uniform(0.1, 3.0, 16).astype(np.float32)
  queries = rng.normal(size=(64, 16)).astype(np.float32)
  with_scann = DenseIndex.build(x, kind, num_eval_queries=0)
  _block(monkeypatch, "scann")
  numpy_index = DenseIndex.build(x, kind, num_eval_queries=0)
  assert isinstance(numpy_index._searcher, NumpySearcher)
  ids, scores = numpy_index.search(queries, 20)
  want_ids, want_scores = with_scann.search(queries, 20)
  assert (ids == want_ids).mean() >= 0.995  # equal up to float rounding of near ties
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  if kind == "int8":  # an approximate search: it must differ from exact search somewhere
    exact_ids = DenseIndex.build(x, "exact", num_eval_queries=0).search(queries, 20)[0]
    assert (ids != exact_ids).any()


def test_scann_saved_index_loads_and_searches_without_scann(tmp_path, monkeypatch):
  pytest.importorskip("scann")
  rng = np.random.default_rng(1)
  x = rng.normal(size=(500, 8)).astype(np.float32)
  queries = rng.normal(size=(10, 8)).astype(np.float32)
  saved = DenseIndex.build(x, "int8", ids=np.arange(500) * 3, num_eval_queries=0)
  saved.save(tmp_path / "index")
  want = saved.search(queries, 10)
  _block(monkeypatch, "scann")
  index = DenseIndex.load(tmp_path / "index")
  got = index.search(queries, 10)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  index.remove(np.asarray(got[0][0, :1]))  # edits work; saving needs ScaNN's format
  assert got[0][0, 0] not in index.search(queries, 10)[0]
  with pytest.raises(RuntimeError, match="needs ScaNN"):
    index.save(tmp_path / "again")


_NO_JAX = """
import sys
BLOCKED = {"jax", "jaxlib", "flax", "optax", "orbax", "scipy", "scann", "ml_dtypes", "tensorstore", "torch", "onnx"}
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import numpy as np
from rnr_jax.bundle import load_bundle
from rnr_jax.runtime import OnnxStudent
bundle = load_bundle(sys.argv[1])
want = np.load(sys.argv[2])
student = OnnxStudent.from_bundle(bundle)
batch = {k: want[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
np.testing.assert_allclose(student.read(batch), want["read"], atol=1e-4)
ids, _ = bundle.index.search(student.embed(batch), 5)
np.testing.assert_array_equal(ids, want["ids"])
from rnr_jax.data.bm25 import BM25Index
texts = [" ".join(f"w{(i * 7 + j * 13) % 97}" for j in range(30)) for i in range(200)]
bm25 = BM25Index.build(["t"] * 200, texts, stemmer="none").search(["w3 w5 w40", "w11 w12"], 10)
np.testing.assert_array_equal(bm25[0], want["bm25_ids"])
np.testing.assert_allclose(bm25[1], want["bm25_scores"], rtol=1e-6)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_bundle_serves_in_a_process_without_jax(tmp_path):
  """An int8-weights bundle with an int8_row index and the graph: loaded, read and searched where JAX, Flax, scipy,
  ScaNN, ml_dtypes and onnx cannot be imported, with the answers of the JAX model on the stored weights and ScaNN's
  search; BM25 ranks there as here."""
  spec = _system(TINY_BERT, "mean", True)
  params = jax.device_get(qa_model.init_params(spec.reader.build(), jax.random.key(2)))
  batch = random_batch(length=12)
  rng = np.random.default_rng(0)
  passages = rng.normal(size=(300, 8)).astype(np.float32)
  index = DenseIndex.build(passages, "int8_row", ids=np.arange(300) + 1000, num_eval_queries=0)
  onnx_export.save(tmp_path / GRAPH_FILE, spec.to_json(), flatten_params(params))
  write_bundle(tmp_path / "bundle", params=params, model_config=spec.to_json(), index=index, token_corpus_dir=None,
               tokenizer_dir_or_files=None, extra_files={GRAPH_FILE: tmp_path / GRAPH_FILE}, weights_dtype="int8")
  stored = stored_values(params, "int8")  # the int8 weights as the bundle loads them
  embedding, logits = _jax_outputs(spec, stored, batch)
  ids = load_bundle(tmp_path / "bundle").index.search(embedding, 5)[0]
  texts = [" ".join(f"w{(i * 7 + j * 13) % 97}" for j in range(30)) for i in range(200)]
  bm25_ids, bm25_scores = BM25Index.build(["t"] * 200, texts, stemmer="none").search(["w3 w5 w40", "w11 w12"], 10)
  np.savez(tmp_path / "want.npz", read=logits, ids=ids, bm25_ids=bm25_ids, bm25_scores=bm25_scores,
           **{k: batch[k] for k in INPUTS})
  proc = subprocess.run([sys.executable, "-c", _NO_JAX, str(tmp_path / "bundle"), str(tmp_path / "want.npz")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "ok []"
  manifest = json.load(open(tmp_path / "bundle" / "manifest.json", encoding="utf-8"))
  assert f"extra/{GRAPH_FILE}" in {e["unpacked_path"] for e in manifest["files"]}  # verified like every file
