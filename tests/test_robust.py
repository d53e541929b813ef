"""Nothing lost, nothing silent: locked and crash-safe edits, verified checkpoints, every bad input named.

Concurrency (the directory lock across processes, two ``infer.edit`` at once), fault injection at every filesystem
step of an edit and of a directory swap (the process SIGKILLed after each), checkpoint corruption (a flipped bit, NaN
values) and the bad-input families of the command lines. ``RNR_EDIT_TRIALS=20`` repeats the concurrent-edit trial.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import toy_model
from infer import edit as edit_cli
from rnr_jax import deploy, exports, io, knowledge, qa_model
from rnr_jax.bundle import BundleError, load_bundle
from rnr_jax.config import load_config
from rnr_jax.data import PreparedData
from rnr_jax.qa_system import InferenceSettings, PassageStore, QASystem
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.training import checkpoint, loop, mesh as mesh_lib, step as step_lib
from rnr_jax.training.mesh import data_mesh
from test_reader_train import build_toy_prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(*args, timeout=300, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False, **kwargs)


def _copy(bundle, dst):
  shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns(".cache"))
  return str(dst)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  """A random-init tiny unified system over the toy corpus (160 passages), exported with an exact index."""
  root = tmp_path_factory.mktemp("robust")
  prepared = build_toy_prepared(str(root))
  config = load_config(os.path.join(ROOT, "configs/reader.py:tiny"), ["model.pooling=mean"])
  spec = ReaderSpec.from_config(config, exports.initial_encoder(config.model)[0],
                                PreparedData.load(prepared).manifest["settings"]["tokenizer"])
  system = SystemSpec.unified_model(spec, passage_len=48)
  deploy.export(out=str(root / "bundle"), prepared=prepared, spec=system,
                params=qa_model.init_params(spec.build(), jax.random.key(0)), mesh=data_mesh(),
                settings=InferenceSettings(top_k=8, read_passages=4), index_kind="exact", batch_size=16)
  return str(root / "bundle")


# --- Concurrency ----------------------------------------------------------------------------------------------------

LOCKED_COUNTER = """
import os, sys
from rnr_jax.io import dir_lock
d = sys.argv[1]
for _ in range(40):
  with dir_lock(d):
    path = os.path.join(d, "count")
    n = int(open(path).read())
    os.sched_yield()
    with open(path, "w") as f:
      f.write(str(n + 1))
"""

HOLD_LOCK = """
import os, sys, time
from rnr_jax.io import dir_lock
with dir_lock(sys.argv[1]):
  open(sys.argv[2], "w").close()
  time.sleep(600)
