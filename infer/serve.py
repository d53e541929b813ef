r"""Serves a QA system over HTTP: a JSON API (FastAPI, OpenAPI schema at ``/openapi.json``, docs at ``/docs``) and a
demo page at ``/``, on uvicorn.

  python -m infer.serve --bundle B [--host 127.0.0.1 --port 8080 --cors_origins URL,... --devices N --engine E]
  RNR_API_KEY=secret python -m infer.serve --bundle B     # enables the knowledge-edit endpoint

Endpoints: ``POST /api/ask`` (one ``question`` or a batch of ``questions``, with per-request ``top_k``, ``rule``,
``passage_score_weight`` (λ), ``read_passages`` (m'), ``n_best`` and ``no_answer_threshold``; ``GET /api/ask?q=...``
too), ``POST /api/search`` (passages only), ``GET /api/passages/{id}``, ``POST /api/edit`` (add, remove and replace
passages, optionally saved into the bundle; needs the ``X-API-Key`` header), ``GET /api/health`` and ``GET
/api/config``. Requests run on one worker thread: concurrent questions are micro-batched into shared reads, and an edit
runs between batches, so it is atomic and the next request sees it; an edit of the bundle by another process
(``python -m infer.edit``) is loaded beside the running system and swapped in (``--watch_s``). Every input shape is
compiled before the port opens on the JAX engine (:func:`infer.common.compile_shapes`); JAX's persistent compilation
cache makes restarts fast. Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'rnr-jax[serve]'``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import hmac
import itertools
import logging as std_logging
import os
import queue
import socket
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Literal

from absl import app, flags, logging

try:
  import fastapi
  import uvicorn
  from fastapi.middleware.cors import CORSMiddleware
  from fastapi.responses import FileResponse
  from fastapi.security import APIKeyHeader
  from pydantic import BaseModel, Field
except ImportError as e:  # the serve extra is not in the base install
  raise ImportError(f"infer.serve needs FastAPI and uvicorn: pip install 'rnr-jax[serve]' ({e})") from e

from infer.common import compile_shapes, define_engine_flag, enable_compilation_cache, local_mesh
from rnr_jax import knowledge
from rnr_jax.bundle import BundleError
from rnr_jax.qa_system import RULES, QASystem

FLAGS = flags.FLAGS
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
API_KEY_ENV = "RNR_API_KEY"
EXAMPLES = ("who sings love is in the air", "who got the first nobel prize in physics",
            "when was the first oil crisis", "what is the capital of australia")
access_log = std_logging.getLogger("rnr_jax.access")


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory (python -m infer.export) or Hugging Face Hub id.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
  flags.DEFINE_integer("port", 8080, "Port to listen on (0: any free port).")
  flags.DEFINE_list("cors_origins", [], "Origins allowed to call the API from a browser ('*': any); none by default.")
  flags.DEFINE_integer("devices", 0, "Local devices each batch is split over (0: all; the JAX engine).")
  flags.DEFINE_integer("max_batch", 16, "Most questions answered in one batch.")
  flags.DEFINE_float("max_wait_ms", 5.0, "How long a batch waits for more questions.")
  flags.DEFINE_integer("max_question_chars", 500, "Longest question accepted, in characters.")
  flags.DEFINE_integer("max_top_k", 100, "Largest top_k accepted.")
  flags.DEFINE_float("timeout_s", 30.0, "A request waiting longer for its answer gets 503.")
  flags.DEFINE_list("examples", list(EXAMPLES), "Example questions on the demo page.")
  flags.DEFINE_float("watch_s", 2.0, "How often to look for edits of the bundle by other processes (0: never).")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  define_engine_flag()
  flags.mark_flag_as_required("bundle")


# ---- the worker: micro-batched questions and exclusive jobs on one thread -------------------------


_STOP = object()  # the worker's last queue item


@dataclasses.dataclass
class _Ask:
  question: str
  options: dict[str, Any]  # top_k, read_passages, rule, passage_score_weight, n_best, no_answer_threshold
  future: concurrent.futures.Future


class Worker:
  """Answers questions submitted from any thread in batches on one thread, and runs jobs (edits, searches) alone
  between batches. ``batches`` and ``questions`` count what it answered."""

  def __init__(self, system: QASystem, *, max_batch: int = 16, max_wait_ms: float = 5.0):
    if max_batch < 1 or max_wait_ms < 0:
      raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
    self.system = system
    self._max_batch, self._max_wait = max_batch, max_wait_ms / 1000
    self._queue: queue.Queue[Any] = queue.Queue()
    self.batches = self.questions = 0
    self.bundle_stamp = 0  # the bundle manifest's mtime the system reflects (watch_bundle)
    self.stamp_lock = threading.Lock()  # a save and its stamp as one step, so the watcher never reloads our write
    self._thread = threading.Thread(target=self._run, name="qa-worker", daemon=True)
    self._thread.start()

  def ask(self, question: str, **options: Any) -> concurrent.futures.Future:
    """A future of the question's :class:`~rnr_jax.qa_system.Prediction`."""
    return self._put(_Ask(question, options, concurrent.futures.Future()))

  def run(self, fn: Callable[[QASystem], Any]) -> concurrent.futures.Future:
    """A future of ``fn(system)``, run with no batch in flight."""
    return self._put((fn, concurrent.futures.Future()))

  def _put(self, item: Any) -> concurrent.futures.Future:
    if not self._thread.is_alive():
      raise RuntimeError("the worker is closed")
    self._queue.put(item)
    return item.future if isinstance(item, _Ask) else item[1]

  def close(self) -> None:
    """Finishes what is queued, then stops."""
    if self._thread.is_alive():
      self._queue.put(_STOP)
      self._thread.join()

  def _run(self) -> None:
    item = self._queue.get()
    while item is not _STOP:
      if not isinstance(item, _Ask):
        fn, future = item
        if future.set_running_or_notify_cancel():
          try:
            future.set_result(fn(self.system))
          except Exception as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)
        item = self._queue.get()
        continue
      batch, deadline, item = [item], time.monotonic() + self._max_wait, None
      while len(batch) < self._max_batch:
        try:
          item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
          item = None
          break
        if not isinstance(item, _Ask):
          break  # a job or the stop: it comes after this batch
        batch.append(item)
        item = None
      self._answer(batch)
      if item is None:
        item = self._queue.get()

  def _answer(self, batch: list[_Ask]) -> None:
    batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
    by_top_k = lambda r: r.options["top_k"]
    for top_k, group in itertools.groupby(sorted(batch, key=by_top_k), key=by_top_k):
      group = list(group)
      try:  # one retrieval and read per top_k; each request chooses its answers from it with its own settings
        reading = self.system.read([r.question for r in group], top_k=top_k,
                                   read_passages=max(r.options["read_passages"] for r in group))
        results = [self.system.choose(reading, i, **{k: v for k, v in r.options.items() if k != "top_k"})
                   for i, r in enumerate(group)]
      except Exception as e:  # noqa: BLE001 - handed to every waiting request
        for r in group:
          r.future.set_exception(e)
        continue
      for r, prediction in zip(group, results):
        r.future.set_result(prediction)
    self.batches += 1
    self.questions += len(batch)


