"""The unified student on ONNX Runtime: embedding and reading without JAX, Flax or XLA.

:class:`OnnxStudent` runs the graph of :mod:`rnr_jax.onnx_export` with the bundle's float32 weights as its external
initializers: the ONNX Runtime engine of :class:`~rnr_jax.qa_system.QASystem`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from rnr_jax.bundle import Bundle, BundleError, flatten_params
from rnr_jax.tokenization import EncodedBatch

GRAPH_FILE = "student.onnx"  # name among a bundle's extra files
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # int64 [batch, length]
OUTPUTS = ("embedding", "start_logits", "end_logits", "rank_logits")  # [batch, dim], [batch, length] x 2, [batch]


def load_graph(graph: bytes | str | os.PathLike, params: Mapping[str, np.ndarray] | None,
               threads: int = 0) -> ort.InferenceSession:
  """``graph`` (bytes or a path) ready to run on the CPU, its external initializers the flat ``params`` (None: the graph
  holds its weights); ``threads`` 0 lets ONNX Runtime use one per physical core."""
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  if params is not None:
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
    # Copied into the graph before it is optimised, so weights are constant-folded and prepacked as if embedded.
    options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
  if not isinstance(graph, bytes):
    graph = os.fspath(graph)
  return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class OnnxStudent:
  """A unified student's ``embed`` and ``read`` on ONNX Runtime; batches (mappings or ``EncodedBatch``) of any size and
  length, run as they come (``rows``, the JAX engine's padded batch size, is ignored)."""

  name = "onnx"
  parallel = 1

  def __init__(self, runner: ort.InferenceSession):
    names = tuple(o.name for o in runner.get_outputs())
    if tuple(i.name for i in runner.get_inputs()) != INPUTS or names != OUTPUTS:
      raise ValueError(f"not a student graph: outputs {names}, expected {OUTPUTS}")
    self.runner = runner

  @classmethod
  def load(cls, graph: bytes | str | os.PathLike, params: Mapping[str, np.ndarray] | None,
           threads: int = 0) -> OnnxStudent:
    return cls(load_graph(graph, params, threads))

  @classmethod
  def from_bundle(cls, bundle: Bundle, threads: int = 0) -> OnnxStudent:
    """The student of a loaded bundle: its graph with its weights (int8 and float16 dequantized to float32)."""
    if GRAPH_FILE not in bundle.extra_files:
      raise BundleError(bundle.root, f"has no extra/{GRAPH_FILE}, the graph the ONNX Runtime engine runs: re-export it "
                        "with `python -m infer.export` (a unified BERT student), or use the JAX engine (--engine=jax, "
                        "pip install 'rnr-jax[train]')")
    return cls.load(bundle.extra_files[GRAPH_FILE], flatten_params(bundle.params), threads)

  def _run(self, names: list[str], batch: Mapping[str, np.ndarray] | EncodedBatch) -> list[np.ndarray]:
    batch = batch if isinstance(batch, Mapping) else batch.as_dict()
    return self.runner.run(names, {k: np.asarray(batch[k], np.int64) for k in INPUTS})

  def embed(self, batch: Mapping[str, np.ndarray] | EncodedBatch, rows: int = 0, passages: bool = False) -> np.ndarray:
    """float32 ``[B, dim]`` retrieval vectors (normalised if the spec says so) of questions or passages alike."""
    return self._run(["embedding"], batch)[0]

  def read(self, batch: Mapping[str, np.ndarray] | EncodedBatch, rows: int = 0) -> np.ndarray:
    """float32 ``[B, 2L + 1]``: start logits, end logits and rank logit of each row, as ``specs.read_fn``."""
    start, end, rank = self._run(list(OUTPUTS[1:]), batch)
    return np.concatenate([start, end, rank[:, None]], axis=1)
