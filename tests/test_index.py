"""DenseIndex: exact / int8 / ah search, recall, edits, save/load and error handling."""

import os

import numpy as np
import pytest

from rnr_jax import index_search
from rnr_jax.index import DenseIndex, IndexFileError, exact_search, recall_at_k
from rnr_jax.quantize import quantize_rows


def _mixture(n: int, q: int, dim: int = 128, components: int = 1000, noise: float = 0.3, seed: int = 0):
  """Gaussian-mixture passages and queries from the same mixture."""
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((components, dim)).astype(np.float32)
  x = centers[rng.integers(0, components, n)] + noise * rng.standard_normal((n, dim))
  queries = centers[rng.integers(0, components, q)] + noise * rng.standard_normal((q, dim))
  return x.astype(np.float32), queries.astype(np.float32)


def _unit(n: int, dim: int = 128, seed: int = 0) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def mixture():
  return _mixture(20_000, 1000)


@pytest.fixture(scope="module")
def int8_index(mixture):
  x, q = mixture
  return DenseIndex.build(x, "int8", ids=np.arange(len(x)) * 3 + 7, eval_queries=q)


def _brute_force(x: np.ndarray, q: np.ndarray, k: int):
  s = q @ x.T
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(s, order, axis=1)


def test_recall_at_k():
  ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  got = np.array([[4, 3, 9, -1], [5, -1, -1, -1]])
  assert recall_at_k(ref, got) == pytest.approx((2 / 4 + 1 / 4) / 2)
  assert recall_at_k(ref, got, k=1) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    recall_at_k(ref, got[:, :2], k=4)


def test_exact_equals_numpy_brute_force(mixture, monkeypatch):
  x, q = mixture
  monkeypatch.setattr(index_search, "_SCORE_BLOCK_ELEMS", 20_000 * 7)  # 7 queries per block: several blocks.
  index = DenseIndex.build(x, "exact", num_eval_queries=0)
  ids, scores = index.search(q[:50], 20)
  want_ids, want_scores = _brute_force(x, q[:50], 20)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_exact_search_tiles_the_corpus(mixture, monkeypatch):
  """Query blocks times row blocks (the last one partial), each tile's top-k merged: brute force's answer, and a
  removed row in any tile never comes back."""
  x, q = mixture
  monkeypatch.setattr(index_search, "_PASSAGE_BLOCK", 3_000)
  monkeypatch.setattr(index_search, "_SCORE_BLOCK_ELEMS", 3_000 * 9)  # 9 queries per block
  want_ids, want_scores = _brute_force(x, q[:50], 20)
  rows, scores = exact_search(x, q[:50], 20)
  np.testing.assert_array_equal(rows, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  removed = np.unique(want_ids[:, 0])
  rows, _ = exact_search(x, q[:50], 20, excluded_rows=removed)
  assert not np.isin(rows, removed).any() and (rows >= 0).all()


def test_int8_recall_on_clustered_embeddings(int8_index, mixture):
  x, q = mixture
  ids_map = np.arange(len(x)) * 3 + 7
  ref, _ = exact_search(x, q, 20)
  ids, _ = int8_index.search(q, 20)
  assert recall_at_k(ids_map[ref], ids) >= 0.99
  assert int8_index.build_report["recall@20"] >= 0.99
  assert int8_index.build_report["recall@10"] >= 0.98


def test_int8_recall_on_normalized_random_vectors():
  # 8-bit scalar quantization of isotropic unit vectors loses some top-20 boundary
  # swaps whatever the quantizer (FAISS SQ8 simulated: 0.987); 0.98 is the floor.
  x, q = _unit(5000), _unit(1000, seed=1)
  index = DenseIndex.build(x, "int8", eval_queries=q)
  assert index.build_report["recall@20"] >= 0.98
  assert index.build_report["recall@10"] >= 0.975


def test_int8_is_exact_search_over_its_codes(int8_index, mixture, tmp_path):
  """The INT8 index ranks exactly as float32 search over codes / multipliers (what is stored)."""
  _, q = mixture
  int8_index.save(tmp_path / "ix")
  codes = np.load(tmp_path / "ix/scann/int8_dataset.npy")
  multipliers = np.load(tmp_path / "ix/scann/int8_multipliers.npy")
  assert codes.dtype == np.int8 and codes.shape == (20_000, 128) and np.abs(codes).max() <= 127
  ref, ref_scores = exact_search(codes.astype(np.float32) / multipliers, q[:200], 20)
  ids, scores = int8_index.search(q[:200], 20)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)
  assert recall_at_k(np.arange(20_000)[ref] * 3 + 7, ids) >= 0.999  # Only float-rounding ties may differ.


