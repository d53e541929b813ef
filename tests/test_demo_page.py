"""The demo page in a real browser (headless Chromium from Debian's packages, driven by Playwright): a question typed
and asked shows ranked answers, each highlighted in its passage under its title, and the retrieved passages."""

import os
import threading

import pytest
import uvicorn

from bench.demo_page import CHROMIUM, ask_in_browser
from infer import serve
from test_serve import system  # noqa: F401 - fixture

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def test_page_asks_and_shows_ranked_answers_with_passages(system, tmp_path):  # noqa: F811 - fixture
  pytest.importorskip("playwright", reason="the test extra's playwright drives the browser")
  sock = serve.bind("127.0.0.1", 0)
  server = uvicorn.Server(uvicorn.Config(serve.make_app(system), log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  try:
    while not server.started and thread.is_alive():
      threading.Event().wait(0.1)
    shown = ask_in_browser(f"http://127.0.0.1:{sock.getsockname()[1]}/", "where is the home of the lion",
                           str(tmp_path / "page.png"))
  finally:
    server.should_exit = True
    thread.join(60)
  want = system.answer(["where is the home of the lion"], n_best=5)[0]
  assert shown["answers"] == [a.text for a in want.answers] and len(shown["answers"]) > 1
  assert shown["highlighted"] == shown["answers"]  # each answer marked inside its passage
  assert shown["titles"] == [a.passage.title for a in want.answers] and all("(notes)" in t for t in shown["titles"])
  assert shown["retrieved"] == system.settings.top_k and len(shown["examples"]) == len(serve.EXAMPLES)
  assert "answers from" in shown["status"] and os.path.getsize(tmp_path / "page.png") > 10_000
