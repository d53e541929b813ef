r"""Edits the passages of a bundle without retraining (:mod:`rnr_jax.knowledge`).

  python -m infer.edit --bundle B add --title "Kiwi Island" --text "The capital of Kiwi Island is Zorbla."
  python -m infer.edit --bundle B add --passages new.jsonl          # {"title", "text"[, "id"]} per line
  python -m infer.edit --bundle B remove --id 17 --id 42
  python -m infer.edit --bundle B replace --id 17 --title T --text X
  python -m infer.edit --bundle B replace --passages changed.jsonl  # {"id", "title", "text"} per line

New passages are encoded with the bundle's own model, the index and the token-ID corpus are updated and the bundle is
rewritten with a new manifest (model, tokenizer and configuration carried over); ``--engine`` chooses what encodes. The
bundle is locked from loading to saving, so a second edit waits for the first and applies on top of it. Prints one JSON
line: the ids added, removed and replaced, and the new passage count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from infer import check_dir, run
from infer.common import define_engine_flag, enable_compilation_cache
from rnr_jax.io import dir_lock
from rnr_jax.knowledge import Passage, add_passages, remove_passages, replace_passages, save_edits
from rnr_jax.qa_system import QASystem

FLAGS = flags.FLAGS
COMMANDS = ("add", "remove", "replace")
FIELDS = ("title", "text", "id")
MAX_ID = 2**63 - 1


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "Bundle directory to edit in place.")
  flags.DEFINE_string("title", None, "add / replace: the passage title (default: empty).")
  flags.DEFINE_string("text", None, "add / replace: the passage text.")
  flags.DEFINE_multi_integer("id", [], "remove: passage ids; replace: the passage id; add: an explicit new id.",
                             lower_bound=0, upper_bound=MAX_ID)
  flags.DEFINE_string("passages", None, "add / replace: a jsonl file of passages {\"title\", \"text\"[, \"id\"]}.")
  flags.DEFINE_string("cache_dir", None, "Where to unpack the bundle (default: <bundle>/.cache).")
  define_engine_flag()
  flags.mark_flag_as_required("bundle")


def _json_type(value: Any) -> str:
  return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def read_passages(path: str, need_id: bool) -> tuple[list[Passage], dict[int, int]]:
  """The passages of a jsonl file (``text``, optional ``title`` and ``id``; ``id`` required when ``need_id``) and the
  line of each given id. Raises ``app.UsageError("file:line: field 'name': problem")`` on the first bad record."""
  passages, line_of = [], {}
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise app.UsageError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise app.UsageError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(record, dict):
        raise app.UsageError(f"{where}: expected an object {{\"title\", \"text\"[, \"id\"]}}, got {_json_type(record)}")
      unknown = sorted(set(record) - set(FIELDS))
      if unknown:
        raise app.UsageError(f"{where}: field {unknown[0]!r}: unknown (expected {', '.join(FIELDS)})")
      title, text, pid = record.get("title", ""), record.get("text"), record.get("id")
      if not isinstance(title, str):
        raise app.UsageError(f"{where}: field 'title': expected a string, got {_json_type(title)}")
      if not isinstance(text, str) or not text.strip():
        problem = "missing" if "text" not in record else f"expected a non-empty string, got {_json_type(text)}"
        raise app.UsageError(f"{where}: field 'text': {problem}")
      if pid is None and need_id:
        raise app.UsageError(f"{where}: field 'id': missing (a replacement names the passage it replaces)")
      if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid <= MAX_ID:
          raise app.UsageError(f"{where}: field 'id': expected an integer in [0, 2^63), got {json.dumps(pid)}")
        if pid in line_of:
          raise app.UsageError(f"{where}: field 'id': {pid} is also on line {line_of[pid]}")
        line_of[pid] = line_no
      passages.append(Passage(title, text, pid))
  if not passages:
    raise app.UsageError(f"{path}: no passages")
  return passages, line_of


def passages_from_flags(command: str) -> tuple[list[Passage], dict[int, int]]:
  """The passages an add / replace command names (``--passages``, or one from ``--title``/``--text``/``--id``) and the
  line of each given id (0 for ``--id``)."""
  if FLAGS.passages:
    if FLAGS.text is not None or FLAGS.title is not None or FLAGS.id:
      raise app.UsageError("pass either --passages or --title/--text/--id")
    return read_passages(FLAGS.passages, need_id=command == "replace")
  if FLAGS.text is None or len(FLAGS.id) > 1 or (command == "replace" and not FLAGS.id):
    raise app.UsageError(f"{command} needs --text (and --title) "
                         f"{'and one --id ' if command == 'replace' else 'and at most one --id '}or --passages")
  if not FLAGS.text.strip():
    raise app.UsageError("--text: expected a non-empty text")
  return [Passage(FLAGS.title or "", FLAGS.text, FLAGS.id[0] if FLAGS.id else None)], {i: 0 for i in FLAGS.id}


def edit(command: str, passages: Sequence[Passage], ids: Sequence[int], line_of: dict[int, int]) -> dict[str, Any]:
  """Applies one command to ``--bundle``, holding its lock from loading to saving (a concurrent edit waits); returns
  the summary to print."""
  def where(pid: int) -> str:  # The line of --passages or the --id flag that gave pid.
    return f"{FLAGS.passages}:{line_of[pid]}: field 'id'" if line_of.get(pid) else f"--id={pid}"

  with dir_lock(FLAGS.bundle):
    system = QASystem.from_bundle(FLAGS.bundle, engine=FLAGS.engine, cache_dir=FLAGS.cache_dir)
    for pid in ids:
      if command == "add" and pid in system.store:
        raise app.UsageError(f"{where(pid)}: passage {pid} is already in use (replace it instead)")
      if command != "add" and (pid not in system.store or pid not in system.index):
        raise app.UsageError(f"{where(pid)}: no passage has id {pid}")
    if command == "remove":
      if len(set(ids)) < len(ids) or len(ids) >= len(system.store):
        raise app.UsageError("--id: each passage once, and not every passage (a bundle needs one)")
      remove_passages(system, ids)
    elif command == "replace":
      replace_passages(system, passages)
    added = add_passages(system, passages) if command == "add" else []
    save_edits(system, FLAGS.bundle)
  return {"added": [int(i) for i in added], "removed": list(ids) if command == "remove" else [],
          "replaced": list(ids) if command == "replace" else [], "passages": len(system.index)}


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  command = argv[1]
  check_dir(FLAGS.bundle, "bundle")
  if command == "remove":
    if not FLAGS.id or FLAGS.text is not None or FLAGS.title is not None or FLAGS.passages:
      raise app.UsageError("remove takes --id (repeatable) only")
    passages, line_of = [], {}
  else:
    passages, line_of = passages_from_flags(command)
  ids = FLAGS.id if command == "remove" else [p.id for p in passages if p.id is not None]
  enable_compilation_cache(FLAGS.engine)
  print(json.dumps(edit(command, passages, ids, line_of)))


if __name__ == "__main__":
  define_flags()
  run(main, "infer.edit")
