"""Hugging Face checkpoint conversion: configs, save/load round trips, file formats, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from rnr_jax import models  # noqa: E402
from rnr_jax.models import hf  # noqa: E402

_SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, max_position_embeddings=24)
BERT = models.BertConfig(**_SIZES, num_attention_heads=4, intermediate_size=48)
MOBILEBERT = models.MobileBertConfig(
  **_SIZES,
  num_attention_heads=2,
  intermediate_size=40,
  embedding_size=8,
  intra_bottleneck_size=16,
  num_feedforward_networks=2,
)
CONFIGS = {"bert": BERT, "mobilebert": MOBILEBERT}


def _random_params(config: models.EncoderConfig, seed: int = 0) -> models.Params:
  """Random float32 params of the encoder's structure; norm scales near 1, everything else N(0, 0.1)."""
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: models.build_encoder(config).init(jax.random.key(0), ids)["params"])
  rng = np.random.RandomState(seed)

  def draw(path, leaf) -> np.ndarray:
    x = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    return x + 1 if path[-1].key == "scale" else x

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(config: models.EncoderConfig) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.RandomState(0)
  ids = rng.randint(1, config.vocab_size, (2, 9))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return ids, mask


def _torch_sequence(torch_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  return out.last_hidden_state.numpy()


def _assert_trees_equal(a: models.Params, b: models.Params) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write_checkpoint(directory: Path, hf_config: dict, state_dict: dict[str, np.ndarray]) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(hf_config))
  save_file(state_dict, str(directory / "model.safetensors"), metadata={"format": "pt"})
  return directory


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_config_round_trip_with_transformers(kind: str) -> None:
  config = CONFIGS[kind]
  d = config.to_hf_dict()
  assert d["model_type"] == kind
  hf_config = transformers.AutoConfig.for_model(**d)
  for field, value in d.items():
    if field != "architectures":
      assert getattr(hf_config, field) == value, field
  assert models.config_from_hf_dict(hf_config.to_dict()) == config
  assert models.config_from_hf_dict(json.loads(json.dumps(d))) == config
  # Defaults agree with transformers'.
  assert models.config_from_hf_dict(transformers.AutoConfig.for_model(kind).to_dict()) == type(config)()


