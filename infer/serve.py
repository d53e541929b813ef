r"""Serves a bundle over HTTP: a JSON API and a small question page.

  python -m infer.serve --bundle B --port 8080 [--host 127.0.0.1]

Endpoints:

* ``GET /``: an HTML page to type questions.
* ``GET /api/ask?q=QUESTION[&top_k=K]`` or ``POST /api/ask`` with a JSON body
  ``{"q": QUESTION, "top_k": K}``: the answer as JSON (:meth:`Prediction.to_json`
  plus ``top_k`` and ``latency_ms``).
* ``GET /healthz``: ``{"status": "ok", ...}`` with the passage count and batching counters.

Bad input gets a 4xx status and ``{"error": message}``: a missing, repeated, empty or non-string ``q``, one with control
characters or invalid UTF-8 (400), one longer than ``--max_question_chars`` characters or ``--max_question_tokens``
tokens (413), a ``top_k`` that is not an integer in ``[1, --max_top_k]`` (400), a body that is not a JSON object (400)
or too large (413); unknown paths get 404.

Requests are answered on one worker thread by a micro-batcher (:class:`MicroBatcher`): the first waiting question opens
a batch, which collects further questions for ``--max_wait_ms`` milliseconds (or until ``--max_batch``) and is answered
with one :meth:`QASystem.predict` call per distinct ``top_k``, so concurrent requests share the jitted encoding and
reading batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import queue
import re
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from absl import app, flags, logging

from rnr_jax.bundle import BundleError
from rnr_jax.qa_system import Prediction, QASystem

FLAGS = flags.FLAGS

INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rnr-jax QA</title>
<style>
body { font-family: sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; }
input[type=text] { width: 70%; font-size: 1.1em; } #answer { font-size: 1.4em; margin: 1em 0 .3em; }
#title { color: #555; } #passage { line-height: 1.5; } mark { background: #ffe066; } .error { color: #b00; }
</style></head><body>
<h1>Ask a question</h1>
<form id="ask"><input type="text" id="q" autofocus placeholder="who wrote the iliad?" maxlength="1000">
<input type="number" id="top_k" min="1" value="20" style="width:4em" title="passages retrieved">
<button>Ask</button></form>
<div id="answer"></div><div id="title"></div><p id="passage"></p>
<script>
const $ = (id) => document.getElementById(id);
$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  for (const id of ["answer", "title", "passage"]) { $(id).textContent = ""; }
  $("answer").className = "";
  const params = new URLSearchParams({q: $("q").value, top_k: $("top_k").value});
  const response = await fetch("/api/ask?" + params);
  const body = await response.json();
  if (!response.ok) { $("answer").className = "error"; $("answer").textContent = body.error; return; }
  $("answer").textContent = body.answer || "(no answer)";
  $("title").textContent = body.title + " (passage " + body.passage_id + ", " + body.latency_ms + " ms)";
  const p = body.passage, s = body.answer_start, e = body.answer_end;
  if (s < 0) { $("passage").textContent = p; return; }
  const mark = document.createElement("mark");
  mark.textContent = p.slice(s, e);
  $("passage").append(p.slice(0, s), mark, p.slice(e));
});
</script></body></html>
"""


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory (python -m infer.export).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8080, "Port to listen on (0: any free port).")
  flags.DEFINE_integer("max_batch", 16, "Most questions answered in one batch.")
  flags.DEFINE_float("max_wait_ms", 5.0, "How long a batch waits for more questions.")
  flags.DEFINE_integer("max_question_chars", 500, "Longest question accepted, in characters.")
  flags.DEFINE_integer("max_question_tokens", 0, "Longest question accepted, in tokens (0: what the model reads).")
  flags.DEFINE_integer("max_top_k", 100, "Largest top_k accepted.")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  flags.mark_flag_as_required("bundle")


# ---- batching ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Request:
  question: str
  top_k: int
  future: concurrent.futures.Future


