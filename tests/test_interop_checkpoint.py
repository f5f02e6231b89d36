"""A checkpoint read with the safetensors package alone (issue 16, part 4), and the examples of
docs/interop.md.

The README's snippet runs as written, with gpubackprop unimportable, on a checkpoint that
gb.save wrote (model and optimizer state); what it reads is the model's config and weights, and a
forward pass written from those alone in NumPy gives model.predict's outputs."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import gpubackprop as gb

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _readme_snippet() -> str:
    """The README's lines that read a checkpoint with safetensors: its import, and the with
    statement and its body, as written."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    lines = next(block for block in blocks if "safe_open(" in block).splitlines()
    imports = [line for line in lines if line.startswith("from safetensors import")]
    start = next(i for i, line in enumerate(lines) if line.startswith("with safe_open("))
    body = lines[start : start + 2]  # the with statement and its one-line body
    assert len(imports) == 1 and body[1].startswith("    "), "README.md: the safetensors snippet"
    return "\n".join([*imports, *body]) + "\n"


def _forward_from_file(config: dict, weights: dict, x: np.ndarray) -> np.ndarray:
    """What a reader without gpubackprop writes from the config and the tensors."""

    def run(layers, prefix, h):
        for i, layer in enumerate(layers):
            name = f"{prefix}{i}"
            kind = layer["type"]
            if kind == "Dense":
                h = h @ weights[f"{name}.weight"].T
                if layer["bias"]:
                    h = h + weights[f"{name}.bias"]
            elif kind == "Residual":
                h = h + run(layer["layers"], f"{name}.", h)
            elif kind == "ReLU":
                h = np.maximum(h, 0)
            elif kind == "Tanh":
                h = np.tanh(h)
            elif kind == "GELU":  # the erf form
                h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
            else:
                raise AssertionError(f"the test model has no {kind}")
        return h

    return run(config["layers"], "", x)


def test_readme_snippet_reads_a_checkpoint_without_gpubackprop(tmp_path, monkeypatch):
    gb.seed(8)
    model = gb.Sequential(
        gb.Dense(64, 32), gb.ReLU(), gb.Residual(gb.Dense(32, 32), gb.GELU()),
        gb.Dense(32, 16, bias=False), gb.Tanh(), gb.Dense(16, 10),
    ).to("numpy", dtype="float64")  # fmt: skip
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    x = np.random.default_rng(0).normal(size=(20, 64))
    model.fit(x, np.arange(20) % 10, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=optimizer,
              epochs=1, verbose=0)  # fmt: skip
    gb.save(tmp_path / "digits.safetensors", model, optimizer)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gpubackprop", None)  # `import gpubackprop` now fails
    namespace: dict = {}
    exec(compile(_readme_snippet(), "README.md", "exec"), namespace)
    monkeypatch.undo()

    config = json.loads(namespace["config"])
    tensors = namespace["tensors"]
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    assert set(tensors) - {f"model.{k}" for k in weights} == {
        f"optimizer.{buffer}.{name}" for buffer in ("exp_avg", "exp_avg_sq") for name in weights
    }  # the rest is the optimizer's state
    assert config == model.config()
    state = model.state_dict()
    assert weights.keys() == state.keys()
    for name, value in state.items():
        assert weights[name].dtype == np.float64
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    np.testing.assert_allclose(
        _forward_from_file(config, weights, x), model.predict(x), rtol=1e-12, atol=1e-12
    )


def test_interop_page_examples_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("torch")  # the page's examples use both (installed by the dev extra)
    pytest.importorskip("onnxruntime")
    page = (ROOT / "docs" / "interop.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/interop.md, example {i + 1}", "exec"), namespace)
    model, x = namespace["model"], namespace["x"]
    expected = model.predict(x)
    np.testing.assert_array_equal(namespace["logits"].numpy(), expected)  # torch.from_dlpack
    back = namespace["back"]
    np.testing.assert_allclose(back.predict(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(namespace["onnx_logits"], expected, rtol=1e-5, atol=1e-6)
    assert namespace["config"] == model.config()
    assert namespace["weights"].keys() == model.state_dict().keys()
