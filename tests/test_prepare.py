"""Training candidates, samplers and ``python -m train.prepare`` end to end on a tiny data directory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rnr_jax.data import examples as E
from rnr_jax.data import prepared as PD
from rnr_jax.data.bm25 import BM25Index
from rnr_jax.data.passages import split_documents
from rnr_jax.data.readers import DataFormatError, Document, Question

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILLER = ("stone river market winter garden signal copper lantern harbor meadow canyon orchard "
          "violet thunder marble falcon ember glacier ").split()


def _filler(n, offset=0):
  return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n))


DOCS = [
    Document(0, "Paris", "Paris is the capital and most populous city of France on the Seine."),
    Document(1, "Berlin", "Berlin is the capital and largest city of Germany by population."),
    Document(2, "Rome", "Rome is the capital city of Italy and home of the Colosseum."),
    Document(3, "Danube", _filler(120) + " The Danube flows into the Black Sea after 2850 kilometres."),
    Document(4, "Seine", "The Seine is a river in northern France that flows through Paris."),
    Document(5, "Tiber", "The Tiber is the river that flows through Rome in Italy."),
    Document(6, "Spree", "The Spree flows through Berlin, the capital of Germany."),
    Document(7, "Atlas", _filler(60, 3)),
]
TRAIN = [
    Question("t1", "what is the capital of France", ("Paris",), 0),
    Question("t2", "what is the capital of Germany", ("Berlin",), 1),
    Question("t3", "where does the Danube flow into", ("the Black Sea",), 3),
]
DEV = [
    Question("d1", "what is the capital city of Italy", ("Rome",), 2),
    Question("d2", "how long is the Danube in kilometres", ("2850 kilometres", "2850"), 3),
]


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


@pytest.fixture()
def data_dir(tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  _write_jsonl(d / "corpus.jsonl", [{"id": x.id, "title": x.title, "text": x.text, "source": "t"} for x in DOCS])
  _write_jsonl(d / "tiny_train.jsonl", [q.to_json() for q in TRAIN])
  _write_jsonl(d / "tiny_dev.jsonl", [q.to_json() for q in DEV])
  (d / "notes.txt").write_text("not a split")
  return d


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  """A tiny uncased WordPiece vocabulary: every word of the test corpus and questions."""
  d = tmp_path_factory.mktemp("vocab")
  words = set()
  for text in [x.title + " " + x.text for x in DOCS] + [q.question for q in TRAIN + DEV]:
    words.update(text.lower().replace(",", " , ").replace(".", " . ").split())
  (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."]
                                         + sorted(words - {",", "."})) + "\n")
  return str(d)


# ---- candidates and samplers ---------------------------------------------------------


def test_build_candidates():
  table = split_documents(DOCS)
  assert len(table) == 9  # the Danube document has two passages
  index = BM25Index.build(table.titles, table.texts, stemmer="none")
  cands = E.build_candidates(TRAIN + DEV, table, index, table.matcher(), k=100, num_hard_negatives=3)
  assert cands.bm25_pids.shape == (5, 9) and cands.bm25_pids.dtype == np.int32  # k capped at the corpus
  assert cands.bm25_scores.dtype == np.float32 and (np.diff(cands.bm25_scores, axis=1) <= 0).all()
  paris, danube = 0, 4  # pids: Paris is passage 0, the Danube's second chunk passage 4
  assert cands.gold[0].tolist() == [paris] and cands.gold[2].tolist() == [danube]
  # positives: gold first, then the other retrieved passages holding the answer (Seine mentions Paris).
  assert cands.positives[0][0] == paris and set(cands.positives[0].tolist()) == {paris, 5}
  for q in range(len(cands)):
    negs = cands.hard_negatives[q]
    assert 0 < len(negs) <= 3 and not set(negs.tolist()) & set(cands.positives[q].tolist())
    ranked_negs = cands.bm25_pids[q][~cands.bm25_has_answer[q]][:3]
    assert negs.tolist() == ranked_negs.tolist()
  assert cands.trainable().tolist() == [0, 1, 2, 3, 4]


def test_candidates_save_load(tmp_path):
  table = split_documents(DOCS)
  index = BM25Index.build(table.titles, table.texts, stemmer="none")
  cands = E.build_candidates(TRAIN, table, index, table.matcher(), k=4, num_hard_negatives=2)
  cands.save(tmp_path)
  back = E.SplitCandidates.load(tmp_path)
  assert isinstance(back.bm25_pids, np.memmap)
  np.testing.assert_array_equal(back.bm25_pids, cands.bm25_pids)
  np.testing.assert_array_equal(back.bm25_has_answer, cands.bm25_has_answer)
  for q in range(len(cands)):
    assert back.positives[q].tolist() == cands.positives[q].tolist()
    assert back.hard_negatives[q].tolist() == cands.hard_negatives[q].tolist()


def test_samplers():
  rng = np.random.default_rng(0)
  pos, neg = np.array([7, 8]), np.array([1, 2, 3, 4, 5])
  for _ in range(20):
    ps = E.sample_reader_passages(pos, neg, 4, rng)
    assert ps.shape == (4,) and ps[0] in pos and set(ps[1:].tolist()) <= set(neg.tolist())
    assert len(set(ps[1:].tolist())) == 3  # without replacement when there are enough
  assert len(E.sample_reader_passages(pos, np.array([1]), 4, rng)) == 4  # with replacement otherwise
  first, negs = E.sample_retriever_passages(pos, neg, 2, rng)
  assert first == 7 and len(negs) == 2 and set(negs.tolist()) <= set(neg.tolist())
  assert len(E.sample_retriever_passages(pos, np.array([], np.int32), 0, rng)[1]) == 0
  with pytest.raises(ValueError, match="no positive"):
    E.sample_reader_passages(np.array([], np.int32), neg, 4, rng)
  with pytest.raises(ValueError, match="no negative"):
    E.sample_reader_passages(pos, np.array([], np.int32), 4, rng)
  with pytest.raises(ValueError, match="m must be >= 2"):
    E.sample_reader_passages(pos, neg, 1, rng)


def test_bm25_save_load(tmp_path):
  table = split_documents(DOCS)
  index = BM25Index.build(table.titles, table.texts, stemmer="none")
  index.save(tmp_path / "bm25")
  back = BM25Index.load(tmp_path / "bm25")
  assert back.stemmer is None and len(back) == len(table)
  ids, scores = index.search(["capital of Italy"], 3)
  ids2, scores2 = back.search(["capital of Italy"], 3)
  assert ids[0, 0] == 2 and ids.tolist() == ids2.tolist() and np.allclose(scores, scores2)
  assert back.search([], 3)[0].shape == (0, 3)
  with pytest.raises(FileNotFoundError, match="not a saved BM25 index"):
    BM25Index.load(tmp_path)


# ---- prepare -------------------------------------------------------------------------


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "train.prepare", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_prepare_cli_end_to_end(data_dir, vocab_dir, tmp_path):
  out = tmp_path / "prepared"
  args = ["--data_dir", str(data_dir), "--out", str(out), "--tokenizer", vocab_dir, "--hard_negatives", "3",
          "--bm25_topk", "100", "--compress", "bz2"]
  stdout = _run_cli(*args)
  line = json.loads(stdout.strip().splitlines()[-1])
  assert line["passages"] == 9 and set(line) >= {"passages", "tiny_dev"}
  assert line["tiny_dev"]["bm25_top20_answer_acc"] == 1.0 and "tiny_train" not in line
  manifest_mtime = os.path.getmtime(out / "manifest.json")

  data = PD.PreparedData.load(out)
  assert data.splits == ["tiny_dev", "tiny_train"]
  assert data.manifest["counts"] == {"documents": 8, "passages": 9, "tokens": data.manifest["counts"]["tokens"],
                                     "skipped_bad_documents": 0}
  assert len(data.passages) == data.num_passages == len(data.token_corpus()) == 9
  assert data.questions("tiny_train") == TRAIN and data.questions("tiny_dev") == DEV
  cands = data.candidates("tiny_train")
  assert cands.bm25_pids.shape == (3, 9) and cands.positives[0][0] == 0
  assert cands.hard_negatives.lengths().max() <= 3
  ids, _ = data.bm25().search(["capital of Italy"], 1)
  assert ids[0, 0] == 2
  assert data.matcher().has_answer(["Black Sea"], 4)
  corpus = data.token_corpus()
  from rnr_jax.tokenization import Tokenizer  # pylint: disable=import-outside-toplevel

  tok = Tokenizer.from_pretrained(vocab_dir)
  assert corpus[0].tolist() == tok.passage_token_ids([DOCS[0].title], [DOCS[0].text])[0].tolist()
  with pytest.raises(KeyError, match="no split"):
    data.questions("nope")

  stdout = _run_cli(*args)
  assert "up to date" in stdout
  assert os.path.getmtime(out / "manifest.json") == manifest_mtime
  assert json.loads(stdout.strip().splitlines()[-1]) == line


def test_prepare_rebuilds_when_inputs_change(data_dir, vocab_dir, tmp_path):
  out = tmp_path / "p"
  settings = PD.PrepareSettings(tokenizer=vocab_dir, hard_negatives=2, bm25_topk=5, compress=(),
                                max_train_questions=2)
  quiet = lambda s: None  # noqa: E731
  first = PD.prepare(str(data_dir), str(out), settings, echo=quiet)
  assert first.built and first.manifest["splits"]["tiny_train"]["questions"] == 2
  assert first.manifest["splits"]["tiny_dev"]["questions"] == 2  # the limit is for *_train only
  assert not PD.prepare(str(data_dir), str(out), settings, echo=quiet).built
  changed = PD.PrepareSettings(**{**settings.__dict__, "hard_negatives": 1})
  assert PD.prepare(str(data_dir), str(out), changed, echo=quiet).built
  with open(data_dir / "tiny_dev.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "d3", "question": "where is the Seine", "answers": ["France"], "gold_pid": 4}) + "\n")
  again = PD.prepare(str(data_dir), str(out), changed, echo=quiet)
  assert again.built and again.manifest["splits"]["tiny_dev"]["questions"] == 3
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".p.")]  # no temporary directories left
  assert PD.prepare(str(data_dir), str(out), changed, force=True, echo=quiet).built


def test_prepare_bad_records(data_dir, vocab_dir, tmp_path):
  with open(data_dir / "tiny_train.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "t4", "question": "x", "answers": ["y"], "gold_pid": 99}) + "\n")
    f.write('{"id": "t5", "question": ""\n')
  settings = PD.PrepareSettings(tokenizer=vocab_dir, bm25_topk=5, compress=())
  out = tmp_path / "p"
  with pytest.raises(DataFormatError, match="tiny_train.jsonl:4: field 'gold_pid' 99 is not a document id"):
    PD.prepare(str(data_dir), str(out), settings, echo=lambda s: None)
  assert not out.exists()  # nothing half-built under the final name
  result = PD.prepare(str(data_dir), str(out), PD.PrepareSettings(**{**settings.__dict__, "skip_bad": True}),
                      echo=lambda s: None)
  assert result.manifest["splits"]["tiny_train"]["skipped_bad"] == 2
  assert result.manifest["splits"]["tiny_train"]["questions"] == 3


def test_prepared_data_errors(tmp_path):
  with pytest.raises(PD.PreparedDataError, match="no prepared dataset"):
    PD.PreparedData.load(tmp_path / "missing")
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / "passages.jsonl").write_text("")
  with pytest.raises(PD.PreparedDataError, match="incomplete"):
    PD.PreparedData.load(tmp_path / "half")
  with pytest.raises(FileNotFoundError, match="no corpus.jsonl"):
    PD.prepare(str(tmp_path), str(tmp_path / "out"))
