"""PyTorch modules both ways (issue 16, part 2): ``model.to_torch()`` and ``gb.from_torch``.

On random float64 inputs the outputs, ∂L/∂x and every parameter's gradient agree with PyTorch
autograd to 1e-12 in both directions, for every activation (with its parameter) and residual
blocks; a model trained here keeps its test accuracy in PyTorch."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends import available_backends

torch = pytest.importorskip("torch")
from gpubackprop import torch_interop  # noqa: E402  (imports torch)

RTOL, ATOL = 1e-12, 1e-13


def _every_activation_model() -> gb.Sequential:
    return gb.Sequential(
        gb.Dense(7, 12), gb.LeakyReLU(0.23),
        gb.Residual(gb.Dense(12, 12), gb.GELU()),
        gb.Residual(gb.Dense(12, 12, bias=False), gb.GELU(approximate="tanh"), gb.Dense(12, 12)),
        gb.Sequential(gb.Dense(12, 11), gb.SiLU(), gb.Sequential(gb.Dense(11, 10), gb.Sigmoid())),
        gb.Dense(10, 9), gb.Tanh(),
        gb.Dense(9, 8), gb.ReLU(),
        gb.Identity(),
        gb.Dense(8, 5),
    )  # fmt: skip


def _backend(name):
    ok, reason = available_backends()[name]
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")
    return name


def _gb_pass(model, x, dout):
    out = np.array(model.backend.to_numpy(model.forward(x)))
    dx = np.array(model.backend.to_numpy(model.backward(dout)))
    grads = [np.array(model.backend.to_numpy(p.grad)) for p in model.parameters()]
    return out, dx, grads


def _torch_pass(module, x, dout):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    module.zero_grad()
    out = module(xt)
    out.backward(torch.from_numpy(dout))
    return out.detach().numpy(), xt.grad.numpy(), [p.grad.numpy() for p in module.parameters()]


def _assert_same_pass(ours, theirs):
    for what, a, b in zip(("output", "dL/dx"), ours[:2], theirs[:2]):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=what)
    assert len(ours[2]) == len(theirs[2])
    for i, (a, b) in enumerate(zip(ours[2], theirs[2])):
        assert a.shape == b.shape, i
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"parameter {i}")


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_to_torch_same_function_and_gradients(backend):
    gb.seed(5)
    model = _every_activation_model().to(_backend(backend), dtype="float64")
    module = model.to_torch()
    assert isinstance(module, torch.nn.Sequential)
    assert isinstance(module[1], torch.nn.LeakyReLU) and module[1].negative_slope == 0.23
    assert isinstance(module[2], torch_interop.Residual) and module[2][1].approximate == "none"
    assert module[3][1].approximate == "tanh" and module[3][0].bias is None
    assert all(p.dtype == torch.float64 for p in module.parameters())
    # Parameter names agree, so state dicts move both ways as they are.
    assert [name for name, _ in module.named_parameters()] == [p.name for p in model.parameters()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 7)) * 2
    dout = rng.normal(size=(13, 5))
    _assert_same_pass(_gb_pass(model, x, dout), _torch_pass(module, x, dout))


def test_from_torch_same_function_and_gradients():
    torch.manual_seed(0)
    nn = torch.nn
    module = nn.Sequential(
        nn.Linear(6, 10), nn.GELU(approximate="tanh"),
        torch_interop.Residual(nn.Linear(10, 10), nn.LeakyReLU(0.07), nn.Linear(10, 10)),
        nn.Sequential(nn.Linear(10, 9, bias=False), nn.SiLU(), nn.Sequential(nn.Tanh())),
        nn.Linear(9, 8), nn.GELU(), nn.Identity(),
        nn.Linear(8, 7), nn.Sigmoid(), nn.Linear(7, 4), nn.ReLU(inplace=True), nn.Linear(4, 3),
    ).double()  # fmt: skip
    model = gb.from_torch(module, backend="numpy")
    assert model.dtype == np.float64  # the module's own dtype
    types = [type(layer).__name__ for layer in model.layers]
    assert types[:5] == ["Dense", "GELU", "Residual", "Sequential", "Dense"]
    assert model.layers[1].approximate == "tanh" and model.layers[2].layers[1].alpha == 0.07
    assert [type(layer).__name__ for layer in model.layers[3].layers] == [
        "Dense",
        "SiLU",
        "Sequential",
    ]
    assert [p.name for p in model.parameters()] == [name for name, _ in module.named_parameters()]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 6)) * 2
    dout = rng.normal(size=(11, 3))
    _assert_same_pass(_gb_pass(model, x, dout), _torch_pass(module, x, dout))


def test_round_trip_keeps_weights_bit_for_bit_and_state_dicts_move():
    gb.seed(2)
    model = _every_activation_model().to("numpy", dtype="float32")
    module = model.to_torch()
    assert all(p.dtype == torch.float32 for p in module.parameters())
    back = gb.from_torch(module)
    assert back.dtype == np.float32
    assert back.config() == {
        **model.config(),
        "layers": [
            {**c, "init": "he_uniform"} if c["type"] == "Dense" else c
            for c in model.config()["layers"]
        ],
    }
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)
    # A torch state dict (tensors) loads into the model by name.
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(-3)
    model.load_state_dict(module.state_dict())
    x = np.random.default_rng(3).normal(size=(4, 7)).astype(np.float32)
    np.testing.assert_allclose(
        model.predict(x), module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )


def test_unsupported_modules_are_refused_by_name():
    nn = torch.nn
    with pytest.raises(TypeError, match=r"module '1' is torch\.nn\.modules\.dropout\.Dropout"):
        gb.from_torch(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1)))
    with pytest.raises(TypeError, match=r"module '2\.0' is .*BatchNorm1d.*supported: Linear"):
        gb.from_torch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.BatchNorm1d(4))))

    class ScaledLinear(nn.Linear):  # another forward behind Linear's parameters
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"module '0' is .*ScaledLinear"):
        gb.from_torch(nn.Sequential(ScaledLinear(3, 4)))
    with pytest.raises(TypeError, match=r"module is torch\.nn\.modules\.linear\.Linear; expected"):
        gb.from_torch(nn.Linear(3, 4))
    with pytest.raises(
        TypeError, match=r"module is gpubackprop\.torch_interop\.Residual; expected"
    ):
        gb.from_torch(torch_interop.Residual(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match=r"module '1' is .*ScaledSequential"):

        class ScaledSequential(nn.Sequential):
            def forward(self, x):
                return 2 * super().forward(x)

        gb.from_torch(nn.Sequential(nn.Linear(3, 3), ScaledSequential(nn.ReLU())))
    with pytest.raises(TypeError, match="expected a gpubackprop Sequential"):
        torch_interop.to_torch(gb.Dense(3, 4))


def test_trained_model_keeps_its_test_accuracy_in_torch():
    from gpubackprop.data import load_digits

    gb.seed(0)
    data = load_digits()
    model = gb.Sequential(
        gb.Dense(64, 64), gb.GELU(), gb.Residual(gb.Dense(64, 64), gb.LeakyReLU(0.1)),
        gb.Dense(64, 10),
    ).to("numpy", dtype="float32")  # fmt: skip
    loss = gb.SoftmaxCrossEntropyLoss()
    model.fit(data.x_train, data.y_train, loss=loss, optimizer=gb.Adam(model.parameters(), lr=3e-3),
              epochs=4, batch_size=64, verbose=0)  # fmt: skip
    accuracy = model.evaluate(data.x_test, data.y_test, loss)["accuracy"]
    assert accuracy > 0.9  # it did train
    module = model.to_torch().eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(np.ascontiguousarray(data.x_test, dtype=np.float32)))
    torch_accuracy = float((logits.argmax(dim=1).numpy() == data.y_test).mean())
    # float32 sums in another order can only flip a prediction whose two top logits tie to ~1e-6.
    assert abs(torch_accuracy - accuracy) <= 1 / len(data.y_test)
    np.testing.assert_allclose(logits.numpy(), model.predict(data.x_test), rtol=1e-4, atol=1e-4)


def test_without_torch_the_error_says_what_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "gpubackprop.torch_interop")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(ImportError, match=r"to_torch needs PyTorch \(pip install torch\)"):
        gb.Sequential(gb.Dense(2, 2)).to_torch()
    with pytest.raises(ImportError, match=r"gb\.from_torch needs PyTorch \(pip install torch\)"):
        gb.from_torch(object())
