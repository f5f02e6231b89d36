"""ONNX export: ``gb.export_onnx(model, path)`` writes the model as an ONNX graph.

The graph takes ``input`` (batch, in_features) in the model's dtype and returns ``output``; the
batch dimension is symbolic.  Every layer becomes standard ONNX operators of opset 17, which any
ONNX runtime runs (onnxruntime, TensorRT, OpenVINO, ...):

- Dense: Gemm(x, W, b, transB=1), i.e. y = x Wᵀ + b with W stored (out, in) as here;
- Standardize (the model's input preprocessing): Sub(x, mean) then Div(·, std);
- ReLU, Sigmoid, Tanh: Relu, Sigmoid, Tanh; LeakyReLU(alpha): PRelu with slope alpha (a tensor
  of the model's dtype); Identity: nothing;
- GELU: ½ x (1 + erf(x/√2)) from Erf, Mul, Add; the tanh form ½ x (1 + tanh(√(2/π)(x + 0.044715
  x³))) from Tanh, Mul, Add (opset 17 has no Gelu operator; the formulas are the same as the
  kernels');
- SiLU: x · Sigmoid(x);
- Residual: Add(x, f(x)); a nested Sequential: its layers in order.

The model's config (``model.config()``, JSON) and the gpubackprop version are stored as metadata
properties.  Needs the ``onnx`` package (extra ``onnx``).  A float64 model exports as float64;
onnxruntime's CPU provider has no float64 Erf, so a float64 model with GELU's erf form runs there
only after ``model.to(dtype="float32")`` (ONNX's reference evaluator runs it as it is).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import layers as gbl
from ._version import __version__
from .arrays import to_host
from .checkpoint import _write_atomic
from .model import Sequential

__all__ = ["OPSET", "export_onnx"]

OPSET = 17


def require_onnx() -> Any:
    """The onnx module, or ImportError with the install hint."""
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "gb.export_onnx needs the onnx package: pip install 'gpubackprop[onnx]'"
        ) from None
    return onnx


class _GraphBuilder:
    """Nodes and initializers of one graph, with fresh value names."""

    def __init__(self, onnx: Any, dtype: np.dtype):
        self.onnx, self.dtype = onnx, dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, name: str, values: Any) -> str:
        array = np.ascontiguousarray(np.asarray(values, dtype=self.dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def scalar(self, value: float) -> str:
        return self.constant(self.name("const"), value)

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attributes) -> str:
        output = self.name(hint or op_type.lower())
        self.nodes.append(
            self.onnx.helper.make_node(op_type, inputs, [output], name=output, **attributes)
        )
        return output


def _gelu_erf(graph: _GraphBuilder, x: str) -> str:
    """½ x (1 + erf(x / √2))."""
    erf = graph.op("Erf", [graph.op("Mul", [x, graph.scalar(1.0 / math.sqrt(2.0))])])
    one_plus = graph.op("Add", [erf, graph.scalar(1.0)])
    return graph.op("Mul", [graph.op("Mul", [x, one_plus]), graph.scalar(0.5)], "gelu")


def _gelu_tanh(graph: _GraphBuilder, x: str) -> str:
    """½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    cube = graph.op("Mul", [graph.op("Mul", [x, x]), x])
    inner = graph.op("Add", [x, graph.op("Mul", [cube, graph.scalar(0.044715)])])
    tanh = graph.op("Tanh", [graph.op("Mul", [inner, graph.scalar(math.sqrt(2.0 / math.pi))])])
    one_plus = graph.op("Add", [tanh, graph.scalar(1.0)])
    return graph.op("Mul", [graph.op("Mul", [x, one_plus]), graph.scalar(0.5)], "gelu_tanh")


