r"""Load test of ``infer.serve`` on loopback: concurrent clients, latency percentiles, errors, and the latency of
requests whose ``top_k`` or batch size the running service has not seen before (every shape is compiled at start).

  python -m bench.serve_load --bundle B [--clients 50 --requests 20 --questions Q.jsonl --record]

Starts the server as a subprocess on a free port, first sends, one at a time, requests with new ``top_k`` values and
batch sizes, then lets ``--clients`` threads send ``--requests`` questions each; counts the compilations the server
logs after it listened; prints a table (``--record``: also into docs/serving.md) and stops the server.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx
import numpy as np

from bench.report import markdown_table, record
from rnr_jax.data.readers import read_questions


def start_server(bundle: str, extra: list[str], log: Any) -> tuple[subprocess.Popen, str, float]:
  """``(process, base url, seconds until it listened)``; its stderr, with JAX's compilation log, goes to ``log``."""
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "infer.serve", f"--bundle={bundle}", "--port=0", *extra],
                          stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "JAX_LOG_COMPILES": "1"})
  for line in proc.stdout:
    m = re.search(r"on (http://\S+/)", line)
    if m:
      return proc, m.group(1).rstrip("/"), time.perf_counter() - start
  raise RuntimeError(f"the server exited with {proc.wait()} before it listened")


def compilations(log: Any) -> int:
  with open(log.name, encoding="utf-8", errors="replace") as f:
    return sum(line.startswith("W") and "Compiling " in line for line in f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--questions", default=os.path.join(os.environ.get("RNR_DATA", "../shared/data"),
                                                          "nq_dev.jsonl"))
  parser.add_argument("--clients", type=int, default=50)
  parser.add_argument("--requests", type=int, default=20, help="per client")
  parser.add_argument("--server_args", default="", help="extra infer.serve flags, space-separated")
  parser.add_argument("--name", default=None, help="the bundle as the recorded command names it (default: --bundle)")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  questions = [q.question for q in read_questions(args.questions)]
  log = tempfile.NamedTemporaryFile("w", suffix=".log")  # pylint: disable=consider-using-with
  proc, base, startup_s = start_server(args.bundle, args.server_args.split(), log)
  compiled_at_start = compilations(log)
  try:
    with httpx.Client(base_url=base, timeout=120) as http:
      settings = http.get("/api/config").json()["settings"]

      def timed(body: dict) -> float:
        start = time.perf_counter()
        reply = http.post("/api/ask", json=body)
        reply.raise_for_status()
        return 1000 * (time.perf_counter() - start)

      new_shapes = {}  # new top_k values and batch sizes, first time each
      for k in (1, 2, 3, 7, 13, 29, 50, 100):
        new_shapes[f"top_k={k}"] = timed({"question": questions[k], "top_k": k, "read_passages": min(k, 10)})
      for n in (2, 3, 5, 9, 17, 33, 64):
        new_shapes[f"{n} questions"] = timed({"questions": questions[100:100 + n]})

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
      with httpx.Client(base_url=base, timeout=120) as http:
        for r in range(args.requests):
          q = questions[(c * args.requests + r) % len(questions)]
          start = time.perf_counter()
          try:
            reply = http.post("/api/ask", json={"question": q})
            ok = reply.status_code == 200 and reply.json()["predictions"][0]["question"] == q.strip()
            error = None if ok else f"HTTP {reply.status_code}"
          except httpx.HTTPError as e:
            error = type(e).__name__
          with lock:
            latencies.append(1000 * (time.perf_counter() - start))
            if error:
              errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    wall = time.perf_counter()
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    wall = time.perf_counter() - wall
  finally:
    proc.terminate()
    proc.wait(60)
    compiled_later = compilations(log) - compiled_at_start
    log.close()
  p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
  worst = max(new_shapes, key=new_shapes.get)
  rows = [["requests", f"{len(latencies)} ({args.clients} clients x {args.requests})"], ["errors", len(errors)],
          ["p50 / p95 / p99 / max (ms)", f"{p50:.0f} / {p95:.0f} / {p99:.0f} / {max(latencies):.0f}"],
          ["throughput (questions/s)", f"{len(latencies) / wall:.1f}"],
          ["start-up until listening (s)", f"{startup_s:.1f} ({compiled_at_start} compilations)"],
          ["compilations after start-up", compiled_later],
          ["new top_k / batch size, slowest (ms)",
           f"{new_shapes[worst]:.0f} ({worst}), {new_shapes[worst] / p50:.2f} x p50"],
          ["new top_k, each (ms)", ", ".join(f"{k[6:]}: {v:.0f}" for k, v in new_shapes.items() if "top_k" in k)],
          ["new batch size, each (ms)",
           ", ".join(f"{k.split()[0]}: {v:.0f}" for k, v in new_shapes.items() if "questions" in k)]]
  name = args.name or args.bundle
  table = markdown_table(["", f"{name}: top_k={settings['top_k']}, m'={settings['read_passages']}, "
                              f"rule={settings['rule']}"], rows)
  print(table)
  if errors:
    print(f"errors: {sorted(set(errors))}")
  if args.record:
    command = (f"python -m bench.serve_load --bundle {name} --clients {args.clients} --requests {args.requests}"
               + (f" --server_args '{args.server_args}'" if args.server_args else ""))
    record("serving", "Load test", table, "New top_k values and batch sizes are sent one at a time right after "
           "start-up, before the load. Compilations are counted in the server's JAX_LOG_COMPILES log: every shape is "
           "compiled before the port opens (from JAX's persistent cache when it is warm), none after. The load generator's "
           "50 threads share the server's 2 cores, so the tail measures the machine as much as the service.", command)


if __name__ == "__main__":
  main()
