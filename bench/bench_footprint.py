r"""Disk footprint of inference on a fresh machine: a virtualenv with only what answering imports, plus a bundle.

1. Finds the distributions inference imports: a subprocess of this interpreter
   imports :mod:`rnr_jax.qa_system` and answers one question from ``--bundle``
   (without one, searches a tiny INT8 index instead, so that the lazily imported
   ScaNN counts), then maps ``sys.modules`` to installed distributions.
2. Creates a fresh virtualenv in a temporary directory and pip-installs exactly
   those distributions, pinned to this environment's versions, with their
   dependencies (pinned by this environment's ``pip freeze``); then copies
   ``rnr_jax/`` and ``infer/`` into its site-packages (the package without its
   training-time dependencies).
3. Checks the venv: ``from rnr_jax.qa_system import QASystem`` imports from the
   venv's copy, and with ``--bundle`` the bundle loads (unpacking into the
   temporary directory) and answers one question.
4. Measures bytes: each installed distribution (the files its RECORD lists,
   bytecode included), the venv in all, the bundle as shipped (without ``.cache``)
   and the bundle unpacked on first load.

Prints the table (the largest distributions, the rest summed, totals) and
records it with ``--record``. The venv is CPU-only (jaxlib without GPU plugins)
and is deleted unless ``--keep``. pip does the downloads; run it niced:

  nice -n 19 python -m bench.bench_footprint --bundle B --record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from bench import report

TITLE = "Inference footprint on a fresh machine"
SKIP = {"rnr-jax", "pip", "setuptools"}  # This package (copied, not installed) and the venv's own tooling.
QUESTION = "who wrote the iliad"

# Run by this interpreter: the distributions imported by loading a bundle and answering one question.
_PROBE = r"""
import importlib.metadata as md, json, sys
import numpy as np
from rnr_jax.qa_system import QASystem
bundle, cache, question = sys.argv[1:4]
if bundle:
  QASystem.from_bundle(bundle, cache_dir=cache).answer([question])
else:
  from rnr_jax.index import DenseIndex
  x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
  DenseIndex.build(x, "int8", num_eval_queries=0).search(x[:2], 4)
names = md.packages_distributions()
dists = {d for m in list(sys.modules) for d in names.get(m.split(".")[0], [])}
print(json.dumps({d: md.version(d) for d in sorted(dists)}))
"""

# Run by the fresh venv's interpreter outside the repository: import, answer, and each distribution's bytes.
_CHECK = r"""
import importlib.metadata as md, json, os, sys
from rnr_jax.qa_system import QASystem
import rnr_jax
assert rnr_jax.__file__.startswith(sys.prefix), rnr_jax.__file__
bundle, cache, question = sys.argv[1:4]
answer = QASystem.from_bundle(bundle, cache_dir=cache).answer([question])[0].answer if bundle else None
sizes = {}
for d in md.distributions():
  files = [f.locate() for f in d.files or ()]
  sizes[d.metadata["Name"]] = [d.version, sum(os.path.getsize(f) for f in files if os.path.isfile(f))]