def test_int8_storage_is_a_quarter_of_float32(int8_index, tmp_path):
  sizes = int8_index.save(tmp_path / "ix")
  assert sizes["scann/int8_dataset.npy"] == 20_000 * 128 + 128
  assert sum(v for k, v in sizes.items() if k.startswith("scann/")) < 20_000 * 128 + 4096


@pytest.mark.parametrize("kind", ["exact", "int8", "int8_row", "ah"])
def test_save_load_round_trip(kind, mixture, tmp_path):
  x, q = mixture
  index = DenseIndex.build(x[:5000], kind, ids=np.arange(5000) + 100, num_eval_queries=200)
  ids, scores = index.search(q[:100], 20)
  sizes = index.save(tmp_path / "ix")
  assert set(sizes) >= {"index.json", "ids.npy"}
  loaded = DenseIndex.load(tmp_path / "ix")
  ids2, scores2 = loaded.search(q[:100], 20)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(scores, scores2)
  assert loaded.kind == kind and loaded.dim == 128 and len(loaded) == 5000
  assert loaded.build_report == index.build_report


def test_ah_recall_and_overrides(mixture):
  x, q = mixture
  index = DenseIndex.build(x, "ah", eval_queries=q[:300], num_leaves=100, num_leaves_to_search=20)
  assert index.settings["num_leaves"] == 100 and index.settings["num_leaves_to_search"] == 20
  assert index.build_report["recall@10"] >= 0.9
  with pytest.raises(ValueError, match="num_leaves_to_search"):
    DenseIndex.build(x[:2000], "ah", num_leaves=10, num_leaves_to_search=11)


@pytest.mark.parametrize("kind", ["exact", "int8", "int8_row", "ah"])
def test_add_is_retrievable_at_once(kind, mixture, tmp_path):
  x, _ = mixture
  index = DenseIndex.build(x[:5000], kind, num_eval_queries=0)
  new, _ = _mixture(3, 1, seed=5)
  new *= 3.0  # Far longer than any stored vector: its own best match under inner product.
  new_ids = np.array([10_000, 10_001, 10_002])
  index.add(new, new_ids)
  assert len(index) == 5003 and 10_001 in index and index.pending_edits == 3
  ids, _ = index.search(new, 5)
  np.testing.assert_array_equal(ids[:, 0], new_ids)
  index.save(tmp_path / "ix")  # Compacts: the new rows are now main rows.
  assert index.pending_edits == 0
  for idx in (index, DenseIndex.load(tmp_path / "ix")):
    ids, _ = idx.search(new, 5)
    np.testing.assert_array_equal(ids[:, 0], new_ids)


@pytest.mark.parametrize("kind", ["exact", "int8", "int8_row", "ah"])
def test_removed_ids_are_never_returned(kind, mixture, tmp_path):
  x, q = mixture
  index = DenseIndex.build(x[:3000], kind, num_eval_queries=0)
  top, _ = index.search(q[:100], 5)
  removed = np.unique(top[top >= 0])
  index.remove(removed)
  assert len(index) == 3000 - len(removed) and removed[0] not in index
  ids, _ = index.search(q[:100], 50)
  assert not np.isin(ids, removed).any()
  index.save(tmp_path / "ix")
  ids, _ = DenseIndex.load(tmp_path / "ix").search(q[:100], 50)
  assert not np.isin(ids, removed).any()
  with pytest.raises(KeyError, match="not in the index"):
    index.remove(removed[:1])


def test_exact_search_over_everything_returns_each_live_id_once(mixture):
  x, q = mixture
  index = DenseIndex.build(x[:300], "exact", num_eval_queries=0)
  index.remove(np.arange(0, 300, 3))
  index.add(x[300:310], np.arange(1000, 1010))
  ids, scores = index.search(q[:4], len(index))
  for row in ids:
    assert sorted(row.tolist()) == sorted(index.ids.tolist())
  assert (np.diff(scores, axis=1) <= 0).all()


