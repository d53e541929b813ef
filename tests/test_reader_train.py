"""The reader trainer (``train.reader``) on a toy task it must learn, and reader batch construction.

Toy task (:func:`write_toy_data`): for each question a document holds the
marker word ``zebra`` followed by the answer (one of a few fruit names), and
three distractor documents share the question's key word but hold neither.
Questions ``"which word follows zebra near <key>"`` retrieve their document and
its distractors with BM25, which are also their hard negatives. The reader must
rank the marker passage first and read the word after the marker; a random-init
reader picks a random span of a random passage (EM near 0).
"""

import json
import os

import jax
import numpy as np
import pytest

from rnr_jax import exports, qa_model, reader
from rnr_jax import reader_data as rd
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData, TokenCorpus
from rnr_jax.data.prepared import PrepareSettings, prepare
from train.sources import data_dir_sources
from rnr_jax.evaluation import ReaderEvaluator
from rnr_jax.metrics import exact_match
from rnr_jax.specs import ReaderSpec
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training import mesh as mesh_lib
from train import reader as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("lion tiger bear wolf fox deer horse sheep goat mouse rabbit eagle hawk owl crow swan duck goose frog snake "
        "shark whale seal otter camel mole panda crab moose bison beaver badger falcon parrot pigeon turtle spider "
        "beetle ant bee").split()
ANSWERS = ("Apple", "Banana", "Cherry", "Grape", "Lemon", "Mango", "Peach", "Plum")
FILLER = "stone river market winter garden signal copper lantern harbor meadow canyon orchard violet thunder".split()
NUM_TRAIN, NUM_DEV, DISTRACTORS = 32, 8, 3


def _filler(n, offset):
  return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n))


def write_toy_data(directory: str) -> None:
  """Writes ``corpus.jsonl``, ``toy_train.jsonl`` and ``toy_dev.jsonl`` of the toy task into ``directory``."""
  docs, questions = [], []
  for q, key in enumerate(KEYS[: NUM_TRAIN + NUM_DEV]):
    answer = ANSWERS[q % len(ANSWERS)]
    gold = len(docs)
    text = f"{_filler(5, q)} {key} zebra {answer} {_filler(5, q + 7)}."
    docs.append({"id": gold, "title": f"{key} notes", "text": text})
    for i in range(DISTRACTORS):
      text = f"{_filler(6, q + 3 * i)} {key} {_filler(5, q + i)}."
      docs.append({"id": len(docs), "title": f"{key} notes", "text": text})
    questions.append({"id": f"q{q}", "question": f"which word follows zebra near {key}", "answers": [answer],
                      "gold_pid": gold})

  def write(name, rows):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.writelines(json.dumps({**r, "source": "toy"} if name == "corpus.jsonl" else r) + "\n" for r in rows)

  write("corpus.jsonl", docs)
  write("toy_train.jsonl", questions[:NUM_TRAIN])
  write("toy_dev.jsonl", questions[NUM_TRAIN:])


def build_toy_prepared(root) -> str:
  """The prepared directory of the toy task under ``root`` (BM25 top-20, 3 hard negatives)."""
  data = os.path.join(root, "data")
  os.makedirs(data)
  write_toy_data(data)
  out = os.path.join(root, "prepared")
  prepare(*data_dir_sources(data), out,
          PrepareSettings(compress=(), bm25_topk=20, hard_negatives=DISTRACTORS, stemmer="none"), echo=lambda s: None)
  return out


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory):
  return build_toy_prepared(str(tmp_path_factory.mktemp("toy_reader")))


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_toy_data_pools(toy_prepared):
  data = PreparedData.load(toy_prepared)
  split = rd.load_reader_split(data, "toy_train", Tokenizer.from_pretrained(data.tokenizer_path))
  assert len(split.trainable()) == NUM_TRAIN
  rng = np.random.default_rng(0)
  for q in range(NUM_TRAIN):
    gold = data.questions("toy_train")[q].gold_pid  # one passage per document: doc id = passage id
    assert split.positives[q][0] == gold
    assert sorted(split.negatives[q].tolist()) == [gold + 1 + i for i in range(DISTRACTORS)]
    pids = split.training_passages(q, 4, rng)
    assert pids[0] in split.positives[q] and set(pids[1:].tolist()) <= set(split.negatives[q].tolist())
    assert split.gold_passages(q, 4).tolist() == [gold, *split.negatives[q][:3].tolist()]
    assert gold in split.open_passages(q, 4)  # BM25 retrieves the marker passage in the top 4


