"""Layer 1 of the test plan: the NumPy reference against float64 finite differences."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends.base import ACTIVATIONS, SAVES_OUTPUT
from gpubackprop.backends.numpy_backend import NumpyBackend, activation_derivative

backend = NumpyBackend()
ODD_SHAPES = [(1, 1), (7, 3), (33, 5), (4, 129)]


def central_difference(f, x, eps=1e-6):
    """∂f/∂x elementwise for an elementwise f."""
    return (f(x + eps) - f(x - eps)) / (2 * eps)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_activation_derivative_matches_finite_difference(activation, shape):
    rng = np.random.default_rng(hash((activation, shape)) % 2**32)
    z = rng.normal(0, 2, size=shape)
    z[np.abs(z) < 1e-3] = 0.5  # keep away from ReLU's kink, where no derivative exists

    def f(v):
        return backend.activation_forward(v, activation, 0.1)[0]

    y, saved = backend.activation_forward(z, activation, 0.1)
    if activation == "identity":
        assert saved is None
    else:
        assert saved is (y if activation in SAVES_OUTPUT else z)
    dout = rng.normal(size=shape)
    dinp = backend.activation_backward(dout, saved, activation, 0.1)
    np.testing.assert_allclose(dinp, dout * central_difference(f, z), rtol=1e-6, atol=1e-8)


def test_sigmoid_is_stable_for_large_inputs():
    z = np.array([-1000.0, -80.0, 0.0, 80.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, _ = backend.activation_forward(z, "sigmoid")
    np.testing.assert_allclose(y, [0.0, np.exp(-80.0), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)
    z32 = z.astype(np.float32)
    assert backend.activation_forward(z32, "sigmoid")[0].dtype == np.float32


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "gelu", "leaky_relu"])
@pytest.mark.parametrize("batch,n_in,n_out", [(1, 1, 1), (7, 33, 5), (33, 7, 129)])
def test_dense_backward_matches_finite_difference(activation, batch, n_in, n_out):
    rng = np.random.default_rng(batch * 1000 + n_in)
    x = rng.normal(size=(batch, n_in))
    w = rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)
    b = rng.normal(size=n_out)
    dout = rng.normal(size=(batch, n_out))

    def objective(x_, w_, b_):  # L = Σ dout ⊙ y, so ∂L/∂y = dout
        return np.sum(dout * backend.dense_forward(x_, w_, b_, activation, 0.05)[0])

    _, saved = backend.dense_forward(x, w, b, activation, 0.05)
    dweight, dbias = np.full_like(w, np.nan), np.full_like(b, np.nan)
    dx = backend.dense_backward(dout, x, w, saved, activation, 0.05, dweight, dbias, True)
    eps = 1e-6
    for array, analytic in ((x, dx), (w, dweight), (b, dbias)):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            old = array[index]
            array[index] = old + eps
            plus = objective(x, w, b)
            array[index] = old - eps
            minus = objective(x, w, b)
            array[index] = old
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


def _loss_cases(rng, n, c):
    logits = rng.normal(0, 3, size=(n, c))
    labels = rng.integers(0, c, size=n)
    probs = rng.dirichlet(np.ones(c), size=n)
    binary = rng.integers(0, 2, size=(n, c)).astype(float)
    return [
        ("mse_mean", lambda z: backend.mse_loss(z, probs, "mean"), logits),
        ("mse_sum", lambda z: backend.mse_loss(z, probs, "sum"), logits),
        ("ce_labels", lambda z: backend.softmax_cross_entropy(z, labels), logits),
        ("ce_probs", lambda z: backend.softmax_cross_entropy(z, probs), logits),
        ("bce_logits_mean", lambda z: backend.bce_with_logits(z, binary, "mean"), logits),
        ("bce_logits_sum", lambda z: backend.bce_with_logits(z, probs, "sum"), logits),
        ("bce_probs", lambda p: backend.bce(p, probs, "mean"), rng.uniform(0.05, 0.95, (n, c))),
    ]


@pytest.mark.parametrize("n,c", [(1, 1), (7, 3), (33, 10)])
def test_loss_gradients_match_finite_difference(n, c):
    rng = np.random.default_rng(n * 31 + c)
    for name, loss_fn, z in _loss_cases(rng, n, c):
        loss, grad = loss_fn(z)
        assert loss.shape == () and grad.shape == z.shape, name
        numeric = np.zeros_like(z)
        eps = 1e-6
        for index in np.ndindex(z.shape):
            old = z[index]
            z[index] = old + eps
            plus = float(loss_fn(z)[0])
            z[index] = old - eps
            minus = float(loss_fn(z)[0])
            z[index] = old
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5000.0, 5000.0, 0.0]])
    loss, grad = backend.softmax_cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, (0.0 + 10000.0) / 2)
    value, _ = backend.bce_with_logits(np.array([[800.0, -800.0]]), np.array([[0.0, 1.0]]), "sum")
    np.testing.assert_allclose(value, 1600.0)


@pytest.mark.parametrize(
    "activation", ["relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu", "leaky_relu"]
)
def test_whole_model_gradcheck(activation):
    layer = {
        "relu": gb.ReLU,
        "sigmoid": gb.Sigmoid,
        "tanh": gb.Tanh,
        "gelu": gb.GELU,
        "silu": gb.SiLU,
        "leaky_relu": lambda: gb.LeakyReLU(0.2),
        "gelu_tanh": lambda: gb.GELU("tanh"),
    }[activation]
    gb.seed(3)
    model = gb.Sequential(
        gb.Dense(5, 9), layer(), gb.Residual(gb.Dense(9, 9), layer()), gb.Dense(9, 4)
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5))
    result = gb.gradcheck(
        model, x, rng.integers(0, 4, size=6), gb.SoftmaxCrossEntropyLoss(), max_elements=None
    )
    assert result.passed, str(result)
    assert {t.name for t in result.tensors} >= {
        "0.weight",
        "0.bias",
        "2.0.weight",
        "3.bias",
        "input",
    }


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(3, 4), gb.Tanh(), gb.Dense(4, 2))
    original = activation_derivative

    def wrong(name, saved, alpha):
        return original(name, saved, alpha) * 1.01

    monkeypatch.setattr("gpubackprop.backends.numpy_backend.activation_derivative", wrong)
    x = np.random.default_rng(0).normal(size=(5, 3))
    result = gb.gradcheck(model, x, np.zeros((5, 2)), gb.MSELoss())
    assert not result.passed
    assert "FAIL" in str(result)


def test_erf_matches_math_erf_with_and_without_scipy(monkeypatch):
    import math

    from gpubackprop.backends import numpy_backend

    z = np.concatenate([np.linspace(-6, 6, 241), [0.0, 1e-300, -1e-8, 30.0]])
    expected = np.array([math.erf(v) for v in z])
    np.testing.assert_allclose(numpy_backend.erf(z), expected, rtol=1e-15, atol=1e-300)
    monkeypatch.setattr(numpy_backend, "_vectorised_erf", None)
    np.testing.assert_array_equal(numpy_backend.erf(z), expected)
    assert numpy_backend.erf(z.astype(np.float32)).dtype == np.float32
