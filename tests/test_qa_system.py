"""The QA system (``rnr_jax.qa_system``) and knowledge edits (``rnr_jax.knowledge``) on a toy task they must learn.

A tiny retriever and a tiny reader are trained for a few seconds on the reader
toy task of ``test_reader_train`` (questions ``"which word follows zebra near
<key>"``, answered by the word after ``zebra`` in the key's marker passage) and
exported as a two-model bundle. The bundle must answer the held-out questions,
exactly as the in-memory system with the same (FP16-rounded) weights and index;
an added passage with a made-up fact must be retrieved and read at once, a
removed one never again, also after the edits are saved into the bundle.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from rnr_jax import deploy, exports, knowledge
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData, TokenCorpus
from rnr_jax.index import DenseIndex
from rnr_jax.metrics import exact_match
from rnr_jax.qa_system import RULES, InferenceSettings, PassageStore, QASystem
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training.mesh import data_mesh
from test_reader_train import build_toy_prepared
from train import reader as reader_trainer
from train import retriever as retriever_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The toy reader only learned to find the marker among its key's passages (its training negatives), so it reads
# the retriever's top passage (m' = 1): deeper, other keys' marker passages look as good to it.
SETTINGS = InferenceSettings(top_k=8, read_passages=1, read_batch=4, question_batch=8)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The toy task's prepared directory."""
  return build_toy_prepared(str(tmp_path_factory.mktemp("qa_toy")))


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
  """``(spec, params)`` of a retriever + reader system trained on the toy task (60 steps each)."""
  root = tmp_path_factory.mktemp("qa_runs")
  common = [f"prepared_dir={toy}", "train.num_steps=60", "train.eval_every=60", "train.ckpt_every=60",
            "train.log_every=20"]
  retriever_config = load_config(os.path.join(ROOT, "configs/retriever.py:tiny"), [
      *common, "retriever.train_splits=('toy_train',)", "retriever.eval_splits=('toy_dev',)",
      "retriever.select_metric=toy_dev/top1", "model.pooling=mean", "retriever.normalize=True", "optim.lr=5e-3"])
  retriever_trainer.train_and_evaluate(retriever_config, str(root / "retriever"))
  reader_config = load_config(os.path.join(ROOT, "configs/reader.py:tiny"), [
      *common, "reader.train_splits=('toy_train',)", "reader.eval_split=toy_dev", "reader.eval_passages=(1, 4)",
      "optim.lr=3e-3"])
  reader_trainer.train_and_evaluate(reader_config, str(root / "reader"))
  mesh = data_mesh(jax.devices()[:1])
  return exports.load_system(str(root / "reader" / "best"), str(root / "retriever" / "best"), mesh)


@pytest.fixture(scope="module")
def built(trained, toy, tmp_path_factory):
  """``(bundle dir, index)``: the trained system's INT8 index (recall on the dev questions) and its bundle."""
  spec, params = trained
  data = PreparedData.load(toy)
  records, pids = deploy.corpus_records(data, None)
  index = deploy.build_index(data, spec, params, records, pids, data_mesh(jax.devices()[:1]), recall_split="toy_dev")
  bundle = str(tmp_path_factory.mktemp("qa_bundle") / "bundle")
  deploy.write_system_bundle(bundle, data, spec, params, index, records, pids, SETTINGS)
  return bundle, index


def _questions(toy, split="toy_dev"):
  return PreparedData.load(toy).questions(split)


