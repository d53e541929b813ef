"""Bundle: write/load round trips, compression, verification, cache reuse, updates, footprint."""

import bz2
import hashlib
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from rnr_jax.bundle import format_footprint
from rnr_jax.bundle import (BundleError, flatten_params, load_bundle, stored_values,
                            unflatten_params, update_bundle, write_bundle)
from rnr_jax.index import DenseIndex

DIM = 32


def _sha(path) -> str:
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return {
      "encoder": {
          "embed": {"embedding": rng.standard_normal((300, DIM)).astype(np.float32)},
          "layer_0": {"kernel": rng.standard_normal((DIM, DIM)).astype(np.float32) * 1e-3,
                      "bias": rng.standard_normal(DIM).astype(ml_dtypes.bfloat16)},
      },
      "head": {"w": rng.standard_normal((DIM, 2)).astype(np.float64), "steps": np.arange(4, dtype=np.int32)},
  }


@pytest.fixture(scope="module")
def embeddings():
  return np.random.default_rng(1).standard_normal((2000, DIM)).astype(np.float32)


@pytest.fixture()
def index(embeddings):
  return DenseIndex.build(embeddings, "int8", ids=np.arange(2000) + 10, num_eval_queries=100)


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
  """A token-ID corpus directory (plus an already-compressed file), tokenizer files and an extra file."""
  root = tmp_path_factory.mktemp("resources")
  corpus = root / "corpus"
  (corpus / "shards").mkdir(parents=True)
  rng = np.random.default_rng(2)
  np.save(corpus / "tokens.npy", rng.integers(0, 30522, 50_000).astype(np.uint16))
  np.save(corpus / "offsets.npy", np.arange(0, 50_001, 25, dtype=np.int64))
  (corpus / "meta.json").write_text(json.dumps({"vocab_size": 30522, "count": 2000}))
  (corpus / "shards" / "titles.txt.bz2").write_bytes(bz2.compress(b"title one\ntitle two\n" * 100))
  tok = root / "tokenizer"
  tok.mkdir()
  (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(500)]))
  (tok / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  extra = root / "README.txt"
  extra.write_text("served by rnr-jax\n")
  return {"corpus": str(corpus), "tokenizer": str(tok), "extra": str(extra)}


def _write(out, params, index, resources, **kw):
  return write_bundle(out, params=params, model_config={"num_layers": 1, "hidden": DIM}, index=index,
                      token_corpus_dir=resources["corpus"], tokenizer_dir_or_files=resources["tokenizer"],
                      extra_files={"README.txt": resources["extra"]}, inference_config={"top_k": 20}, **kw)


def _corpus_files(root):
  out = {}
  for r, _, names in os.walk(root):
    for n in names:
      out[os.path.relpath(os.path.join(r, n), root)] = open(os.path.join(r, n), "rb").read()
  return out


@pytest.mark.parametrize("binary,text", [("bz2", "lzma"), ("lzma", "bz2"), ("none", "none")])
def test_round_trip(binary, text, params, index, embeddings, resources, tmp_path):
  out = tmp_path / "bundle"
  queries = embeddings[:50] + 0.1
  want_ids, want_scores = index.search(queries, 20)
  manifest = _write(out, params, index, resources, compression={"binary": binary, "text": text})

  # Manifest: every stored file listed with its size and sha256, and the right compression.
  on_disk = {os.path.relpath(os.path.join(r, n), out) for r, _, ns in os.walk(out) for n in ns}
  assert on_disk == {e["path"] for e in manifest["files"]} | {"manifest.json"}
  for e in manifest["files"]:
    assert os.path.getsize(out / e["path"]) == e["bytes"]
    assert _sha(out / e["path"]) == e["sha256"]
  by_path = {e["unpacked_path"]: e for e in manifest["files"]}
  assert by_path["corpus/offsets.npy"]["compression"] == binary
  assert by_path["tokenizer/vocab.txt"]["compression"] == text
  assert by_path["corpus/shards/titles.txt.bz2"]["compression"] == "none"  # Already compressed.
  assert by_path["config.json"]["compression"] == "none"
  assert {e["component"] for e in manifest["files"]} == {"model", "index", "corpus", "other"}
  assert json.loads((out / "manifest.json").read_text()) == manifest

  b = load_bundle(out)
  # Parameters: float16-rounded values, computed in float32; integer leaves unchanged.
  flat, got = flatten_params(params), flatten_params(b.params)
  assert set(flat) == set(got)
  for key, value in flat.items():
    if value.dtype.kind == "i":
      np.testing.assert_array_equal(got[key], value)
      assert got[key].dtype == value.dtype
    else:
      assert got[key].dtype == np.float32
      np.testing.assert_array_equal(got[key], value.astype(np.float16).astype(np.float32))
  # Index, corpus, tokenizer, extras, config.
  ids, scores = b.index.search(queries, 20)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)
  assert _corpus_files(b.corpus_dir) == _corpus_files(resources["corpus"])
  assert _corpus_files(b.tokenizer_dir) == _corpus_files(resources["tokenizer"])
  assert open(b.extra_files["README.txt"]).read() == "served by rnr-jax\n"
  assert b.config["model"] == {"num_layers": 1, "hidden": DIM}
  assert b.config["inference"] == {"top_k": 20}
  assert b.config["index"] == {"kind": "int8", "dim": DIM, "size": 2000}
  for e in manifest["files"]:
    assert _sha(os.path.join(b.unpacked_dir, e["unpacked_path"])) == e["raw_sha256"]
  if binary == text == "none":
    assert b.unpacked_dir == str(out) and b.unpacked_files == 0
  else:
    assert b.unpacked_files > 0