# ---- requests and responses ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts."""

  max_question_chars: int = 500
  max_question_tokens: int = 62
  max_top_k: int = 100
  max_questions: int = 64
  max_n_best: int = 20
  timeout_s: float = 30.0


class AskRequest(BaseModel):
  """One question (``question``) or several (``questions``); unset settings take the bundle's."""

  question: str | None = Field(None, description="A question.", examples=["who wrote the origin of species"])
  questions: list[str] | None = Field(None, description="Several questions, answered alike.")
  top_k: int | None = Field(None, ge=1, description="Passages retrieved per question.")
  read_passages: int | None = Field(None, ge=1, description="Passages read, m' (at most top_k).")
  rule: Literal[RULES] | None = Field(None, description="Answer rule: dpr, weighted (appendix A.3) or fused.")
  passage_score_weight: float | None = Field(None, ge=0.0, le=1.0, description="λ of the weighted rule.")
  n_best: int = Field(3, ge=1, description="Answers returned per question.")
  no_answer_threshold: float = Field(0.0, ge=0.0, le=1.0, description="No answer below this probability.")


class SearchRequest(BaseModel):
  question: str | None = None
  questions: list[str] | None = None
  top_k: int | None = Field(None, ge=1)


class PassageIn(BaseModel):
  title: str = ""
  text: str = Field(min_length=1)
  id: int | None = Field(None, ge=0, description="add: an explicit new id; replace: the passage replaced.")


class EditRequest(BaseModel):
  """Removals, then replacements, then additions, all or nothing; ``save`` writes them into the bundle."""

  add: list[PassageIn] = []
  remove: list[int] = []
  replace: list[PassageIn] = []
  save: bool = False


class PassageOut(BaseModel):
  id: int
  title: str
  text: str
  score: float = 0.0
  rank: int = -1


class AnswerOut(BaseModel):
  text: str
  probability: float
  score: float
  start: int = Field(description="First character of the answer in passage.text.")
  end: int = Field(description="One past its last character.")
  passage: PassageOut


