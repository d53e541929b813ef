"""Readers (our jsonl, NQ-open; DPR tsv/json/qa.csv, SQuAD and TFDS in train/) and DPR-style passage splitting."""

import json
import logging
import os

import numpy as np
import pytest

from rnr_jax.data import passages as P
from rnr_jax.data import readers as R
from rnr_jax.metrics import AnswerMatcher
from train import formats as F

DATA = os.environ.get("RNR_DATA", "/work/shared/data")
FORMATS = os.path.join(DATA, "formats")


def _sample(name):
  path = os.path.join(FORMATS, name)
  if not os.path.exists(path):
    pytest.skip(f"{path} not found (set RNR_DATA to the shared data directory)")
  return path


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def _jl(**rec):
  return json.dumps(rec)


# ---- our jsonl -----------------------------------------------------------------------


def test_read_corpus(tmp_path):
  path = _write(tmp_path, "corpus.jsonl", [_jl(id=0, title="A", text="alpha", source="x"), "",
                                           _jl(id=1, title="B", text="beta")])
  docs = list(R.read_corpus(path))
  assert docs == [R.Document(0, "A", "alpha", "x"), R.Document(1, "B", "beta", None)]


@pytest.mark.parametrize("bad,message", [
    ('{"id": 1, "title": "B", "text": ', "corpus.jsonl:2: invalid JSON"),
    (_jl(id=1, text="beta"), "corpus.jsonl:2: field 'title' is missing"),
    (_jl(id="one", title="B", text="beta"), "corpus.jsonl:2: field 'id' must be an integer, got a string"),
    (_jl(id=1, title="B", text=["beta"]), "corpus.jsonl:2: field 'text' must be a string, got a list"),
    ("[1, 2]", "corpus.jsonl:2: record must be a JSON object"),
])
def test_read_corpus_rejects_bad_lines(tmp_path, bad, message):
  path = _write(tmp_path, "corpus.jsonl", [_jl(id=0, title="A", text="alpha"), bad, _jl(id=2, title="C", text="c")])
  with pytest.raises(R.DataFormatError, match=message) as info:
    list(R.read_corpus(path))
  assert info.value.line == 2 and isinstance(info.value, ValueError)


def test_skip_bad_counts_and_warns(tmp_path, caplog):
  path = _write(tmp_path, "corpus.jsonl", [_jl(id=0, title="A", text="a"), "{oops", _jl(id=2, title="C"),
                                           _jl(id=3, title="D", text="d")])
  stats = R.ReadStats()
  with caplog.at_level(logging.WARNING):
    docs = list(R.read_corpus(path, skip_bad=True, stats=stats))
  assert [d.id for d in docs] == [0, 3]
  assert (stats.records, stats.skipped) == (2, 2)
  assert "corpus.jsonl:2:" in stats.examples[0] and "corpus.jsonl:3: field 'text'" in stats.examples[1]
  assert "skipped 2 malformed" in caplog.text and "corpus.jsonl:3" in caplog.text


def test_read_questions_our_format(tmp_path):
  path = _write(tmp_path, "nq_dev.jsonl", [_jl(id="q1", question="who?", answers=["Ann", "Anne"], gold_pid=3),
                                           _jl(id=7, question="what?", answers=["x"])])
  qs = list(R.read_questions(path))
  assert qs == [R.Question("q1", "who?", ("Ann", "Anne"), 3), R.Question("7", "what?", ("x",), None)]
  with pytest.raises(R.DataFormatError, match="nq_dev.jsonl:2: field 'gold_pid' is missing"):
    list(R.read_questions(path, require_gold_pid=True))
  with pytest.raises(R.DataFormatError, match="nq_dev.jsonl:1: field 'gold_pid' 3 is not a document id"):
    list(R.read_questions(path, doc_ids={0, 1}))


@pytest.mark.parametrize("bad,message", [
    (_jl(id="q", question="  ", answers=["a"], gold_pid=0), "nq_dev.jsonl:3: field 'question' must not be empty"),
    (_jl(id="q", question="why", answers="a", gold_pid=0), "nq_dev.jsonl:3: field 'answers' must be a list of strings"),
    (_jl(id="q", question="why", answers=[1], gold_pid=0), "nq_dev.jsonl:3: field 'answers' must be a list of strings"),
    (_jl(id="q", question="why", answers=[], gold_pid=0), "nq_dev.jsonl:3: field 'answers' must not be an empty list"),
    (_jl(id="q", question="why", answers=["a"], gold_pid=-1), r"nq_dev.jsonl:3: field 'gold_pid' must be in \[0, 2"),
    (_jl(id="q", question="why", answers=["a"], gold_pid=True), "nq_dev.jsonl:3: field 'gold_pid' must be an integer"),
    (_jl(id="q", question="why", answer=["a"]), "nq_dev.jsonl:3: field 'answers' is missing"),  # format of line 1
    ("not json", "nq_dev.jsonl:3: invalid JSON"),
])
def test_read_questions_rejects_bad_lines(tmp_path, bad, message):
  good = _jl(id="q0", question="who?", answers=["a"], gold_pid=0)
  path = _write(tmp_path, "nq_dev.jsonl", [good, "", bad])
  with pytest.raises(R.DataFormatError, match=message):
    list(R.read_questions(path))