def test_compression_shrinks_and_footprint(params, index, resources, tmp_path):
  packed = _write(tmp_path / "packed", params, index, resources)
  plain = _write(tmp_path / "plain", params, index, resources, compression={"binary": "none", "text": "none"})
  rows = {r["component"]: r for r in packed["footprint"]}
  assert [r["component"] for r in packed["footprint"]] == ["model", "index", "corpus", "other", "total"]
  assert rows["total"]["stored_bytes"] == sum(e["bytes"] for e in packed["files"])
  assert rows["total"]["raw_bytes"] == sum(e["raw_bytes"] for e in packed["files"])
  assert rows["corpus"]["stored_bytes"] < rows["corpus"]["raw_bytes"]
  plain_rows = {r["component"]: r for r in plain["footprint"]}
  assert plain_rows["total"]["stored_bytes"] == plain_rows["total"]["raw_bytes"] == rows["total"]["raw_bytes"]
  # float16 values: the weights file is about half of float32.
  n_float = sum(v.size for v in flatten_params(params).values() if v.dtype.kind != "i")
  assert rows["model"]["raw_bytes"] < n_float * 2 + 2000
  table = format_footprint(packed["footprint"])
  assert table.splitlines()[0].startswith("| component | files | stored (MB)")
  assert "| total |" in table and len(table.splitlines()) == 7


