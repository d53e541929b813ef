"""Python config files (ml_collections). ``common.base_config()`` holds every field."""

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def resolve(path: str) -> str:
  """``path`` (``:arg`` allowed) if its file exists, else the file of that name in this package, so that
  ``configs/retriever.py`` names the installed stage config from any directory."""
  file, sep, arg = path.partition(":")
  packaged = os.path.join(DIR, os.path.basename(file))
  bare = os.path.normpath(os.path.dirname(file)) in (".", "configs")  # "retriever.py" or "configs/retriever.py"
  if bare and not os.path.exists(file) and os.path.isfile(packaged):
    file = packaged
  return file + sep + arg
