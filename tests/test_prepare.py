"""Training candidates, samplers and ``python -m train.prepare`` end to end on a tiny data directory."""

import bz2
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rnr_jax.data import examples as E
from rnr_jax.data import prepared as PD
from rnr_jax.data import readers as R
from rnr_jax.data.bm25 import BM25Index
from rnr_jax.data.passages import split_documents
from rnr_jax.data.readers import DataFormatError, Document, Question
from train import formats, sources

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


def _prepare(data_dir, out, settings, **kwargs):
  """prepare() of a data directory of our jsonl files, as ``train.prepare --data_dir`` runs it."""
  corpus, questions = sources.build(*sources.data_dir_specs(str(data_dir)))
  return PD.prepare(corpus, questions, str(out), settings, **kwargs)


def _run_cli(*args, returncode=0):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "train.prepare", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == returncode, proc.stderr[-3000:]
  return proc.stdout if returncode == 0 else proc.stderr


def test_prepare_cli_names_a_bad_record_in_one_line(vocab_dir, tmp_path):
  corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "q.jsonl"
  corpus.write_bytes(b'{"id": 1, "title": "a", "text": "alpha"}\n{"id": 2, "title": "b", "text": "be \xff ta"}\n')
  questions.write_text(json.dumps({"id": "q", "question": "what", "answers": ["alpha"], "gold_pid": 1}) + "\n")
  stderr = _run_cli("--corpus", str(corpus), "--questions", f"toy_dev={questions}", "--out", str(tmp_path / "out"),
                    "--tokenizer", vocab_dir, returncode=1)
  assert stderr.strip().splitlines()[-1] == f"train.prepare: error: {corpus}:2: invalid UTF-8: invalid start byte " \
                                           "(byte 36)"
  assert "Traceback" not in stderr and not (tmp_path / "out").exists()


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
                                     "skipped_bad_documents": 0, "empty_documents": 0}
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


def test_compressed_sizes_come_from_the_passages_in_the_first_bytes(monkeypatch, tmp_path):
  records = [np.arange(i, i + 10 + i % 7) for i in range(50)]
  corpus = PD.TokenCorpus.write(str(tmp_path / "c"), records, 1000)
  monkeypatch.setattr(PD, "SIZE_SAMPLE_BYTES", 100 * corpus.tokens.itemsize)
  fit = int(np.sum(corpus.offsets[1:] <= 100))  # passages whose tokens lie in the first 100 ids
  tokens, offsets = np.asarray(corpus.tokens[:corpus.offsets[fit]]), np.asarray(corpus.offsets[:fit + 1])
  packed = len(bz2.compress(tokens.tobytes(), 9)) + len(bz2.compress(offsets.tobytes(), 9))
  plain = round((corpus.tokens.nbytes + corpus.offsets.nbytes) / 50, 2)
  assert 0 < fit < 50 and PD._token_id_sizes(corpus, ("bz2",)) == {  # pylint: disable=protected-access
      "token_ids": plain, "token_ids_bz2": round(packed / fit, 2)}

  sizes = PD._TextSizes(("bz2",))  # pylint: disable=protected-access
  chunks = [(["Title"] * 3, [f"passage {i} " * 30] * 3) for i in range(100)]  # 3 passages, 0.3 kB a chunk
  for titles, texts in chunks:
    sizes.add(titles, texts)
  text = ["".join(f"{a}\t{b}\n" for a, b in zip(*c)).encode() for c in chunks]
  sampled = next(i for i in range(1, 101) if sum(map(len, text[:i])) >= 100 * corpus.tokens.itemsize)
  packed = len(bz2.compress(b"".join(text[:sampled]), 9))
  assert sizes.per_passage(300) == {"text_utf8": round(sum(map(len, text)) / 300, 2),
                                    "text_utf8_bz2": round(packed / (3 * sampled), 2)}


def test_prepare_rebuilds_when_inputs_change(data_dir, vocab_dir, tmp_path):
  out = tmp_path / "p"
  settings = PD.PrepareSettings(tokenizer=vocab_dir, hard_negatives=2, bm25_topk=5, compress=(),
                                max_train_questions=2)
  quiet = lambda s: None  # noqa: E731
  first = _prepare(data_dir, out, settings, echo=quiet)
  assert first.built and first.manifest["splits"]["tiny_train"]["questions"] == 2
  assert first.manifest["splits"]["tiny_dev"]["questions"] == 2  # the limit is for *_train only
  assert not _prepare(data_dir, out, settings, echo=quiet).built
  changed = PD.PrepareSettings(**{**settings.__dict__, "hard_negatives": 1})
  assert _prepare(data_dir, out, changed, echo=quiet).built
  with open(data_dir / "tiny_dev.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "d3", "question": "where is the Seine", "answers": ["France"], "gold_pid": 4}) + "\n")
  again = _prepare(data_dir, out, changed, echo=quiet)
  assert again.built and again.manifest["splits"]["tiny_dev"]["questions"] == 3
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".p.")]  # no temporary directories left
  assert _prepare(data_dir, out, changed, force=True, echo=quiet).built