class MicroBatcher:
  """Answers questions submitted from many threads in batches, on one worker thread.

  Attributes:
    batches: batches answered so far; questions: questions answered so far.
  """

  def __init__(self, system: QASystem, *, max_batch: int = 16, max_wait_ms: float = 5.0):
    if max_batch < 1 or max_wait_ms < 0:
      raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
    self._system = system
    self._max_batch = max_batch
    self._max_wait = max_wait_ms / 1000
    self._queue: queue.Queue[_Request | None] = queue.Queue()
    self.batches = 0
    self.questions = 0
    self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
    self._thread.start()

  def submit(self, question: str, top_k: int) -> concurrent.futures.Future:
    """A future of the question's :class:`Prediction`."""
    if not self._thread.is_alive():
      raise RuntimeError("the micro-batcher is closed")
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Request(question, top_k, future))
    return future

  def close(self) -> None:
    """Answers what is queued, then stops the worker."""
    self._queue.put(None)
    self._thread.join()

  def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
    """``first`` and what arrives within the wait (up to the batch size); whether the stop sentinel came."""
    batch, deadline = [first], time.monotonic() + self._max_wait
    while len(batch) < self._max_batch:
      try:
        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
      except queue.Empty:
        break
      if item is None:
        return batch, True
      batch.append(item)
    return batch, False

  def _run(self) -> None:
    stop = False
    while not stop:
      first = self._queue.get()
      if first is None:
        break
      batch, stop = self._collect(first)
      batch.sort(key=lambda r: r.top_k)
      for top_k, group in itertools.groupby(batch, key=lambda r: r.top_k):
        group = [r for r in group if r.future.set_running_or_notify_cancel()]
        if not group:
          continue
        try:
          predictions = self._system.answer([r.question for r in group], top_k=top_k)
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
          for r in group:
            r.future.set_exception(e)
          continue
        for r, p in zip(group, predictions):
          r.future.set_result(p)
      self.batches += 1
      self.questions += len(batch)


# ---- requests ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts (see the module docstring)."""

  max_question_chars: int = 500
  max_question_tokens: int = 62
  max_top_k: int = 100
  max_body_bytes: int = 1 << 16
  timeout_s: float = 120.0


class RequestError(ValueError):
  """A rejected request: an HTTP status and a message."""

  def __init__(self, status: HTTPStatus, message: str):
    self.status = status
    super().__init__(message)


_INTEGER = re.compile(r"[+]?\d{1,9}")


def check_request(system: QASystem, limits: Limits, q: Any, top_k: Any) -> tuple[str, int]:
  """The question and ``top_k`` of a request, or :class:`RequestError` (``top_k`` None: the default)."""
  if q is None:
    raise RequestError(HTTPStatus.BAD_REQUEST, "missing parameter 'q' (the question)")
  if not isinstance(q, str):
    raise RequestError(HTTPStatus.BAD_REQUEST, "'q' must be a string")
  if not q.strip():
    raise RequestError(HTTPStatus.BAD_REQUEST, "'q' is empty")
  if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r" for c in q):
    raise RequestError(HTTPStatus.BAD_REQUEST, "'q' contains control characters or is not text")
  if len(q) > limits.max_question_chars:
    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"'q' is longer than {limits.max_question_chars} characters")
  if len(system.tokenizer.encode_texts([q])[0]) > limits.max_question_tokens:
    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"'q' is longer than {limits.max_question_tokens} tokens")
  if top_k is None:
    return q.strip(), system.settings.top_k
  if isinstance(top_k, str) and _INTEGER.fullmatch(top_k.strip()):
    top_k = int(top_k)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
    raise RequestError(HTTPStatus.BAD_REQUEST, f"'top_k' must be an integer in [1, {limits.max_top_k}]")
  return q.strip(), top_k


class QAServer(ThreadingHTTPServer):
  """An HTTP server answering with a :class:`MicroBatcher` over a :class:`QASystem`."""

  daemon_threads = True

  def __init__(self, address: tuple[str, int], system: QASystem, batcher: MicroBatcher, limits: Limits):
    super().__init__(address, Handler)
    self.system = system
    self.batcher = batcher
    self.limits = limits

  def server_close(self) -> None:
    super().server_close()
    self.batcher.close()