def test_replace_changes_the_embedding(mixture):
  x, _ = mixture
  index = DenseIndex.build(x[:2000], "int8", num_eval_queries=0)
  target = -3.0 * x[5:6]  # Points away from passage 5's old embedding.
  index.replace(target, [5])
  assert len(index) == 2000
  ids, _ = index.search(target, 1)
  assert ids[0, 0] == 5
  ids, _ = index.search(x[5:6], 20)
  assert 5 not in ids
  with pytest.raises(KeyError):
    index.replace(target, [99_999])
  with pytest.raises(ValueError, match="already in the index"):
    index.add(target, [5])


def _uneven(n: int, seed: int, dim: int = 128) -> np.ndarray:
  """Clustered unit vectors whose dimensions span ranges 10x apart (as our students' retrieval vectors do)."""
  rng = np.random.default_rng(seed)
  scale = np.logspace(0, -1, dim).astype(np.float32)
  centers = rng.standard_normal((300, dim)).astype(np.float32) * scale
  x = centers[rng.integers(0, 300, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32) * scale
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_row_is_exact_search_over_its_codes_and_beats_per_dimension_scales(tmp_path):
  x, q = _uneven(20_000, 0), _uneven(1000, 1)
  row = DenseIndex.build(x, "int8_row", eval_queries=q)
  per_dim = DenseIndex.build(x, "int8", eval_queries=q)
  assert row.build_report["recall@20"] > per_dim.build_report["recall@20"]
  assert row.build_report["recall@10"] > per_dim.build_report["recall@10"]
  assert row.build_report["recall@20"] >= 0.98
  sizes = row.save(tmp_path / "ix")
  assert sizes["codes.npy"] == 20_000 * 128 + 128 and sizes["row_scales.npy"] == 20_000 * 4 + 128
  codes, scales = np.load(tmp_path / "ix/codes.npy"), np.load(tmp_path / "ix/row_scales.npy")
  assert codes.dtype == np.int8 and (np.abs(codes).max(axis=1) == 127).all()  # each row spans its own grid
  stored = codes.astype(np.float32) * scales[:, None]
  np.testing.assert_allclose(stored, x, rtol=0, atol=float(scales.max()) / 2 + 1e-7)
  ref, ref_scores = exact_search(stored, q[:200], 20)
  ids, scores = row.search(q[:200], 20)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)  # exact reordering of the stored rows
  assert recall_at_k(ref, ids) >= 0.999
  again, again_scales = quantize_rows(stored)  # re-quantizing the stored rows changes nothing
  np.testing.assert_array_equal(again, codes)
  np.testing.assert_array_equal(again_scales, scales)
  zero_codes, zero_scales = quantize_rows(np.zeros((2, 4), np.float32))
  assert not zero_codes.any() and (zero_scales == 1).all()
  # A subnormal peak whose scale (peak / 127) underflows to 0 is treated as an all-zero row, not divided by 0.
  tiny_codes, tiny_scales = quantize_rows(np.array([[1e-44, 0.0]], np.float32))
  assert not tiny_codes.any() and (tiny_scales == 1).all()


@pytest.mark.parametrize("name,problem", [("codes.npy", "missing"), ("row_scales.npy", "positive")])
def test_int8_row_bad_files_are_named(tmp_path, name, problem):
  index = DenseIndex.build(_unit(300), "int8_row", num_eval_queries=0)
  index.save(tmp_path / "ix")
  path = tmp_path / "ix" / name
  if problem == "missing":
    path.unlink()
  else:  # same size, and the sha256 check is off (verify=False): only the value check catches it
    scales = np.load(path)
    scales[3] = -1.0
    np.save(path, scales)
  with pytest.raises(IndexFileError, match=name):
    DenseIndex.load(tmp_path / "ix", verify=problem == "missing")


def test_int8_compaction_keeps_codes(tmp_path):
  """Re-quantizing dequantized codes reproduces them: compaction loses no precision."""
  index = DenseIndex.build(_mixture(4000, 1)[0], "int8", num_eval_queries=0)
  index.save(tmp_path / "a")
  index.remove([17])
  index.save(tmp_path / "b")
  before = np.load(tmp_path / "a/scann/int8_dataset.npy")
  after = np.load(tmp_path / "b/scann/int8_dataset.npy")
  np.testing.assert_array_equal(np.delete(before, 17, axis=0), after)
  np.testing.assert_array_equal(np.load(tmp_path / "b/ids.npy"), np.delete(np.arange(4000), 17))


