"""Kills a knowledge edit's filesystem work after each of its steps and checks the bundle after every kill.

  python tests/fault_injection.py --bundle B --pristine P --staged S [--no_exchange]

``S`` holds an edited system's ``index/`` and ``corpus/``; ``P`` a copy of the bundle before the edit. For k = 1, 2,
... a forked child replays the edit's filesystem work (lock, unpack cache, scratch files, index, corpus, bundle files,
manifest, fsyncs, swap, clean-up) on a fresh copy of ``P`` and SIGKILLs itself just before its k-th step, i.e. right
after step k - 1; the parent then loads the bundle at its path (verifying every file) and records whether it holds
the old or the new passages, and what the next lock holder leaves beside it. The run never initialises JAX, so the
forks are safe. Prints one JSON line per k and a summary line.
"""

import argparse
import collections
import json
import os
import shutil
import signal
import sys
import threading
import types

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bm25s runs a JAX computation when imported, which starts XLA's threads; nothing here uses BM25, and this process
# forks, so it must stay single-threaded.
sys.modules["bm25s"] = types.ModuleType("bm25s")

from rnr_jax import bundle as bundle_lib  # noqa: E402
from rnr_jax import io, knowledge  # noqa: E402
from rnr_jax.index import DenseIndex  # noqa: E402
from rnr_jax.qa_system import PassageStore  # noqa: E402
from jax._src import xla_bridge  # noqa: E402

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "shutil.rmtree", "fcntl.flock")


def replay_edit(bundle: str, staged: str, kill_at: int, log_fd: int) -> None:
  """The filesystem work of ``infer.edit`` (encoding aside, which writes nothing), killed just before its
  step ``kill_at``; each step's name is written to ``log_fd`` first."""
  root = os.path.dirname(os.path.abspath(bundle))
  count = [0]

  def step(name: str) -> None:
    count[0] += 1
    os.write(log_fd, (name + "\n").encode())
    if count[0] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  def audit(event: str, args: tuple) -> None:
    if event == "open" and args[2] is not None and args[2] & WRITE_FLAGS and str(args[0]).startswith(root):
      step(f"write {os.path.relpath(args[0], root)}")
    elif event in EVENTS and (event == "fcntl.flock" or str(args[0]).startswith(root)):
      step(f"{event} {os.path.relpath(str(args[0]), root) if event != 'fcntl.flock' else ''}".strip())

  real_fsync, real_exchange = os.fsync, io._exchange
  os.fsync = lambda fd: (step("fsync"), real_fsync(fd))[1]
  io._exchange = lambda a, b: (step(f"exchange {os.path.relpath(a, root)}"), real_exchange(a, b))[1]
  system = types.SimpleNamespace(index=DenseIndex.load(os.path.join(staged, "index")),
                                 store=PassageStore.load(os.path.join(staged, "corpus")))
  sys.addaudithook(audit)
  with io.dir_lock(bundle):
    bundle_lib.load_bundle(bundle)  # unpacks the cache, as QASystem.from_bundle does
    knowledge.save_edits(system, bundle)


def passage_ids(bundle: str) -> list[int]:
  loaded = bundle_lib.load_bundle(bundle)  # every file checked against the manifest's sha256
  return sorted(PassageStore.load(loaded.corpus_dir).ids.tolist())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--pristine", required=True)
  parser.add_argument("--staged", required=True)
  parser.add_argument("--no_exchange", action="store_true", help="swap with two renames, as without renameat2")
  args = parser.parse_args()
  if args.no_exchange:
    io._exchange = lambda a, b: False
  bundle_lib.parallel = lambda fn, items: [fn(x) for x in items]  # one thread: the same steps in the same order
  old = passage_ids(args.pristine)
  new = sorted(PassageStore.load(os.path.join(args.staged, "corpus")).ids.tolist())
  root = os.path.dirname(os.path.abspath(args.bundle))
  outcomes = collections.Counter()
  kill_at = 1
  while True:
    shutil.rmtree(args.bundle, ignore_errors=True)
    shutil.copytree(args.pristine, args.bundle, ignore=shutil.ignore_patterns(".cache"))
    read, write = os.pipe()
    assert threading.active_count() == 1 and not xla_bridge._backends, "forking a multithreaded process"
    pid = os.fork()
    if pid == 0:  # The child: replay the edit, die before step kill_at (or finish).
      os.close(read)
      code = 1
      try:
        replay_edit(args.bundle, args.staged, kill_at, write)
        code = 0
      finally:
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
      log = f.read().splitlines()
    status = os.waitpid(pid, 0)[1]
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ids = passage_ids(args.bundle)
    held = "old" if ids == old else "new" if ids == new else "other"
    with io.dir_lock(args.bundle):  # the next writer's clean-up
      pass
    left = sorted(e for e in os.listdir(root) if e != os.path.basename(args.bundle) and e.startswith("."))
    outcomes[held] += 1
    print(json.dumps({"kill": kill_at if killed else None, "after": log[-2] if killed and len(log) > 1 else None,
                      "holds": held, "left_after_next_lock": left}), flush=True)
    if not killed:
      assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the replay failed: {status}"
      break
    kill_at += 1
  print(json.dumps({"summary": True, "kills": kill_at - 1, "outcomes": dict(outcomes),
                    "exchange": not args.no_exchange}), flush=True)


if __name__ == "__main__":
  main()
