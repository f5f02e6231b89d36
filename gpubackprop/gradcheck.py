"""Finite-difference gradient check in float64.

For each checked element θ_k, the central difference
    (L(θ + ε e_k) − L(θ − ε e_k)) / 2ε = ∂L/∂θ_k + O(ε²)
is compared with the gradient backpropagation computed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import to_host
from .losses import Loss, MSELoss
from .model import Sequential


@dataclass
class TensorError:
    name: str
    checked: int  # elements compared
    max_abs_error: float
    max_rel_error: float
    passed: bool


@dataclass
class GradcheckResult:
    tensors: list[TensorError]

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    def __str__(self) -> str:
        lines = [f"{'tensor':<24} {'checked':>8} {'max abs err':>12} {'max rel err':>12}  result"]
        for t in self.tensors:
            lines.append(
                f"{t.name:<24} {t.checked:>8} {t.max_abs_error:>12.3e} "
                f"{t.max_rel_error:>12.3e}  {'ok' if t.passed else 'FAIL'}"
            )
        return "\n".join(lines)


def gradcheck(
    model,
    x,
    y,
    loss: Loss | None = None,
    *,
    backend="numpy",
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    max_elements: int | None = 64,
    seed: int = 0,
) -> GradcheckResult:
    """Check every parameter's gradient and ∂L/∂x of ``model`` against central differences.

    A float64 copy of the model on ``backend`` is checked (the model itself is not
    changed).  ``max_elements`` caps the elements checked per tensor (a random subset);
    None checks all.  Passes when |numeric − analytic| ≤ atol + rtol·|numeric| everywhere."""
    loss = loss if loss is not None else MSELoss()
    checked_model = Sequential.from_config(model.config()).to(backend, "float64")
    checked_model.load_state_dict(model.state_dict())
    back = checked_model.backend
    x64 = np.array(to_host(x), dtype=np.float64)
    y_host = to_host(y)
    target = y_host if y_host.dtype.kind in "iu" else y_host.astype(np.float64)
    loss.backend = back

    def loss_at() -> float:
        return float(loss.forward(checked_model.forward(x64), target))

    loss_at()
    dx = np.array(back.to_numpy(checked_model.backward(loss.backward(), need_input_grad=True)))
    rng = np.random.default_rng(seed)
    results = []
    for p in checked_model.parameters():
        analytic = np.array(back.to_numpy(p.grad)).ravel()
        host = np.array(back.to_numpy(p.data))

        def perturbed_loss(index: int, delta: float, p=p, host=host) -> float:
            changed = host.copy().ravel()
            changed[index] += delta
            p.data[...] = back.asarray(changed.reshape(host.shape), np.float64)
            value = loss_at()
            p.data[...] = back.asarray(host, np.float64)
            return value

        results.append(
            _compare(
                p.name, analytic, perturbed_loss, host.size, eps, atol, rtol, max_elements, rng
            )
        )

    def perturbed_input_loss(index: int, delta: float) -> float:
        changed = x64.copy().ravel()
        changed[index] += delta
        return float(loss.forward(checked_model.forward(changed.reshape(x64.shape)), target))

    results.append(
        _compare(
            "input", dx.ravel(), perturbed_input_loss, x64.size, eps, atol, rtol, max_elements, rng
        )
    )
    return GradcheckResult(results)


def _compare(name, analytic, perturbed_loss, size, eps, atol, rtol, max_elements, rng):
    if max_elements is None or size <= max_elements:
        indices = np.arange(size)
    else:
        indices = rng.choice(size, max_elements, replace=False)
    numeric = np.array(
        [(perturbed_loss(i, eps) - perturbed_loss(i, -eps)) / (2 * eps) for i in indices]
    )
    error = np.abs(numeric - analytic[indices])
    relative = error / np.maximum(np.abs(numeric), 1e-12)
    passed = bool(np.all(error <= atol + rtol * np.abs(numeric)))
    return TensorError(
        name, len(indices), float(error.max(initial=0.0)), float(relative.max(initial=0.0)), passed
    )