def test_read_questions_detects_nq_open(tmp_path):
  path = _write(tmp_path, "nq.jsonl", [_jl(question="when?", answer=["1988"]), _jl(question="who?", answer=["X", "Y"])])
  assert list(R.read_questions(path)) == [R.Question("0", "when?", ("1988",)), R.Question("1", "who?", ("X", "Y"))]
  bad = _write(tmp_path, "bad.jsonl", [_jl(question="when?", answer=["1988"]), _jl(question="", answer=["x"])])
  with pytest.raises(R.DataFormatError, match="bad.jsonl:2: field 'question' must not be empty"):
    list(R.read_questions(bad))
  neither = _write(tmp_path, "neither.jsonl", [_jl(question="when?", reply=["1988"])])
  with pytest.raises(R.DataFormatError, match="neither.jsonl:1: field 'answers' is missing"):
    list(R.read_questions(neither))


def test_nq_open_sample():
  qs = list(R.read_questions(_sample("NQ-open.efficientqa.dev.1.1.jsonl")))
  assert len(qs) == 1800
  assert qs[0] == R.Question("0", "the last time la dodgers won the world series", ("1988",))
  assert qs[2].answers == ("Salzburg, Austria", "Austria")


# ---- DPR -----------------------------------------------------------------------------


def test_read_dpr_tsv(tmp_path):
  path = tmp_path / "psgs_w100.tsv"
  path.write_text('id\ttext\ttitle\n'
                  '1\t"He said ""hi"" to her"\tAaron\n'
                  '2\tplain text, no quotes\tBob "the" Builder\n', encoding="utf-8")
  docs = list(F.read_dpr_tsv(path))
  assert docs == [R.Document(1, "Aaron", 'He said "hi" to her', "dpr"),
                  R.Document(2, 'Bob "the" Builder', "plain text, no quotes", "dpr")]


@pytest.mark.parametrize("row,message", [
    ("x7\ttext\ttitle", "psgs.tsv:3: field 'id' must be an integer, got 'x7'"),
    ("7\ttext only", "psgs.tsv:3: expected 3 tab-separated columns, got 2"),
])
def test_read_dpr_tsv_rejects_bad_rows(tmp_path, row, message):
  path = _write(tmp_path, "psgs.tsv", ["id\ttext\ttitle", "1\tok\tT", row])
  with pytest.raises(R.DataFormatError, match=message):
    list(F.read_dpr_tsv(path))
  assert [d.id for d in F.read_dpr_tsv(path, skip_bad=True)] == [1]
  with pytest.raises(R.DataFormatError, match="psgs2.tsv:1: header"):
    list(F.read_dpr_tsv(_write(tmp_path, "psgs2.tsv", ["pid\ttext\ttitle"])))


def test_dpr_biencoder_sample():
  examples = list(F.read_dpr_biencoder(_sample("dpr_biencoder_sample.json")))
  assert len(examples) == 5
  assert [len(e.positive_ctxs) for e in examples] == [5, 6, 3, 1, 7]
  ex = examples[0]
  assert ex.question == "who sings does he love me with reba" and ex.answers == ("Linda Davis",)
  assert ex.positive_ctxs[0].passage_id == "11828866" and ex.positive_ctxs[0].title == "Does He Love You"
  assert len(ex.negative_ctxs) == 50 and len(ex.hard_negative_ctxs) == 96


def _dpr_record(**over):
  ctx = {"title": "T", "text": "some text", "score": 1.5, "passage_id": "9"}
  rec = {"question": "q?", "answers": ["a"], "positive_ctxs": [dict(ctx)], "negative_ctxs": [],
         "hard_negative_ctxs": [dict(ctx, psg_id="10")]}
  rec["hard_negative_ctxs"][0].pop("passage_id")
  rec.update(over)
  return rec


