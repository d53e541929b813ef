r"""Pushes a bundle to the Hugging Face Hub with a model card, and pulls one (``QASystem.from_pretrained`` does too).

  python -m infer.hub push --bundle B --repo_id USER/NAME [--private] [--message M]
  python -m infer.hub pull --repo_id USER/NAME --out DIR [--revision R]

Authentication and the Hub's address come from ``huggingface_hub`` (``HF_TOKEN``, ``huggingface-cli login``,
``HF_ENDPOINT``). The card (``README.md``) holds the model index metadata, the footprint table, the default answer
settings and how to load the system.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from rnr_jax.bundle import BundleError, format_footprint
from rnr_jax.io import read_json

FLAGS = flags.FLAGS
COMMANDS = ("push", "pull")


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("bundle", None, "push: the bundle directory.")
  flags.DEFINE_string("repo_id", None, "The Hub repository, USER/NAME.")
  flags.DEFINE_bool("private", False, "push: create the repository private.")
  flags.DEFINE_string("message", "Upload rnr-jax bundle", "push: the commit message.")
  flags.DEFINE_string("out", None, "pull: the directory to download into.")
  flags.DEFINE_string("revision", None, "pull: a branch, tag or commit.")
  flags.mark_flag_as_required("repo_id")


def model_card(bundle_dir: str, repo_id: str) -> str:
  """The ``README.md`` of a pushed bundle."""
  manifest, config = read_json(os.path.join(bundle_dir, "manifest.json")), read_json(os.path.join(bundle_dir,
                                                                                                  "config.json"))
  encoder, settings = config["model"]["reader"]["encoder"], config["inference"]
  index = config.get("index", {})
  return f"""---
library_name: rnr-jax
pipeline_tag: question-answering
tags: [open-domain-qa, retrieve-and-read, jax, flax]
---

# {repo_id.split("/")[-1]}

A minimal retrieve-and-read open-domain question answering system (Yang & Seo, NAACL 2021) built with
[rnr-jax](https://pypi.org/project/rnr-jax/): one {encoder.get("model_type", "bert")} encoder of
{encoder.get("num_hidden_layers")} layers ({"one model that retrieves and reads" if config["model"]["unified"]
else "a retriever and a reader"}), a {index.get("kind", "dense")} index of {index.get("size", "?")} passages and the
passages themselves as compressed token ids.

```python
from rnr_jax import QASystem

system = QASystem.from_pretrained("{repo_id}")
prediction = system.answer(["who wrote the origin of species"], n_best=3)[0]
print(prediction.answer, [(a.text, round(a.probability, 3)) for a in prediction.answers])
```

Or serve it: `python -m infer.serve --bundle {repo_id}`.

## Footprint

```
{format_footprint(manifest["footprint"])}
```

## Default answer settings

```json
{json.dumps(settings, indent=2, sort_keys=True)}
```
"""


def push(bundle_dir: str, repo_id: str, *, private: bool = False, message: str = "Upload rnr-jax bundle",
         endpoint: str | None = None, token: str | None = None) -> str:
  """Uploads a bundle (its local cache left out) and its model card in one commit; returns the commit's URL."""
  from huggingface_hub import CommitOperationAdd, HfApi  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(os.path.join(bundle_dir, "manifest.json")):
    raise BundleError(bundle_dir, "is not a bundle (no manifest.json)")
  api = HfApi(endpoint=endpoint, token=token)
  api.create_repo(repo_id, private=private, exist_ok=True)
  operations = [CommitOperationAdd("README.md", model_card(bundle_dir, repo_id).encode())]
  for root, dirs, files in os.walk(bundle_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      path = os.path.join(root, name)
      operations.append(CommitOperationAdd(os.path.relpath(path, bundle_dir).replace(os.sep, "/"), path))
  return str(api.create_commit(repo_id, operations, commit_message=message).commit_url)


def pull(repo_id: str, out: str | None = None, *, revision: str | None = None, endpoint: str | None = None,
         token: str | None = None) -> str:
  """Downloads a pushed bundle (into ``out``, else the Hugging Face cache); returns its directory."""
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel

  return snapshot_download(repo_id, revision=revision, local_dir=out, endpoint=endpoint, token=token)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  try:
    if argv[1] == "push":
      if not FLAGS.bundle:
        raise app.UsageError("push needs --bundle")
      result: Any = push(FLAGS.bundle, FLAGS.repo_id, private=FLAGS.private, message=FLAGS.message)
    else:
      result = pull(FLAGS.repo_id, FLAGS.out, revision=FLAGS.revision)
  except (BundleError, OSError) as e:  # huggingface_hub's HTTP errors are OSErrors
    sys.exit(f"infer.hub: error: {e}")
  print(result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