def _emit(graph: _GraphBuilder, layer: gbl.Layer, x: str, path: str) -> str:
    """The nodes of ``layer`` applied to value ``x``; returns the output value's name."""
    if isinstance(layer, gbl.Dense):
        inputs = [x, graph.constant(f"{path}.weight", to_host(layer.weight.data))]
        if layer.bias is not None:
            inputs.append(graph.constant(f"{path}.bias", to_host(layer.bias.data)))
        return graph.op("Gemm", inputs, f"dense_{path}", transB=1)
    if isinstance(layer, gbl.Standardize):
        centred = graph.op("Sub", [x, graph.constant(f"{path}.mean", to_host(layer.mean))])
        return graph.op("Div", [centred, graph.constant(f"{path}.std", to_host(layer.std))])
    if isinstance(layer, (gbl.Residual, Sequential)):
        h = x
        for i, inner in enumerate(layer.layers):
            h = _emit(graph, inner, h, f"{path}.{i}" if path else str(i))
        return graph.op("Add", [x, h], f"residual_{path}") if isinstance(layer, gbl.Residual) else h
    if type(layer) is gbl.Identity:
        return x
    if type(layer) is gbl.ReLU:
        return graph.op("Relu", [x])
    if type(layer) is gbl.LeakyReLU:
        # PRelu with the slope as a tensor of the model's dtype: LeakyRelu's alpha attribute is
        # a float32, which would change a float64 model's result in the 8th digit.
        return graph.op("PRelu", [x, graph.scalar(layer.alpha)], "leaky_relu")
    if type(layer) is gbl.Sigmoid:
        return graph.op("Sigmoid", [x])
    if type(layer) is gbl.Tanh:
        return graph.op("Tanh", [x])
    if type(layer) is gbl.GELU:
        return _gelu_tanh(graph, x) if layer.approximate == "tanh" else _gelu_erf(graph, x)
    if type(layer) is gbl.SiLU:
        return graph.op("Mul", [x, graph.op("Sigmoid", [x])], "silu")
    raise TypeError(f"layer {path!r} ({layer!r}) has no ONNX export")


def to_onnx(model: Any) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (checked with onnx.checker), not written anywhere."""
    onnx = require_onnx()
    if not isinstance(model, Sequential):
        raise TypeError(f"model is {type(model).__name__}; expected a gpubackprop Sequential")
    if model.in_features is None:
        raise ValueError("the model's input width is unknown (no Dense or Standardize layer)")
    # The model's dtype once placed; an unplaced model's float64 weights are exported as float32,
    # the dtype `to()` would give them.
    dtype = np.dtype(model.dtype or np.float32)
    element_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    graph = _GraphBuilder(onnx, dtype)
    output = _emit(graph, model, "input", "")
    graph.nodes.append(onnx.helper.make_node("Identity", [output], ["output"], name="output"))
    out_features = next((c.out_features for c in reversed(_dense_layers(model))), model.in_features)
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            graph.nodes,
            "gpubackprop_sequential",
            [
                onnx.helper.make_tensor_value_info(
                    "input", element_type, ["batch", model.in_features]
                )
            ],
            [onnx.helper.make_tensor_value_info("output", element_type, ["batch", out_features])],
            initializer=graph.initializers,
        ),
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="gpubackprop",
        producer_version=__version__,
        doc_string="A gpubackprop Sequential; its config is the metadata property 'config'.",
    )
    onnx.helper.set_model_props(proto, {"config": json.dumps(model.config(), sort_keys=True)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _dense_layers(layer: Any) -> list[gbl.Dense]:
    if isinstance(layer, gbl.Dense):
        return [layer]
    return [d for inner in getattr(layer, "layers", []) for d in _dense_layers(inner)]


def export_onnx(model: Any, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` as an ONNX model (opset 17; see the module docstring for the
    operators), atomically.  Its input preprocessing (a Standardize layer) is part of the graph,
    so the file predicts from raw features as ``model.predict`` does."""
    proto = to_onnx(model)
    _write_atomic(Path(path), proto.SerializeToString())