def test_read_dpr_biencoder_locates_errors(tmp_path):
  recs = [_dpr_record(), _dpr_record(), _dpr_record(positive_ctxs=[{"text": "x", "passage_id": "3"}])]
  path = tmp_path / "dpr.json"
  text = json.dumps(recs, indent=1)
  path.write_text(text, encoding="utf-8")
  element_lines = [i + 1 for i, line in enumerate(text.split("\n")) if line == " {"]
  with pytest.raises(R.DataFormatError) as info:
    list(F.read_dpr_biencoder(path))
  msg = str(info.value)
  assert "dpr.json:" in msg and "[2].positive_ctxs[0]: field 'title' is missing" in msg
  assert info.value.line == element_lines[2] > 1
  good = list(F.read_dpr_biencoder(path, skip_bad=True))
  assert len(good) == 2 and good[0].hard_negative_ctxs[0].passage_id == "10"

  path.write_text(json.dumps(recs[:2])[:-30], encoding="utf-8")  # truncated file
  with pytest.raises(R.DataFormatError, match="dpr.json:1: invalid JSON"):
    list(F.read_dpr_biencoder(path, skip_bad=True))  # syntax errors are fatal
  path.write_text(json.dumps({"question": "q"}), encoding="utf-8")
  with pytest.raises(R.DataFormatError, match=r"expected '\['"):
    list(F.read_dpr_biencoder(path))


def test_json_stream_across_chunk_boundaries(tmp_path):
  recs = [_dpr_record(answers=[str(10 ** i)]) for i in range(12)]
  path = tmp_path / "dpr.json"
  path.write_text(json.dumps(recs, indent=2), encoding="utf-8")
  with open(path, encoding="utf-8") as f:
    stream = F._JsonStream(f, path, chunk_size=5)  # pylint: disable=protected-access
    got = [obj for _, obj, _ in stream.array("test")]
    stream.end()
  assert got == recs


# ---- SQuAD ---------------------------------------------------------------------------


def test_squad_sample():
  paragraphs = list(F.read_squad(_sample("squadshifts_new_wiki_v1.0.json"), first_doc_id=100))
  assert len(paragraphs) == 1581 and sum(len(p.questions) for p in paragraphs) == 7938
  first = paragraphs[0]
  assert first.document.id == 100 and first.document.title == "Armenian Apostolic Church"
  assert first.questions[0].id == "5d6571572b22cd4dfcfbc8ea"
  assert first.questions[0].answers == ("Each brotherhood elects two delegates who take part in the National "
                                        "Ecclesiastical Assembly", "two delegates")  # duplicates dropped
  assert all(q.gold_pid == p.document.id for p in paragraphs for q in p.questions)
  assert [p.document.id for p in paragraphs] == list(range(100, 100 + 1581))


def _squad(context, answers, **qa):
  return {"version": "1.1", "data": [{"title": "Some_Title", "paragraphs": [
      {"context": context, "qas": [{"id": "a1", "question": "q?", "answers": answers, **qa}]}]}]}


def test_read_squad_checks(tmp_path):
  path = tmp_path / "squad.json"
  path.write_text(json.dumps(_squad("The cat sat.", [{"text": "cat", "answer_start": 4}])), encoding="utf-8")
  (p,) = list(F.read_squad(path))
  assert p.document == R.Document(0, "Some Title", "The cat sat.", "squad")
  assert p.questions == (R.Question("a1", "q?", ("cat",), 0),)

  path.write_text(json.dumps(_squad("The cat sat.", [{"text": "cat", "answer_start": 40}])), encoding="utf-8")
  with pytest.raises(R.DataFormatError, match=r"squad.json:1: data\[0\].paragraphs\[0\].qas\[0\].answers\[0\]: "
                                              r"field 'answer_start'"):
    list(F.read_squad(path))
  path.write_text(json.dumps(_squad("The cat sat.", [{"text": "cat"}])), encoding="utf-8")
  with pytest.raises(R.DataFormatError, match="field 'answer_start' is missing"):
    list(F.read_squad(path))
  path.write_text(json.dumps(_squad("The cat sat.", [], is_impossible=True)), encoding="utf-8")
  assert list(F.read_squad(path))[0].questions == ()
  path.write_text(json.dumps({"version": "x"}), encoding="utf-8")
  with pytest.raises(R.DataFormatError, match="field 'data' is missing"):
    list(F.read_squad(path))


