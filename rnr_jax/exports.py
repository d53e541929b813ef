"""Exported models: a stage's best parameters with the JSON that rebuilds them, and the loaders of every kind.

An export is an Orbax directory ``<dir>/<step>/`` with items ``params`` and ``model`` (JSON: the spec, and the step's
``metrics``); only the newest step is kept."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rnr_jax import qa_model
from rnr_jax.models import EncoderConfig, config_from_hf_dict, load_hf_encoder, load_minilm
from rnr_jax.models.encoder import resolve_num_layers
from rnr_jax.specs import ReaderSpec, RetrieverSpec, SystemSpec
from rnr_jax.training.mesh import path_name, replicated

Params = Any


class Export:
  """Exported parameters: ``<directory>/<step>/{params, model}``, newest step only."""

  def __init__(self, directory: str):
    # A bucket's URI (gs://...) is kept as it is: Orbax writes there through etils.epath.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_info(self) -> dict[str, Any] | None:
    """The ``model`` item of the exported step, or None if nothing is exported."""
    step = self._manager.latest_step()
    if step is None:
      return None
    return dict(self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore())).model)

  def save(self, step: int, params: Any, model: Mapping[str, Any]) -> None:
    """Exports ``params`` as ``step`` with the JSON ``model`` item; every process must call it."""
    for old in self._manager.all_steps():
      if old >= step:  # a resumed run exporting a step it had exported before
        self._manager.delete(old)
    self._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     model=ocp.args.JsonSave({**model, "step": step})), force=True)
    self._manager.wait_until_finished()

  def restore(self, abstract_params: Any) -> Any:
    """The exported parameters, placed like ``abstract_params`` (``ShapeDtypeStruct`` with shardings)."""
    step = self._manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no exported parameters")
    return self._manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params

  def close(self) -> None:
    self._manager.close()


def read_info(directory: str) -> dict[str, Any] | None:
  """The ``model`` item of an export directory, or None when it holds none."""
  export = Export(directory)
  try:
    return export.latest_info()
  finally:
    export.close()


def params_fingerprint(params: Params) -> str:
  """sha256 over the parameters' paths, dtypes, shapes and values (gathered from all processes)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(multihost_utils.process_allgather(leaf, tiled=True) if isinstance(leaf, jax.Array) else leaf)
    h.update(f"{path_name(path)}:{x.dtype.str}:{x.shape};".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


class BestExport:
  """Exports the parameters of the best evaluation by ``metric`` to ``<workdir>/best``, with ``model`` (the JSON
  that rebuilds it) and the ``bests`` so far (a resumed run compares as an uninterrupted one); then ``on_best``."""

  def __init__(self, workdir: str, model: Mapping[str, Any], select: str, *, fingerprint: bool = False,
               on_best: Callable[[int, dict[str, Any]], None] | None = None):
    self.select = select
    self._fingerprint = fingerprint
    self._model = dict(model)
    self._export = Export(os.path.join(workdir, "best"))
    self._on_best = on_best
    exported = self._export.latest_info()
    self.best = float(exported["metrics"].get(select, -math.inf)) if exported else -math.inf
    self._bests = [tuple(b) for b in exported.get("bests", [[exported["step"], self.best]])] if exported else []

  @property
  def directory(self) -> str:
    return self._export.directory

  def offer(self, step: int, params: Params, metrics: Mapping[str, float]) -> bool:
    """Exports ``params`` if ``metrics[select]`` beats every earlier evaluation; returns whether it did."""
    if self.select not in metrics:
      raise KeyError(f"the evaluation has no metric {self.select!r} to select by (has {sorted(metrics)})")
    if self._bests and self._bests[-1][0] >= step:  # bests of steps a run resumed from an earlier checkpoint replays
      self._bests = [(s, v) for s, v in self._bests if s < step]
      self.best = self._bests[-1][1] if self._bests else -math.inf
    if not metrics[self.select] > self.best:
      return False
    self.best = float(metrics[self.select])
    self._bests.append((step, self.best))
    item = self._save(step, params, metrics=dict(metrics), select_metric=self.select,
                      bests=[list(b) for b in self._bests])
    if self._on_best is not None:
      self._on_best(step, item)
    logging.info("Step %d: new best %s %.4f, exported to %s.", step, self.select, self.best, self.directory)
    return True

  def export_final(self, step: int, params: Params) -> None:
    """Exports ``params`` of a run that never evaluates (``train.eval_every=0``): its last step is its export."""
    self._save(step, params, metrics={}, select_metric=None, bests=[])
    logging.info("Step %d: no evaluations; the final parameters exported to %s.", step, self.directory)

  def _save(self, step: int, params: Params, **fields: Any) -> dict[str, Any]:
    """Saves ``params`` with the model item plus ``fields`` (and the fingerprint if asked); returns the item."""
    item = {**self._model, **fields}
    if self._fingerprint:
      item["fingerprint"] = params_fingerprint(params)
    self._export.save(step, params, item)
    return item

  def latest(self, abstract_params: Any) -> tuple[Params, dict[str, Any]]:
    """The best export's parameters (placed like ``abstract_params``) and its model item."""
    return self._export.restore(abstract_params), self._export.latest_info()

  def close(self) -> None:
    self._export.close()


def _restore(directory: str, kind: str, mesh: Mesh | None) -> tuple[Any, Params, dict[str, Any]]:
  """``(spec, params replicated on mesh or on device 0, model item)`` of an export holding ``model[kind]``."""
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"{directory}: no exported {kind} (no such directory)")
  export = Export(directory)
  try:
    info = export.latest_info()
    if info is None:
      raise FileNotFoundError(f"{directory}: no exported {kind}")
    if kind not in info:
      raise ValueError(f"{directory}: not an exported {kind} (its model item holds {sorted(info)})")
    spec = {"retriever": RetrieverSpec, "reader": ReaderSpec}[kind].from_json(info[kind])
    sharding = replicated(mesh) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: qa_model.init_params(spec.build(), jax.random.key(0)))
    return spec, export.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                             abstract)), info
  finally:
    export.close()


