"""Token-ID corpus: exact round trips, compressed forms, memory mapping, text recovery."""

import json
import os
import unicodedata

import numpy as np
import pytest

from rnr_jax.data import token_corpus as tc


def _records(rng, n=50, vocab=30522):
  return [rng.integers(0, vocab, size=int(rng.integers(0, 40))) for _ in range(n)]


def test_token_dtype():
  assert tc.token_dtype(30522) == np.uint16 and tc.token_dtype(65536) == np.uint16
  assert tc.token_dtype(65537) == np.int32


def test_ragged_array(tmp_path):
  r = tc.RaggedArray.from_sequences([[1, 2], [], [3]], np.int32)
  assert len(r) == 3 and r[0].tolist() == [1, 2] and r[1].tolist() == [] and r[-1].tolist() == [3]
  assert r.lengths().tolist() == [2, 0, 1] and r.offsets.dtype == np.int64
  with pytest.raises(IndexError):
    r[3]  # pylint: disable=pointless-statement
  r.save(tmp_path, "x")
  back = tc.RaggedArray.load(tmp_path, "x")
  assert isinstance(back.values, np.memmap) and [back[i].tolist() for i in range(3)] == [[1, 2], [], [3]]
  with pytest.raises(ValueError, match="do not fit"):
    tc.RaggedArray.from_sequences([[70000]], np.uint16)
  assert len(tc.RaggedArray.from_sequences([], np.int32)) == 0


@pytest.mark.parametrize("vocab", [30522, 100000])
def test_round_trip_plain_and_compressed(tmp_path, vocab):
  rng = np.random.default_rng(0)
  records = _records(rng, vocab=vocab)
  corpus = tc.TokenCorpus.write(tmp_path / "c", records, vocab, tokenizer="test")
  assert corpus.tokens.dtype == tc.token_dtype(vocab) and isinstance(corpus.tokens, np.memmap)
  assert len(corpus) == len(records)
  for i, rec in enumerate(records):
    assert corpus[i].dtype == np.int32 and corpus.get(i).tolist() == rec.tolist()
  assert corpus.lengths().tolist() == [len(r) for r in records]
  assert corpus.nbytes == tc.data_bytes(tmp_path / "c") - 2 * 128  # two .npy headers

  loaded = tc.TokenCorpus.load(tmp_path / "c")
  np.testing.assert_array_equal(loaded.tokens, corpus.tokens)
  for method in ("bz2", "lzma"):
    out = tc.compress(tmp_path / "c", method)
    assert out == f"{tmp_path / 'c'}.{method}"
    assert sorted(os.listdir(out)) == sorted(["meta.json", f"tokens.npy.{method}", f"offsets.npy.{method}"])
    cache = tmp_path / f"cache_{method}"
    back = tc.TokenCorpus.load(out, cache_dir=cache)
    np.testing.assert_array_equal(back.tokens, corpus.tokens)
    np.testing.assert_array_equal(back.offsets, corpus.offsets)
    assert back.path.startswith(str(cache)) and "compression" not in back.meta
    again = tc.TokenCorpus.load(out, cache_dir=cache)  # cached: no second decompression
    assert again.path == back.path
  with pytest.raises(ValueError, match="already compressed"):
    tc.compress(f"{tmp_path / 'c'}.bz2", "lzma")
  with pytest.raises(ValueError, match="unknown compression"):
    tc.compress(tmp_path / "c", "zip")


def test_corrupt_compressed_form_is_detected(tmp_path):
  tc.TokenCorpus.write(tmp_path / "c", [np.arange(10), np.arange(5)], 30522)
  out = tc.compress(tmp_path / "c", "bz2")
  meta_path = os.path.join(out, "meta.json")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  meta["sha256"]["tokens.npy"] = "0" * 64
  with open(meta_path, "w", encoding="utf-8") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="sha256"):
    tc.TokenCorpus.load(out, cache_dir=tmp_path / "cache")
  assert os.listdir(tmp_path / "cache" / "token_corpus") == []  # nothing half-done left in the cache


def test_not_a_corpus(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a token-ID corpus"):
    tc.TokenCorpus.load(tmp_path)
  (tmp_path / "meta.json").write_text(json.dumps({"format": "other"}), encoding="utf-8")
  with pytest.raises(ValueError, match="unsupported token corpus format"):
    tc.TokenCorpus.load(tmp_path)


def _squash(s):
  """Lowercase, accents stripped, whitespace removed: what uncased WordPiece decoding preserves."""
  s = "".join(ch for ch in unicodedata.normalize("NFD", s.lower()) if not unicodedata.combining(ch))
  return "".join(s.split())


def test_text_recoverable_with_minilm_tokenizer(tmp_path):
  from rnr_jax import tokenization  # pylint: disable=import-outside-toplevel

  try:
    tok = tokenization.Tokenizer.from_pretrained(tokenization.default_tokenizer_path())
  except ImportError as e:
    pytest.skip(str(e))
  titles = ["Charles Darwin", "Café Müller"]
  texts = ["Charles Robert Darwin (1809-1882) was an English naturalist.",
           "Café Müller is a dance piece by Pina Bausch, first performed in Wuppertal."]
  corpus = tc.TokenCorpus.write(tmp_path / "c", tok.passage_token_ids(titles, texts), tok.vocab_size)
  assert corpus.tokens.dtype == np.uint16
  with pytest.raises(ValueError, match="needs a tokenizer"):
    corpus.text(0)
  corpus = tc.TokenCorpus.load(tc.compress(tmp_path / "c", "lzma"), tokenizer=tok, cache_dir=tmp_path / "cache")
  for i, (title, text) in enumerate(zip(titles, texts)):
    title_ids, text_ids = tok.split_record(corpus[i])
    assert _squash(tok.decode(text_ids)) == _squash(text)
    assert _squash(tok.decode(title_ids)) == _squash(title)
    assert _squash(corpus.text(i)) == _squash(title + text)
