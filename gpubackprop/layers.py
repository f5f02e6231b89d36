"""Layers: Dense, the activations, Residual.

A layer's ``forward(x)`` keeps what its ``backward(dout)`` needs and nothing more;
``backward`` overwrites the gradients of the layer's parameters and returns
∂L/∂x.  Inside a Sequential, a Dense followed by an activation runs as one fused
step (GEMM + bias + activation in one kernel on the GPU); see model.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backends.base import ACTIVATIONS, check_activation
from .checks import check_int
from .parameters import Parameter
from .random import generator

INITS = ("xavier_uniform", "xavier_normal", "he_uniform", "he_normal")


def init_weight(init: str, fan_in: int, fan_out: int, rng: np.random.Generator) -> np.ndarray:
    """Weight (fan_out, fan_in) drawn in float64.

    Xavier/Glorot keeps the variance of activations and gradients: Var = 2/(fan_in + fan_out).
    He/Kaiming compensates ReLU halving the variance: Var = 2/fan_in.
    Uniform draws from U(−a, a) with a = √(3·Var); normal from N(0, Var)."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not supported; expected one of {INITS}")
    variance = 2.0 / (fan_in + fan_out) if init.startswith("xavier") else 2.0 / fan_in
    shape = (fan_out, fan_in)
    if init.endswith("uniform"):
        bound = math.sqrt(3.0 * variance)
        return rng.uniform(-bound, bound, size=shape)
    return rng.normal(0.0, math.sqrt(variance), size=shape)


class Layer:
    """Base class.  ``backend`` is set by Sequential.to()."""

    backend: Any = None

    def parameters(self) -> list[Parameter]:
        return []

    def config(self) -> dict:
        return {"type": type(self).__name__}

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout, need_dinp: bool = True):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer: y = x Wᵀ + b, W of shape (out_features, in_features).

    Same layout and names (``weight``, ``bias``) as torch.nn.Linear.  Biases start at
    zero; ``init`` picks the weight distribution (INITS), drawn from the generator
    that gb.seed() seeds."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, init: str = "he_uniform"
    ):
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.init = init
        self.weight = Parameter(
            "weight", init_weight(init, self.in_features, self.out_features, generator())
        )
        self.bias = Parameter("bias", np.zeros(self.out_features)) if bias else None
        # Set by the Sequential plan when an activation follows (fused epilogue).
        self.activation = "identity"
        self.alpha = 0.0
        self._x = self._saved = None

    def parameters(self) -> list[Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self) -> dict:
        return {
            "type": "Dense",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "init": self.init,
        }

    def forward(self, x):
        """z = x Wᵀ + b and, when fused, y = f(z); keeps x (for ∂L/∂W) and y or z (for f')."""
        bias = self.bias.data if self.bias is not None else None
        y, self._saved = self.backend.dense_forward(
            x, self.weight.data, bias, self.activation, self.alpha
        )
        self._x = x
        return y

    def backward(self, dout, need_dinp: bool = True):
        """δ = dout ⊙ f'(z); ∂L/∂W = δᵀ x; ∂L/∂b = Σ_rows δ; returns ∂L/∂x = δ W."""
        if self._x is None:
            raise RuntimeError("Dense.backward called before forward")
        dbias = self.bias.grad if self.bias is not None else None
        return self.backend.dense_backward(
            dout,
            self._x,
            self.weight.data,
            self._saved,
            self.activation,
            self.alpha,
            self.weight.grad,
            dbias,
            need_dinp,
        )


class Activation(Layer):
    """y = f(x) elementwise; ``kind`` is one of base.ACTIVATIONS."""

    kind = "identity"

    def __init__(self):
        self.alpha = 0.0
        self._saved = None

    def forward(self, x):
        y, self._saved = self.backend.activation_forward(x, self.kind, self.alpha)
        return y

    def backward(self, dout, need_dinp: bool = True):
        return self.backend.activation_backward(dout, self._saved, self.kind, self.alpha)


class Identity(Activation):
    """f(z) = z."""

    kind = "identity"


class ReLU(Activation):
    """f(z) = max(z, 0);  f'(z) = [z > 0]."""

    kind = "relu"


class LeakyReLU(Activation):
    """f(z) = z for z > 0, αz otherwise;  f'(z) = 1 or α."""

    kind = "leaky_relu"

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        if not math.isfinite(alpha):
            raise ValueError(f"alpha={alpha!r} is not accepted; expected a finite number")
        self.alpha = float(alpha)

    def config(self) -> dict:
        return {"type": "LeakyReLU", "alpha": self.alpha}


class Sigmoid(Activation):
    """σ(z) = 1/(1 + e^(−z));  σ' = σ(1 − σ)."""

    kind = "sigmoid"