def test_every_file_is_verified(params, index, resources, tmp_path):
  src = tmp_path / "bundle"
  manifest = _write(src, params, index, resources)
  for e in manifest["files"]:
    for damage in ("flip", "truncate", "delete"):
      out = tmp_path / "damaged"
      shutil.rmtree(out, ignore_errors=True)
      shutil.copytree(src, out)
      path = out / e["path"]
      data = path.read_bytes()
      if damage == "flip":
        path.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x40]) + data[len(data) // 2 + 1:])
      elif damage == "truncate":
        path.write_bytes(data[:-1])
      else:
        path.unlink()
      with pytest.raises(BundleError) as err:
        load_bundle(out)
      assert err.value.path == str(path), (e["path"], damage)
      assert {"flip": "sha256", "truncate": "size", "delete": "missing"}[damage] in str(err.value)


def test_manifest_missing_or_invalid(params, index, resources, tmp_path):
  out = tmp_path / "bundle"
  _write(out, params, index, resources)
  (out / "manifest.json").write_text('{"format": "something else"}')
  with pytest.raises(BundleError, match="manifest.json: not an rnr_jax.bundle manifest"):
    load_bundle(out)
  (out / "manifest.json").write_text("{")
  with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
    load_bundle(out)
  (out / "manifest.json").unlink()
  with pytest.raises(BundleError, match="manifest.json: missing"):
    load_bundle(out)


def test_cache_is_reused(params, index, resources, tmp_path):
  out = tmp_path / "bundle"
  _write(out, params, index, resources)
  first = load_bundle(out)
  assert first.unpacked_dir.startswith(str(out / ".cache"))
  assert first.unpacked_files > 0
  mtimes = {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, ns in os.walk(first.unpacked_dir) for p in ns}
  second = load_bundle(out)
  assert second.unpacked_files == 0 and second.unpacked_dir == first.unpacked_dir
  assert mtimes == {p: os.stat(os.path.join(r, p)).st_mtime_ns
                    for r, _, ns in os.walk(second.unpacked_dir) for p in ns}
  # A damaged cache is detected (sha256 of cached files) and rebuilt (offsets.npy compresses: the cache has a copy).
  cached = os.path.join(first.unpacked_dir, "corpus", "offsets.npy")
  with open(cached, "r+b") as f:
    f.seek(200)
    f.write(b"\xff\xff")
  third = load_bundle(out)
  assert third.unpacked_files > 0
  assert open(os.path.join(third.corpus_dir, "offsets.npy"), "rb").read() == \
      open(os.path.join(resources["corpus"], "offsets.npy"), "rb").read()
  # An explicit cache directory.
  other = load_bundle(out, cache_dir=tmp_path / "elsewhere")
  assert other.unpacked_dir.startswith(str(tmp_path / "elsewhere")) and other.unpacked_files > 0


def test_update_bundle_replaces_index_and_corpus(params, index, embeddings, resources, tmp_path):
  out = tmp_path / "bundle"
  before = _write(out, params, index, resources)
  load_bundle(out)  # Leaves a cache inside the bundle; the update must drop it.
  # A knowledge edit: one passage removed, one added, and the corpus rewritten.
  new = 5.0 * embeddings[:1]
  index.remove([10])
  index.add(new, [5000])
  corpus = tmp_path / "corpus2"
  shutil.copytree(resources["corpus"], corpus)
  np.save(corpus / "offsets.npy", np.arange(0, 50_001, 25, dtype=np.int64)[:-1])
  after = update_bundle(out, index=index, token_corpus_dir=corpus)
  assert not (out / ".cache").exists()
  old = {e["unpacked_path"]: e for e in before["files"]}
  new_entries = {e["unpacked_path"]: e for e in after["files"]}
  assert old["model/params.safetensors"] == new_entries["model/params.safetensors"]
  assert old["tokenizer/vocab.txt"] == new_entries["tokenizer/vocab.txt"]
  assert old["corpus/offsets.npy"]["raw_sha256"] != new_entries["corpus/offsets.npy"]["raw_sha256"]
  b = load_bundle(out)
  ids, _ = b.index.search(new, 3)
  assert ids[0, 0] == 5000 and 10 not in b.index
  assert b.config["index"]["size"] == 2000
  assert b.config["inference"] == {"top_k": 20}
  np.testing.assert_array_equal(np.load(os.path.join(b.corpus_dir, "offsets.npy")), np.load(corpus / "offsets.npy"))
  update_bundle(out, inference_config={"top_k": 5})
  assert load_bundle(out).config["inference"] == {"top_k": 5}


def test_write_errors(params, index, resources, tmp_path):
  out = tmp_path / "bundle"
  _write(out, params, index, resources)
  with pytest.raises(FileExistsError):
    _write(out, params, index, resources)
  _write(out, params, index, resources, overwrite=True)
  foreign = tmp_path / "home"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="not a bundle"):
    _write(foreign, params, index, resources, overwrite=True)
  assert (foreign / "notes.txt").read_text() == "keep"
  with pytest.raises(ValueError, match="beyond the float16 range"):
    _write(tmp_path / "b2", {"w": np.array([1e6], np.float32)}, index, resources)
  with pytest.raises(ValueError, match="compression"):
    _write(tmp_path / "b3", params, index, resources, compression={"binary": "zip"})
  assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()


def test_flatten_round_trip(params):
  flat = flatten_params(params)
  assert "encoder/layer_0/kernel" in flat
  back = unflatten_params(flat)
  assert flatten_params(back).keys() == flat.keys()
  with pytest.raises(ValueError, match="without '/'"):
    flatten_params({"a/b": np.zeros(1)})


def test_files_compression_barely_shrinks_are_stored_plain_and_linked(params, index, tmp_path):
  """Random bytes, and random bytes with 5% zeros (bzip2 saves about 5%), are stored as they are and hard-linked into
  the unpack cache, so they take their bytes once on disk; with 40% zeros they are compressed."""
  rng = np.random.default_rng(3)
  files = {"noise.bin": rng.bytes(40_000), "five.bin": rng.bytes(38_000) + bytes(2_000),
           "forty.bin": rng.bytes(24_000) + bytes(16_000)}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  manifest = write_bundle(tmp_path / "bundle", params=params, model_config={}, index=index, token_corpus_dir=None,
                          tokenizer_dir_or_files=[str(tmp_path / n) for n in files], extra_files=None)
  entries = {e["unpacked_path"].removeprefix("tokenizer/"): e for e in manifest["files"]}
  for name in ("noise.bin", "five.bin"):
    assert entries[name]["compression"] == "none" and entries[name]["path"] == f"tokenizer/{name}"
    assert entries[name]["bytes"] == entries[name]["raw_bytes"] == 40_000
  assert entries["forty.bin"]["compression"] == "bz2" and entries["forty.bin"]["bytes"] < 30_000
  b = load_bundle(tmp_path / "bundle")
  assert b.unpacked_dir != str(tmp_path / "bundle")  # compressed files were unpacked into a cache
  for name, data in files.items():
    assert open(os.path.join(b.tokenizer_dir, name), "rb").read() == data
  for name in ("noise.bin", "five.bin"):
    assert os.path.samefile(os.path.join(b.tokenizer_dir, name), tmp_path / "bundle" / "tokenizer" / name)
  assert b.corpus_dir is None and b.extra_files == {}