"""


def _blocked_on_flock(pid):
  """Whether process ``pid`` waits for a flock (a "->" line of /proc/locks)."""
  with open("/proc/locks") as f:
    return any(line.split()[1] == "->" and line.split()[5] == str(pid) for line in f if len(line.split()) > 5)


def test_dir_lock_serialises_processes_and_dies_with_its_holder(tmp_path):
  d = tmp_path / "d"
  d.mkdir()
  (d / "count").write_text("0")
  env = {**os.environ, "PYTHONPATH": ROOT}
  procs = [subprocess.Popen([sys.executable, "-c", LOCKED_COUNTER, str(d)], env=env) for _ in range(3)]
  assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
  assert (d / "count").read_text() == "120"  # no read-modify-write was lost
  assert sorted(os.listdir(tmp_path)) == ["d"]  # the lock file goes with its last holder

  held = tmp_path / "held"
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(d), str(held)], env=env)
  try:
    while not held.exists():
      assert holder.poll() is None
      time.sleep(0.05)
    waiter = subprocess.Popen([sys.executable, "-c", LOCKED_COUNTER, str(d)], env=env)
    while not _blocked_on_flock(waiter.pid):  # it waits for the holder...
      assert waiter.poll() is None
      time.sleep(0.05)
  finally:
    holder.send_signal(signal.SIGKILL)  # ...whose lock the kernel drops when it is killed
    holder.wait(timeout=60)
  assert waiter.wait(timeout=120) == 0 and (d / "count").read_text() == "160"
  assert sorted(os.listdir(tmp_path)) == ["d", "held"]


def test_a_second_editor_waits_and_applies_on_top_of_the_first(bundle, tmp_path):
  edited = _copy(bundle, tmp_path / "b")
  with io.dir_lock(edited):  # the first editor, in this process
    second = subprocess.Popen([sys.executable, "-m", "infer.edit", f"--bundle={edited}", "add", "--title=second",
                               "--text=stone zebra fig river."], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while not _blocked_on_flock(second.pid):
      assert second.poll() is None, second.communicate()
      time.sleep(0.1)
    system = QASystem.from_bundle(edited)
    [first] = knowledge.add_passages(system, [knowledge.Passage("first", "stone zebra kiwi river.")])
    knowledge.save_edits(system, edited)
  out, err = second.communicate(timeout=600)
  assert second.returncode == 0, err
  [added] = json.loads(out.strip().splitlines()[-1])["added"]
  system = QASystem.from_bundle(edited)
  assert added == first + 1 and system.passage(first)[0] == "first" and system.passage(added)[0] == "second"


def test_concurrent_edit_clis_keep_both_passages(bundle, tmp_path):
  trials = int(os.environ.get("RNR_EDIT_TRIALS", "1"))
  losses = 0
  for trial in range(trials):
    edited = _copy(bundle, tmp_path / f"trial{trial}")
    procs = []
    for who in ("alpha", "beta"):
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "infer.edit", f"--bundle={edited}", "add", f"--title={who}",
           f"--text=stone zebra {who} river."], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
      time.sleep(0.8 * trial / max(trials - 1, 1))  # 0 to 0.8 s apart
    added = {}  # title -> id, of each edit that reported success
    for who, p in zip(("alpha", "beta"), procs):
      out, err = p.communicate(timeout=600)
      if p.returncode == 0:
        [added[who]] = json.loads(out.strip().splitlines()[-1])["added"]
      else:  # a refusal would have to be a clear one-line error; a silent loss is never allowed
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    system = QASystem.from_bundle(edited)
    kept = {who: pid for who, pid in added.items() if pid in system.store and system.passage(pid)[0] == who}
    losses += len(added) - len(kept)
    print(f"trial {trial}: reported {added}, kept {kept}, {len(system.store)} passages")
  assert losses == 0


# --- Fault injection ------------------------------------------------------------------------------------------------


def _swap_contents(path):
  return {n: open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


SWAP_KILLED_AT = """
import os, signal, sys
from rnr_jax import io
target, kill_at, exchange = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if not exchange:
  io._exchange = lambda a, b: False
steps = [0]
def step(*_):
  steps[0] += 1
  if steps[0] == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
events = ("os.rename", "os.mkdir", "open", "os.remove", "shutil.rmtree", "fcntl.flock")
sys.addaudithook(lambda event, args: step() if event in events else None)
fsync, exchange_dirs = os.fsync, io._exchange
os.fsync = lambda fd: (step(), fsync(fd))[1]
io._exchange = lambda a, b: (step(), exchange_dirs(a, b))[1]
with io.atomic_dir(target) as tmp:
  for name in ("a", "c"):
    with open(os.path.join(tmp, name), "w") as f:
      f.write("new " + name)