def test_reader_batches_grouped_by_length_keep_their_draws(toy_prepared):
  data = PreparedData.load(toy_prepared)
  tok = Tokenizer.from_pretrained(data.tokenizer_path)
  config = load_config(os.path.join(ROOT, "configs/reader.py:tiny"), [f"prepared_dir={toy_prepared}"])
  spec = ReaderSpec.from_config(config, exports.initial_encoder(config.model)[0], data.manifest["settings"]["tokenizer"])
  split = rd.load_reader_split(data, "toy_train", tok)

  def batches(group_batches):
    return trainer.ReaderBatches([split], tok, data.token_corpus(), spec, m=4, max_spans=2, batch_size=4,
                                 max_questions=0, seed=5, group_batches=group_batches)

  def rows(batch):  # question token ids and passage rows of each question, whatever its place in the batch
    return {tuple(r[0].tolist()): r.tolist() for r in batch["input_ids"].reshape(4, 4, -1)}

  grouped, plain = batches(3), batches(0)
  per_epoch = grouped.batches_per_epoch
  epoch = [next(grouped) for _ in range(per_epoch)]
  seen = {}
  for b in epoch:
    seen.update(rows(b))
  want = {}
  for b in [next(plain) for _ in range(per_epoch)]:
    want.update(rows(b))
  assert len(seen) == per_epoch * 4 and seen == want  # same questions, same drawn passages, other batches
  assert [b["input_ids"].tolist() for b in epoch] != [b["input_ids"].tolist() for b in
                                                      [next(batches(0)) for _ in range(per_epoch)]]
  saved = grouped.state()
  rest = [next(grouped) for _ in range(per_epoch + 2)]
  again = batches(3)
  again.restore(saved)
  for a, b in zip(rest, [next(again) for _ in range(per_epoch + 2)]):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_reader_batch_hand_example(tmp_path):
  tok = Tokenizer.from_pretrained()
  titles = ["Danube", "Seine", "Alps"]
  texts = ["The Danube flows into the Black Sea after 2850 kilometres.", "The Seine flows through Paris.",
           "The Alps are mountains."]
  corpus = TokenCorpus.write(tmp_path / "corpus", tok.passage_token_ids(titles, texts), tok.vocab_size)
  question = tok.encode_texts(["where does the danube end"])[0]
  answers = tok.encode_texts(["Black Sea", "the Black Sea"])
  pids = np.array([[0, 1, 2, rd.NO_PASSAGE]])
  batch = rd.reader_batch(tok, corpus, [question], pids, [answers], max_len=64, buckets=(32, 64), question_len=16,
                          max_answer_len=10, max_spans=4)
  assert batch["input_ids"].shape == (4, 32) and batch["passage_mask"].tolist() == [[True, True, True, False]]
  ids, ts, te = batch["input_ids"][0], int(batch["text_start"][0]), int(batch["text_end"][0])
  # Row 0 is the positive: [CLS] question [SEP] danube [SEP] text [SEP].
  assert ids[0] == tok.cls_id and ids[ts - 1] == tok.sep_id and ids[te] == tok.sep_id
  assert ids[ts:te].tolist() == tok.encode_texts([texts[0]])[0].tolist()
  assert batch["text_start"][3] == batch["text_end"][3]  # the padding passage has no text
  spans = [(s, e) for s, e, ok in zip(batch["span_starts"][0], batch["span_ends"][0], batch["span_mask"][0]) if ok]
  assert len(spans) == 2  # "black sea" and "the black sea"
  cont = reader.continuation_table(tok.vocab())
  decoded = {rd.answer_text(tok, cont, ids, ts, te, s, e, texts[0]) for s, e in spans}
  assert decoded == {"Black Sea", "the Black Sea"}
  # A span on the first piece of "2850" ("285", "##0") widens to the whole word.
  number = int(np.flatnonzero(ids == tok.encode_texts(["285"])[0][0])[0])
  assert rd.answer_text(tok, cont, ids, ts, te, number, number, texts[0]) == "2850"

  # predict_answers reads the top-ranked passage's best span, and only the first n passages.
  length = ids.shape[0]
  start, end = np.zeros((4, length)), np.zeros((4, length))
  start[0, spans[0][0]] = end[0, spans[0][1]] = 10.0
  rank = np.array([5.0, 0.0, 0.0, 0.0])
  got = rd.predict_answers(tok, cont, texts, batch, pids, start, end, rank, 4, max_answer_len=10)
  assert exact_match(got[0], ["Black Sea"]) and got[0] in decoded
  rank = np.array([0.0, 5.0, 0.0, 0.0])
  assert rd.predict_answers(tok, cont, texts, batch, pids, start, end, rank, 1, max_answer_len=10) == got


