r"""Quick start: retrieve passages for real questions with the pretrained encoder.

Encodes a sample of the corpus (every sampled question's gold paragraph plus random distractors) and the questions with
all-MiniLM-L6-v2 converted into our Flax BERT, then prints each question's best passages.

  python -m infer.quickstart --data_dir ../shared/data --num_questions 8 --num_passages 2000
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from rnr_jax import metrics, retrieval, tokenization
from rnr_jax.data import readers
from rnr_jax.models.hf import load_hf_encoder
from rnr_jax.specs import RetrieverSpec
from rnr_jax.training import mesh as mesh_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.environ.get("RNR_DATA", "../shared/data"),
                    "Directory of corpus.jsonl and *_dev.jsonl.")
flags.DEFINE_string("questions", "nq_dev.jsonl", "Question file inside data_dir.")
flags.DEFINE_string("encoder", "", "Hugging Face encoder directory or hub id (default: installed all-MiniLM-L6-v2).")
flags.DEFINE_integer("num_questions", 8, "Questions to answer.")
flags.DEFINE_integer("num_passages", 2000, "Corpus rows to encode (gold rows of the questions included).")
flags.DEFINE_integer("top_k", 3, "Passages printed per question.")
flags.DEFINE_enum("pooling", "mean", ["mean", "cls"], "Pooling (MiniLM was pretrained with mean pooling).")
flags.DEFINE_integer("passage_len", 256, "Max passage tokens.")
flags.DEFINE_integer("batch_size", 64, "Encoding batch size.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  rng = np.random.default_rng(FLAGS.seed)
  qpath = os.path.join(FLAGS.data_dir, FLAGS.questions)
  questions = list(readers.read_questions(qpath))
  picked = rng.choice(len(questions), min(FLAGS.num_questions, len(questions)), replace=False)
  questions = [questions[i] for i in sorted(picked)]
  corpus = list(readers.read_corpus(os.path.join(FLAGS.data_dir, "corpus.jsonl")))
  by_id = {d.id: i for i, d in enumerate(corpus)}
  gold_rows = {by_id[q.gold_pid] for q in questions if q.gold_pid is not None and q.gold_pid in by_id}
  others = rng.choice(len(corpus), min(FLAGS.num_passages, len(corpus)), replace=False)
  rows = sorted(gold_rows | {int(i) for i in others})
  docs = [corpus[i] for i in rows]

  encoder_path = FLAGS.encoder or tokenization.default_tokenizer_path()
  config, params = load_hf_encoder(encoder_path)
  tok = tokenization.Tokenizer.from_pretrained(encoder_path)
  # One shared encoder scoring by cosine, passages of token type 0: how sentence-transformers models were trained.
  spec = RetrieverSpec(encoder=config.to_hf_dict(), shared=True, pooling=FLAGS.pooling, retrieval_dim=0,
                       normalize=True, passage_token_type=0, tokenizer_fingerprint="", question_len=64,
                       passage_len=FLAGS.passage_len, buckets=tokenization.DEFAULT_BUCKETS)
  params = {"encoder": params}
  q_fn, p_fn = spec.embed_fns()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  print(f"encoder {encoder_path} ({config.num_hidden_layers} layers, hidden {config.hidden_size}); "
        f"pooling={FLAGS.pooling}")

  records = tok.passage_token_ids([d.title for d in docs], [d.text for d in docs])
  t0 = time.perf_counter()
  encoded = retrieval.encode_corpus(retrieval.BatchEncoder(p_fn, mesh, FLAGS.batch_size), params, tok, records,
                                    max_len=FLAGS.passage_len, buckets=spec.buckets, token_type=0, progress=True)
  q_vecs = retrieval.encode_questions(retrieval.BatchEncoder(q_fn, mesh, FLAGS.batch_size), params, tok,
                                      [q.question for q in questions], max_len=64, buckets=spec.buckets)
  scores = q_vecs @ encoded.vectors.T
  p_rate = encoded.passages_per_s
  print(f"encoded {len(docs)} passages in {time.perf_counter() - t0:.1f}s ({p_rate:.0f} passages/s)\n")

  hits = []
  for qi, q in enumerate(questions):
    order = np.argsort(-scores[qi])[: FLAGS.top_k]
    print(f"Q: {q.question}   (answers: {' | '.join(q.answers)})")
    found = False
    for rank, j in enumerate(order, 1):
      d = docs[j]
      has = metrics.has_answer(q.answers, d.text)
      found |= has
      mark = ("*" if has else " ") + ("G" if d.id == q.gold_pid else " ")
      snippet = d.text[:160].replace("\n", " ")
      print(f"  {rank}. [{scores[qi, j]:.3f}] {mark} {d.title}: {snippet}...")
    hits.append(found)
    print()
  print("* = passage holds an answer, G = the question's gold paragraph")
  print(json.dumps({"questions": len(questions), "passages": len(docs),
                    f"top{FLAGS.top_k}_answer_acc": float(np.mean(hits)), "passages_per_s": round(p_rate, 1)}))


if __name__ == "__main__":
  app.run(main)