class PredictionOut(BaseModel):
  question: str
  answer: str
  no_answer: bool
  answers: list[AnswerOut]
  passages: list[PassageOut]


class AskResponse(BaseModel):
  predictions: list[PredictionOut]
  latency_ms: float


class SearchResponse(BaseModel):
  results: list[list[PassageOut]]
  latency_ms: float


def _questions(limits: Limits, system: QASystem, one: str | None, many: list[str] | None) -> list[str]:
  """The questions of a request, or an HTTP error (400 malformed, 413 too long or too many)."""
  if (one is None) == (many is None):
    raise fastapi.HTTPException(400, "give 'question' or 'questions'")
  questions = [one] if many is None else many
  if not questions or len(questions) > limits.max_questions:
    raise fastapi.HTTPException(413 if questions else 400, f"give 1 to {limits.max_questions} questions")
  for q in questions:
    if not q.strip():
      raise fastapi.HTTPException(400, "a question is empty")
    if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r" for c in q):
      raise fastapi.HTTPException(400, "a question contains control characters")
    if len(q) > limits.max_question_chars:
      raise fastapi.HTTPException(413, f"a question is longer than {limits.max_question_chars} characters")
  if any(len(ids) > limits.max_question_tokens for ids in system.tokenizer.encode_texts(questions)):
    raise fastapi.HTTPException(413, f"a question is longer than {limits.max_question_tokens} tokens")
  return [q.strip() for q in questions]


async def _wait(futures: Sequence[concurrent.futures.Future], timeout_s: float,
                expected: tuple[type[Exception], ...] = ()) -> list[Any]:
  """The futures' results; a timeout is a 503, a failure other than ``expected`` a logged 500."""
  try:
    return await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), timeout_s)
  except TimeoutError:
    raise fastapi.HTTPException(503, "timed out waiting for the worker") from None
  except expected:
    raise
  except Exception as e:  # noqa: BLE001 - the client gets its type, the log the traceback
    logging.exception("a request failed")
    raise fastapi.HTTPException(500, f"answering failed: {type(e).__name__}") from None


def _apply_edits(worker: Worker, edit: EditRequest, bundle_dir: str | None) -> dict[str, Any]:
  """Checks every edit first, so a bad one changes nothing, then applies them (on the worker thread)."""
  system = worker.system
  removed, replaced = set(edit.remove), [p.id for p in edit.replace]
  missing = [i for i in [*removed, *replaced] if i is None or i not in system.store or i not in system.index]
  if missing:
    raise KeyError(f"no passages with ids {missing[:10]} (a replacement needs the id it replaces)")
  taken = [p.id for p in edit.add if p.id is not None and (p.id in system.store or p.id in removed)]
  if taken or len(removed) != len(edit.remove) or len(set(replaced)) != len(replaced) or removed & set(replaced):
    raise ValueError(f"ids in use or named twice: {taken[:10] or sorted(removed & set(replaced))[:10]}")
  if edit.save and bundle_dir is None:
    raise ValueError("this server was not started from a local bundle directory: nothing to save into")
  knowledge.remove_passages(system, sorted(removed))
  knowledge.replace_passages(system, [knowledge.Passage(p.title, p.text, p.id) for p in edit.replace])
  added = knowledge.add_passages(system, [knowledge.Passage(p.title, p.text, p.id) for p in edit.add])
  if edit.save:
    with worker.stamp_lock:
      knowledge.save_edits(system, bundle_dir)
      worker.bundle_stamp = _manifest_stamp(bundle_dir)  # our own write: nothing to reload
  return {"added": added.tolist(), "removed": sorted(removed), "replaced": replaced, "passages": len(system.index),
          "saved": edit.save}


def _manifest_stamp(bundle_dir: str) -> int:
  try:
    return os.stat(os.path.join(bundle_dir, "manifest.json")).st_mtime_ns
  except OSError:
    return 0


def watch_bundle(worker: Worker, bundle_dir: str, interval_s: float, stop: threading.Event) -> threading.Thread:
  """Reloads the bundle when another process edits it (``python -m infer.edit`` rewrites its manifest), loading beside
  the running system and swapping it in between batches, so the next request sees the edit."""
  worker.bundle_stamp = _manifest_stamp(bundle_dir)

  def run() -> None:
    while not stop.wait(interval_s):
      with worker.stamp_lock:
        stamp = _manifest_stamp(bundle_dir)
        changed = stamp not in (0, worker.bundle_stamp)
      if not changed:
        continue
      try:
        new = QASystem.from_bundle(bundle_dir, engine=worker.system.engine.name, mesh=worker.system.mesh)
      except Exception:  # noqa: BLE001 - a half-written or broken bundle: keep serving, try again later
        logging.exception("reloading %s failed; still serving the system loaded before", bundle_dir)
        continue
      worker.bundle_stamp = stamp
      worker.run(lambda _: setattr(worker, "system", new)).result()
      logging.info("reloaded %s: %d passages", bundle_dir, len(new.index))

  thread = threading.Thread(target=run, name="bundle-watcher", daemon=True)
  thread.start()
  return thread