def test_ranked_candidates_file(toy_prepared, tmp_path):
  data = PreparedData.load(toy_prepared)
  tok = Tokenizer.from_pretrained(data.tokenizer_path)
  bm25 = rd.ranked_pids(data, "toy_dev", None)
  reversed_rank = bm25[:, ::-1].copy()
  reversed_rank[:, -1] = rd.NO_PASSAGE
  path = tmp_path / "ranked.npz"
  rd.save_ranked(path, {"toy_dev": reversed_rank})
  np.testing.assert_array_equal(rd.ranked_pids(data, "toy_dev", str(path)), reversed_rank)
  split = rd.load_reader_split(data, "toy_dev", tok, str(path), num_negatives=2, positives="any")
  gold_only = rd.load_reader_split(data, "toy_dev", tok, str(path), num_negatives=2)  # positives="gold_article"
  for q in range(NUM_DEV):
    assert split.positives[q][0] == data.questions("toy_dev")[q].gold_pid  # gold first
    assert len(split.negatives[q]) == 2 and rd.NO_PASSAGE not in split.negatives[q]
    assert split.negatives[q].tolist() == [p for p in reversed_rank[q] if p not in split.positives[q] and p >= 0][:2]
    # Gold-article positives drop the other answer-holding passages; they never become negatives.
    gold = np.asarray(data.candidates("toy_dev").gold[q])
    assert gold_only.positives[q].tolist() == (gold.tolist() or split.positives[q].tolist())
    np.testing.assert_array_equal(gold_only.negatives[q], split.negatives[q])
  with pytest.raises(KeyError, match="no ranking for split 'toy_train'"):
    rd.ranked_pids(data, "toy_train", str(path))
  rd.save_ranked(path, {"toy_dev": reversed_rank[:3]})
  with pytest.raises(ValueError, match="expected integer"):
    rd.ranked_pids(data, "toy_dev", str(path))


def test_reader_learns_toy_task(toy_prepared, tmp_path):
  config = load_config(os.path.join(ROOT, "configs/reader.py:tiny"), [
      f"prepared_dir={toy_prepared}", "reader.train_splits=('toy_train',)", "reader.eval_split=toy_dev",
      "reader.eval_passages=(1, 4)", "optim.lr=3e-3", "train.num_steps=60", "train.eval_every=30",
      "train.log_every=10", "train.ckpt_every=30"])
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [r["loss"] for r in _read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
  evals = _read_jsonl(tmp_path / "run" / "eval.jsonl")
  assert [e["step"] for e in evals] == [30, 60]
  assert losses[-1] < 0.2 * losses[0]
  assert evals[-1]["em_gold_ranked"] >= 0.85 and evals[-1]["em_open"] >= 0.85, evals
  select = config.reader.select_metric
  best = next(e for e in evals if e[select] == max(x[select] for x in evals))
  assert [e["best"] for e in evals] == [True, evals[1][select] > evals[0][select]]
  mesh = mesh_lib.data_mesh()
  spec, params, info = exports.load_reader(str(tmp_path / "run" / "best"), mesh)
  assert info["step"] == best["step"] and info["select_metric"] == select
  assert {k: v for k, v in info["metrics"].items() if k != "eval_s"} == {
      k: v for k, v in best.items() if k not in ("step", "best", "eval_s")}
  assert spec.reader_len == config.tokens.reader_len and spec.build().config.hidden_size == 32

  # The exported parameters reproduce their evaluation; a random-init reader's EM is near 0.
  data = PreparedData.load(toy_prepared)
  tok = Tokenizer.from_pretrained(data.tokenizer_path)
  dev = rd.load_reader_split(data, "toy_dev", tok)
  evaluator = ReaderEvaluator(config.reader, spec, dev, data, tok, mesh)
  assert evaluator(params, best["step"]) == {k: v for k, v in info["metrics"].items() if k != "eval_s"}
  initial = evaluator(qa_model.init_params(spec.build(), jax.random.key(1)), 0)
  assert initial["em_gold_ranked"] <= 0.25 and initial["em_open"] <= 0.25, initial