"""


@pytest.mark.parametrize("exchange", [True, False])
def test_a_kill_at_any_step_of_a_directory_swap_leaves_old_or_new(tmp_path, exchange):
  """atomic_dir in a child process SIGKILLed before each of its filesystem steps in turn (k = 1, 2, ...)."""
  target = tmp_path / "d"
  old, new = {"a": "old a", "b": "old b"}, {"a": "new a", "c": "new c"}
  seen = []
  for kill_at in range(1, 200):
    with io.atomic_dir(target) as tmp:
      for name, text in old.items():
        (tmp_path / tmp / name).write_text(text)
    proc = _run("-c", SWAP_KILLED_AT, str(target), str(kill_at), str(int(exchange)), env={**os.environ,
                                                                                         "PYTHONPATH": ROOT})
    io.repair_dir(target)  # what a reader of the path does first
    contents = {n: (target / n).read_text() for n in sorted(os.listdir(target))}
    seen.append("old" if contents == old else "new" if contents == new else f"torn {contents}")
    with io.dir_lock(target):  # the next writer's clean-up
      pass
    assert sorted(os.listdir(tmp_path)) == ["d"], (kill_at, os.listdir(tmp_path))
    if proc.returncode == 0:
      break
    assert proc.returncode == -signal.SIGKILL, proc.stderr
  print("exchange" if exchange else "two renames", seen)
  assert seen[0] == "old" and seen[-1] == "new" and set(seen) == {"old", "new"} and len(seen) > 10, seen


@pytest.mark.slow
def test_a_kill_at_any_step_of_an_edit_leaves_a_loadable_bundle(bundle, tmp_path):
  """The edit's filesystem work replayed by tests/fault_injection.py, SIGKILLed after each step in turn, swapping by
  two renames (the harder case; the exchange is covered by the directory-swap test above)."""
  system = QASystem.from_bundle(bundle, cache_dir=str(tmp_path / "cache"))
  [added] = knowledge.add_passages(system, [knowledge.Passage("kiwi notes", "stone zebra kiwi river.")])
  staged = tmp_path / "staged"
  system.index.save(staged / "index")
  system.store.write(staged / "corpus")
  work = tmp_path / "work"
  work.mkdir()
  proc = _run(os.path.join(TESTS, "fault_injection.py"), f"--bundle={work / 'bundle'}", f"--pristine={bundle}",
              f"--staged={staged}", "--no_exchange", timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  kills, summary = rows[:-1], rows[-1]
  assert summary["kills"] > 40 and summary["outcomes"].get("other", 0) == 0, summary
  assert all(r["holds"] in ("old", "new") and r["left_after_next_lock"] == [] for r in rows[:-1]), kills
  assert kills[0]["holds"] == "old" and kills[-1]["holds"] == "new"
  assert added in PassageStore.load(load_bundle(str(work / "bundle")).corpus_dir)


def test_repair_rolls_back_a_swap_killed_between_its_renames(tmp_path):
  target, old = tmp_path / "b", tmp_path / ".b.old"
  old.mkdir()
  (old / "manifest.json").write_text("{}")
  (tmp_path / ".b.abcd1234.tmp").mkdir()  # the new copy, complete or not
  (tmp_path / ".b.x.abcd1234.tmp").mkdir()  # a sibling "b.x"'s temporary: not b's to remove
  io.repair_dir(target)
  assert (target / "manifest.json").read_text() == "{}"
  assert sorted(os.listdir(tmp_path)) == [".b.x.abcd1234.tmp", "b"]


# --- Checkpoints ----------------------------------------------------------------------------------------------------


def test_checksum_changes_with_every_single_bit_and_nan_is_named():
  rng = np.random.default_rng(0)
  tree = {"f32": rng.normal(size=(3, 4)).astype(np.float32), "bf16": rng.normal(size=(5,)).astype(jnp.bfloat16),
          "i32": np.arange(4, dtype=np.int32), "flag": np.array([True, False])}
  base = checkpoint._fingerprint(tree)[0]
  for name, x in tree.items():
    raw = np.frombuffer(x.tobytes(), np.uint8).copy()
    for bit in range(8 if x.dtype == bool else raw.size * 8):
      flipped = raw.copy()
      if x.dtype == bool:
        flipped[bit % raw.size] ^= 1
      else:
        flipped[bit // 8] ^= 1 << (bit % 8)
      changed = {**tree, name: np.frombuffer(flipped.tobytes(), x.dtype).reshape(x.shape)}
      assert int(checkpoint._fingerprint(changed)[0][name]) != int(base[name]), (name, bit)
  record, non_finite = checkpoint._checks({**tree, "f32": np.full((3, 4), np.nan, np.float32)}, {}, {})
  assert non_finite == ["f32"] and set(record["state"]) == set(tree)


def _wide_model():
  """A 48 x 48 parameter: its checkpoint values are stored outside OCDBT's checksummed b-tree nodes."""
  def init_fn(rng):
    return {"w": jax.random.normal(rng, (48, 48)) * 0.1}

  def loss_fn(params, batch, rng):
    del rng
    pred = jax.nn.one_hot(batch["tokens"][:, 0], 48) @ params["w"]
    return jnp.mean((pred[:, :3] - batch["target"]) ** 2), {}
  return init_fn, loss_fn


