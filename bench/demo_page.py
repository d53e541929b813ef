r"""Drives the demo page of ``infer.serve`` in headless Chromium (Debian's, through Playwright; no browser download):
types a question, asks, waits for the ranked answers and reads back what a person sees; optionally a screenshot.

  python -m bench.demo_page --bundle B --question "who sings love is in the air" --out docs/serving_demo.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and no background traffic: this machine has no network but loopback.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def ask_in_browser(url: str, question: str, screenshot: str | None = None, timeout_s: float = 120) -> dict[str, Any]:
  """What the page shows after asking ``question``: answer texts, highlighted spans, titles, retrieved count."""
  from playwright.sync_api import sync_playwright  # pylint: disable=import-outside-toplevel

  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
      page = browser.new_page(viewport={"width": 1000, "height": 900})
      page.set_default_timeout(1000 * timeout_s)
      page.goto(url)
      page.wait_for_selector("body[data-ready='1']")
      page.fill("#q", question)
      page.click("#ask")
      page.wait_for_selector("#answers li")
      shown = {"answers": page.locator("#answers .answer").all_text_contents(),
               "highlighted": page.locator("#answers mark").all_text_contents(),
               "titles": page.locator("#answers .title").all_text_contents(),
               "retrieved": page.locator("#retrieved li").count(),
               "examples": page.locator("#examples button").all_text_contents(),
               "status": page.locator("#status").text_content()}
      if screenshot:
        page.screenshot(path=screenshot, full_page=True)
      return shown
    finally:
      browser.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--question", default="who sings love is in the air")
  parser.add_argument("--out", default=None, help="PNG screenshot to write")
  args = parser.parse_args()
  import uvicorn  # pylint: disable=import-outside-toplevel

  from infer import serve  # pylint: disable=import-outside-toplevel
  from infer.common import compile_shapes  # pylint: disable=import-outside-toplevel
  from rnr_jax import QASystem  # pylint: disable=import-outside-toplevel

  system = QASystem.from_pretrained(args.bundle)
  compile_shapes(system)  # as infer.serve does before it listens
  sock = serve.bind("127.0.0.1", 0)
  server = uvicorn.Server(uvicorn.Config(serve.make_app(system), log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  try:
    while not server.started:
      threading.Event().wait(0.1)
    shown = ask_in_browser(f"http://127.0.0.1:{sock.getsockname()[1]}/", args.question, args.out)
  finally:
    server.should_exit = True
    thread.join(30)
  for key, value in shown.items():
    print(f"{key}: {value}")
  if args.out:
    print(f"screenshot: {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
