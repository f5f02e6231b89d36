"""ONNX export (issue 16, part 3): the file, run by onnxruntime, predicts what the model predicts.

Every activation (GELU in both forms, SiLU, LeakyReLU's slope, ...) inside and outside a residual
block, in float32 through onnxruntime and in float64 through ONNX's reference evaluator (and
through onnxruntime where its CPU provider implements the float64 operator); the model's input
preprocessing is part of the graph; ``gpubackprop train --export-onnx``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import cli
from gpubackprop.backends import available_backends
from gpubackprop.layers import Layer

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.op_run import OpRun  # noqa: E402


class Erf(OpRun):
    """Erf in the input's precision: the reference evaluator's own computes in float32."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


ACTIVATIONS = {
    "relu": gb.ReLU,
    "leaky_relu": lambda: gb.LeakyReLU(0.137),
    "sigmoid": gb.Sigmoid,
    "tanh": gb.Tanh,
    "gelu": gb.GELU,
    "gelu_tanh": lambda: gb.GELU(approximate="tanh"),
    "silu": gb.SiLU,
    "identity": gb.Identity,
}


def _model(activation: str, backend="numpy", dtype="float32", seed=4) -> gb.Sequential:
    gb.seed(seed)
    make = ACTIVATIONS[activation]
    return gb.Sequential(
        gb.Dense(5, 9), make(),
        gb.Residual(gb.Dense(9, 9), make(), gb.Dense(9, 9, bias=False)),
        gb.Dense(9, 4),
    ).to(backend, dtype=dtype)  # fmt: skip


def _inputs(rows: int, dtype) -> np.ndarray:
    # Wide enough for both sides of every activation, and GELU's curved part.
    return (np.random.default_rng(rows).normal(size=(rows, 5)) * 3).astype(dtype)


def _run_onnxruntime(path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x})[0]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_onnxruntime_matches_predict_float32(tmp_path, activation):
    model = _model(activation)
    path = tmp_path / "model.onnx"
    gb.export_onnx(model, path)
    for rows in (1, 37):  # the batch dimension is symbolic
        x = _inputs(rows, np.float32)
        out = _run_onnxruntime(path, x)
        assert out.dtype == np.float32 and out.shape == (rows, 4)
        np.testing.assert_allclose(out, model.predict(x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_graph_matches_predict_float64(tmp_path, activation):
    model = _model(activation, dtype="float64")
    path = tmp_path / "model.onnx"
    gb.export_onnx(model, path)
    x = _inputs(23, np.float64)
    expected = model.predict(x)
    out = ReferenceEvaluator(str(path), new_ops=[Erf]).run(None, {"input": x})[0]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    if activation != "gelu":  # onnxruntime's CPU provider has no float64 Erf
        np.testing.assert_allclose(_run_onnxruntime(path, x), expected, rtol=1e-12, atol=1e-13)


def test_file_says_what_model_it_is(tmp_path):
    model = _model("silu")
    path = tmp_path / "model.onnx"
    gb.export_onnx(model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.producer_name == "gpubackprop" and proto.producer_version == gb.__version__
    properties = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(properties["config"]) == model.config()
    assert [o.version for o in proto.opset_import] == [17]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 5]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name, value in model.state_dict().items():  # the parameters under their own names
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


@pytest.mark.parametrize("backend", ["emu", "emu-device-arrays"])
def test_export_from_kernel_backends(tmp_path, backend):
    ok, reason = available_backends()["emu"]
    if not ok:
        pytest.skip(f"emu unavailable: {reason}")
    from gpubackprop.backends.emu_backend import EmuBackend

    placed = EmuBackend(device_arrays=True) if backend == "emu-device-arrays" else "emu"
    model = _model("gelu_tanh", backend=placed)
    path = tmp_path / "model.onnx"
    gb.export_onnx(model, path)
    x = _inputs(9, np.float32)
    np.testing.assert_allclose(_run_onnxruntime(path, x), model.predict(x), rtol=1e-5, atol=2e-6)


def test_layer_without_export_is_refused(tmp_path):
    class Doubling(Layer):
        pass

    model = gb.Sequential(gb.Dense(3, 3), gb.Residual(Doubling()))
    with pytest.raises(TypeError, match=r"layer '1\.0' \(Doubling\(\)\) has no ONNX export"):
        gb.export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_train_exports_onnx_that_predicts_from_raw_features(tmp_path, capsys):
    from gpubackprop.data import load_digits

    onnx_path, checkpoint = tmp_path / "digits.onnx", tmp_path / "digits.safetensors"
    metrics_path = tmp_path / "metrics.json"
    argv = ["train", "--epochs", "3", "--hidden", "64", "--lr", "0.01", "--activation", "gelu",
            "--verbose", "0",
            "--backend", "numpy", "--no-augment", "--save", str(checkpoint),
            "--metrics-json", str(metrics_path), "--export-onnx", str(onnx_path)]  # fmt: skip
    assert cli.main(argv) == 0
    assert f"wrote ONNX model {onnx_path}" in capsys.readouterr().out
    # The model carries its standardisation: the file takes the raw 0..16 pixels.
    raw = load_digits(standardize=False)
    assert raw.x_test.max() > 10
    nodes = [node.op_type for node in onnx.load(str(onnx_path)).graph.node]
    assert nodes[:3] == ["Sub", "Div", "Gemm"]
    logits = _run_onnxruntime(onnx_path, np.ascontiguousarray(raw.x_test, dtype=np.float32))
    accuracy = float((logits.argmax(axis=1) == raw.y_test).mean())
    trained = json.loads(metrics_path.read_text())["test_accuracy"]
    assert accuracy > 0.8 and abs(accuracy - trained) <= 1 / len(raw.y_test)
    loaded = gb.load(checkpoint)
    np.testing.assert_allclose(logits, loaded.predict(raw.x_test), rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")  # the same model moved to PyTorch, standardisation too
    with torch.no_grad():
        torch_logits = loaded.to_torch()(torch.from_numpy(raw.x_test.astype(np.float32))).numpy()
    torch_accuracy = float((torch_logits.argmax(axis=1) == raw.y_test).mean())
    assert abs(torch_accuracy - trained) <= 1 / len(raw.y_test)


def test_train_without_onnx_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx raises
    argv = ["train", "--epochs", "50", "--export-onnx", str(tmp_path / "m.onnx")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'gpubackprop[onnx]'" in err and "epoch" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_unplaced_model_exports_as_float32(tmp_path):
    gb.seed(6)
    model = gb.Sequential(gb.Dense(5, 7), gb.SiLU(), gb.Dense(7, 2))  # not placed: float64 weights
    path = tmp_path / "model.onnx"
    gb.export_onnx(model, path)
    x = _inputs(6, np.float32)
    out = _run_onnxruntime(path, x)
    model.to("numpy", dtype="float32")  # what to() makes of the same weights
    np.testing.assert_allclose(out, model.predict(x), rtol=1e-5, atol=2e-6)