def test_int8_row_compaction_keeps_the_codes_of_kept_rows(tmp_path):
  """Compaction carries the kept rows' codes over and quantizes only the added rows (no float32 round trip)."""
  x = _mixture(3000, 2)[0]
  index = DenseIndex.build(x, "int8_row", num_eval_queries=0)
  index.save(tmp_path / "a")
  index.remove([5, 2999])
  index.add(x[:2] * 2, [5000, 5001])
  index.compact(num_eval_queries=50)
  index.save(tmp_path / "b")
  keep = np.setdiff1d(np.arange(3000), [5, 2999])
  before, after = np.load(tmp_path / "a/codes.npy"), np.load(tmp_path / "b/codes.npy")
  np.testing.assert_array_equal(after[:len(keep)], before[keep])
  np.testing.assert_array_equal(after[len(keep):], quantize_rows(x[:2] * 2)[0])
  assert np.load(tmp_path / "b/ids.npy")[-2:].tolist() == [5000, 5001] and index.build_report["recall@10"] > 0.9


def test_errors(mixture):
  x, q = mixture
  index = DenseIndex.build(x[:100], "int8", num_eval_queries=0)
  with pytest.raises(ValueError, match=r"queries must be a 2-D \[n, 128\]"):
    index.search(q[:2, :64], 5)
  with pytest.raises(ValueError, match="queries must be a 2-D"):
    index.search(q[0], 5)
  with pytest.raises(ValueError, match="NaN"):
    index.search(np.full((1, 128), np.nan, np.float32), 5)
  with pytest.raises(ValueError, match="k must be"):
    index.search(q[:2], 0)
  with pytest.warns(UserWarning, match="exceeds the 100 passages"):
    ids, _ = index.search(q[:2], 500)
  assert ids.shape == (2, 100) and sorted(ids[0].tolist()) == list(range(100))
  with pytest.raises(ValueError, match="embeddings must be"):
    index.add(x[:1, :10], [500])
  with pytest.raises(ValueError, match="duplicates"):
    DenseIndex.build(x[:3], "exact", ids=[1, 1, 2])
  with pytest.raises(ValueError, match="zero embeddings"):
    DenseIndex.build(np.zeros((0, 128), np.float32), "int8")
  with pytest.raises(ValueError, match="unknown index kind"):
    DenseIndex.build(x[:10], "hnsw")
  with pytest.raises(ValueError, match="unknown options"):
    DenseIndex.build(x[:10], "int8", num_leaves=3)
  index.remove(np.arange(100))
  with pytest.raises(ValueError, match="empty"):
    index.search(q[:2], 5)
  with pytest.raises(ValueError, match="empty"):
    index.save("/nonexistent/never-written")


@pytest.fixture()
def saved_int8(tmp_path):
  index = DenseIndex.build(_unit(500), "int8", num_eval_queries=0)
  index.save(tmp_path / "ix")
  return tmp_path / "ix"


def test_load_missing_meta(tmp_path):
  with pytest.raises(IndexFileError, match="index.json: missing"):
    DenseIndex.load(tmp_path)


@pytest.mark.parametrize("name", ["ids.npy", "scann/int8_dataset.npy", "scann/scann_assets.pbtxt"])
def test_load_missing_truncated_or_corrupt_file(saved_int8, name):
  path = os.path.join(saved_int8, name)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(IndexFileError, match=f"{name}: sha256"):
    DenseIndex.load(saved_int8)
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(IndexFileError, match=f"{name}: size"):
    DenseIndex.load(saved_int8)
  os.remove(path)
  with pytest.raises(IndexFileError, match=f"{name}: missing"):
    DenseIndex.load(saved_int8)


def test_load_invalid_meta(saved_int8):
  with open(os.path.join(saved_int8, "index.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(IndexFileError, match="index.json: not valid JSON"):
    DenseIndex.load(saved_int8)


def test_save_refuses_foreign_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError):
    DenseIndex.build(_unit(10), "exact").save(tmp_path)
  assert (tmp_path / "notes.txt").read_text() == "keep me"
