"""Loading ml_collections config files outside of absl flags (tests, notebooks): ``load_config("configs/tiny.py",
["optim.lr=1e-5"])`` gives what ``--config configs/tiny.py --config.optim.lr=1e-5`` does."""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

import ml_collections


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (``path:arg`` passes ``arg``), then ``key=value`` overrides (literals parsed)."""
  arg = None
  if ".py:" in path:  # the argument may itself hold paths: "configs/paper.py:mobilebert=/weights/mobilebert"
    path, arg = path.split(".py:", 1)
    path += ".py"
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_rnr_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"{path} defines no get_config()")
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not of the form key=value")
    apply_override(cfg, key.strip().removeprefix("config."), raw.strip())
  return cfg


def apply_override(cfg: ml_collections.ConfigDict, dotted_key: str, raw: str) -> None:
  """Sets ``cfg.<dotted_key>`` from a string, parsed as a python literal if possible."""
  *parents, leaf = dotted_key.split(".")
  node = cfg
  for p in parents:
    if p not in node:
      raise KeyError(f"config has no section {p!r} (in override {dotted_key}={raw})")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config has no field {dotted_key!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node[leaf] = value
