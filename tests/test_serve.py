"""The HTTP server (``infer.serve``): concurrent requests batched, bad input rejected, answers unchanged by batching."""

import concurrent.futures
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import jax
import pytest

from infer import serve
from rnr_jax import exports, qa_model
from rnr_jax.config import load_config
from rnr_jax.data import TokenCorpus
from rnr_jax.index import DenseIndex
from rnr_jax.qa_system import InferenceSettings, QASystem, encode_passages
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training.mesh import data_mesh
from test_reader_train import ANSWERS, KEYS, ROOT

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def system(tmp_path_factory):
  """A random-init tiny unified system over 40 short passages."""
  tokenizer = Tokenizer.from_pretrained()
  titles = [f"{key} notes" for key in KEYS]
  texts = [f"the {key} lives near the {ANSWERS[i % len(ANSWERS)]} tree" for i, key in enumerate(KEYS)]
  corpus = TokenCorpus.write(tmp_path_factory.mktemp("serve") / "corpus", tokenizer.passage_token_ids(titles, texts),
                             tokenizer.vocab_size)
  config = load_config(f"{ROOT}/configs/reader.py:tiny", ["model.pooling=mean"])
  reader_spec = ReaderSpec.from_config(config, exports.initial_encoder(config.model)[0], "")
  spec = SystemSpec.unified_model(reader_spec, passage_len=64, normalize=True)
  params = qa_model.init_params(spec.reader.build(), jax.random.key(0))
  vectors = encode_passages(spec, params, tokenizer, corpus, data_mesh(jax.devices()[:1]))
  settings = InferenceSettings(top_k=5, read_passages=2, question_batch=16, read_batch=16)
  return QASystem.from_parts(spec, params, DenseIndex.build(vectors, "exact"), corpus, tokenizer, settings=settings)


@pytest.fixture()
def server(system):
  """``(base url, server)`` of a server on a free port, shut down after the test."""
  server = serve.make_server(system, "127.0.0.1", 0, max_batch=16, max_wait_ms=20)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT_S)


def _request(url, data=None, content_type="application/json"):
  """``(status, content type, body)``, HTTP errors included."""
  request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
  try:
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
      return response.status, response.headers["Content-Type"], response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers["Content-Type"], e.read()


def _ask(base, question, top_k):
  status, _, body = _request(f"{base}/api/ask?" + urllib.parse.urlencode({"q": question, "top_k": top_k}))
  return status, json.loads(body)


def test_concurrent_requests_are_batched_with_unchanged_answers(server, system):
  base, srv = server
  questions = [(f"where does the {KEYS[i % len(KEYS)]} live {i}", 3 if i % 3 else 5) for i in range(50)]
  assert _ask(base, "warm up", 3)[0] == 200
  with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
    replies = list(pool.map(lambda qk: _ask(base, *qk), questions, timeout=TIMEOUT_S))
  assert [status for status, _ in replies] == [200] * 50
  assert srv.batcher.questions == 51 and srv.batcher.batches < 30  # requests shared batches
  expected = {}  # The same questions answered in other batches, directly.
  for k in (3, 5):
    group = [q for q, top_k in questions if top_k == k]
    expected.update({(q, k): p for q, p in zip(group, system.answer(group, top_k=k))})
  for (question, top_k), (_, reply) in zip(questions, replies):
    want = expected[question, top_k]
    assert reply["question"] == question and reply["top_k"] == top_k
    assert (reply["answer"], reply["passage_id"], reply["answer_start"]) == \
           (want.answer, want.passage_id, want.answer_start)
    assert reply["score"] == pytest.approx(want.score, rel=1e-4, abs=1e-4)
  status, _, body = _request(f"{base}/healthz")
  assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["passages"] == len(KEYS)


def test_bad_requests_are_rejected(server):
  base, _ = server
  long_question = "word " * 200
  rejected = {
      "/api/ask": 400, "/api/ask?q=": 400, "/api/ask?q=%20%20": 400, "/api/ask?q=a&q=b": 400,
      "/api/ask?q=%FF%FE": 400, "/api/ask?q=hi%00there": 400, "/api/ask?q=hi&top_k=abc": 400,
      "/api/ask?q=hi&top_k=0": 400, "/api/ask?q=hi&top_k=-1": 400, "/api/ask?q=hi&top_k=1.5": 400,
      "/api/ask?q=hi&top_k=101": 400, "/api/ask?q=" + "x" * 600: 413,
      "/api/ask?q=" + urllib.parse.quote(long_question[:400]): 413, "/nope": 404,
  }
  for path, want in rejected.items():
    status, content_type, body = _request(base + path)
    assert status == want, (path, status, body)
    assert content_type.startswith("application/json") and json.loads(body)["error"]
  posts = {b"not json": 400, b"[1, 2]": 400, b'{"q": 5}': 400, b'{"q": "hi", "top_k": true}': 400,
           b'{"q": "\xff\xfe"}': 400, b'{"top_k": 3}': 400}
  for data, want in posts.items():
    status, _, body = _request(f"{base}/api/ask", data)
    assert status == want, (data, status, body)
    assert json.loads(body)["error"]
  status, _, body = _request(f"{base}/nope", b"{}")
  assert status == 404
  status, _, body = _request(f"{base}/api/ask", json.dumps({"q": "where does the lion live", "top_k": 2}).encode())
  assert status == 200 and json.loads(body)["top_k"] == 2 and "passage" in json.loads(body)
  status, content_type, body = _request(base + "/")
  assert status == 200 and content_type.startswith("text/html") and b"<form" in body