def make_app(system: QASystem, *, limits: Limits | None = None, max_batch: int = 16, max_wait_ms: float = 5.0,
             cors_origins: Sequence[str] = (), api_key: str | None = None, bundle_dir: str | None = None,
             watch_s: float = 0.0, examples: Sequence[str] = EXAMPLES) -> fastapi.FastAPI:
  """The application; its worker starts now and stops at shutdown (``app.state.worker``). ``api_key`` None disables
  the edit endpoint; ``bundle_dir``: where ``save`` writes edits and, every ``watch_s`` > 0 seconds, where the server
  looks for edits made by other processes (:func:`watch_bundle`)."""
  limits = limits or Limits(max_question_tokens=system.spec.retriever.question_len - 2)
  worker = Worker(system, max_batch=max_batch, max_wait_ms=max_wait_ms)
  started, stop = time.time(), threading.Event()
  if bundle_dir and watch_s > 0:
    watch_bundle(worker, bundle_dir, watch_s, stop)

  @contextlib.asynccontextmanager
  async def lifespan(_: fastapi.FastAPI):
    yield
    stop.set()
    worker.close()

  api = fastapi.FastAPI(title="rnr-jax", version="1", lifespan=lifespan,
                        description="Minimal retrieve-and-read open-domain question answering.")
  api.state.worker = worker
  if cors_origins:
    api.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Content-Type", "X-API-Key"])
  key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"The server's ${API_KEY_ENV}.")

  @api.middleware("http")
  async def log_access(request: fastapi.Request, call_next: Any) -> Any:
    start = time.perf_counter()
    response = await call_next(request)
    client = request.client.host if request.client else "-"
    access_log.info('%s "%s %s" %d %.1fms', client, request.method, request.url.path, response.status_code,
                    1000 * (time.perf_counter() - start))
    return response

  def defaults(r: AskRequest) -> dict[str, Any]:
    s = system.settings
    top_k = r.top_k or s.top_k
    if top_k > limits.max_top_k or r.n_best > limits.max_n_best:
      raise fastapi.HTTPException(400, f"top_k must be <= {limits.max_top_k} and n_best <= {limits.max_n_best}")
    lam = s.passage_score_weight if r.passage_score_weight is None else r.passage_score_weight
    return {"top_k": top_k, "read_passages": min(r.read_passages or s.read_passages, top_k), "rule": r.rule or s.rule,
            "passage_score_weight": lam, "n_best": r.n_best, "no_answer_threshold": r.no_answer_threshold}

  @api.post("/api/ask", response_model=AskResponse, summary="Answer one question or a batch")
  async def ask(request: AskRequest) -> dict[str, Any]:
    start = time.perf_counter()
    questions, options = _questions(limits, system, request.question, request.questions), defaults(request)
    predictions = await _wait([worker.ask(q, **options) for q in questions], limits.timeout_s)
    return {"predictions": [p.to_json() for p in predictions], "latency_ms": 1000 * (time.perf_counter() - start)}

  @api.get("/api/ask", response_model=AskResponse, summary="Answer one question (query parameters)")
  async def ask_get(q: str, top_k: int | None = fastapi.Query(None, ge=1),
                    read_passages: int | None = fastapi.Query(None, ge=1), rule: Literal[RULES] | None = None,
                    passage_score_weight: float | None = fastapi.Query(None, ge=0.0, le=1.0),
                    n_best: int = fastapi.Query(3, ge=1)) -> dict[str, Any]:
    return await ask(AskRequest(question=q, top_k=top_k, read_passages=read_passages, rule=rule,
                                passage_score_weight=passage_score_weight, n_best=n_best))

  @api.post("/api/search", response_model=SearchResponse, summary="Retrieve passages only")
  async def search(request: SearchRequest) -> dict[str, Any]:
    start = time.perf_counter()
    questions = _questions(limits, system, request.question, request.questions)
    top_k = request.top_k or system.settings.top_k
    if top_k > limits.max_top_k:
      raise fastapi.HTTPException(400, f"top_k must be <= {limits.max_top_k}")

    def run(s: QASystem) -> list[Any]:
      pids, scores = s.search(questions, top_k)
      return [[dataclasses.asdict(p) for p in s.retrieved(pids[q], scores[q])] for q in range(len(questions))]

    [results] = await _wait([worker.run(run)], limits.timeout_s)
    return {"results": results, "latency_ms": 1000 * (time.perf_counter() - start)}

  @api.get("/api/passages/{pid}", response_model=PassageOut, summary="A passage by id")
  async def passage(pid: int) -> dict[str, Any]:
    try:
      [(title, text)] = await _wait([worker.run(lambda s: s.passage(pid))], limits.timeout_s, (KeyError,))
    except KeyError:
      raise fastapi.HTTPException(404, f"no passage with id {pid}") from None
    return {"id": pid, "title": title, "text": text}

  @api.post("/api/edit", summary="Add, remove and replace passages (X-API-Key)")
  async def edit(request: EditRequest, key: str | None = fastapi.Security(key_header)) -> dict[str, Any]:
    if api_key is None:
      raise fastapi.HTTPException(403, f"edits are disabled: start the server with ${API_KEY_ENV} set")
    if key is None or not hmac.compare_digest(key.encode(), api_key.encode()):
      raise fastapi.HTTPException(401, "a valid X-API-Key header is required")
    try:
      [result] = await _wait([worker.run(lambda _: _apply_edits(worker, request, bundle_dir))], 10 * limits.timeout_s,
                             (KeyError, ValueError))
    except (KeyError, ValueError) as e:
      raise fastapi.HTTPException(400, str(e).strip("'\"")) from None
    return result

  @api.get("/api/health", summary="Liveness and counters")
  async def health() -> dict[str, Any]:
    return {"status": "ok", "passages": len(worker.system.index), "engine": system.engine.name,
            "devices": int(system.mesh.devices.size) if system.mesh is not None else 1,
            "batches": worker.batches, "questions": worker.questions, "uptime_s": round(time.time() - started, 1)}

  @api.get("/api/config", summary="Defaults, limits and example questions (for the demo page)")
  async def config() -> dict[str, Any]:
    return {"settings": system.settings.to_json(), "limits": dataclasses.asdict(limits), "examples": list(examples),
            "rules": list(RULES), "edits": api_key is not None}

  @api.get("/", include_in_schema=False)
  async def page() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

  return api


