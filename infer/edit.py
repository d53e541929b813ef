r"""Edits the passages of a bundle without retraining (:mod:`rnr_jax.knowledge`).

  python -m infer.edit --bundle B add --title "Kiwi Island" --text "The capital of Kiwi Island is Zorbla."
  python -m infer.edit --bundle B add --passages new.jsonl          # {"title", "text"[, "id"]} per line
  python -m infer.edit --bundle B remove --id 17 --id 42
  python -m infer.edit --bundle B replace --id 17 --title T --text X
  python -m infer.edit --bundle B replace --passages changed.jsonl  # {"id", "title", "text"} per line

New passages are encoded with the bundle's own model, the index and the token-ID corpus are updated and the bundle is
rewritten with a new manifest (model, tokenizer and configuration carried over). Prints one JSON line: the ids added,
removed and replaced, and the new passage count.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from infer.common import enable_compilation_cache
from rnr_jax.bundle import BundleError
from rnr_jax.knowledge import Passage, edit_bundle

FLAGS = flags.FLAGS
COMMANDS = ("add", "remove", "replace")


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory to edit in place.")
  flags.DEFINE_string("title", None, "add / replace: the passage title.")
  flags.DEFINE_string("text", None, "add / replace: the passage text.")
  flags.DEFINE_multi_integer("id", [], "remove: passage ids; replace: the passage id; add: an explicit new id.")
  flags.DEFINE_string("passages", None, "add / replace: a jsonl file of passages {\"title\", \"text\"[, \"id\"]}.")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  flags.mark_flag_as_required("bundle")


def read_passages(path: str) -> list[Passage]:
  """Passages of a jsonl file (``title``, ``text`` and optional ``id`` per line)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        out.append(Passage(str(r.get("title", "")), r["text"], None if r.get("id") is None else int(r["id"])))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}:{line_no}: expected {{\"title\", \"text\"[, \"id\"]}} ({e!r})") from e
  return out


def passages_from_flags(command: str) -> list[Passage]:
  """The passages an add / replace command names: ``--passages``, or one from ``--title``/``--text``/``--id``."""
  if FLAGS.passages:
    if FLAGS.text is not None or FLAGS.id:
      raise app.UsageError("pass either --passages or --title/--text/--id")
    return read_passages(FLAGS.passages)
  if FLAGS.text is None or len(FLAGS.id) > 1 or (command == "replace" and not FLAGS.id):
    raise app.UsageError(f"{command} needs --text (and --title) "
                         f"{'and one --id ' if command == 'replace' else 'and at most one --id '}or --passages")
  return [Passage(FLAGS.title or "", FLAGS.text, FLAGS.id[0] if FLAGS.id else None)]


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  command = argv[1]
  if command == "remove":
    if not FLAGS.id or FLAGS.text is not None or FLAGS.passages:
      raise app.UsageError("remove takes --id (repeatable) only")
    edits = {"remove": FLAGS.id}
  else:
    edits = {command: passages_from_flags(command)}
  enable_compilation_cache()
  try:
    result = edit_bundle(FLAGS.bundle, cache_dir=FLAGS.cache_dir, **edits)
  except (BundleError, FileNotFoundError, KeyError, ValueError) as e:
    sys.exit(f"infer.edit: error: {e}")
  print(json.dumps({k: v for k, v in result.items() if k != "manifest"}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
