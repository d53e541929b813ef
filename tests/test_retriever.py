"""The retriever trainer (``train.retriever``) on a toy task it must learn, its batches and its models.

Toy task: 48 one-line documents ``"<code> means <answer>"`` with a distinct rare
word as code; train questions ``"what does <code> mean"``, dev questions
``"meaning of <code>"`` (another template). Only the shared code word tells the
right passage apart, so retrieval from a random-init encoder is at chance
(top-1 = 1/48) until it learns to match it. Mean pooling: a random-init tiny
BERT's [CLS] vector is nearly the same for every input, so [CLS] pooling needs
far more steps than a unit test can afford.
"""

import json
import os

import jax
import numpy as np
import optax
import pytest

from infer import encode as encode_cli
from rnr_jax import embeddings, exports, qa_model
from rnr_jax import tokenization as tk
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData
from rnr_jax.data.prepared import PrepareSettings, prepare
from train.sources import data_dir_sources
from rnr_jax.specs import RetrieverSpec
from rnr_jax.training import mesh as mesh_lib
from train import retriever as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DOCS = 48


def write_toy_data(directory: str, num_docs: int = NUM_DOCS) -> None:
  """Writes the toy corpus and the ``toy_train`` / ``toy_dev`` question files into ``directory``."""
  vocab = tk.Tokenizer.from_pretrained().vocab()
  words = sorted(w for w in vocab if w.isascii() and w.isalpha() and 6 <= len(w) <= 9 and vocab[w] > 5000)[::97]
  codes, answers = words[:num_docs], words[num_docs:2 * num_docs]
  assert len(answers) == num_docs

  def write(name, rows):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)

  write("corpus.jsonl", [{"id": i, "title": "entry", "text": f"{codes[i]} means {answers[i]}", "source": "toy"}
                         for i in range(num_docs)])
  write("toy_train.jsonl", [{"id": f"t{i}", "question": f"what does {codes[i]} mean", "answers": [answers[i]],
                             "gold_pid": i} for i in range(num_docs)])
  write("toy_dev.jsonl", [{"id": f"d{i}", "question": f"meaning of {codes[i]}", "answers": [answers[i]],
                           "gold_pid": i} for i in range(num_docs)])


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  data = tmp_path_factory.mktemp("toy_data")
  write_toy_data(str(data))
  out = str(tmp_path_factory.mktemp("toy") / "prepared")
  prepare(*data_dir_sources(str(data)), out, PrepareSettings(compress=()), echo=lambda s: None)
  return out


def toy_config(prepared: str, *overrides: str):
  return load_config(os.path.join(ROOT, "configs/retriever.py:tiny"), [
      f"prepared_dir={prepared}", "retriever.train_splits=('toy_train',)", "retriever.eval_splits=('toy_dev',)",
      "retriever.select_metric=toy_dev/top1", "model.pooling=mean", "optim.lr=5e-3", *overrides])


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_batches_dpr_layout_and_resume(prepared_dir):
  config = toy_config(prepared_dir, "retriever.hard_negatives=2")
  data = PreparedData.load(prepared_dir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  encoder, _, _ = exports.initial_encoder(config.model)
  spec = RetrieverSpec.from_config(config, encoder, "")

  def batches():
    return trainer.RetrieverBatches(data, tokenizer, spec, splits=["toy_train"], hard_negatives=2, batch_size=8,
                                    max_questions=0, seed=3)

  it = batches()
  cands = data.candidates("toy_train")
  first = next(it)
  assert first["q_input_ids"].shape[0] == 8 and first["p_input_ids"].shape[0] == 24
  assert (first["q_token_type_ids"] == 0).all()
  assert (first["p_token_type_ids"] == first["p_attention_mask"]).all()  # type 1 on every real token
  assert first["p_input_ids"].shape[1] in spec.buckets and first["q_input_ids"].shape[1] in spec.buckets
  corpus = data.token_corpus()
  # Row 3i is question i's positive (gold passage i here), rows 3i+1, 3i+2 its hard negatives.
  rows = first["p_input_ids"].reshape(8, 3, -1)
  pos_ids = {tuple(corpus[int(cands.positives[q][0])]) for q in range(len(cands))}
  for i in range(8):
    record = rows[i, 0][rows[i, 0] > 0][1:-1]  # strip [CLS] ... [SEP] and padding
    assert tuple(record) in pos_ids
    for neg in rows[i, 1:]:
      assert not np.array_equal(neg, rows[i, 0])
    batch_positives = {tuple(r) for r in rows[:, 0]}
    assert not any(tuple(neg) in batch_positives for neg in rows[i, 1:])
  for _ in range(7):  # cross an epoch boundary (6 batches per epoch)
    next(it)
  state = it.state()
  expected = next(it)
  resumed = batches()
  resumed.restore(state)
  got = next(resumed)
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])