# ---- TFDS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name", ["natural_questions_open", "squad", "trivia_qa"])
def test_tfds_questions_mocked(tfds, tmp_path, name):
  from train import tfds_sources  # pylint: disable=import-outside-toplevel

  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    qs = list(tfds_sources.tfds_questions(name, "train", data_dir=str(tmp_path)))
  assert len(qs) == 3
  for q in qs:
    assert isinstance(q.question, str) and q.question.strip() and q.answers
    assert all(isinstance(a, str) and a for a in q.answers) and q.gold_pid is None


def test_tfds_squad_open_domain_mocked(tfds, tmp_path):
  from train import tfds_sources  # pylint: disable=import-outside-toplevel

  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    docs, qs = tfds_sources.squad_open_domain("validation", data_dir=str(tmp_path), first_doc_id=10)
  assert len(qs) == 4 and docs and docs[0].id == 10
  ids = {d.id for d in docs}
  assert all(q.gold_pid in ids for q in qs)


def test_tfds_unavailable_is_a_clear_error(tfds, tmp_path):
  from train import tfds_sources  # pylint: disable=import-outside-toplevel

  with pytest.raises(tfds_sources.TfdsSourceError, match="(?s)not available in .*`tfds build squad/v1.1"):
    list(tfds_sources.tfds_questions("squad", "validation", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="unsupported"):
    list(tfds_sources.tfds_questions("mnist", "train", data_dir=str(tmp_path)))


# ---- passages ------------------------------------------------------------------------


def test_split_words():
  words = [f"w{i}" for i in range(250)]
  chunks = P.split_words("  \n".join(words), 100)
  assert [len(c.split()) for c in chunks] == [100, 100, 50]
  assert chunks[1].split() == words[100:200] and chunks[0] == " ".join(words[:100])
  assert P.split_words("", 100) == [""] and P.split_words("one two", 100) == ["one two"]
  with pytest.raises(ValueError):
    P.split_words("x", 0)


def _docs():
  return [R.Document(5, "Long", " ".join(f"w{i}" for i in range(230)) + " needle", None),
          R.Document(2, "Short", "a short needle text", None),
          R.Document(9, "Empty", "", None)]


def test_split_documents_ids_are_stable_and_titles_kept():
  table = P.split_documents(_docs(), 100)
  again = P.split_documents(_docs(), 100)
  assert len(table) == 5
  assert table.doc_ids.tolist() == [5, 5, 5, 2, 9] == again.doc_ids.tolist()
  assert table.chunks.tolist() == [0, 1, 2, 0, 0]
  assert table.titles == ["Long"] * 3 + ["Short", "Empty"] and table.texts == again.texts
  assert table.texts[2] == " ".join(f"w{i}" for i in range(200, 230)) + " needle" and table.titles[2] == "Long"
  assert table.passages_of(5) == range(0, 3) and table.passages_of(9) == range(4, 5)
  with pytest.raises(KeyError):
    table.passages_of(1)
  with pytest.raises(ValueError, match="document 5 appears twice"):
    P.split_documents(_docs() + [R.Document(5, "x", "y")]).passages_of(2)


def test_gold_passages_and_jsonl_round_trip(tmp_path):
  table = P.split_documents(_docs(), 100)
  matcher = AnswerMatcher(table.texts.__getitem__)
  assert P.gold_passages(table, R.Question("q", "?", ("needle",), 5), matcher) == [2]
  assert P.gold_passages(table, R.Question("q", "?", ("w150",), 5), matcher) == [1]
  assert P.gold_passages(table, R.Question("q", "?", ("needle",), 2), matcher) == [3]
  assert P.gold_passages(table, R.Question("q", "?", ("absent",), 2), matcher) == []
  assert P.gold_passages(table, R.Question("q", "?", ("needle",), None), matcher) == []

  path = tmp_path / "passages.jsonl"
  with P.PassageWriter(path) as writer:
    for pid in range(len(table)):
      writer.add(int(table.doc_ids[pid]), int(table.chunks[pid]), table.titles[pid], table.texts[pid])
  back = P.PassageTable.open(path)
  assert list(back.texts) == table.texts and list(back.titles) == table.titles and back.texts[4] == table.texts[4]
  assert back.doc_ids.tolist() == table.doc_ids.tolist() and back.chunks.tolist() == table.chunks.tolist()
  for column in P.COLUMNS:  # a table written before the column files existed is read too
    os.remove(tmp_path / f"passages.{column}.npy")
  older = P.PassageTable.open(path)
  assert list(older.texts) == table.texts and older.passages_of(5) == range(0, 3)
  assert back.passages_of(2) == range(3, 4)
  np.testing.assert_array_equal(back.doc_ids, table.doc_ids)
  np.testing.assert_array_equal(back.chunks, table.chunks)