def test_prepare_bad_records(data_dir, vocab_dir, tmp_path):
  with open(data_dir / "tiny_train.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "t4", "question": "x", "answers": ["y"], "gold_pid": 99}) + "\n")
    f.write('{"id": "t5", "question": ""\n')
  settings = PD.PrepareSettings(tokenizer=vocab_dir, bm25_topk=5, compress=())
  out = tmp_path / "p"
  with pytest.raises(DataFormatError, match="tiny_train.jsonl:4: field 'gold_pid' 99 is not a document id"):
    _prepare(data_dir, out, settings, echo=lambda s: None)
  assert not out.exists()  # nothing half-built under the final name
  result = _prepare(data_dir, out, PD.PrepareSettings(**{**settings.__dict__, "skip_bad": True}),
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
    _prepare(tmp_path, tmp_path / "out", PD.PrepareSettings())


# ---- other data formats and bad data --------------------------------------------------


def _passages_as_dpr(tmp_path):
  """The toy corpus's passages as DPR's psgs_w100.tsv (gzip) and as our corpus jsonl, one document per passage."""
  table = split_documents(DOCS)
  rows = [(pid + 1, table.titles[pid], table.texts[pid]) for pid in range(len(table))]
  tsv = tmp_path / "psgs_w100.tsv.gz"
  with gzip.open(tsv, "wt", encoding="utf-8") as f:
    f.write("id\ttext\ttitle\n" + "".join(f"{i}\t{text}\t{title}\n" for i, title, text in rows))
  ours = tmp_path / "corpus.jsonl"
  _write_jsonl(ours, [{"id": i, "title": title, "text": text} for i, title, text in rows])
  return str(tsv), str(ours)


def test_prepare_cli_reads_dpr_and_nq_open_formats_like_our_jsonl(vocab_dir, tmp_path):
  """The same passages as DPR tsv.gz, and the same questions as NQ-open jsonl and DPR qa.csv (given as
  ``--questions A=x B=y``), give the same BM25 candidates and accuracy as our jsonl files."""
  tsv, ours = _passages_as_dpr(tmp_path)
  nq_open, qa_csv, our_train, our_dev = (tmp_path / n for n in ("train.jsonl", "dev.qa.csv", "t.jsonl", "d.jsonl"))
  _write_jsonl(nq_open, [{"question": q.question, "answer": list(q.answers)} for q in TRAIN])
  qa_csv.write_text("".join(f"{q.question}\t{list(q.answers)!r}\n" for q in DEV), encoding="utf-8")
  _write_jsonl(our_train, [dict(q.to_json(), gold_pid=None) for q in TRAIN])
  _write_jsonl(our_dev, [dict(q.to_json(), gold_pid=None) for q in DEV])
  common = ["--tokenizer", vocab_dir, "--compress", "", "--bm25_topk", "5"]
  dpr = json.loads(_run_cli("--corpus", tsv, "--questions", f"tiny_train={nq_open}", f"tiny_dev={qa_csv}",
                            "--out", str(tmp_path / "dpr"), *common).strip().splitlines()[-1])
  jsonl = json.loads(_run_cli("--corpus", ours, "--questions", f"tiny_train={our_train}", "--questions",
                              f"tiny_dev={our_dev}", "--out", str(tmp_path / "ours"), *common).strip().splitlines()[-1])
  assert dpr.pop("prepare_s") and jsonl.pop("prepare_s")
  assert dpr == jsonl and dpr["passages"] == 9 and dpr["tiny_dev"]["questions"] == 2
  a, b = PD.PreparedData.load(tmp_path / "dpr"), PD.PreparedData.load(tmp_path / "ours")
  for split in ("tiny_train", "tiny_dev"):
    np.testing.assert_array_equal(a.candidates(split).bm25_pids, b.candidates(split).bm25_pids)
    assert [q.answers for q in a.questions(split)] == [q.answers for q in b.questions(split)]


def test_dpr_retriever_json_contexts_are_used_as_given(vocab_dir, tmp_path):
  tsv, _ = _passages_as_dpr(tmp_path)
  ctx = lambda pid: {"title": "x", "text": "y", "passage_id": str(pid)}  # noqa: E731
  examples = [{"question": "what is the capital of France", "answers": ["Paris"], "positive_ctxs": [ctx(1), ctx(99)],
               "negative_ctxs": [], "hard_negative_ctxs": [ctx(3), ctx(8)]},
              {"question": "what is the capital of Germany", "answers": ["Berlin"], "positive_ctxs": [ctx(2)]}]
  (tmp_path / "nq-train.json").write_text(json.dumps(examples), encoding="utf-8")
  corpus, questions = sources.build([tsv], {"nq_train": str(tmp_path / "nq-train.json")})
  result = PD.prepare(corpus, questions, str(tmp_path / "p"), PD.PrepareSettings(tokenizer=vocab_dir, compress=()),
                      echo=lambda s: None)
  info = result.manifest["splits"]["nq_train"]
  assert info["given_documents_missing"] == 1  # passage 99 is not in the corpus
  cands = PD.PreparedData.load(tmp_path / "p").candidates("nq_train")
  # DPR id i is passage i - 1 here: positives start with the given ones, the hard negatives are exactly the given.
  assert cands.gold[0].tolist() == [0] and cands.positives[0][0] == 0 and cands.hard_negatives[0].tolist() == [2, 7]
  assert cands.gold[1].tolist() == [1] and len(cands.hard_negatives[1]) > 0  # none given: BM25's


def test_squad_json_as_corpus_and_questions_links_gold(vocab_dir, tmp_path):
  squad = {"version": "1.1", "data": [{"title": "Rome", "paragraphs": [
      {"context": "Rome is the capital city of Italy.", "qas": [
          {"id": "s1", "question": "what is the capital of Italy", "answers": [{"text": "Rome", "answer_start": 0}]}]},
      {"context": "The Tiber flows through Rome.", "qas": [
          {"id": "s2", "question": "which river flows through Rome", "answers": [{"text": "Tiber",
                                                                                  "answer_start": 4}]}]}]}]}
  path = tmp_path / "squad.json"
  path.write_text(json.dumps(squad), encoding="utf-8")
  corpus, questions = sources.build([str(path)], {"squad_dev": str(path)})
  PD.prepare(corpus, questions, str(tmp_path / "p"), PD.PrepareSettings(tokenizer=vocab_dir, compress=()),
             echo=lambda s: None)
  data = PD.PreparedData.load(tmp_path / "p")
  assert [q.gold_pid for q in data.questions("squad_dev")] == [0, 1]
  assert data.candidates("squad_dev").gold[1].tolist() == [1]
  # Without the file among the corpus specs the questions have no gold document.
  _, alone = sources.build([str(path)], {})
  only_questions = sources.Sources().questions(str(path))
  assert not alone and [q.gold_pid for q in only_questions.read(False, R.ReadStats())] == [None, None]


def test_tfds_specs_through_sources(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    corpus, questions = sources.build(["tfds:squad/train"], {"squad_train": "tfds:squad/train",
                                                             "nq_dev": "tfds:natural_questions_open/validation"},
                                      sources.TfdsOptions(str(tmp_path)))
    docs = list(corpus[0].read(False, R.ReadStats()))
    squad = list(questions["squad_train"].read(False, R.ReadStats()))
    nq = list(questions["nq_dev"].read(False, R.ReadStats()))
  ids = {d.id for d in docs}
  assert ids == set(range(len(docs))) and len(squad) == 4 and all(q.gold_pid in ids for q in squad)
  assert len(nq) == 4 and all(q.gold_pid is None and q.answers for q in nq)


def test_detect_format(tmp_path):
  files = {"c.jsonl": '{"id": 1, "title": "t", "text": "x"}\n', "d.json": '[{"question": "q"}]',
           "s.json": '{"version": "1",\n "data": []}', "q.qa.csv": "who\t['a']\n", "p.txt": "id\ttext\ttitle\n",
           "n.txt": "who\t['a']\n"}
  expected = {"c.jsonl": "jsonl", "d.json": "dpr_json", "s.json": "squad", "q.qa.csv": "dpr_qa_csv",
              "p.txt": "dpr_tsv", "n.txt": "dpr_qa_csv"}
  for name, text in files.items():
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert sources.detect_format(str(tmp_path / name)) == expected[name], name
  assert sources.detect_format("tfds:trivia_qa/train") == "tfds"
  (tmp_path / "x.bin").write_bytes(b"\x00\x01")
  with pytest.raises(ValueError, match="unrecognised data format"):
    sources.detect_format(str(tmp_path / "x.bin"))
  with pytest.raises(ValueError, match="holds questions, not a corpus"):
    sources.Sources().corpus(str(tmp_path / "q.qa.csv"))
  with pytest.raises(ValueError, match="NAME ending in _train or _dev"):
    sources.parse_questions(["nq_test=x.jsonl"])


@pytest.mark.parametrize("line,message", [
    ('{"id": %d, "title": "T", "text": "big"}' % 2**70, r"corpus.jsonl:3: field 'id' must be in \[0, 2\*\*63\)"),
    ('{"id": 70, "title": "T", "text": "a \\ud800 b"}', "corpus.jsonl:3: field 'text' holds a lone surrogate"),
    (b'{"id": 70, "title": "T", "text": "caf\xe9"}', "corpus.jsonl:3: invalid UTF-8"),
    ('{"id": 1, "title": "Again", "text": "twice"}', "corpus.jsonl:3: field 'id' is a duplicate: an earlier document"),
])
def test_prepare_names_bad_documents_and_skips_them(data_dir, vocab_dir, tmp_path, line, message):
  rows = (data_dir / "corpus.jsonl").read_bytes().splitlines(keepends=True)
  rows.insert(2, (line if isinstance(line, bytes) else line.encode()) + b"\n")
  (data_dir / "corpus.jsonl").write_bytes(b"".join(rows))
  settings = PD.PrepareSettings(tokenizer=vocab_dir, compress=(), bm25_topk=5)
  with pytest.raises(DataFormatError, match=message):
    _prepare(data_dir, tmp_path / "p", settings, echo=lambda s: None)
  skipped = _prepare(data_dir, tmp_path / "p", PD.PrepareSettings(**{**settings.__dict__, "skip_bad": True}),
                     echo=lambda s: None).manifest["counts"]
  assert skipped["skipped_bad_documents"] == 1 and skipped["documents"] == len(DOCS)


def test_prepare_non_utf8_tsv_byte_names_line_and_field(vocab_dir, tmp_path):
  path = tmp_path / "psgs.tsv"
  path.write_bytes(b"id\ttext\ttitle\n1\tParis is in France\tParis\n2\tcaf\xe9 au lait\tCafe\n")
  with pytest.raises(DataFormatError, match="psgs.tsv:3: field 'text' holds a byte 0xe9 that is not UTF-8"):
    list(formats.read_dpr_tsv(path))
  assert [d.id for d in formats.read_dpr_tsv(path, skip_bad=True)] == [1]


def test_prepare_counts_empty_documents_duplicate_questions_and_empty_answers(data_dir, vocab_dir, tmp_path):
  with open(data_dir / "corpus.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": 50, "title": " ", "text": ""}) + "\n")
  with open(data_dir / "tiny_dev.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "d3", "question": "what?", "answers": [""], "gold_pid": 2}) + "\n")
    f.write(json.dumps({"id": "d4", "question": "where is Rome", "answers": ["", "Italy"], "gold_pid": 2}) + "\n")
    f.write(json.dumps({"id": "d1", "question": "again", "answers": ["x"]}) + "\n")
  settings = PD.PrepareSettings(tokenizer=vocab_dir, compress=(), bm25_topk=5)
  with pytest.raises(DataFormatError, match="tiny_dev.jsonl:5: field 'id' is a duplicate: an earlier question has"):
    _prepare(data_dir, tmp_path / "p", settings, echo=lambda s: None)
  m = _prepare(data_dir, tmp_path / "p", PD.PrepareSettings(**{**settings.__dict__, "skip_bad": True}),
               echo=lambda s: None).manifest
  assert m["counts"]["empty_documents"] == 1 and m["counts"]["documents"] == len(DOCS)
  dev = m["splits"]["tiny_dev"]
  assert (dev["questions"], dev["no_answer"], dev["skipped_bad"]) == (3, 1, 1)
  assert PD.PreparedData.load(tmp_path / "p").questions("tiny_dev")[-1].answers == ("Italy",)


def test_prepare_holds_out_the_last_training_questions(data_dir, vocab_dir, tmp_path):
  settings = PD.PrepareSettings(tokenizer=vocab_dir, hard_negatives=2, bm25_topk=5, compress=(), holdout=1)
  result = _prepare(data_dir, tmp_path / "p", settings, echo=lambda s: None)
  data = PD.PreparedData.load(result.path)
  with open(data_dir / "tiny_train.jsonl", encoding="utf-8") as f:
    ids = [json.loads(line)["id"] for line in f]
  assert [q.id for q in data.questions("tiny_train")] == ids[:-1]
  assert [q.id for q in data.questions(PD.holdout_name("tiny_train"))] == ids[-1:] and PD.holdout_name(
      "tiny_train") == "tiny_holdout"
  assert len(data.candidates("tiny_holdout")) == 1
  with pytest.raises(ValueError, match="not more than the 9 to hold out"):
    _prepare(data_dir, tmp_path / "q", PD.PrepareSettings(**{**settings.__dict__, "holdout": 9}), echo=lambda s: None)
