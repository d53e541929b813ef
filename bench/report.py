"""Recording benchmark tables in the docs topic pages (``docs/<page>.md``), one section per benchmark.

Each section holds the exact command, the machine and the date, then the table; re-running a benchmark with
``--record`` replaces only its own section.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def machine() -> str:
  """CPU model and core count (and GPU name when one is visible to JAX)."""
  cpu = platform.processor() or "unknown CPU"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"Model name:\s*(.+)", out)
    if m:
      cpu = m.group(1).strip()
  except OSError:
    pass
  desc = f"{cpu}, {os.cpu_count()} cores"
  try:
    import jax  # pylint: disable=import-outside-toplevel

    gpus = [d.device_kind for d in jax.devices() if d.platform != "cpu"]
    if gpus:
      desc += f", {len(gpus)} x {gpus[0]}"
  except Exception:  # noqa: BLE001 - the description is best-effort
    pass
  return desc


def record(page: str, title: str, table: str, note: str = "", command: str | None = None) -> None:
  """Writes (or replaces) the ``## title`` section of ``docs/<page>.md``."""
  from rnr_jax.io import atomic_write_text  # pylint: disable=import-outside-toplevel

  module = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  command = command or " ".join(["python -m bench." + module, *map(shlex.quote, sys.argv[1:])])
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  body = f"## {title}\n\n```bash\n{command}\n```\n\n{machine()}, {date}.\n\n{table}\n"
  if note:
    body += f"\n{note}\n"
  doc = os.path.join(DOCS, f"{page}.md")
  text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else f"# {page.capitalize()}\n"
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: body + "\n", text)
  else:
    text = text.rstrip("\n") + "\n\n" + body
  atomic_write_text(doc, text.rstrip("\n") + "\n")
