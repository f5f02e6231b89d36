"""The worked two-layer example of the guide this project grew from
(shared/seeds/000_356f68b3f647e505.txt), checked against the library.

z_h = w₁x + b₁, a_h = σ(z_h), z_o = w₂a_h + b₂, ŷ = z_o, L = ½(y − ŷ)², and its boxed results
∂L/∂w₂ = −(y − ŷ)a_h, ∂L/∂w₁ = −(y − ŷ)w₂σ'(z_h)x, ∂L/∂b₂ = −(y − ŷ), ∂L/∂b₁ = −(y − ŷ)w₂σ'(z_h),
and one gradient-descent step w ← w − η ∂L/∂w."""

import math

import numpy as np
import pytest

import gpubackprop as gb


def _scalar_network(w1, b1, w2, b2):
    model = gb.Sequential(gb.Dense(1, 1), gb.Sigmoid(), gb.Dense(1, 1)).to("numpy", "float64")
    model.load_state_dict(
        {
            "0.weight": np.array([[w1]]),
            "0.bias": np.array([b1]),
            "2.weight": np.array([[w2]]),
            "2.bias": np.array([b2]),
        }
    )
    return model


@pytest.mark.parametrize(
    "x,y,w1,b1,w2,b2", [(0.5, 1.0, 0.3, -0.1, 0.8, 0.2), (-1.7, -0.4, -1.2, 0.6, 2.1, -0.3)]
)
def test_boxed_gradients_and_one_descent_step(x, y, w1, b1, w2, b2):
    eta = 0.1
    z_h = w1 * x + b1
    a_h = 1.0 / (1.0 + math.exp(-z_h))
    y_hat = w2 * a_h + b2
    sigma_prime = a_h * (1.0 - a_h)
    boxed = {
        "2.weight": -(y - y_hat) * a_h,
        "0.weight": -(y - y_hat) * w2 * sigma_prime * x,
        "2.bias": -(y - y_hat),
        "0.bias": -(y - y_hat) * w2 * sigma_prime,
    }

    model = _scalar_network(w1, b1, w2, b2)
    # L = ½(y − ŷ)² is ½ · MSELoss(reduction="sum"); its gradient is ½ of MSELoss's.
    mse = gb.MSELoss(reduction="sum")
    pred = model.forward(np.array([[x]]))
    loss = mse.forward(pred, np.array([[y]]))
    assert float(loss) / 2 == pytest.approx(0.5 * (y - y_hat) ** 2, rel=1e-12)
    model.backward(0.5 * mse.backward())
    grads = {p.name: float(p.grad.item()) for p in model.parameters()}
    for name, expected in boxed.items():
        assert grads[name] == pytest.approx(expected, rel=1e-12, abs=1e-15), name

    before = {p.name: float(p.data.item()) for p in model.parameters()}
    gb.SGD(model.parameters(), lr=eta).step()
    for p in model.parameters():
        assert float(p.data.item()) == pytest.approx(
            before[p.name] - eta * boxed[p.name], rel=1e-12
        )


def test_pseudocode_backprop_matches_library_on_a_batch():
    """Section 6's pseudocode (weights stored (in, out), MSE gradient ŷ − y) on a batch."""
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(11, 3)), rng.normal(size=(11, 2))
    weights = {"w1": rng.normal(size=(3, 5)), "w2": rng.normal(size=(5, 2))}
    biases = {"b1": rng.normal(size=5), "b2": rng.normal(size=2)}

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    z1 = X @ weights["w1"] + biases["b1"]
    a1 = sigmoid(z1)
    y_pred = a1 @ weights["w2"] + biases["b2"]
    dL_dy = y_pred - y
    expected = {"2.weight": (a1.T @ dL_dy).T, "2.bias": dL_dy.sum(axis=0)}
    dL_dz1 = (dL_dy @ weights["w2"].T) * sigmoid(z1) * (1 - sigmoid(z1))
    expected.update({"0.weight": (X.T @ dL_dz1).T, "0.bias": dL_dz1.sum(axis=0)})

    model = gb.Sequential(gb.Dense(3, 5), gb.Sigmoid(), gb.Dense(5, 2)).to("numpy", "float64")
    model.load_state_dict(
        {
            "0.weight": weights["w1"].T,
            "0.bias": biases["b1"],
            "2.weight": weights["w2"].T,
            "2.bias": biases["b2"],
        }
    )
    mse = gb.MSELoss(reduction="sum")
    mse.forward(model.forward(X), y)
    model.backward(0.5 * mse.backward())
    for p in model.parameters():
        np.testing.assert_allclose(p.grad, expected[p.name], rtol=1e-12, atol=1e-12)