def test_empty_eval_splits_are_refused_before_training(prepared_dir, tmp_path):
  workdir = tmp_path / "noeval"
  with pytest.raises(ValueError, match="retriever.eval_splits is empty"):
    trainer.train_and_evaluate(toy_config(prepared_dir, "retriever.eval_splits=()", "train.num_steps=3"), str(workdir))
  assert not (workdir / "checkpoints").exists() and not (workdir / "best").exists()


def test_shared_and_two_encoder_param_trees(prepared_dir):
  trees = {}
  for shared in (True, False):
    config = toy_config(prepared_dir, f"retriever.shared={shared}")
    encoder, _, _ = exports.initial_encoder(config.model)
    spec = RetrieverSpec.from_config(config, encoder, "")
    trees[shared] = jax.eval_shape(lambda s=spec: qa_model.init_params(s.build(), jax.random.key(0)))
  assert set(trees[True]) == {"encoder"}
  assert set(trees[False]) == {"question_encoder", "passage_encoder"}
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
  assert shapes(trees[False]["question_encoder"]) == shapes(trees[True]["encoder"])
  assert shapes(trees[False]["passage_encoder"]) == shapes(trees[True]["encoder"])
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert count(trees[False]) == 2 * count(trees[True])

  # The shared encoder tells questions and passages apart only by the token type.
  config = toy_config(prepared_dir)
  spec = RetrieverSpec.from_config(config, exports.initial_encoder(config.model)[0], "")
  params = jax.jit(qa_model.init_params, static_argnums=0)(spec.build(), jax.random.key(0))
  q_fn, p_fn = map(jax.jit, spec.embed_fns())
  ids = np.array([[101, 2054, 2515, 102]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
  np.testing.assert_allclose(q_fn(params, batch), p_fn(params, batch))
  assert not np.allclose(q_fn(params, batch), p_fn(params, {**batch, "token_type_ids": np.ones_like(ids)}))

  # normalize=True: the same vectors at unit length (inner product = cosine).
  unit = RetrieverSpec.from_config(toy_config(prepared_dir, "retriever.normalize=True"),
                                   exports.initial_encoder(config.model)[0], "")
  raw, normed = q_fn(params, batch), jax.jit(unit.embed_fns()[0])(params, batch)
  np.testing.assert_allclose(np.linalg.norm(normed, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(normed, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_trainer_learns_toy_task(prepared_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = toy_config(prepared_dir, "train.num_steps=40", "train.eval_every=20", "train.ckpt_every=20",
                      "train.log_every=5", "retriever.save_embeddings=True")
  mesh = mesh_lib.data_mesh()
  # The untrained model: the config's random initialisation, through the encoding entry point.
  spec, params, fingerprint = encode_cli.resolve_model(None, None, config, "", mesh)
  untrained = embeddings.encode_prepared(out=str(tmp_path / "emb0"), prepared=prepared_dir, spec=spec, params=params,
                                         fingerprint=fingerprint, mesh=mesh, batch_size=16, chunk_size=4096,
                                         eval_splits=["toy_dev"])["eval"]["toy_dev"]

  trainer.train_and_evaluate(config, workdir)

  train_logs = [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert train_logs[-1]["step"] == 40
  assert np.mean([r["loss"] for r in train_logs[-2:]]) < train_logs[0]["loss"] - 1.0
  evals = _read_jsonl(os.path.join(workdir, "eval.jsonl"))
  assert [e["step"] for e in evals] == [20, 40]
  final = evals[-1]
  chance = 1 / NUM_DOCS
  assert final["toy_dev/top1"] >= 0.5, final
  assert final["toy_dev/top1"] > untrained["top1"] + 0.3 and final["toy_dev/top1"] > 10 * chance
  assert final["toy_dev/top5"] >= final["toy_dev/top1"]

  # The best evaluation is the exported one, with its metrics and the fingerprint of its parameters.
  best = max(evals, key=lambda e: e["toy_dev/top1"])
  assert evals[0]["best"] and evals[1]["best"] == (evals[1]["toy_dev/top1"] > evals[0]["toy_dev/top1"])
  spec, params, fingerprint = encode_cli.resolve_model(workdir, None, None, PreparedData.load(
      prepared_dir).manifest["settings"]["tokenizer"], mesh)
  assert spec.shared and set(params) == {"encoder"}
  info = exports.read_info(os.path.join(workdir, "best"))
  assert info["step"] == best["step"] and info["select_metric"] == "toy_dev/top1"
  assert info["retriever"] == spec.to_json() and info["fingerprint"] == exports.params_fingerprint(params)
  assert {k: v for k, v in info["metrics"].items() if k != "eval_s"} == {
      k: v for k, v in best.items() if k not in ("step", "best", "eval_s")}
  # The exported best model, encoded by infer.encode, reproduces its evaluation.
  encoded = embeddings.encode_prepared(out=str(tmp_path / "emb"), prepared=prepared_dir, spec=spec, params=params,
                                       fingerprint=fingerprint, mesh=mesh, batch_size=16, chunk_size=32,
                                       eval_splits=["toy_dev"])
  for k in (1, 5, 20):
    assert encoded["eval"]["toy_dev"][f"top{k}"] == pytest.approx(best[f"toy_dev/top{k}"])
  vectors, meta = embeddings.load(str(tmp_path / "emb"))
  assert vectors.shape == (NUM_DOCS, 16) and meta["dim"] == 16 and meta["model_fingerprint"] == fingerprint
  # retriever.save_embeddings: the best evaluation's corpus encoding, under the key infer.encode checks.
  kept, kept_meta = embeddings.load(os.path.join(workdir, "embeddings"))
  assert kept_meta["step"] == best["step"]
  key = embeddings.key_of(spec, fingerprint, meta["corpus_sha256"])
  assert {k: kept_meta[k] for k in key} == key
  np.testing.assert_allclose(kept, vectors, rtol=1e-5, atol=1e-6)


def test_two_encoder_loss_trains_both_encoders_and_exports_them(prepared_dir, tmp_path):
  config = toy_config(prepared_dir, "retriever.shared=False")
  data = PreparedData.load(prepared_dir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  spec = RetrieverSpec.from_config(config, exports.initial_encoder(config.model)[0], "")
  batch = next(trainer.RetrieverBatches(data, tokenizer, spec, splits=["toy_train"], hard_negatives=1, batch_size=8,
                                        max_questions=0, seed=0))
  params = jax.jit(qa_model.init_params, static_argnums=0)(spec.build(), jax.random.key(0))
  (loss, aux), grads = jax.jit(jax.value_and_grad(trainer.make_loss_fn(spec, 1.0), has_aux=True))(
      params, batch, jax.random.key(1))
  assert np.isfinite(loss) and 0 <= aux["in_batch_accuracy"] <= 1
  for name in ("question_encoder", "passage_encoder"):
    assert float(optax.tree.norm(grads[name])) > 0, name

  # Exported as train.retriever does: the spec, the metrics and the parameters' fingerprint.
  best = exports.BestExport(str(tmp_path), {"retriever": spec.to_json()}, "top1", fingerprint=True)
  assert best.offer(5, params, {"top1": 0.5})
  best.close()
  spec2, params2, model_item = exports.load_retriever(str(tmp_path / "best"))
  assert spec2 == spec and not spec2.shared and model_item["step"] == 5
  assert model_item["metrics"] == {"top1": 0.5} and model_item["select_metric"] == "top1"
  assert model_item["fingerprint"] == exports.params_fingerprint(params) == exports.params_fingerprint(params2)
  jax.tree.map(np.testing.assert_array_equal, params2, params)

  # Another kind of export (a reader's or a unified student's: no retriever spec) is refused by name.
  other = exports.Export(str(tmp_path / "reader_best"))
  other.save(3, {"w": np.zeros((2,), np.float32)}, {"reader": {}, "metrics": {}})
  other.close()
  with pytest.raises(ValueError, match=r"reader_best: not an exported retriever .*'reader'"):
    exports.load_retriever(str(tmp_path / "reader_best"))
