"""Tokenization layouts against transformers' own tokenizer, offsets, buckets."""

import numpy as np
import pytest

from rnr_jax import tokenization as tk

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
  try:
    path = tk.default_tokenizer_path()
  except ImportError as e:
    pytest.skip(str(e))
  return tk.Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_tok(tok):
  return transformers.AutoTokenizer.from_pretrained(tok.path)


QUESTIONS = ["who wrote the origin of species?", "Where is Café Müller located", "when did the 2nd world war end"]
TITLES = ["Charles Darwin", "Café Müller", "World War II"]
TEXTS = [
    "Charles Robert Darwin was an English naturalist, geologist and biologist.",
    "Café Müller is a dance piece by Pina Bausch, first performed in Wuppertal.",
    "World War II, also known as the Second World War, was a global war that lasted from 1939 to 1945.",
]


def test_question_layout_matches_transformers(tok, hf_tok):
  batch = tok.questions(QUESTIONS, max_len=64)
  for i, q in enumerate(QUESTIONS):
    ref = hf_tok(q)["input_ids"]
    n = int(batch.attention_mask[i].sum())
    assert batch.input_ids[i, :n].tolist() == ref
    assert (batch.input_ids[i, n:] == tok.pad_id).all()
  assert (batch.token_type_ids == 0).all()
  assert batch.input_ids.shape[1] == tk.bucket_length(max(len(hf_tok(q)["input_ids"]) for q in QUESTIONS))


def test_passage_layout_matches_transformers_pair(tok, hf_tok):
  batch = tok.passages_from_records(tok.passage_token_ids(TITLES, TEXTS), max_len=256)
  for i, (t, x) in enumerate(zip(TITLES, TEXTS)):
    ref = hf_tok(t, x)["input_ids"]
    n = int(batch.attention_mask[i].sum())
    assert batch.input_ids[i, :n].tolist() == ref
    assert (batch.token_type_ids[i, :n] == 1).all()


def test_truncation_keeps_final_sep(tok):
  batch = tok.passages_from_records(tok.passage_token_ids(TITLES, [" ".join(["word"] * 400)] * 3), 32, None)
  assert batch.input_ids.shape == (3, 32)
  assert (batch.input_ids[:, -1] == tok.sep_id).all()
  assert (batch.input_ids[:, 0] == tok.cls_id).all()


def test_reader_layout_matches_transformers_pair(tok, hf_tok):
  batch = tok.reader_from_records(QUESTIONS[0], tok.passage_token_ids(TITLES, TEXTS), max_len=128)
  for i, (t, x) in enumerate(zip(TITLES, TEXTS)):
    ref = hf_tok(QUESTIONS[0], t + " [SEP] " + x)["input_ids"]
    n = int(batch.attention_mask[i].sum())
    assert batch.input_ids[i, :n].tolist() == ref
    s, e = batch.text_start[i], batch.text_end[i]
    assert batch.input_ids[i, s:e].tolist() == tok.encode_texts([x])[0].tolist()
    assert (batch.token_type_ids[i, : s - len(tok.encode_texts([t])[0]) - 1] == 0).all()
    assert (batch.token_type_ids[i, s:n] == 1).all()
  by_ids = tok.reader_from_records(tok.encode_texts(QUESTIONS[:1])[0], tok.passage_token_ids(TITLES, TEXTS), 128)
  np.testing.assert_array_equal(by_ids.input_ids, batch.input_ids)  # a question as text or as its ids


def test_offsets_map_tokens_back_to_text(tok, hf_tok):
  for x in TEXTS:
    ids, offsets = tok.encode_texts_with_offsets([x])[0]
    for tid, (a, b) in zip(ids.tolist(), offsets.tolist()):  # each token's characters tokenize to that token
      assert tok.encode_texts([x[a:b]])[0].tolist()[0] == tid or hf_tok.convert_ids_to_tokens(tid).startswith("##")
    a, b = offsets[0, 0], offsets[-2, 1]  # a multi-token span maps back to the original substring
    assert tok.decode(ids[:-1]).replace(" ", "") == hf_tok.decode(
        hf_tok(x[a:b], add_special_tokens=False)["input_ids"]).replace(" ", "")


def test_record_round_trip_decodes_text(tok):
  rec = tok.passage_token_ids(TITLES[:1], TEXTS[:1])[0]
  title, text = tok.split_record(rec)
  assert tok.decode(title) == TITLES[0].lower()
  assert tok.decode(text).replace(" ", "") == TEXTS[0].lower().replace(" ", "")


def test_empty_question_rejected(tok):
  with pytest.raises(ValueError, match="question 1"):
    tok.questions(["ok?", "   "])
  with pytest.raises(ValueError, match="empty"):
    tok.reader_from_records("", tok.passage_token_ids(TITLES, TEXTS))


def test_bucketed_batches_cover_every_index_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 300, size=257)
  buckets = (32, 64, 128, 256, 512)
  batches = list(tk.bucketed_batches(lengths, 16, buckets, shuffle_rng=np.random.default_rng(1)))
  flat = np.concatenate(batches)
  assert sorted(flat.tolist()) == list(range(257))
  for b in batches:
    assert len(b) <= 16
    assert len({tk.bucket_length(int(l), buckets) for l in lengths[b]}) == 1
  # Padding to buckets wastes less than padding everything to the maximum.
  padded = sum(len(b) * tk.bucket_length(int(lengths[b].max()), buckets) for b in batches)
  assert padded < len(lengths) * 512 * 0.7
