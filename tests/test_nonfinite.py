"""NaN and ±Inf: what every backend gives for them (docs/derivation.md, "NaN and infinity").

The op table's NaN/Inf cases (tests/test_parity.py) hold every kernel to the NumPy reference;
here the reference itself is held to PyTorch's choices, and a NaN in the training data must stop
``fit`` with the same error on every backend instead of training on silently.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends.base import ACTIVATIONS, SAVES_OUTPUT
from gpubackprop.backends.numpy_backend import NumpyBackend

SPECIAL = np.array([np.nan, np.inf, -np.inf, -1.5, 0.0, 2.0])
DOUT = np.array([1.0, np.inf, -np.inf, np.nan, 0.5, -2.0])


def _torch_activation(torch, name: str, alpha: float):
    F = torch.nn.functional
    return {
        "identity": lambda x: x,
        "relu": torch.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, alpha),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
    }[name]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_reference_gives_pytorchs_values_and_gradients_at_nan_and_inf(activation):
    torch = pytest.importorskip("torch")
    alpha = 0.1
    backend = NumpyBackend()
    for dout in (np.ones_like(SPECIAL), DOUT):
        z = torch.tensor(SPECIAL, requires_grad=True)
        y = _torch_activation(torch, activation, alpha)(z)
        (grad,) = torch.autograd.grad(y, z, torch.tensor(dout))
        with np.errstate(all="ignore"):  # ∞·0 and ∞ − ∞ are NaN, as intended
            ours, saved = backend.activation_forward(SPECIAL.copy(), activation, alpha)
            dinp = backend.activation_backward(dout, saved, activation, alpha)
        # NaN where torch has NaN, the same infinities, finite values to float64 rounding
        np.testing.assert_allclose(ours, y.detach().numpy(), rtol=1e-12, err_msg=activation)
        np.testing.assert_allclose(dinp, grad.numpy(), rtol=1e-12, err_msg=f"{activation}'")


def test_relu_passes_the_gradient_at_nan_and_stops_it_below_zero():
    """The choice written down in docs/derivation.md, on its own: y = NaN passes ∂L/∂y, y = 0
    gives 0 even for an infinite ∂L/∂y (a selection, not 0·∞)."""
    backend = NumpyBackend()
    y, saved = backend.activation_forward(np.array([np.nan, -np.inf, -1.0]), "relu")
    assert np.isnan(y[0]) and list(y[1:]) == [0.0, 0.0]
    assert "relu" in SAVES_OUTPUT
    dinp = backend.activation_backward(np.array([3.0, np.inf, -np.inf]), saved, "relu")
    assert list(dinp) == [3.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_fit_on_data_with_one_nan_stops_with_the_nan_loss_error(backend):
    """One NaN feature in a ReLU network: forward carries it to the loss, so fit stops at the
    first batch on every backend (the kernels used to turn relu(NaN) into 0 and train on)."""
    if not gb.available_backends()[backend][0]:
        pytest.skip(f"{backend}: {gb.available_backends()[backend][1]}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6))
    x[5, 2] = np.nan
    y = rng.integers(0, 3, size=32)
    gb.seed(0)
    model = gb.Sequential(gb.Dense(6, 8), gb.ReLU(), gb.Dense(8, 3)).to(backend, "float32")
    opt = gb.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"the loss is nan"):
        model.fit(x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=opt, epochs=2, batch_size=32)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_a_nan_row_stays_nan_through_every_activation_of_a_dense_layer(backend):
    if not gb.available_backends()[backend][0]:
        pytest.skip(f"{backend}: {gb.available_backends()[backend][1]}")
    b = gb.get_backend(backend)
    x = np.ones((3, 4))
    x[1, 2] = np.nan
    w = np.full((5, 4), 0.25)
    for activation in ACTIVATIONS:
        y, _ = b.dense_forward(b.asarray(x, np.float32), b.asarray(w, np.float32), None, activation)
        y = b.to_numpy(y)
        assert np.all(np.isnan(y[1])), (activation, y[1])
        assert np.all(np.isfinite(y[[0, 2]])), activation