print(json.dumps({"answer": answer, "sizes": sizes}))
"""


def dir_bytes(path: str, exclude: tuple[str, ...] = ()) -> int:
  """Apparent bytes of the files under ``path`` (links not followed), skipping directories named in ``exclude``."""
  total = 0
  for root, dirs, names in os.walk(path):
    dirs[:] = [d for d in dirs if d not in exclude]
    total += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
  return total


def _run(cmd: list[str], **kwargs) -> str:
  """stdout of ``cmd``; on failure, exits with its stderr."""
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
  if out.returncode:
    sys.exit(f"bench_footprint: {' '.join(cmd[:4])} ... failed:\n{out.stderr[-4000:]}")
  return out.stdout


def inference_distributions(bundle: str, cache: str) -> dict[str, str]:
  """``{distribution: version}`` that answering a question imports, in this environment."""
  out = _run([sys.executable, "-c", _PROBE, bundle, cache, QUESTION], cwd=report.ROOT)
  return json.loads(out.strip().splitlines()[-1])


def build_venv(venv: str, requirements: dict[str, str]) -> str:
  """Creates ``venv`` with the pinned requirements and a copy of rnr_jax/ and infer/; returns its python."""
  _run([sys.executable, "-m", "venv", venv])
  python = os.path.join(venv, "bin", "python")
  freeze = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"])
  constraints = os.path.join(os.path.dirname(venv), "constraints.txt")
  with open(constraints, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in freeze.splitlines() if "==" in line and not line.startswith("-")))
  _run([python, "-m", "pip", "install", "--quiet", "-c", constraints,
        *(f"{name}=={version}" for name, version in sorted(requirements.items()))])
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
  for package in ("rnr_jax", "infer"):
    shutil.copytree(os.path.join(report.ROOT, package), os.path.join(site, package),
                    ignore=shutil.ignore_patterns("__pycache__"))
  return python


def table(sizes: dict[str, tuple[str, int]], imported: set[str], own: int, venv: int, shipped: int, unpacked: int,
          top: int) -> str:
  """The largest distributions, the others summed, and the totals (MB = 10^6 bytes)."""
  mb = lambda n: f"{n / 1e6:,.1f}"
  ranked = sorted(sizes.items(), key=lambda kv: -kv[1][1])
  def note(name: str) -> str:
    if name.lower() in imported:
      return "imported"
    return "comes with `python -m venv`" if name.lower() in SKIP else "dependency, not imported"

  rows = [[f"{name} {version}", mb(n), note(name)] for name, (version, n) in ranked[:top]]
  rest = ranked[top:]
  rows.append([f"{len(rest)} other distributions", mb(sum(n for _, (_, n) in rest)),
               f"{sum(1 for name, _ in rest if name.lower() in imported)} of them imported"])
  unused = [(name, n) for name, (_, n) in ranked if name.lower() not in imported]
  rows.append([f"(of all the above: {len(unused)} never imported)", mb(sum(n for _, n in unused)),
               ", ".join(name for name, _ in unused)])
  rows.append(["rnr_jax/ + infer/ (copied)", mb(own), ""])
  rows.append(["**virtualenv, all files**", f"**{mb(venv)}**",
               f"{len(sizes)} distributions, interpreter links, bytecode"])
  if shipped:
    rows.append(["bundle as shipped", mb(shipped), "without `.cache`"])
    rows.append(["bundle unpacked on first load", mb(unpacked), "the bundle cache directory"])
    rows.append(["**total**", f"**{mb(venv + shipped + unpacked)}**", "venv + bundle + its unpacked cache"])
  return report.markdown_table(["item", "MB", "note"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--bundle", default="", help="a bundle to load and ask in the fresh venv, and to measure")
  ap.add_argument("--top", type=int, default=12, help="distributions listed one by one")
  ap.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
  ap.add_argument("--record", action="store_true", help="write the table into docs/compression.md")
  args = ap.parse_args()
  bundle = os.path.abspath(args.bundle) if args.bundle else ""

  tmp = tempfile.mkdtemp(prefix="bench_footprint_")
  try:
    requirements = inference_distributions(bundle, os.path.join(tmp, "probe_cache"))
    requirements = {k: v for k, v in requirements.items() if k.lower() not in SKIP}
    print("imported by inference:", " ".join(f"{k}=={v}" for k, v in requirements.items()), flush=True)
    venv = os.path.join(tmp, "venv")
    python = build_venv(venv, requirements)
    cache = os.path.join(tmp, "cache")
    out = _run([python, "-c", _CHECK, bundle, cache, QUESTION], cwd=tmp,
               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    check = json.loads(out.strip().splitlines()[-1])
    print("fresh venv: QASystem imports" + (f"; {QUESTION!r} -> {check['answer']!r}" if bundle else ""))
    sizes = {k: tuple(v) for k, v in check["sizes"].items()}
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    own = dir_bytes(os.path.join(site, "rnr_jax")) + dir_bytes(os.path.join(site, "infer"))
    venv_bytes = dir_bytes(venv)
    shipped = dir_bytes(bundle, exclude=(".cache",)) if bundle else 0
    unpacked = dir_bytes(cache) if bundle else 0
    python_version = _run([python, "-c", "import sys; print(sys.version.split()[0])"]).strip()
  finally:
    if args.keep:
      print(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)

  imported = {k.lower() for k in requirements}
  result = table(sizes, imported, own, venv_bytes, shipped, unpacked, args.top)
  print(result)
  if not args.record:
    return
  note = "\n".join([
      f"- installed: the {len(requirements)} distributions inference imports (import of `rnr_jax.qa_system`"
      + (", loading the bundle and answering one question" if bundle else " and an INT8 index search")
      + f"), pinned, with pip's dependencies; Python {python_version}, CPU-only jaxlib: "
      + ", ".join(f"`{k}`" for k in sorted(requirements, key=str.lower)),
      "- sizes: apparent bytes (`du -b`); a distribution's are those of the files its RECORD lists (bytecode "
      "included); MB = 10^6 bytes; pip and setuptools come with `python -m venv`",
  ])
  report.record("compression", TITLE, result, note)
  print("recorded in docs/")


if __name__ == "__main__":
  main()
