"""The HTTP service (``infer.serve``): n-best answers and search over a JSON API with an OpenAPI schema, concurrent
requests batched without changing answers, every shape compiled at start, CORS, an access log, knowledge edits behind
an API key that the next request sees, and one clear line when the port is taken."""

import concurrent.futures
import logging
import os
import socket
import subprocess
import sys
import threading

import httpx
import jax
import pytest
import uvicorn
from fastapi.testclient import TestClient

from infer import serve
from infer.common import compile_shapes
from rnr_jax import exports, qa_model
from rnr_jax.config import load_config
from rnr_jax.data import TokenCorpus
from rnr_jax.index import DenseIndex
from rnr_jax.qa_system import InferenceSettings, QASystem
from rnr_jax.retrieval import JaxEngine, encode_passages
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training.mesh import data_mesh
from test_reader_train import ANSWERS, KEYS, ROOT

TIMEOUT_S = 120
KEY = "test-key"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
  """A random-init tiny unified system over 40 short passages, on every local device (8 in tests)."""
  tokenizer = Tokenizer.from_pretrained()
  titles = [f"{key} (notes)" for key in KEYS]
  texts = [f"the {key}'s home is near the ``{ANSWERS[i % len(ANSWERS)]}'' tree" for i, key in enumerate(KEYS)]
  corpus = TokenCorpus.write(tmp_path_factory.mktemp("serve") / "corpus", tokenizer.passage_token_ids(titles, texts),
                             tokenizer.vocab_size)
  config = load_config(f"{ROOT}/configs/reader.py:tiny", ["model.pooling=mean"])
  reader_spec = ReaderSpec.from_config(config, exports.initial_encoder(config.model)[0], "")
  spec = SystemSpec.unified_model(reader_spec, passage_len=64, normalize=True)
  params = qa_model.init_params(spec.reader.build(), jax.random.key(0))
  vectors = encode_passages(spec, params, tokenizer, corpus, data_mesh(jax.devices()[:1]))
  settings = InferenceSettings(top_k=5, read_passages=2, question_batch=16, read_batch=4)
  return QASystem.from_parts(spec, params, DenseIndex.build(vectors, "exact"), corpus, tokenizer, settings=settings)


@pytest.fixture()
def client(system):
  with TestClient(serve.make_app(system, api_key=KEY, cors_origins=["http://example.org"])) as c:
    yield c


def _questions(n, offset=0):
  return [f"where is the home of the {KEYS[(i + offset) % len(KEYS)]} {i}" for i in range(n)]


def test_ask_returns_ranked_answers_with_their_passages(client, system):
  assert system.mesh.devices.size == len(jax.local_devices()) == 8  # batches are split over every local device
  one = QASystem(system.spec, JaxEngine(system.spec, system.engine.params, data_mesh(jax.devices()[:1])),
                 system.index, system.store, system.tokenizer, settings=system.settings)
  for a, b in zip(one.answer(_questions(5), n_best=3), system.answer(_questions(5), n_best=3)):
    assert [x.text for x in a.answers] == [x.text for x in b.answers]
    assert [x.probability for x in a.answers] == pytest.approx([x.probability for x in b.answers], abs=1e-4)
  reply = client.post("/api/ask", json={"questions": _questions(3), "top_k": 4, "read_passages": 3, "n_best": 4,
                                        "rule": "weighted", "passage_score_weight": 0.3})
  assert reply.status_code == 200, reply.text
  predictions = reply.json()["predictions"]
  want = system.answer(_questions(3), top_k=4, read_passages=3, n_best=4, rule="weighted", passage_score_weight=0.3)
  for got, expected in zip(predictions, want):
    assert got["answer"] == expected.answer and len(got["answers"]) == 4 and len(got["passages"]) == 4
    assert [p["rank"] for p in got["passages"]] == [0, 1, 2, 3]
    assert [p["id"] for p in got["passages"]] == [p.id for p in expected.passages]
    probabilities = [a["probability"] for a in got["answers"]]
    assert 0 < sum(probabilities) <= 1 + 1e-9 and probabilities[0] > 0
    for a in got["answers"]:
      assert a["passage"]["text"][a["start"]:a["end"]] == a["text"] and a["passage"]["rank"] < 3
      assert "(notes)" in a["passage"]["title"] and "``" not in a["passage"]["text"] and " '" not in a["text"]
  # A single question by query string, the bundle's defaults; a threshold above every probability: no answer.
  one = client.get("/api/ask", params={"q": _questions(1)[0]}).json()["predictions"][0]
  assert len(one["passages"]) == system.settings.top_k and one["answer"] == system.answer(_questions(1))[0].answer
  none = client.post("/api/ask", json={"question": "where", "no_answer_threshold": 1.0}).json()["predictions"][0]
  assert none["no_answer"] and none["answer"] == "" and none["answers"]
  found = client.post("/api/search", json={"questions": _questions(2), "top_k": 3}).json()["results"]
  pids, _ = system.search(_questions(2), 3)
  assert [[p["id"] for p in r] for r in found] == pids.tolist() and found[0][0]["text"]
  assert client.get("/api/passages/3").json()["title"] == f"{KEYS[3]} (notes)"


