"""The model's input preprocessing (gb.Standardize) crosses over with the model: to PyTorch as
torch_interop.Standardize, back again, and into ONNX as Sub and Div, so each predicts from raw
features what model.predict does."""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb

torch = pytest.importorskip("torch")
from gpubackprop import torch_interop  # noqa: E402  (imports torch)

FEATURES = 6


def _raw_features(rows: int) -> np.ndarray:
    # Raw features far from standardised: offsets and scales of several orders of magnitude.
    rng = np.random.default_rng(rows)
    return (
        rng.normal(size=(rows, FEATURES)) * np.logspace(-2, 3, FEATURES) + np.arange(FEATURES) * 50
    )


def _model(dtype: str = "float64", nested: bool = True) -> gb.Sequential:
    gb.seed(9)
    x = _raw_features(200)
    body = [
        gb.Dense(FEATURES, 8),
        gb.GELU(approximate="tanh"),
        gb.Residual(gb.Dense(8, 8), gb.SiLU()),
    ]
    if nested:
        body = [gb.Sequential(*body)]
    return gb.Sequential(gb.Standardize(x.mean(axis=0), x.std(axis=0)), *body, gb.Dense(8, 3)).to(
        "numpy", dtype=dtype
    )


def test_to_torch_and_back_keep_the_preprocessing():
    model = _model()
    module = model.to_torch()
    assert isinstance(module[0], torch_interop.Standardize)
    assert isinstance(module[1], torch.nn.Sequential)  # a nested Sequential stays nested
    np.testing.assert_array_equal(module[0].mean.numpy(), model.layers[0].mean)
    rng = np.random.default_rng(0)
    x, dout = _raw_features(11), rng.normal(size=(11, 3))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = module(xt)
    out.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(out.detach().numpy(), model.forward(x), rtol=1e-12, atol=1e-13)
    # ∂L/∂x passes through (x − mean)/std: divided by std, as autograd finds.
    np.testing.assert_allclose(xt.grad.numpy(), model.backward(dout), rtol=1e-12, atol=1e-15)
    back = gb.from_torch(module, backend="numpy")
    assert type(back.layers[0]).__name__ == "Standardize"
    np.testing.assert_array_equal(back.layers[0].std, model.layers[0].std)
    np.testing.assert_allclose(back.predict(x), model.predict(x), rtol=1e-12, atol=1e-13)
    assert set(module.state_dict()) == set(model.state_dict())  # buffers by the same names


def test_onnx_graph_standardizes_raw_features(tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _model(dtype="float32", nested=False)
    path = tmp_path / "model.onnx"
    gb.export_onnx(model, path)
    nodes = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert nodes[:3] == ["Sub", "Div", "Gemm"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _raw_features(17).astype(np.float32)
    np.testing.assert_allclose(
        session.run(None, {"input": x})[0], model.predict(x), rtol=1e-5, atol=1e-5
    )
