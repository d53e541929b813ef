"""The ONNX graph of a unified BERT student (encoder, retrieval vector, span and ranking heads) for ONNX Runtime.

Built from the parameter tree with standard ops (opset 17, any batch and length); ``external=True`` leaves the
initializers' values out, for the runtime to supply from the bundle's weights (:func:`rnr_jax.runtime.load_graph`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnr_jax.io import PathLike, atomic_write_bytes
from rnr_jax.runtime import INPUTS

OPSET = 17


class _Graph:
  """Nodes, constants and the parameters they read; every op has one output."""

  def __init__(self, params: Mapping[str, Any]):
    self.params, self.nodes, self.consts, self.used = params, [], [], []

  def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
    out = out or f"{op_type}_{len(self.nodes)}"
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
    return out

  def const(self, value: Any, dtype: Any = np.int64) -> str:
    self.consts.append(numpy_helper.from_array(np.asarray(value, dtype), f"const_{len(self.consts)}"))
    return self.consts[-1].name

  def param(self, key: str) -> str:
    if key not in self.params:
      raise KeyError(f"parameter {key!r} missing: not a unified BERT student's parameter tree")
    self.used.append(key)
    return key

  def dense(self, x: str, path: str) -> str:
    return self.op("Add", self.op("MatMul", x, self.param(f"{path}/kernel")), self.param(f"{path}/bias"))

  def norm(self, x: str, path: str, eps: float) -> str:
    return self.op("LayerNormalization", x, self.param(f"{path}/scale"), self.param(f"{path}/bias"), axis=-1,
                   epsilon=eps)

  def activation(self, x: str, name: str) -> str:
    f32 = lambda v: self.const(v, np.float32)
    if name in ("gelu", "gelu_python"):  # the Div-Erf-Add-Mul-Mul form that ONNX Runtime fuses into one Gelu
      erf = self.op("Erf", self.op("Div", x, f32(math.sqrt(2.0))))
      return self.op("Mul", self.op("Mul", x, self.op("Add", erf, f32(1.0))), f32(0.5))
    if name == "relu":
      return self.op("Relu", x)
    raise ValueError(f"hidden_act {name!r} has no ONNX form here (gelu, relu)")


def _initializer(key: str, value: Any, external: bool) -> TensorProto:
  if not external:
    return numpy_helper.from_array(np.asarray(value, np.float32), key)
  tensor = TensorProto(name=key, data_type=TensorProto.FLOAT, dims=np.shape(value))
  tensor.data_location = TensorProto.EXTERNAL
  tensor.external_data.add(key="location", value="supplied-by-the-runtime")  # never read: the runtime supplies it
  return tensor


def supported(spec: Mapping[str, Any]) -> bool:
  """Whether a system (``SystemSpec.to_json()``) has a graph here: a unified student with a BERT encoder."""
  return bool(spec["unified"]) and spec["reader"]["encoder"].get("model_type") == "bert"


def build_model(spec: Mapping[str, Any], params: Mapping[str, Any], *, external: bool = False) -> onnx.ModelProto:
  """The graph of a unified student from its ``SystemSpec.to_json()`` and flat parameters (``external``: only their
  shapes are read). Inputs and outputs: :data:`rnr_jax.runtime.INPUTS` and ``OUTPUTS``, float32."""
  if not supported(spec):
    raise ValueError("only a unified student with a BERT encoder has an ONNX graph here")
  enc, retriever = spec["reader"]["encoder"], spec["retriever"]
  g = _Graph(params)
  hidden, heads = enc["hidden_size"], enc["num_attention_heads"]
  eps, p = enc.get("layer_norm_eps", 1e-12), "encoder/embeddings/"
  ids, mask, types = INPUTS
  length = g.op("Shape", ids, start=1, end=2)
  positions = g.op("Slice", g.param(p + "position_embeddings/embedding"), g.const([0]), length, g.const([0]))
  x = g.op("Add", g.op("Gather", g.param(p + "word_embeddings/embedding"), ids), positions)
  x = g.norm(g.op("Add", x, g.op("Gather", g.param(p + "token_type_embeddings/embedding"), types)), p + "layer_norm",
             eps)
  maskf = g.op("Cast", mask, to=TensorProto.FLOAT)
  # Additive -max_float at padding: softmax then gives padding exactly 0, as jnp.where(mask, logits, min) does.
  bias = g.op("Unsqueeze", g.op("Mul", g.op("Sub", g.const(1.0, np.float32), maskf),
                                g.const(np.finfo(np.float32).min, np.float32)), g.const([1, 2]))
  split = g.const([0, 0, heads, hidden // heads])
  for i in range(enc["num_hidden_layers"]):
    p = f"encoder/layer_{i}/"
    q = g.op("Mul", g.dense(x, p + "attention/query"), g.const((hidden // heads) ** -0.5, np.float32))
    q, k, v = (g.op("Transpose", g.op("Reshape", t, split), perm=perm) for t, perm in (
        (q, [0, 2, 1, 3]), (g.dense(x, p + "attention/key"), [0, 2, 3, 1]), (g.dense(x, p + "attention/value"),
                                                                             [0, 2, 1, 3])))
    probs = g.op("Softmax", g.op("Add", g.op("MatMul", q, k), bias), axis=-1)
    context = g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3]), g.const([0, 0, hidden]))
    x = g.norm(g.op("Add", g.dense(context, p + "attention/output/dense"), x), p + "attention/output/layer_norm", eps)
    h = g.activation(g.dense(x, p + "intermediate/dense"), enc.get("hidden_act", "gelu"))
    x = g.norm(g.op("Add", g.dense(h, p + "output/dense"), x), p + "output/layer_norm", eps)
  spans = g.dense(x, "qa_outputs")
  g.op("Gather", spans, g.const(0), axis=2, out="start_logits")
  g.op("Gather", spans, g.const(1), axis=2, out="end_logits")
  cls = g.op("Gather", x, g.const(0), axis=1)
  g.op("Gather", g.dense(cls, "qa_classifier"), g.const(0), axis=1, out="rank_logits")
  if retriever["pooling"] == "mean":
    m = g.op("Unsqueeze", maskf, g.const([2]))
    count = g.op("Max", g.op("ReduceSum", m, g.const([1]), keepdims=0), g.const(1.0, np.float32))
    cls = g.op("Div", g.op("ReduceSum", g.op("Mul", x, m), g.const([1]), keepdims=0), count)
  vector = g.op("Slice", cls, g.const([0]), g.const([retriever["retrieval_dim"] or hidden]), g.const([1]))
  if retriever["normalize"]:
    norm = g.op("Max", g.op("ReduceL2", vector, axes=[1], keepdims=1), g.const(1e-12, np.float32))
    vector = g.op("Div", vector, norm)
  g.op("Identity", vector, out="embedding")
  int_input = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "length"])
  float_output = lambda name, *shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape])
  graph = helper.make_graph(
      g.nodes, "rnr_jax_student", [int_input(n) for n in INPUTS],
      [float_output("embedding", "dim"), float_output("start_logits", "length"), float_output("end_logits", "length"),
       float_output("rank_logits")],
      initializer=[_initializer(k, params[k], external) for k in dict.fromkeys(g.used)] + g.consts)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnr_jax")
  model.ir_version = 8  # the IR of opset 17, so older runtimes load it too
  return model


def save(path: PathLike, spec: Mapping[str, Any], params: Mapping[str, Any], *, external: bool = True) -> None:
  """Writes :func:`build_model`'s graph to ``path`` atomically (``external``: without the weights)."""
  atomic_write_bytes(path, build_model(spec, params, external=external).SerializeToString())
