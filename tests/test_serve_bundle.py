"""The service over a bundle on disk: an edit saved over HTTP persists into the bundle, and an edit another process
makes to the bundle (``python -m infer.edit``) reaches the running server without a restart."""

import json
import shutil
import time

from fastapi.testclient import TestClient

from infer import serve
from rnr_jax import QASystem
from test_export_infer import _run, bundle, workdir  # noqa: F401 - fixtures

KEY = "k"


def _until(predicate, timeout_s=120):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.2)


def test_edits_by_http_persist_and_edits_by_other_processes_are_seen(bundle, tmp_path):  # noqa: F811 - fixture
  directory = str(tmp_path / "bundle")
  shutil.copytree(bundle[0], directory, ignore=shutil.ignore_patterns(".cache"))
  system = QASystem.from_pretrained(directory)
  n = len(system.index)
  api = serve.make_app(system, api_key=KEY, bundle_dir=directory, watch_s=0.2, limits=serve.Limits(max_top_k=1000))
  with TestClient(api) as client:
    reply = client.post("/api/edit", headers={"X-API-Key": KEY}, json={
        "add": [{"title": "Kiwi Island", "text": "The capital of Kiwi Island is Zorbla."}], "remove": [0], "save": True})
    assert reply.status_code == 200 and reply.json()["saved"], reply.text
    [added] = reply.json()["added"]
    reloaded = QASystem.from_pretrained(directory)
    assert added in reloaded.store and 0 not in reloaded.store and len(reloaded.index) == n
    time.sleep(1)
    assert api.state.worker.system is system  # its own save is not reloaded

    proc = _run("infer.edit", f"--bundle={directory}", "add", "--title=Orb", "--text=The orb glows at dusk.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [other] = json.loads(proc.stdout.strip().splitlines()[-1])["added"]
    _until(lambda: client.get(f"/api/passages/{other}").status_code == 200)
    assert client.get(f"/api/passages/{other}").json()["text"] == "the orb glows at dusk."  # from the shipped ids
    assert client.get(f"/api/passages/{added}").status_code == 200 and client.get("/api/health").json()[
        "passages"] == n + 1
    found = client.post("/api/search", json={"question": "when does the orb glow", "top_k": n + 1}).json()
    assert other in [p["id"] for p in found["results"][0]]