def _train(workdir, config, init_fn, loss_fn):
  data = toy_model.array_batches(toy_model.regression_data(160), config.train.batch_size, seed=config.train.seed)
  return jax.device_get(loop.train_loop(config, workdir=str(workdir), init_fn=init_fn,
                                        step=step_lib.adamw_step(config, loss_fn), data=data).params)


def _abstract_state(config, init_fn, loss_fn):
  st = step_lib.adamw_step(config, loss_fn)
  abstract = jax.eval_shape(lambda r: st.init_state(init_fn(r)), jax.random.key(0))
  mesh = mesh_lib.make_mesh(config.mesh)
  return mesh_lib.with_shardings(abstract, mesh_lib.param_shardings(abstract, mesh, config.mesh.rules))


def _restarted(workdir, config, init_fn, loss_fn, caplog):
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    params = _train(workdir, config, init_fn, loss_fn)
  return params, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_flipped_bit_in_the_newest_checkpoint_is_named_and_skipped(tmp_path, caplog):
  config = toy_model.toy_config(num_steps=6, ckpt_every=2, keep_ckpts=3, async_ckpt=False)
  init_fn, loss_fn = _wide_model()
  final = _train(tmp_path, config, init_fn, loss_fn)
  newest = tmp_path / "checkpoints" / "6"
  # A bit that Orbax restores without complaint (TensorStore checks no checksum on these bytes) but that changes
  # the values: the case that used to be resumed silently.
  data_file = max(glob.glob(str(newest / "state" / "**" / "d" / "*"), recursive=True), key=os.path.getsize)
  original = open(data_file, "rb").read()
  reference = jax.device_get(ocp.PyTreeCheckpointer().restore(str(newest / "state")))
  for position in range(len(original) // 4, len(original), 97):
    flipped = bytearray(original)
    flipped[position] ^= 0x04
    open(data_file, "wb").write(bytes(flipped))
    try:
      got = jax.device_get(ocp.PyTreeCheckpointer().restore(str(newest / "state")))
    except Exception:  # noqa: BLE001  (this byte's damage is caught by TensorStore itself)
      continue
    if not np.array_equal(got["params"]["w"], reference["params"]["w"]):
      break
  else:
    pytest.fail("no silently restored bit flip found")

  resumed, warnings = _restarted(tmp_path, config, init_fn, loss_fn, caplog)
  assert any(f"Checkpoint {newest} is corrupt" in w and "params/w does not match the checksum" in w
             for w in warnings), warnings
  assert any(f"Deleting corrupt checkpoint {newest} (step 4 restored)" in w for w in warnings), warnings
  np.testing.assert_array_equal(resumed["w"], final["w"])  # steps 5 and 6 replayed: bitwise the same
  again, warnings = _restarted(tmp_path, config, init_fn, loss_fn, caplog)  # the rewritten step 6 is intact
  assert not warnings and np.array_equal(again["w"], final["w"])


def test_non_finite_values_at_restore_are_named_and_skipped(tmp_path, caplog):
  config = toy_model.toy_config(num_steps=6, ckpt_every=2, keep_ckpts=3, async_ckpt=False)
  init_fn, loss_fn = _wide_model()
  final = _train(tmp_path, config, init_fn, loss_fn)
  # Step 6 rewritten with NaN parameters and matching checksums: only the finiteness check can catch it.
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=2, async_save=False)
  state, rng, data = ckpt.restore(6, _abstract_state(config, init_fn, loss_fn))
  ckpt._manager.delete(6)
  ckpt.save(6, state.replace(params={"w": jnp.full_like(state.params["w"], jnp.nan)}), rng, data)
  ckpt.close()
  resumed, warnings = _restarted(tmp_path, config, init_fn, loss_fn, caplog)
  assert any("is corrupt" in w and "non-finite values in params/w" in w for w in warnings), warnings
  np.testing.assert_array_equal(resumed["w"], final["w"])