def test_config_rejects_unsupported_settings() -> None:
  base = BERT.to_hf_dict()
  for bad in ({"position_embedding_type": "relative_key"}, {"is_decoder": True}, {"hidden_act": "prelu"}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      models.config_from_hf_dict({**base, **bad})
  with pytest.raises(ValueError, match="model_type"):
    models.config_from_hf_dict({**base, "model_type": "roberta"})


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_load_round_trip_parity(kind: str, tmp_path: Path) -> None:
  config = CONFIGS[kind]
  params = _random_params(config)
  tokenizer_dir = tmp_path / "tokenizer"
  tokenizer_dir.mkdir()
  (tokenizer_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  out_dir = tmp_path / "export" / "model"
  assert models.save_hf_encoder(config, params, out_dir, tokenizer_dir=tokenizer_dir) == out_dir
  assert (out_dir / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"

  torch_model, info = transformers.AutoModel.from_pretrained(out_dir, output_loading_info=True)
  assert type(torch_model).__name__ == config.architecture
  assert all(key.startswith("pooler.") for key in info["missing_keys"]), info
  assert not info["unexpected_keys"] and not info["mismatched_keys"], info
  ids, mask = _inputs(config)
  reference = _torch_sequence(torch_model.eval(), ids, mask)
  flax_out = models.build_encoder(config).apply({"params": params}, ids, mask)
  real = mask.astype(bool)
  assert np.abs(reference[real]).mean() > 0.1
  assert np.abs(np.asarray(flax_out.sequence)[real] - reference[real]).max() <= 1e-5

  loaded_config, loaded_params = models.load_hf_encoder(out_dir)
  assert loaded_config == config
  _assert_trees_equal(params, loaded_params)

  # Saving again replaces the directory atomically and leaves no temporary directories behind.
  models.save_hf_encoder(config, params, out_dir)
  assert not (out_dir / "vocab.txt").exists()
  assert sorted(p.name for p in out_dir.parent.iterdir()) == ["model"]


def test_truncated_params_save_as_shallower_model(tmp_path: Path) -> None:
  params = _random_params(BERT)
  state_dict = models.params_to_hf_state_dict(BERT, params)
  config, truncated = models.load_hf_encoder(_write_checkpoint(tmp_path / "full", BERT.to_hf_dict(), state_dict), 1)
  assert config.num_hidden_layers == 1 and set(truncated) == {"embeddings", "layer_0"}
  models.save_hf_encoder(config, truncated, tmp_path / "shallow")
  assert json.loads((tmp_path / "shallow" / "config.json").read_text())["num_hidden_layers"] == 1
  _assert_trees_equal(truncated, models.load_hf_encoder(tmp_path / "shallow")[1])


def test_load_pytorch_bin_and_prefixed_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(**{k: v for k, v in BERT.to_hf_dict().items() if k != "architectures"})
  qa_model = transformers.BertForQuestionAnswering(hf_config).eval()
  expected = models.hf_state_dict_to_params(BERT, {k: v.numpy() for k, v in qa_model.bert.state_dict().items()})
  ids, mask = _inputs(BERT)
  reference = _torch_sequence(qa_model.bert, ids, mask)

  # Prefixed keys (``bert.`` + ``qa_outputs``) as saved by a task model, in safetensors.
  qa_model.save_pretrained(tmp_path / "qa")
  with caplog.at_level(logging.DEBUG, logger=hf.__name__):
    config, params = models.load_hf_encoder(tmp_path / "qa")
  assert "qa_outputs.weight" in caplog.text
  _assert_trees_equal(expected, params)

  # pytorch_model.bin with the same prefixed keys.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  hf_config.save_pretrained(bin_dir)
  torch.save(qa_model.state_dict(), bin_dir / "pytorch_model.bin")
  _, bin_params = models.load_hf_encoder(bin_dir)
  _assert_trees_equal(expected, bin_params)
  out = models.build_encoder(config).apply({"params": bin_params}, ids, mask)
  assert np.abs(np.asarray(out.sequence) - reference)[mask.astype(bool)].max() <= 1e-4


def test_load_bf16_and_sharded_safetensors(tmp_path: Path) -> None:
  state_dict = models.params_to_hf_state_dict(MOBILEBERT, _random_params(MOBILEBERT))
  # bfloat16 weights, as written by torch.
  bf16_dir = tmp_path / "bf16"
  bf16_dir.mkdir()
  (bf16_dir / "config.json").write_text(json.dumps(MOBILEBERT.to_hf_dict()))
  from safetensors.torch import save_file as save_torch_file

  save_torch_file(
    {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state_dict.items()},
    str(bf16_dir / "model.safetensors"),
    metadata={"format": "pt"},
  )
  _, params = models.load_hf_encoder(bf16_dir)
  rounded = {k: v.astype(jnp.bfloat16).astype(np.float32) for k, v in state_dict.items()}
  _assert_trees_equal(models.hf_state_dict_to_params(MOBILEBERT, rounded), params)

  # Two shards and an index.
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  (shard_dir / "config.json").write_text(json.dumps(MOBILEBERT.to_hf_dict()))
  keys = sorted(state_dict)
  weight_map = {}
  for i, shard_keys in enumerate((keys[::2], keys[1::2])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: state_dict[k] for k in shard_keys}, str(shard_dir / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard_keys, name))
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, sharded = models.load_hf_encoder(shard_dir)
  _assert_trees_equal(models.hf_state_dict_to_params(MOBILEBERT, state_dict), sharded)


def test_legacy_layer_norm_names() -> None:
  state_dict = models.params_to_hf_state_dict(BERT, _random_params(BERT))
  legacy = {
    k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
    for k, v in state_dict.items()
  }
  assert legacy.keys() != state_dict.keys()
  _assert_trees_equal(models.hf_state_dict_to_params(BERT, state_dict), models.hf_state_dict_to_params(BERT, legacy))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_bad_checkpoint_names_the_tensor(problem: str, tmp_path: Path) -> None:
  state_dict = models.params_to_hf_state_dict(BERT, _random_params(BERT))
  name = "encoder.layer.1.attention.self.key.weight"
  if problem == "missing":
    del state_dict[name]
  elif problem == "unexpected":
    name = "encoder.layer.0.attention.self.rotary.weight"
    state_dict[name] = np.zeros((4, 4), np.float32)
  else:
    state_dict[name] = np.zeros((32, 31), np.float32)
  directory = _write_checkpoint(tmp_path / "bad", BERT.to_hf_dict(), state_dict)
  with pytest.raises(ValueError, match=problem.replace("misshaped", "wrongly shaped")) as error:
    models.load_hf_encoder(directory)
  assert name in str(error.value) and "model.safetensors" in str(error.value)


def test_params_to_hf_state_dict_rejects_foreign_params() -> None:
  params = _random_params(BERT)
  params["layer_0"]["attention"]["query"]["kernel"] = np.zeros((32, 8), np.float32)
  with pytest.raises(ValueError, match="layer_0/attention/query/kernel"):
    models.params_to_hf_state_dict(BERT, params)


def test_unreachable_hub_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
  import huggingface_hub

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(OSError, match=r"unreachable.*Pass a local directory"):
    models.load_hf_encoder("rnr-jax-tests/no-such-model")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    models.load_hf_encoder(tmp_path / "missing")