def load_retriever(directory: str, mesh: Mesh | None = None) -> tuple[RetrieverSpec, Params, dict[str, Any]]:
  """``(spec, params, model item)`` of an exported retriever (``train.retriever``'s ``W/best``)."""
  return _restore(directory, "retriever", mesh)


def load_reader(directory: str, mesh: Mesh | None = None) -> tuple[ReaderSpec, Params, dict[str, Any]]:
  """``(spec, params, model item)`` of an exported reader or unified student."""
  return _restore(directory, "reader", mesh)


def load_system(model_dir: str, retriever_dir: str | None = None, mesh: Mesh | None = None, *,
                passage_len: int = 256, passage_token_type: int = 1, normalize: bool = False,
                require_system: bool = False) -> tuple[SystemSpec, Params]:
  """The spec and parameters of a unified model, or of a retriever plus a reader (a plain reader takes
  ``passage_len``, ``passage_token_type`` and ``normalize``, or is refused with ``require_system``)."""
  reader_spec, reader_params, info = load_reader(model_dir, mesh)
  if retriever_dir is not None:
    retriever_spec, retriever_params, _ = load_retriever(retriever_dir, mesh)
    return SystemSpec.two_models(retriever_spec, reader_spec), {"retriever": retriever_params, "reader": reader_params}
  if "system" in info:
    return SystemSpec.from_json(info["system"]), reader_params
  if require_system:
    raise ValueError(f"{model_dir}: a reader export without a system spec (its retrieval settings: passage length, "
                     "token type, normalisation); python -m infer.export --model DIR takes them as flags")
  return SystemSpec.unified_model(reader_spec, passage_len=passage_len, passage_token_type=passage_token_type,
                                  normalize=normalize), reader_params


def unified_info(system: SystemSpec, scale: float) -> dict[str, Any]:
  """The ``model`` item of an exported unified student: reader spec, system spec and training score scale."""
  return {"reader": system.reader.to_json(), "system": system.to_json(), "scale": scale}


def load_unified(directory: str, mesh: Mesh | None = None) -> tuple[SystemSpec, float, Params]:
  """``(system, scale, params)`` of an exported unified student."""
  _, params, info = load_reader(directory, mesh)
  if "system" not in info:
    raise ValueError(f"{directory}: an exported reader, not a unified retriever-reader (no system spec)")
  return SystemSpec.from_json(info["system"]), float(info["scale"]), params


def is_export(path: str) -> bool:
  """Whether ``path`` is an export directory (``<dir>/<step>/``) rather than a Hugging Face one."""
  return (bool(path) and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))
          and any(d.isdigit() for d in os.listdir(path)))


def reader_encoder(directory: str, num_layers: int | None = None) -> tuple[EncoderConfig, Params, Params]:
  """``(encoder config, encoder params, heads)`` of a reader export, its encoder cut to the first ``num_layers`` (host
  arrays): a student starts from the teacher reader's encoder, which already reads, and its heads."""
  spec, params, _ = load_reader(directory)
  config = config_from_hf_dict(dict(spec.encoder))
  keep = resolve_num_layers(config.num_hidden_layers, num_layers)
  encoder = jax.device_get(params["encoder"])
  encoder = {k: v for k, v in encoder.items() if not (k.startswith("layer_") and int(k.split("_")[1]) >= keep)}
  heads = {k: jax.device_get(params[k]) for k in qa_model.HEAD_NAMES}
  return dataclasses.replace(config, num_hidden_layers=keep), encoder, heads


def initial_encoder(model_cfg: Any) -> tuple[EncoderConfig, Params | None, Params | None]:
  """``(config, pretrained encoder or None, reader heads or None)`` that a stage starts from: ``model_cfg.init`` is
  ``"minilm"``, a Hugging Face directory or hub id, an exported reader, or ``""`` (random ``hf_config``)."""
  heads = None
  if model_cfg.init == "minilm":
    config, params = load_minilm(model_cfg.num_layers)
  elif is_export(model_cfg.init):
    config, params, heads = reader_encoder(model_cfg.init, model_cfg.num_layers)
  elif model_cfg.init:
    config, params = load_hf_encoder(model_cfg.init, model_cfg.num_layers)
  else:
    config, params = config_from_hf_dict(dict(model_cfg.hf_config)), None
    if model_cfg.num_layers is not None:
      config = dataclasses.replace(config, num_hidden_layers=int(model_cfg.num_layers))
  config = dataclasses.replace(config, hidden_dropout_prob=float(model_cfg.dropout),
                               attention_probs_dropout_prob=float(model_cfg.dropout))
  return config, params, heads
