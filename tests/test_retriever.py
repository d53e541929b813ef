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
from rnr_jax import retrieval
from rnr_jax import tokenization as tk
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData
from rnr_jax.data.prepared import PrepareSettings, prepare
from rnr_jax.training.checkpoint import ParamsExport
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
  prepare(str(data), out, PrepareSettings(compress=()), echo=lambda s: None)
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
  encoder, _ = retrieval.initial_encoder(config.model)
  spec = retrieval.RetrieverSpec.from_config(config, encoder, "")

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


def test_holdout_tail_never_trains_on_the_last_questions(prepared_dir):
  config = toy_config(prepared_dir)
  data = PreparedData.load(prepared_dir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  spec = retrieval.RetrieverSpec.from_config(config, retrieval.initial_encoder(config.model)[0], "")
  questions = [q.question for q in data.questions("toy_train")]
  every = trainer.RetrieverBatches(data, tokenizer, spec, splits=["toy_train"], hard_negatives=0, batch_size=8,
                                   max_questions=0, seed=0)
  held = trainer.RetrieverBatches(data, tokenizer, spec, splits=["toy_train"], hard_negatives=0, batch_size=8,
                                  max_questions=0, seed=0, holdout_tail=10)
  assert every.questions == questions
  assert held.questions == questions[:-10]


def test_without_eval_splits_the_last_parameters_are_exported(prepared_dir, tmp_path):
  workdir = str(tmp_path / "noeval")
  state = trainer.train_and_evaluate(toy_config(prepared_dir, "retriever.eval_splits=()", "train.num_steps=3",
                                                "train.eval_every=100000"), workdir)
  assert not os.path.exists(os.path.join(workdir, "eval.jsonl"))
  _, params, info = retrieval.load_retriever(os.path.join(workdir, "best"))
  assert info["step"] == 3
  for got, want in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="save_embeddings needs retriever.eval_splits"):
    trainer.train_and_evaluate(toy_config(prepared_dir, "retriever.eval_splits=()", "retriever.save_embeddings=True"),
                               str(tmp_path / "bad"))


