"""A local stand-in for the Hugging Face Hub: the few endpoints ``huggingface_hub`` uses to create a model repository,
commit small files inline and download a snapshot, served on loopback so push and pull are tested offline."""

import base64
import hashlib
import json
import threading

import fastapi
import uvicorn
import yaml
from fastapi.responses import Response

from infer.serve import bind


def make_app() -> fastapi.FastAPI:
  repos: dict[str, dict] = {}  # repo id -> {"sha": head commit, "files": {path: bytes}}
  api = fastapi.FastAPI()

  def repo(namespace: str, name: str) -> dict:
    if f"{namespace}/{name}" not in repos:
      raise fastapi.HTTPException(404, "Repository not found", headers={"X-Error-Code": "RepoNotFound"})
    return repos[f"{namespace}/{name}"]

  @api.post("/api/repos/create")
  async def create(request: fastapi.Request) -> dict:
    body = await request.json()
    repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
    repos.setdefault(repo_id, {"sha": "0" * 40, "files": {}})
    return {"url": f"{request.base_url}{repo_id}", "name": repo_id}

  @api.post("/api/validate-yaml")
  async def validate_yaml(request: fastapi.Request) -> dict:  # the model card's front matter must be a YAML mapping
    content = (await request.json())["content"]
    front = content.split("---\n")[1] if content.startswith("---\n") else ""
    if not isinstance(yaml.safe_load(front), dict):
      raise fastapi.HTTPException(400, "the metadata is not a YAML mapping")
    return {"errors": [], "warnings": []}

  @api.post("/api/models/{namespace}/{name}/preupload/{revision}")
  async def preupload(namespace: str, name: str, request: fastapi.Request) -> dict:
    repo(namespace, name)
    files = (await request.json())["files"]
    return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

  @api.post("/api/models/{namespace}/{name}/commit/{revision}")
  async def commit(namespace: str, name: str, request: fastapi.Request) -> dict:
    r = repo(namespace, name)
    for line in (await request.body()).splitlines():
      item = json.loads(line)
      if item["key"] == "file":
        r["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    r["sha"] = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in r["files"].items())).encode()
                            ).hexdigest()
    return {"commitUrl": f"{request.base_url}{namespace}/{name}/commit/{r['sha']}", "commitOid": r["sha"]}

  @api.get("/api/models/{namespace}/{name}/revision/{revision}")
  async def info(namespace: str, name: str) -> dict:
    r = repo(namespace, name)
    return {"id": f"{namespace}/{name}", "sha": r["sha"], "siblings": [{"rfilename": f} for f in sorted(r["files"])]}

  @api.get("/api/models/{namespace}/{name}/tree/{revision}")
  async def tree(namespace: str, name: str) -> list:
    r = repo(namespace, name)
    return [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for f, data in sorted(r["files"].items())]

  @api.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
  async def resolve(namespace: str, name: str, path: str, request: fastapi.Request) -> Response:
    r = repo(namespace, name)
    if path not in r["files"]:
      raise fastapi.HTTPException(404, "Entry not found", headers={"X-Error-Code": "EntryNotFound"})
    data = r["files"][path]
    headers = {"X-Repo-Commit": r["sha"], "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
               "Content-Length": str(len(data))}
    return Response(b"" if request.method == "HEAD" else data, headers=headers)

  return api


class StandIn:
  """The stand-in running on a free loopback port (``url``) until :meth:`close`."""

  def __init__(self):
    sock = bind("127.0.0.1", 0)
    self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    self._server = uvicorn.Server(uvicorn.Config(make_app(), log_level="warning"))
    self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
    self._thread.start()
    while not self._server.started and self._thread.is_alive():
      threading.Event().wait(0.05)

  def close(self) -> None:
    self._server.should_exit = True
    self._thread.join(30)