class Tanh(Activation):
    """tanh(z);  tanh' = 1 − tanh²."""

    kind = "tanh"


class GELU(Activation):
    """z Φ(z) (approximate="none") or ½z(1 + tanh(√(2/π)(z + 0.044715z³))) ("tanh")."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(
                f"approximate={approximate!r} is not supported; expected 'none' or 'tanh'"
            )
        self.approximate = approximate
        self.kind = "gelu" if approximate == "none" else "gelu_tanh"

    def config(self) -> dict:
        return {"type": "GELU", "approximate": self.approximate}


class SiLU(Activation):
    """z σ(z);  derivative σ(z)(1 + z(1 − σ(z)))."""

    kind = "silu"


class Container(Layer):
    """A layer made of other layers, held in ``layers`` in order: Sequential (model.py) and
    Residual.  Code that walks a network (parameter names, exporters) recurses into these."""

    layers: list[Layer]


class Residual(Container):
    """y = x + f(x), f the layers given in order (a sub-network, fused like Sequential's).

    Backward: ∂L/∂x = ∂L/∂y + f'ᵀ ∂L/∂y — the identity path passes the gradient through."""

    def __init__(self, *layers: Layer):
        if not layers:
            raise ValueError("Residual() needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual layer {i} is {layer!r}, not a gpubackprop Layer")
        self.layers = list(layers)
        self.steps: list[Layer] = []

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def config(self) -> dict:
        return {"type": "Residual", "layers": [layer.config() for layer in self.layers]}

    def __repr__(self) -> str:
        return f"Residual({', '.join(repr(layer) for layer in self.layers)})"

    def forward(self, x):
        h = x
        for step in self.steps:
            h = step.forward(h)
        if tuple(h.shape) != tuple(x.shape):
            raise ValueError(
                f"Residual: f(x) has shape {tuple(h.shape)} but x has {tuple(x.shape)}; "
                "y = x + f(x) needs f to keep the shape"
            )
        return self.backend.add(x, h)

    def backward(self, dout, need_dinp: bool = True):
        grad = dout
        for step in reversed(self.steps):
            grad = step.backward(grad, True)
        return self.backend.add(dout, grad)


ACTIVATION_LAYERS: dict[str, type[Activation]] = {
    cls.__name__: cls for cls in (Identity, ReLU, LeakyReLU, Sigmoid, Tanh, GELU, SiLU)
}
LAYER_TYPES: dict[str, type[Layer]] = {"Dense": Dense, "Residual": Residual, **ACTIVATION_LAYERS}
assert {cls.kind for cls in ACTIVATION_LAYERS.values() if cls is not GELU} | {
    "gelu",
    "gelu_tanh",
} == set(ACTIVATIONS)


def activation_layer(kind: str, alpha: float = 0.01) -> Activation:
    """The layer for an activation name of ``ACTIVATIONS`` ("gelu" is GELU's erf form,
    "gelu_tanh" its tanh form); ``alpha`` is LeakyReLU's negative slope."""
    check_activation(kind)
    if kind in ("gelu", "gelu_tanh"):
        return GELU("tanh" if kind == "gelu_tanh" else "none")
    if kind == "leaky_relu":
        return LeakyReLU(alpha)
    return next(cls for cls in ACTIVATION_LAYERS.values() if cls.kind == kind)()


def layer_from_config(config: dict) -> Layer:
    """Build a layer from ``config()`` output; unknown types and keys raise ValueError."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"layer config {config!r} is not a dict with a 'type' key")
    kind = config["type"]
    if kind not in LAYER_TYPES:
        raise ValueError(f"layer type {kind!r} is unknown; expected one of {sorted(LAYER_TYPES)}")
    arguments = {k: v for k, v in config.items() if k != "type"}
    if kind == "Residual":
        return Residual(*(layer_from_config(c) for c in arguments.get("layers", [])))
    try:
        return LAYER_TYPES[kind](**arguments)
    except TypeError as error:
        raise ValueError(f"layer config {config!r} is invalid: {error}") from None


def build_steps(layers: list[Layer], backend) -> list[Layer]:
    """The execution plan: a Dense followed by an activation becomes one fused step
    (the activation runs in the Dense's epilogue and is not run on its own)."""
    steps: list[Layer] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        layer.backend = backend
        if isinstance(layer, Dense):
            following = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(following, Activation):
                following.backend = backend
                layer.activation, layer.alpha = following.kind, following.alpha
                i += 1
            else:
                layer.activation, layer.alpha = "identity", 0.0
        elif isinstance(layer, Residual):
            layer.steps = build_steps(layer.layers, backend)
        steps.append(layer)
        i += 1
    return steps
