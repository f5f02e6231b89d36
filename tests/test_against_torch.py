"""Layer 2 of the test plan: the NumPy reference against PyTorch autograd and torch.optim."""

import itertools

import numpy as np
import pytest

import gpubackprop as gb

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI installs torch==2.13.0)")

TORCH_ACTIVATIONS = {
    "ReLU": (gb.ReLU, torch.nn.ReLU),
    "LeakyReLU": (lambda: gb.LeakyReLU(0.2), lambda: torch.nn.LeakyReLU(0.2)),
    "Sigmoid": (gb.Sigmoid, torch.nn.Sigmoid),
    "Tanh": (gb.Tanh, torch.nn.Tanh),
    "GELU": (gb.GELU, torch.nn.GELU),
    "GELU_tanh": (lambda: gb.GELU("tanh"), lambda: torch.nn.GELU(approximate="tanh")),
    "SiLU": (gb.SiLU, torch.nn.SiLU),
}


def _twin_models(activation: str, sizes=(13, 33, 7, 5)):
    ours_act, torch_act = TORCH_ACTIVATIONS[activation]
    layers, torch_layers = [], []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(gb.Dense(a, b))
        torch_layers.append(torch.nn.Linear(a, b, dtype=torch.float64))
        if i < len(sizes) - 2:
            layers += [ours_act()]
            torch_layers += [torch_act()]
    ours = gb.Sequential(*layers).to("numpy", "float64")
    theirs = torch.nn.Sequential(*torch_layers)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(ours.state_dict()[name]))
    return ours, theirs


@pytest.mark.parametrize("activation", sorted(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("loss_name", ["ce_labels", "ce_probs", "mse", "bce_logits"])
def test_model_gradients_match_torch_autograd(activation, loss_name):
    gb.seed(11)
    ours, theirs = _twin_models(activation)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 13))
    if loss_name == "ce_labels":
        y = rng.integers(0, 5, size=9)
        loss, torch_loss, ty = (
            gb.SoftmaxCrossEntropyLoss(),
            torch.nn.CrossEntropyLoss(),
            torch.from_numpy(y),
        )
    elif loss_name == "ce_probs":
        y = rng.dirichlet(np.ones(5), size=9)
        loss, torch_loss, ty = (
            gb.SoftmaxCrossEntropyLoss(),
            torch.nn.CrossEntropyLoss(),
            torch.from_numpy(y),
        )
    elif loss_name == "mse":
        y = rng.normal(size=(9, 5))
        loss, torch_loss, ty = gb.MSELoss(), torch.nn.MSELoss(), torch.from_numpy(y)
    else:
        y = rng.integers(0, 2, size=(9, 5)).astype(np.float64)
        loss, torch_loss, ty = (
            gb.BCEWithLogitsLoss(),
            torch.nn.BCEWithLogitsLoss(),
            torch.from_numpy(y),
        )

    value = loss.forward(ours.forward(x), y)
    dx = ours.backward(loss.backward())

    tx = torch.from_numpy(x).requires_grad_(True)
    expected = torch_loss(theirs(tx), ty)
    expected.backward()
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(
            ours.named_parameters()[name].grad, p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name
        )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_losses_match_torch(reduction):
    rng = np.random.default_rng(2)
    be = gb.get_backend("numpy")
    z = rng.normal(0, 4, size=(33, 7))
    t = rng.uniform(size=(33, 7))
    p = rng.uniform(0.0, 1.0, size=(33, 7))
    p[0, 0], p[1, 1] = 0.0, 1.0  # exercise the clamp of log at −100
    for ours, theirs, inp in [
        (be.mse_loss(z, t, reduction), torch.nn.MSELoss(reduction=reduction), z),
        (be.bce_with_logits(z, t, reduction), torch.nn.BCEWithLogitsLoss(reduction=reduction), z),
        (be.bce(p, t, reduction), torch.nn.BCELoss(reduction=reduction), p),
    ]:
        tz = torch.from_numpy(inp).requires_grad_(True)
        value = theirs(tz, torch.from_numpy(t))
        value.backward()
        np.testing.assert_allclose(ours[0], value.item(), rtol=1e-12)
        np.testing.assert_allclose(ours[1], tz.grad.numpy(), rtol=1e-8, atol=1e-12)


OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.02, "weight_decay": 0.3}),
]


@pytest.mark.parametrize("name,hyper", OPTIMIZERS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_optimizer_steps_match_torch_optim(name, hyper, dtype):
    gb.seed(4)
    ours, theirs = _twin_models("Tanh", sizes=(6, 7, 3))
    ours.to("numpy", dtype)
    theirs.to(getattr(torch, dtype))
    opt = getattr(gb, name)(ours.parameters(), **hyper)
    torch_opt = getattr(torch.optim, name)(theirs.parameters(), **hyper)
    rng = np.random.default_rng(9)
    named = ours.named_parameters()
    for _ in range(5):
        for tname, p in theirs.named_parameters():
            grad = rng.normal(size=p.shape).astype(dtype)
            named[tname].grad[...] = grad
            p.grad = torch.from_numpy(grad.copy())
        opt.step()
        torch_opt.step()
    tol = 1e-12 if dtype == "float64" else 2e-6
    for tname, p in theirs.named_parameters():
        np.testing.assert_allclose(
            named[tname].data,
            p.detach().numpy(),
            rtol=tol,
            atol=tol,
            err_msg=f"{name} {hyper} {tname}",
        )


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    gb.seed(1)
    ours, theirs = _twin_models("ReLU", sizes=(4, 9, 3))
    rng = np.random.default_rng(3)
    named = ours.named_parameters()
    for tname, p in theirs.named_parameters():
        grad = rng.normal(size=p.shape)
        named[tname].grad[...] = grad
        p.grad = torch.from_numpy(grad.copy())
    total = gb.clip_grad_norm(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert total == pytest.approx(expected.item(), rel=1e-12)
    for tname, p in theirs.named_parameters():
        np.testing.assert_allclose(named[tname].grad, p.grad.numpy(), rtol=1e-12)


def test_weights_move_both_ways_with_torch_linear_layout():
    gb.seed(2)
    ours, theirs = _twin_models("ReLU")
    x = np.random.default_rng(0).normal(size=(4, 13))
    np.testing.assert_allclose(
        ours.predict(x), theirs(torch.from_numpy(x)).detach().numpy(), rtol=1e-12
    )
    assert set(ours.state_dict()) == set(dict(theirs.named_parameters()))