def test_bad_requests_are_rejected(client):
  long_question = "word " * 200
  posts = {"{}": 400, '{"question": ""}': 400, '{"question": "  "}': 400, '{"question": "a", "questions": ["b"]}': 400,
           '{"question": "hi\\u0000there"}': 400, '{"questions": []}': 400, '{"question": "hi", "top_k": 0}': 422,
           '{"question": "hi", "top_k": 101}': 400, '{"question": "hi", "top_k": "x"}': 422,
           '{"question": "hi", "rule": "bogus"}': 422, '{"question": "hi", "passage_score_weight": 2}': 422,
           '{"question": "' + "x" * 600 + '"}': 413, '{"question": "' + long_question[:400] + '"}': 413,
           '{"questions": ' + str(["q"] * 65).replace("'", '"') + "}": 413, "not json": 422, "[1, 2]": 422}
  for body, want in posts.items():
    reply = client.post("/api/ask", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == want, (body, reply.status_code, reply.text)
    assert reply.json()["detail"]
  assert client.get("/api/ask").status_code == 422  # q missing
  assert client.get("/nope").status_code == 404
  assert client.get("/api/passages/999").status_code == 404


def test_openapi_docs_cors_and_access_log(client, system, caplog):
  schema = client.get("/openapi.json").json()
  assert {"/api/ask", "/api/search", "/api/edit", "/api/health", "/api/passages/{pid}"} <= set(schema["paths"])
  assert "AskRequest" in schema["components"]["schemas"] and "X-API-Key" in str(schema["components"])
  assert "swagger" in client.get("/docs").text.lower()
  preflight = {"Origin": "http://example.org", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type"}
  reply = client.options("/api/ask", headers=preflight)
  assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "http://example.org"
  assert client.options("/api/ask", headers={**preflight, "Origin": "http://evil.example"}).status_code == 400
  with TestClient(serve.make_app(system)) as plain:  # no CORS unless asked for
    assert "access-control-allow-origin" not in plain.options("/api/ask", headers=preflight).headers
  with caplog.at_level(logging.INFO, logger="rnr_jax.access"):
    assert client.get("/api/health").json()["status"] == "ok"
  assert any('"GET /api/health" 200' in r.getMessage() for r in caplog.records)
  page = client.get("/")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and 'id="lambda"' in page.text


def test_edits_need_the_key_are_atomic_and_visible_to_the_next_request(client, system):
  n = len(system.index)
  new = {"title": "Kiwi Island", "text": "The capital of Kiwi Island is Zorbla."}
  assert client.post("/api/edit", json={"add": [new]}).status_code == 401
  assert client.post("/api/edit", json={"add": [new]}, headers={"X-API-Key": "wrong"}).status_code == 401
  with TestClient(serve.make_app(system)) as no_key:
    assert no_key.post("/api/edit", json={"add": [new]}, headers={"X-API-Key": KEY}).status_code == 403
  # A bad edit changes nothing: a missing id to remove, a taken id to add.
  for bad in ({"add": [new], "remove": [999]}, {"add": [{**new, "id": 3}]}, {"replace": [new]}):
    reply = client.post("/api/edit", json=bad, headers={"X-API-Key": KEY})
    assert reply.status_code == 400 and reply.json()["detail"], reply.text
    assert len(system.index) == n
  reply = client.post("/api/edit", json={"add": [new], "remove": [0], "replace": [{**new, "id": 1, "title": "T1"}]},
                      headers={"X-API-Key": KEY})
  assert reply.status_code == 200, reply.text
  [added] = reply.json()["added"]
  assert reply.json()["passages"] == n and added == n  # one added, one removed; the next free id
  assert client.get(f"/api/passages/{added}").json()["text"] == new["text"]
  assert client.get("/api/passages/0").status_code == 404 and client.get("/api/passages/1").json()["title"] == "T1"
  everything = client.post("/api/search", json={"question": "capital of kiwi island", "top_k": n}).json()["results"][0]
  assert added in [p["id"] for p in everything] and 0 not in [p["id"] for p in everything]
  assert client.post("/api/edit", json={"save": True}, headers={"X-API-Key": KEY}).status_code == 400  # no bundle
  reply = client.post("/api/edit", json={"remove": [added], "add": [{"title": "x", "text": "y", "id": 0}]},
                      headers={"X-API-Key": KEY})
  assert reply.status_code == 200 and len(system.index) == n


def test_concurrent_requests_are_batched_with_unchanged_answers(system):
  sock = serve.bind("127.0.0.1", 0)
  api = serve.make_app(system, max_batch=16, max_wait_ms=20)
  server = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  base = f"http://127.0.0.1:{sock.getsockname()[1]}"
  try:
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
      for _ in range(100):
        if server.started:
          break
        threading.Event().wait(0.1)
      questions = [(q, 3 if i % 3 else 5) for i, q in enumerate(_questions(50))]
      ask = lambda qk: http.post("/api/ask", json={"question": qk[0], "top_k": qk[1]})
      with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(ask, questions, timeout=TIMEOUT_S))
      assert [r.status_code for r in replies] == [200] * 50
      worker = api.state.worker
      assert worker.questions == 50 and worker.batches < 30  # requests shared batches
  finally:
    server.should_exit = True
    thread.join(TIMEOUT_S)
  for k in (3, 5):  # The same questions answered in other batches, directly.
    group = [q for q, top_k in questions if top_k == k]
    expected = dict(zip(group, system.answer(group, top_k=k, n_best=3)))
    for (question, top_k), reply in zip(questions, replies):
      if top_k == k:
        got, want = reply.json()["predictions"][0], expected[question]
        assert got["answer"] == want.answer and len(got["passages"]) == k
        assert [a["passage"]["id"] for a in got["answers"]] == [a.passage.id for a in want.answers]
        assert got["answers"][0]["probability"] == pytest.approx(want.answers[0].probability, abs=1e-4)


def test_every_shape_requests_can_take_is_compiled_at_start(system):
  count = compile_shapes(system)
  embed, read = system.engine.question_runner._fn, system.engine.read_runner._fn  # pylint: disable=protected-access
  sizes = embed._cache_size(), read._cache_size()  # pylint: disable=protected-access
  assert count >= sizes[0] + sizes[1] - 2 and sizes[1] > 1
  for n in (1, 3, 7, 16, 21):
    for top_k, m in ((1, 1), (5, 2), (9, 9), (40, 40)):
      system.answer(_questions(n, offset=n), top_k=top_k, read_passages=m)
  assert (embed._cache_size(), read._cache_size()) == sizes  # pylint: disable=protected-access


def test_worker_answers_what_is_queued_then_stops(system):
  worker = serve.Worker(system, max_batch=16, max_wait_ms=2000)
  options = dict(top_k=3, read_passages=2, rule="dpr", passage_score_weight=0.8, n_best=1, no_answer_threshold=0.0)
  asked = worker.ask(_questions(1)[0], **options)
  closing = threading.Thread(target=worker.close)
  closing.start()  # the stop arrives while the batch still waits for company
  closing.join(TIMEOUT_S)
  assert not closing.is_alive() and asked.result(0).answer == system.answer(_questions(1), top_k=3, read_passages=2,
                                                                             rule="dpr")[0].answer
  with pytest.raises(RuntimeError, match="closed"):
    worker.ask("another", **options)


def test_taken_port_is_one_clear_error_line(tmp_path):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "infer.serve", f"--bundle={tmp_path}", f"--port={port}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == f"infer.serve: error: 127.0.0.1:{port} is already in use"