def _smaller_weights(tmp_path, params, index, resources, weights_dtype):
  """Bundles of ``params`` as float16 and as ``weights_dtype`` (in tmp_path/int8): the model-bytes ratio of the
  second to the first, and the second's loaded params."""
  fp16 = _write(str(tmp_path / "fp16"), params, index, resources)
  small = _write(str(tmp_path / "int8"), params, index, resources, weights_dtype=weights_dtype)
  model_bytes = [next(r for r in m["footprint"] if r["component"] == "model")["raw_bytes"] for m in (fp16, small)]
  return model_bytes[1] / model_bytes[0], load_bundle(str(tmp_path / "int8")).params


def test_int8_word_embeddings(index, resources, tmp_path):
  rng = np.random.default_rng(5)
  table = rng.standard_normal((3000, DIM)).astype(np.float32) * 0.05
  table[7] = 0.0  # an all-zero row must survive (scale 1, not 0/0)
  params = {"embeddings": {"word_embeddings": {"embedding": table}},
            "layer_0": {"kernel": rng.standard_normal((DIM, DIM)).astype(np.float32)}}
  size_ratio, loaded = _smaller_weights(tmp_path, params, index, resources, "float16+int8-embeddings")
  # int8 rows + one float32 scale per row: a bit over half of the float16 table.
  assert size_ratio < 0.6
  got = loaded["embeddings"]["word_embeddings"]["embedding"]
  assert got.dtype == np.float32 and got.shape == table.shape
  row_max = np.abs(table).max(axis=1, keepdims=True)
  assert np.all(np.abs(got - table) <= row_max / 254 + 1e-7)  # half a quantisation step per row
  assert np.all(got[7] == 0.0)
  # Other tensors are float16 values as usual.
  np.testing.assert_array_equal(loaded["layer_0"]["kernel"],
                                params["layer_0"]["kernel"].astype(np.float16).astype(np.float32))
  assert json.load(open(tmp_path / "int8" / "config.json"))["weights"]["stored_dtype"] == "float16+int8-embeddings"


def test_int8_weights(index, resources, tmp_path):
  rng = np.random.default_rng(6)
  kernel = rng.standard_normal((DIM, 3, 8)).astype(np.float32)  # a DenseGeneral kernel [in, heads, head_dim]
  kernel[:, 1, 2] = 0.0  # an all-zero output unit
  params = {"embeddings": {"word_embeddings": {"embedding": rng.standard_normal((500, DIM)).astype(np.float32)}},
            "layer_0": {"kernel": kernel, "bias": rng.standard_normal(24).astype(np.float32)}}
  size_ratio, loaded = _smaller_weights(tmp_path, params, index, resources, "int8")
  assert size_ratio < 0.6
  got = loaded["layer_0"]["kernel"]
  assert got.dtype == np.float32 and got.shape == kernel.shape
  unit_max = np.abs(kernel).max(axis=0, keepdims=True)  # per output unit, over the input dimension
  assert np.all(np.abs(got - kernel) <= unit_max / 254 + 1e-7)
  assert np.all(got[:, 1, 2] == 0.0)
  table = params["embeddings"]["word_embeddings"]["embedding"]
  row_max = np.abs(table).max(axis=1, keepdims=True)
  assert np.all(np.abs(loaded["embeddings"]["word_embeddings"]["embedding"] - table) <= row_max / 254 + 1e-7)
  # Vectors stay float16 values; stored_values() predicts exactly what the bundle loads.
  np.testing.assert_array_equal(loaded["layer_0"]["bias"], params["layer_0"]["bias"].astype(np.float16))
  predicted = stored_values(params, "int8")
  for key in ("kernel", "bias"):
    np.testing.assert_array_equal(predicted["layer_0"][key], loaded["layer_0"][key])