# --- Bad inputs -----------------------------------------------------------------------------------------------------

BAD_PASSAGES = [  # (line, expected message after "<file>:<line>: ")
    ('{"title": null, "text": "x"}', "field 'title': expected a string, got null"),
    ('{"title": "t", "text": "x", "id": 5000.7}', "field 'id': expected an integer in [0, 2^63), got 5000.7"),
    ('{"title": "t", "text": "x", "id": true}', "field 'id': expected an integer in [0, 2^63), got true"),
    ('{"title": "t", "text": "x", "id": -1}', "field 'id': expected an integer in [0, 2^63), got -1"),
    ('{"title": "t", "text": "x", "id": "7"}', "field 'id': expected an integer in [0, 2^63), got \"7\""),
    ('{"title": "t"}', "field 'text': missing"),
    ('{"title": "t", "text": "  "}', "field 'text': expected a non-empty string, got a string"),
    ('{"title": "t", "text": 3}', "field 'text': expected a non-empty string, got an integer"),
    ('{"titel": "t", "text": "x"}', "field 'titel': unknown (expected title, text, id)"),
    ('["t", "x"]', "expected an object {\"title\", \"text\"[, \"id\"]}, got an array"),
    ('{"title": "t", "text": "x"', "not valid JSON"),
]


@pytest.mark.parametrize("line,expected", BAD_PASSAGES)
def test_bad_passage_lines_are_named_by_file_line_and_field(tmp_path, line, expected):
  path = tmp_path / "new.jsonl"
  path.write_text('{"title": "ok", "text": "fine", "id": 9}\n\n' + line + "\n")
  with pytest.raises(edit_cli.app.UsageError) as error:
    edit_cli.read_passages(str(path), need_id=False)
  assert str(error.value).startswith(f"{path}:3: {expected}"), str(error.value)


def test_passage_files_refuse_duplicates_missing_ids_and_emptiness(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"text": "a", "id": 4}\n{"text": "b", "id": 4}\n')
  with pytest.raises(edit_cli.app.UsageError, match=f"{path}:2: field 'id': 4 is also on line 1"):
    edit_cli.read_passages(str(path), need_id=False)
  path.write_text('{"text": "a"}\n')
  with pytest.raises(edit_cli.app.UsageError, match=f"{path}:1: field 'id': missing"):
    edit_cli.read_passages(str(path), need_id=True)
  path.write_text("\n")
  with pytest.raises(edit_cli.app.UsageError, match=f"{path}: no passages"):
    edit_cli.read_passages(str(path), need_id=False)
  path.write_bytes(b'{"text": "caf\xe9"}\n')
  with pytest.raises(edit_cli.app.UsageError, match=f"{path}:1: not UTF-8"):
    edit_cli.read_passages(str(path), need_id=False)
  ok = _write(tmp_path / "ok.jsonl", '{"text": "a"}\n{"title": "T", "text": "b", "id": 12}\n')
  passages, lines = edit_cli.read_passages(ok, need_id=False)
  assert passages == [knowledge.Passage("", "a"), knowledge.Passage("T", "b", 12)] and lines == {12: 2}
  for bad in ({"title": None, "text": "x"}, {"title": "t", "text": "x", "id": 5000.7},
              {"title": "t", "text": "x", "id": True}):
    with pytest.raises(ValueError):
      knowledge.Passage(**bad)  # the library refuses them too, with no coercion


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_edit_cli_names_the_line_of_an_id_in_use(bundle, tmp_path):
  edited = _copy(bundle, tmp_path / "b")
  new = _write(tmp_path / "new.jsonl", '{"text": "stone zebra kiwi.", "id": 900}\n{"text": "zebra fig.", "id": 7}\n')
  proc = _run("-m", "infer.edit", f"--bundle={edited}", "add", f"--passages={new}")
  assert proc.returncode == 1 and proc.stderr.strip() == (
      f"infer.edit: error: {new}:2: field 'id': passage 7 is already in use (replace it instead)")
  proc = _run("-m", "infer.edit", f"--bundle={edited}", "remove", "--id=3", "--id=99999")
  assert proc.returncode == 1 and proc.stderr.strip() == "infer.edit: error: --id=99999: no passage has id 99999"
  assert sorted(os.listdir(tmp_path)) == ["b", "new.jsonl"]  # refused edits leave nothing behind


