"""Sharing a system: ``infer.export --hf_out`` writes an encoder transformers loads, with heads that read as ours do;
a bundle pushed to the Hub (a local stand-in) and pulled by id with ``QASystem.from_pretrained`` answers identically."""

import json
import os

import numpy as np
import pytest

from hub_standin import StandIn
from infer import hub
from rnr_jax import QASystem, exports
from rnr_jax.data.readers import read_questions
from rnr_jax.tokenization import Tokenizer
from test_export_infer import _run, bundle, workdir  # noqa: F401 - fixtures


def test_hf_export_loads_in_transformers_and_reads_as_we_do(workdir, tmp_path):  # noqa: F811 - fixture
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  out = tmp_path / "hf"
  proc = _run("infer.export", f"--workdir={workdir}", f"--hf_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {"config.json", "model.safetensors", "heads.safetensors", "rnr_jax.json", "tokenizer.json"} <= set(
      os.listdir(out))
  model = transformers.AutoModel.from_pretrained(out).eval()
  heads = load_file(out / "heads.safetensors")
  spec, params = exports.load_system(str(workdir / "best"))
  assert json.loads((out / "rnr_jax.json").read_text())["system"] == spec.to_json()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tokenizer("who wrote it")["input_ids"] == [101, *Tokenizer.from_pretrained(str(out)).encode_texts(
      ["who wrote it"])[0].tolist(), 102]
  tokenizer = Tokenizer.from_pretrained(str(out))
  batch = tokenizer.reader_from_records("which word follows zebra", tokenizer.passage_token_ids(
      ["lion notes", "owl"], ["stone zebra kiwi", "a river"]), max_len=48, buckets=None)
  ours = np.asarray(spec.read_fn()(params, {k: batch.as_dict()[k] for k in ("input_ids", "attention_mask",
                                                                            "token_type_ids")}))
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask),
                   token_type_ids=torch.tensor(batch.token_type_ids)).last_hidden_state
    span = hidden @ heads["qa_outputs.weight"].T + heads["qa_outputs.bias"]
    rank = hidden[:, 0] @ heads["qa_classifier.weight"].T + heads["qa_classifier.bias"]
  theirs = np.concatenate([span[..., 0].numpy(), span[..., 1].numpy(), rank.numpy()], axis=1)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_push_and_pull_by_hub_id_answer_identically(bundle, workdir, tmp_path, monkeypatch):  # noqa: F811
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))  # not the user's cache
  questions = [q.question for q in read_questions(workdir / "data" / "toy_dev.jsonl")]
  local = QASystem.from_pretrained(bundle[0])
  want = [p.to_json() for p in local.answer(questions, n_best=3)]
  standin = StandIn()
  try:
    url = hub.push(bundle[0], "team/toy-qa", endpoint=standin.url)
    assert url.startswith(f"{standin.url}/team/toy-qa/commit/")
    pulled = QASystem.from_pretrained("team/toy-qa", endpoint=standin.url, cache_dir=str(tmp_path / "unpacked"))
    assert [p.to_json() for p in pulled.answer(questions, n_best=3)] == want
    copy = hub.pull("team/toy-qa", str(tmp_path / "copy"), endpoint=standin.url)
    card = open(os.path.join(copy, "README.md"), encoding="utf-8").read()
    assert card.startswith("---\nlibrary_name: rnr-jax") and 'QASystem.from_pretrained("team/toy-qa")' in card
    assert "| model |" in card or "model" in card.split("## Footprint")[1]
    pushed = {os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs}
    shipped = {os.path.relpath(os.path.join(d, f), bundle[0]) for d, _, fs in os.walk(bundle[0]) for f in fs}
    assert {f for f in pushed if not f.startswith(".cache/huggingface")} == {  # huggingface_hub's own metadata
        f for f in shipped if not f.startswith(".cache")} | {"README.md"}  # the bundle's unpack cache stays home
    with pytest.raises(OSError):
      QASystem.from_pretrained("team/missing", endpoint=standin.url)
  finally:
    standin.close()
