"""Recording benchmark tables in docs/benchmarks.md, one section per benchmark.

Each section holds the table, the exact command, the machine and the date;
re-running a benchmark with ``--record`` replaces only its own section.
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
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
HEADER = ("# Benchmarks\n\nEvery table below was produced by the command shown with it, on the machine and date shown. "
          "Comparisons are side by side in one run (ratios), since these machines are shared and noisy.\n")


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


def record(title: str, table: str, note: str = "", command: str | None = None) -> None:
  """Writes (or replaces) the ``## title`` section of docs/benchmarks.md."""
  from rnr_jax.io import atomic_write_text  # pylint: disable=import-outside-toplevel

  module = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  command = command or " ".join(["python -m bench." + module, *map(shlex.quote, sys.argv[1:])])
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  body = f"## {title}\n\n`{command}`  \nMachine: {machine()}  \nDate: {date}\n\n{table}\n"
  if note:
    body += f"\n{note}\n"
  text = open(DOC, encoding="utf-8").read() if os.path.exists(DOC) else HEADER
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: body + "\n", text)
  else:
    text = text.rstrip("\n") + "\n\n" + body
  os.makedirs(os.path.dirname(DOC), exist_ok=True)
  atomic_write_text(DOC, text.rstrip("\n") + "\n")