def bind(host: str, port: int) -> socket.socket:
  """A socket bound to the address (uvicorn listens on it), or exit with one line when the address is taken."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
    sys.exit(f"infer.serve: error: {host}:{port} {reason}")
  return sock


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sock = bind(FLAGS.host, FLAGS.port)  # before the minutes of loading, so a taken port fails at once
  enable_compilation_cache(FLAGS.engine)
  try:
    system = QASystem.from_pretrained(FLAGS.bundle, engine=FLAGS.engine, cache_dir=FLAGS.cache_dir,
                                      mesh=local_mesh(FLAGS.devices, FLAGS.engine))
  except (BundleError, OSError, ValueError) as e:
    sys.exit(f"infer.serve: error: {e}")
  api_key = os.environ.get(API_KEY_ENV) or None
  start = time.perf_counter()
  shapes = compile_shapes(system, passages=api_key is not None)
  system.answer(["warm up"], n_best=3)  # the rest of the path: BM25 when fused, the answer choice
  logging.info("compiled %d input shapes in %.1f s", shapes, time.perf_counter() - start)
  limits = Limits(max_question_chars=FLAGS.max_question_chars, max_top_k=FLAGS.max_top_k,
                  max_question_tokens=system.spec.retriever.question_len - 2, max_questions=FLAGS.max_batch * 4,
                  timeout_s=FLAGS.timeout_s)
  bundle_dir = FLAGS.bundle if os.path.isdir(FLAGS.bundle) else None
  api = make_app(system, limits=limits, max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                 cors_origins=FLAGS.cors_origins, api_key=api_key, bundle_dir=bundle_dir, watch_s=FLAGS.watch_s,
                 examples=FLAGS.examples)
  access_log.setLevel(std_logging.INFO)  # one line per request on stderr, through absl's handler
  host, port = sock.getsockname()[:2]
  print(f"Serving {FLAGS.bundle} ({len(system.index)} passages) on http://{host}:{port}/", flush=True)
  server = uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False, timeout_keep_alive=30,
                                         timeout_graceful_shutdown=10, limit_concurrency=1024))
  server.run(sockets=[sock])


if __name__ == "__main__":
  define_flags()
  app.run(main)