class Handler(BaseHTTPRequestHandler):
  """Routes requests of a :class:`QAServer`."""

  server: QAServer
  protocol_version = "HTTP/1.1"

  def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
    logging.debug("%s - " + format, self.address_string(), *args)

  def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: HTTPStatus, obj: Any) -> None:
    self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

  def do_GET(self) -> None:  # noqa: N802 - the http.server name
    url = urllib.parse.urlsplit(self.path)
    if url.path in ("/", "/index.html"):
      self._send(HTTPStatus.OK, INDEX_HTML.encode(), "text/html; charset=utf-8")
    elif url.path == "/healthz":
      batcher = self.server.batcher
      self._json(HTTPStatus.OK, {"status": "ok", "passages": len(self.server.system.index),
                                 "batches": batcher.batches, "questions": batcher.questions})
    elif url.path == "/api/ask":
      try:
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True, errors="strict", max_num_fields=20)
      except UnicodeDecodeError:
        self._json(HTTPStatus.BAD_REQUEST, {"error": "the query string is not valid UTF-8"})
        return
      except ValueError as e:
        self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad query string: {e}"})
        return
      if any(len(query.get(name, ())) > 1 for name in ("q", "top_k")):
        self._json(HTTPStatus.BAD_REQUEST, {"error": "give 'q' and 'top_k' at most once"})
        return
      self._ask(query.get("q", [None])[0], query.get("top_k", [None])[0])
    else:
      self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path}"})

  def do_POST(self) -> None:  # noqa: N802 - the http.server name
    url = urllib.parse.urlsplit(self.path)
    if url.path != "/api/ask":
      self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path}"})
      return
    try:
      length = int(self.headers.get("Content-Length", ""))
    except ValueError:
      self.close_connection = True
      self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
      return
    if not 0 <= length <= self.server.limits.max_body_bytes:
      self.close_connection = True
      self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                 {"error": f"the body must be at most {self.server.limits.max_body_bytes} bytes"})
      return
    raw = self.rfile.read(length)
    try:
      body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
      self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not valid UTF-8"})
      return
    except ValueError:
      self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
      return
    if not isinstance(body, dict):
      self._json(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
      return
    self._ask(body.get("q"), body.get("top_k"))

  def _ask(self, q: Any, top_k: Any) -> None:
    start = time.perf_counter()
    try:
      question, k = check_request(self.server.system, self.server.limits, q, top_k)
    except RequestError as e:
      self._json(e.status, {"error": str(e)})
      return
    try:
      prediction: Prediction = self.server.batcher.submit(question, k).result(timeout=self.server.limits.timeout_s)
    except concurrent.futures.TimeoutError:
      self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "timed out waiting for an answer"})
      return
    except Exception as e:  # noqa: BLE001 - reported to the client, logged here
      logging.exception("answering %r failed", question)
      self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"answering failed: {type(e).__name__}"})
      return
    self._json(HTTPStatus.OK, {**prediction.to_json(), "top_k": k,
                               "latency_ms": round(1000 * (time.perf_counter() - start), 1)})


def make_server(system: QASystem, host: str, port: int, *, limits: Limits | None = None, max_batch: int = 16,
                max_wait_ms: float = 5.0) -> QAServer:
  """A bound server (port 0: any free port, see ``server_address``); run it with ``serve_forever()``.

  ``server_close()`` also stops its micro-batcher.
  """
  limits = limits or Limits(max_question_tokens=system.spec.retriever.question_len - 2)
  batcher = MicroBatcher(system, max_batch=max_batch, max_wait_ms=max_wait_ms)
  try:
    return QAServer((host, port), system, batcher, limits)
  except OSError:
    batcher.close()
    raise


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    system = QASystem.from_bundle(FLAGS.bundle, cache_dir=FLAGS.cache_dir)
  except (BundleError, FileNotFoundError) as e:
    sys.exit(f"infer.serve: error: {e}")
  limits = Limits(max_question_chars=FLAGS.max_question_chars,
                  max_question_tokens=FLAGS.max_question_tokens or system.spec.retriever.question_len - 2,
                  max_top_k=FLAGS.max_top_k)
  system.answer(["warm up the jitted functions"])
  server = make_server(system, FLAGS.host, FLAGS.port, limits=limits, max_batch=FLAGS.max_batch,
                       max_wait_ms=FLAGS.max_wait_ms)
  host, port = server.server_address[:2]
  print(f"Serving {FLAGS.bundle} ({len(system.index)} passages) on http://{host}:{port}/", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  define_flags()
  app.run(main)