EVALUATE_MISTAKES = [  # (flags, expected message after "infer.evaluate: error: ")
    (["--limit=-1"], "flag --limit=-1: -1 is not a positive integer"),
    (["--batch_size=0"], "flag --batch_size=0: 0 is not a positive integer"),
    (["--passage_score_weight=1.5"], "flag --passage_score_weight=1.5: 1.5 is not a number in the range [0, 1]"),
    (["--out={tmp}/file.txt/pred.jsonl"], "--out={tmp}/file.txt/pred.jsonl: cannot write there"),
    (["--questions={tmp}/none.jsonl"], "{tmp}/none.jsonl"),
    (["--bundle={tmp}/none"], "--bundle={tmp}/none: no such directory"),
]


def test_evaluate_cli_mistakes_are_one_line_errors(bundle, tmp_path):
  (tmp_path / "file.txt").write_text("")
  questions = _write(tmp_path / "q.jsonl", json.dumps({"question": "q", "answer": ["a"]}) + "\n")
  for extra, expected in EVALUATE_MISTAKES:
    extra = [e.format(tmp=tmp_path) for e in extra]
    proc = _run("-m", "infer.evaluate", f"--bundle={bundle}", f"--questions={questions}", *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("infer.evaluate: error: " + expected.format(tmp=tmp_path)), lines[0]
  assert not os.path.exists(tmp_path / "file.txt" / "pred.jsonl")

  # A question whose only answer is "" is left out by the reader, naming its line; answers empty after normalisation
  # ("a", "the") are counted and left out of EM.
  empty = _write(tmp_path / "empty.jsonl", json.dumps({"question": "q", "answer": [""]}) + "\n"
                 + json.dumps({"question": "r", "answer": ["a", "the"]}) + "\n")
  proc = _run("-m", "infer.evaluate", f"--bundle={bundle}", f"--questions={empty}")
  assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["em"] == 0.0, proc.stderr
  assert "empty.jsonl:1: field 'answer' has no non-empty answer" in proc.stderr
  assert "infer.evaluate: warning: 2 gold answers are empty after normalisation; EM and F1 ignore them" in proc.stderr


def test_ask_cli_refuses_to_read_more_passages_than_it_retrieves(bundle):
  proc = _run("-m", "infer.ask", f"--bundle={bundle}", "--top_k=2", "--read_passages=5", "which word follows zebra")
  assert proc.returncode == 1 and proc.stderr.strip() == (
      "infer.ask: error: --read_passages=5: more than the 2 passages retrieved (--top_k)")


def test_a_bundle_whose_manifest_lost_an_entry_names_the_manifest(bundle, tmp_path):
  broken = _copy(bundle, tmp_path / "b")
  manifest_path = os.path.join(broken, "manifest.json")
  manifest = json.load(open(manifest_path))
  manifest["files"] = [e for e in manifest["files"] if e["unpacked_path"] != "index/ids.npy"]
  io.atomic_write_json(manifest_path, manifest)
  with pytest.raises(BundleError, match=f"{manifest_path}: has no entry for index/ids.npy"):
    load_bundle(broken)