def test_shared_and_two_encoder_param_trees(prepared_dir):
  trees = {}
  for shared in (True, False):
    config = toy_config(prepared_dir, f"retriever.shared={shared}")
    encoder, _ = retrieval.initial_encoder(config.model)
    spec = retrieval.RetrieverSpec.from_config(config, encoder, "")
    trees[shared] = jax.eval_shape(lambda s=spec: retrieval.initial_params(s.build(), jax.random.key(0)))
  assert set(trees[True]) == {"encoder"}
  assert set(trees[False]) == {"question_encoder", "passage_encoder"}
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
  assert shapes(trees[False]["question_encoder"]) == shapes(trees[True]["encoder"])
  assert shapes(trees[False]["passage_encoder"]) == shapes(trees[True]["encoder"])
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert count(trees[False]) == 2 * count(trees[True])

  # The shared encoder tells questions and passages apart only by the token type.
  config = toy_config(prepared_dir)
  spec = retrieval.RetrieverSpec.from_config(config, retrieval.initial_encoder(config.model)[0], "")
  params = retrieval.initial_params(spec.build(), jax.random.key(0))
  q_fn, p_fn = map(jax.jit, spec.embed_fns())
  ids = np.array([[101, 2054, 2515, 102]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
  np.testing.assert_allclose(q_fn(params, batch), p_fn(params, batch))
  assert not np.allclose(q_fn(params, batch), p_fn(params, {**batch, "token_type_ids": np.ones_like(ids)}))

  # normalize=True: the same vectors at unit length (inner product = cosine).
  unit = retrieval.RetrieverSpec.from_config(toy_config(prepared_dir, "retriever.normalize=True"),
                                             retrieval.initial_encoder(config.model)[0], "")
  raw, normed = q_fn(params, batch), jax.jit(unit.embed_fns()[0])(params, batch)
  np.testing.assert_allclose(np.linalg.norm(normed, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(normed, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_trainer_learns_toy_task(prepared_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = toy_config(prepared_dir, "train.num_steps=40", "train.eval_every=20", "train.ckpt_every=20",
                      "train.log_every=5")
  mesh = retrieval.data_mesh()
  # The untrained model: the config's random initialisation, through the encoding entry point.
  spec, params, fingerprint = encode_cli.resolve_model(None, None, config, "", mesh)
  untrained = encode_cli.encode(out=str(tmp_path / "emb0"), prepared=prepared_dir, spec=spec, params=params,
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

  # The exported best model, encoded by infer.encode, reproduces its evaluation.
  best = max(evals, key=lambda e: e["toy_dev/top1"])
  spec, params, fingerprint = encode_cli.resolve_model(workdir, None, None, PreparedData.load(
      prepared_dir).manifest["settings"]["tokenizer"], mesh)
  assert spec.shared and set(params) == {"encoder"}
  info = encode_cli.encode(out=str(tmp_path / "emb"), prepared=prepared_dir, spec=spec, params=params,
                           fingerprint=fingerprint, mesh=mesh, batch_size=16, chunk_size=32, eval_splits=["toy_dev"])
  for k in (1, 5, 20):
    assert info["eval"]["toy_dev"][f"top{k}"] == pytest.approx(best[f"toy_dev/top{k}"])
  vectors, meta = retrieval.load_embeddings(str(tmp_path / "emb"))
  assert vectors.shape == (NUM_DOCS, 16) and meta["dim"] == 16 and meta["model_fingerprint"] == fingerprint


def test_two_encoder_loss_trains_both_encoders_and_exports_them(prepared_dir, tmp_path):
  config = toy_config(prepared_dir, "retriever.shared=False")
  data = PreparedData.load(prepared_dir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  spec = retrieval.RetrieverSpec.from_config(config, retrieval.initial_encoder(config.model)[0], "")
  batch = next(trainer.RetrieverBatches(data, tokenizer, spec, splits=["toy_train"], hard_negatives=1, batch_size=8,
                                        max_questions=0, seed=0))
  params = retrieval.initial_params(spec.build(), jax.random.key(0))
  (loss, aux), grads = jax.jit(jax.value_and_grad(trainer.make_loss_fn(spec, 1.0), has_aux=True))(
      params, batch, jax.random.key(1))
  assert np.isfinite(loss) and 0 <= aux["in_batch_accuracy"] <= 1
  for name in ("question_encoder", "passage_encoder"):
    assert float(optax.tree.norm(grads[name])) > 0, name

  export = retrieval.RetrieverExport(str(tmp_path / "best"))
  fingerprint = export.save(5, spec, params, {"metrics": {}})
  export.close()
  spec2, params2, model_item = retrieval.load_retriever(str(tmp_path / "best"))
  assert spec2 == spec and not spec2.shared and model_item["step"] == 5
  assert model_item["fingerprint"] == fingerprint == retrieval.params_fingerprint(params2)
  jax.tree.map(np.testing.assert_array_equal, params2, params)

  # Another kind of export (a reader's or a unified student's: no retriever spec) is refused by name.
  other = ParamsExport(str(tmp_path / "reader_best"))
  other.save(3, {"w": np.zeros((2,), np.float32)}, {"reader": {}, "fingerprint": "x", "info": {}})
  other.close()
  with pytest.raises(ValueError, match=r"reader_best: not a retriever export .*'reader'"):
    retrieval.load_retriever(str(tmp_path / "reader_best"))


def test_teacher_scores_are_distilled(prepared_dir, tmp_path):
  """retriever.teacher: the KL term is zero against the student's own scores, a run learns from a trained teacher's
  scores, and embeddings of another model are refused."""
  data = PreparedData.load(prepared_dir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  mesh = retrieval.data_mesh()

  # Zero against itself: the teacher's vectors are the student's own (no dropout), at the student's scale.
  config = toy_config(prepared_dir, "model.dropout=0.0", "retriever.normalize=True")
  spec = retrieval.RetrieverSpec.from_config(config, retrieval.initial_encoder(config.model)[0], "")
  batches = trainer.RetrieverBatches(data, tokenizer, spec, splits=["toy_train"], hard_negatives=1, batch_size=8,
                                     max_questions=0, seed=0)
  params = retrieval.initial_params(spec.build(), jax.random.key(0))
  q_fn, p_fn = spec.embed_fns()
  corpus = data.token_corpus()
  passages = np.asarray(p_fn(params, retrieval.passage_batch(tokenizer, [corpus[i] for i in range(NUM_DOCS)],
                                                             spec.passage_len, spec.buckets,
                                                             spec.passage_token_type).as_dict()))
  questions = np.asarray(q_fn(params, tokenizer.questions(batches.questions, spec.question_len,
                                                          spec.buckets).as_dict()))
  batches.set_teacher(questions, passages)
  batch = next(batches)
  assert batch["t_q"].shape == (8, spec.dim) and batch["t_p"].shape == (16, spec.dim)
  loss_fn = trainer.make_loss_fn(spec, 20.0, teacher_weight=1.0, teacher_temperature=2.0, teacher_scale=20.0)
  loss, aux = jax.jit(loss_fn)(params, batch, jax.random.key(1))
  assert float(aux["teacher_kl"]) < 1e-4 and float(loss) == pytest.approx(float(aux["nll"]), abs=1e-4)
  with pytest.raises(ValueError, match="teacher question vectors"):
    batches.set_teacher(questions[:3], passages)

  # A trained teacher (export + its corpus embeddings); the student distils it (NLL and KL together).
  teacher_dir = str(tmp_path / "teacher")
  trainer.train_and_evaluate(toy_config(prepared_dir, "train.num_steps=40", "train.eval_every=40",
                                        "train.ckpt_every=40"), teacher_dir)
  t_spec, t_params, fingerprint = encode_cli.resolve_model(teacher_dir, None, None, data.manifest["settings"][
      "tokenizer"], mesh)
  encode_cli.encode(out=str(tmp_path / "t_emb"), prepared=prepared_dir, spec=t_spec, params=t_params,
                    fingerprint=fingerprint, mesh=mesh, batch_size=16, chunk_size=4096, eval_splits=[])
  student_dir = str(tmp_path / "student")
  trainer.train_and_evaluate(toy_config(
      prepared_dir, "train.num_steps=40", "train.eval_every=40", "train.ckpt_every=40", "train.log_every=5",
      f"retriever.teacher={teacher_dir}/best", f"retriever.teacher_embeddings={tmp_path}/t_emb",
      "retriever.teacher_temperature=1.0"), student_dir)
  logs = [r for r in _read_jsonl(os.path.join(student_dir, "metrics.jsonl")) if "teacher_kl" in r]
  assert logs[-1]["teacher_kl"] < 0.5 * logs[0]["teacher_kl"], logs
  teacher_top1 = _read_jsonl(os.path.join(teacher_dir, "eval.jsonl"))[-1]["toy_dev/top1"]
  student_top1 = _read_jsonl(os.path.join(student_dir, "eval.jsonl"))[-1]["toy_dev/top1"]
  assert student_top1 > 10 / NUM_DOCS and student_top1 >= teacher_top1 - 0.15, (student_top1, teacher_top1)

  # Embeddings of another model than the teacher are refused before training.
  other = toy_config(prepared_dir, "train.num_steps=1", f"retriever.teacher={student_dir}/best",
                     f"retriever.teacher_embeddings={tmp_path}/t_emb")
  with pytest.raises(ValueError, match="encoded by another model"):
    trainer.train_and_evaluate(other, str(tmp_path / "other"))