def test_trained_system_bundle_answers_like_in_memory(trained, built, toy):
  spec, params = trained
  bundle, index = built
  assert not spec.unified and index.kind == "int8"
  assert index.build_report["recall@20"] >= 0.99 and index.build_report["eval_source"] == "given"  # dev questions

  data = PreparedData.load(toy)
  tokenizer = Tokenizer.from_pretrained(data.tokenizer_path)
  rounded = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(np.float32), jax.device_get(params))
  in_memory = QASystem.from_parts(spec, rounded, index, data.token_corpus(), tokenizer, settings=SETTINGS)
  bundled = QASystem.from_bundle(bundle)
  assert bundled.settings == SETTINGS and bundled.spec == spec and len(bundled.store) == data.num_passages
  vectors = bundled.embed_passages(data.token_corpus())
  assert DenseIndex.build(vectors, "int8").build_report["recall@20"] >= 0.99  # every passage as a query

  questions = _questions(toy) + _questions(toy, "toy_train")[:8]
  texts = [q.question for q in questions]

  def unscored(predictions):  # scores of reads in other batch shapes are compared to a tolerance
    return [(p.answer, _best(p).passage, _best(p).start, [r.id for r in p.passages]) for p in predictions]

  # Every rule; its m' from one retrieval and one read: the answers of a predict call per m'.
  for rule in RULES:
    got = bundled.predict(texts, read_counts=(1, 4, 8), rule=rule)
    want = in_memory.predict(texts, read_counts=(1, 4, 8), rule=rule)
    for n in (1, 4, 8):
      alone = bundled.predict(texts, read_counts=(n,), rule=rule)
      np.testing.assert_array_equal(alone.passage_ids, got.passage_ids)
      assert unscored(alone.predictions[n]) == unscored(got.predictions[n])
      np.testing.assert_allclose([_best(p).score for p in alone.predictions[n]],
                                 [_best(p).score for p in got.predictions[n]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.passage_ids, want.passage_ids)
    np.testing.assert_allclose(got.passage_scores, want.passage_scores, rtol=1e-5, atol=1e-5)
    for n in (1, 4, 8):
      assert [(p.answer, _best(p).passage.id, _best(p).start) for p in got.predictions[n]] == \
             [(p.answer, _best(p).passage.id, _best(p).start) for p in want.predictions[n]]
      np.testing.assert_allclose([_best(p).score for p in got.predictions[n]],
                                 [_best(p).score for p in want.predictions[n]], rtol=1e-4, atol=1e-4)
  assert list(bundled.predict(texts, read_counts=(4, 4)).predictions) == [4]  # each m' answered once

  # It learned the task: the held-out questions are answered from their marker passage.
  dev = _questions(toy)
  predictions = bundled.answer([q.question for q in dev])
  assert np.mean([exact_match(p.answer, q.answers) for p, q in zip(predictions, dev)]) >= 0.85
  for p in predictions:
    assert _best(p).passage.text[_best(p).start:_best(p).end] == p.answer and "zebra" in _best(p).passage.text
  # With the original texts, answers keep the corpus casing.
  with_texts = QASystem.from_parts(spec, rounded, index, data.token_corpus(), tokenizer, settings=SETTINGS,
                                   passage_texts=lambda pid: (data.passages.titles[pid], data.passages.texts[pid]))
  cased = with_texts.answer([q.question for q in dev])
  assert np.mean([p.answer in q.answers for p, q in zip(cased, dev)]) >= 0.85
  assert [_best(p).passage.id for p in cased] == [_best(p).passage.id for p in predictions]


def test_read_chunks_by_length_and_keeps_each_questions_order(built, toy):
  bundle, _ = built
  system = QASystem.from_bundle(bundle)
  texts = [q.question for q in _questions(toy) + _questions(toy, "toy_train")[:8]]
  texts[1::3] = [t + " in the long list of the many passages" * 3 for t in texts[1::3]]  # longer rows
  together = system.read(texts, read_passages=8)
  lengths = {len(row[0]) for rows in together.rows for row in rows}
  buckets = {next(b for b in system.spec.reader.buckets if b >= n) for n in lengths}
  assert len(buckets) > 1  # rows of several buckets: chunks regroup them across questions
  for q, text in enumerate(texts):
    alone = system.read([text], read_passages=8)
    np.testing.assert_array_equal(alone.passage_ids[0], together.passage_ids[q])
    assert len(alone.rows[0]) == len(together.rows[q]) == 8
    for got, want in zip(together.rows[q], alone.rows[0]):  # the q-th question's rows, in retrieval order
      np.testing.assert_array_equal(got[0], want[0])
      assert got[1:3] == want[1:3]
      for a, b in zip(got[3:], want[3:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _best(prediction):
  return prediction.answers[0]


def _top(system, question, k=None):
  results = system.predict([question], top_k=k or len(system.index))
  return results.passage_ids[0], results.predictions[SETTINGS.read_passages][0]


def test_knowledge_edits_apply_at_once_and_persist(built, toy, tmp_path):
  bundle = str(tmp_path / "bundle")
  shutil.copytree(built[0], bundle, ignore=shutil.ignore_patterns(".cache"))
  system = QASystem.from_bundle(bundle)
  dev = _questions(toy)
  fact = "which word follows zebra near robin"
  assert not exact_match(_top(system, fact)[1].answer, ["Kiwi"])

  [added] = knowledge.add_passages(system, [knowledge.Passage(
      "robin notes", "stone river market winter garden robin zebra Kiwi meadow canyon orchard violet thunder.")])
  assert added == PreparedData.load(toy).num_passages  # the next free id
  removed = dev[0].gold_pid
  knowledge.remove_passages(system, [removed])
  key = dev[1].question.split()[-1]
  knowledge.replace_passages(system, [knowledge.Passage(
      f"{key} notes", f"stone river market winter garden {key} zebra Guava meadow canyon orchard violet thunder.",
      dev[1].gold_pid)])
  with pytest.raises(ValueError, match="already in use"):
    knowledge.add_passages(system, [knowledge.Passage("t", "text", added)])
  with pytest.raises(KeyError):
    knowledge.remove_passages(system, [removed])

  def check(system):
    ids, prediction = _top(system, fact)
    assert ids[0] == added and _best(prediction).passage.id == added and exact_match(prediction.answer, ["Kiwi"])
    ids, prediction = _top(system, dev[0].question)
    assert removed not in ids and len(ids) == len(system.index) and _best(prediction).passage.id != removed
    ids, prediction = _top(system, dev[1].question, k=8)
    assert _best(prediction).passage.id == dev[1].gold_pid and exact_match(prediction.answer, ["Guava"])

  check(system)
  assert len(system.index) == len(system.store) == PreparedData.load(toy).num_passages
  knowledge.save_edits(system, bundle)
  reloaded = QASystem.from_bundle(bundle)
  assert reloaded.index.pending_edits == 0 and removed not in reloaded.store and added in reloaded.store
  check(reloaded)


def test_passage_store_edits_and_round_trip(tmp_path):
  tokenizer = Tokenizer.from_pretrained()
  records = tokenizer.passage_token_ids(["a", "b", "c"], ["one", "two", "three"])
  corpus = TokenCorpus.write(tmp_path / "corpus", records, tokenizer.vocab_size)
  store = PassageStore(corpus, np.array([5, 2, 9]))
  assert len(store) == 3 and 2 in store and 0 not in store and store.next_id() == 10
  np.testing.assert_array_equal(store[9], records[2])
  new = tokenizer.passage_token_ids(["d", "b2"], ["four", "two again"])
  store.put([11, 2], new)
  store.delete([5])
  with pytest.raises(KeyError):
    store.delete([5])
  with pytest.raises(KeyError):
    store[5]  # pylint: disable=pointless-statement
  assert store.ids.tolist() == [9, 11, 2] and store.pending_edits == 4 and store.next_id() == 12
  store.write(tmp_path / "edited")
  loaded = PassageStore.load(tmp_path / "edited")
  assert loaded.ids.tolist() == [9, 11, 2] and loaded.pending_edits == 0
  for pid, record in ((9, records[2]), (11, new[0]), (2, new[1])):
    np.testing.assert_array_equal(loaded[pid], record)
  with pytest.raises(ValueError, match="unique"):
    PassageStore(corpus, np.array([1, 1, 2]))


def test_system_spec_round_trip_and_checks(trained):
  spec, _ = trained
  assert SystemSpec.from_json(spec.to_json()) == spec
  unified = SystemSpec.unified_model(spec.reader, passage_len=64)
  assert unified.unified and unified.dim == spec.reader.retrieval_dim
  assert SystemSpec.from_json(unified.to_json()) == unified
  with pytest.raises(ValueError, match="tokenizers"):
    SystemSpec.two_models(spec.retriever, ReaderSpec.from_json({**spec.reader.to_json(),
                                                                 "tokenizer_fingerprint": "other"}))
  with pytest.raises(ValueError, match="rule"):
    InferenceSettings(rule="best")
