"""Layers: Dense, Standardize, the activations, and the containers (Residual; Sequential
in model.py).

Layers describe the model: parameters, buffers, config.  They do not run: ``Sequential.to()``
builds the execution plan (plan.py) from them, in which a Dense followed by an activation is
one fused step (GEMM + bias + activation in one kernel on the GPU).
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
    """Base class.  A layer describes a part of the model: its parameters (trainable), its
    buffers (saved with the model, never trained) and its config.  It holds no backend and no
    activations: ``Sequential.to()`` builds the execution plan (plan.py) from the layers and
    leaves them as the user built them."""

    def named_parameters(self) -> dict[str, Parameter]:
        """{local name: Parameter} ("weight", "bias"; "0.weight" inside a container)."""
        return {}

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters().values())

    def named_buffers(self) -> dict[str, np.ndarray]:
        """{local name: float64 host array} of the non-trainable tensors a checkpoint keeps."""
        return {}

    def config(self) -> dict:
        return {"type": type(self).__name__}

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        """The layer a ``config()`` describes, with fresh parameters."""
        arguments = {k: v for k, v in config.items() if k != "type"}
        try:
            return cls(**arguments)
        except TypeError as error:
            raise ValueError(f"layer config {config!r:.200} is invalid: {error}") from None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer: y = x Wᵀ + b, W of shape (out_features, in_features).

    Same layout and names (``weight``, ``bias``) as torch.nn.Linear.  Biases start at
    zero; ``init`` picks the weight distribution (INITS), drawn from the generator
    that gb.seed() seeds.  Inside a Sequential, a Dense followed by an activation runs
    as one fused step (GEMM + bias + activation in one kernel)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, init: str = "he_uniform"
    ):
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"bias={bias!r} is not accepted; expected True or False")
        self.init = init
        self.weight = Parameter(
            "weight", init_weight(init, self.in_features, self.out_features, generator())
        )
        self.bias = Parameter("bias", np.zeros(self.out_features)) if bool(bias) else None

    @property
    def weight_bf16(self) -> Any:
        """bf16(weight) as uint16 bits, shape (out_features, in_features): a view into the flat
        bf16 copy a model placed with precision="bf16" keeps (parameters.py), which the bf16
        GEMMs read; None otherwise."""
        return self.weight.bf16

    def named_parameters(self) -> dict[str, Parameter]:
        return {"weight": self.weight, **({"bias": self.bias} if self.bias is not None else {})}

    def config(self) -> dict:
        return {
            "type": "Dense",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "init": self.init,
        }


class Standardize(Layer):
    """Input preprocessing as part of the model: y = (x − mean) / std per feature.

    ``mean`` and ``std`` (one value per feature, std > 0) are buffers: saved in the checkpoint
    with the weights, never updated by an optimizer.  Backward: ∂L/∂x = ∂L/∂y / std.
    The config records the width only (``features``); the values travel as tensors, as a
    Dense layer's weights do."""

    def __init__(self, mean: Any, std: Any):
        self.mean = _feature_vector("mean", mean)
        self.std = _feature_vector("std", std)
        if self.std.shape != self.mean.shape:
            raise ValueError(
                f"std has {self.std.size} values but mean has {self.mean.size}; "
                "expected one of each per feature"
            )
        if not np.all(self.std > 0):
            bad = float(self.std[~(self.std > 0)][0])
            raise ValueError(
                f"std holds {bad!r}; expected every std > 0 (map a constant feature with std 1)"
            )

    @property
    def features(self) -> int:
        return int(self.mean.size)

    in_features = out_features = features

    def named_buffers(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "std": self.std}

    def config(self) -> dict:
        return {"type": "Standardize", "features": self.features}

    @classmethod
    def from_config(cls, config: dict) -> Standardize:
        """An identity Standardize (mean 0, std 1) of ``features`` values; the saved mean and
        std are loaded as tensors (load_state_dict, gb.load)."""
        unknown = sorted(set(config) - {"type", "features"})
        if unknown or "features" not in config:
            raise ValueError(
                f"layer config {config!r:.200} is invalid: Standardize takes 'features' only"
            )
        features = check_int("features", config["features"])
        return cls(np.zeros(features), np.ones(features))

    def __repr__(self) -> str:
        return f"Standardize(features={self.features})"


def _feature_vector(name: str, value: Any) -> np.ndarray:
    """``value`` as a fresh 1-D float64 array of finite numbers, or ValueError naming it."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r:.80} is not accepted; expected numbers") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} has shape {array.shape}; expected one value per feature, shape (features,)"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values; expected finite numbers")
    return array


class Activation(Layer):
    """y = f(x) elementwise; ``kind`` is one of base.ACTIVATIONS."""

    kind = "identity"

    def __init__(self):
        self.alpha = 0.0


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
    """Layers in order (Residual, Sequential): their parameters and buffers are named by
    position, "<index>.<name>", recursively ("2.0.weight")."""

    def __init__(self, *layers: Layer):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"{type(self).__name__} layer {i} is {layer!r}, not a gpubackprop Layer"
                )
        self.layers = list(layers)
        self.widths = chain_widths(self.layers, type(self).__name__)

    def named_parameters(self) -> dict[str, Parameter]:
        return {
            f"{i}.{name}": p
            for i, layer in enumerate(self.layers)
            for name, p in layer.named_parameters().items()
        }

    def named_buffers(self) -> dict[str, np.ndarray]:
        return {
            f"{i}.{name}": b
            for i, layer in enumerate(self.layers)
            for name, b in layer.named_buffers().items()
        }

    def config(self) -> dict:
        return {"type": type(self).__name__, "layers": [layer.config() for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict, depth: int = 0) -> Container:
        unknown = sorted(set(config) - {"type", "layers"})
        layers = config.get("layers", [])
        if unknown or not isinstance(layers, list):
            raise ValueError(
                f"layer config {config!r:.200} is invalid: {cls.__name__} takes a list "
                "'layers' only"
            )
        return cls(*(layer_from_config(c, depth + 1) for c in layers))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(layer) for layer in self.layers)})"


def layer_widths(layer: Layer) -> tuple[int | None, int | None]:
    """(input width, output width) of a layer; None where the layer takes any width (an
    activation) or passes it through."""
    if isinstance(layer, Container):
        return layer.widths
    return getattr(layer, "in_features", None), getattr(layer, "out_features", None)


def _one_line(layer: Layer) -> str:
    return " ".join(repr(layer).split())


def chain_widths(layers: list[Layer], owner: str) -> tuple[int | None, int | None]:
    """(input width, output width) of ``layers`` applied in order.  Raises ValueError, naming
    both layers, where a layer takes another width than the layer before it gives, so that the
    mistake shows when the model is built, not as a shape error in the first forward pass."""
    first_in: int | None = None
    width: int | None = None
    source: tuple[int, Layer] | None = None
    for i, layer in enumerate(layers):
        takes, gives = layer_widths(layer)
        if takes is not None:
            if source is not None and takes != width:
                j, before = source
                raise ValueError(
                    f"{owner}: layer {i}, {_one_line(layer)}, takes {takes} features but layer "
                    f"{j} before it, {_one_line(before)}, gives {width}; make the widths agree"
                )
            if source is None and first_in is None:
                first_in = takes
        if gives is not None:
            width, source = gives, (i, layer)
    return first_in, width


class Residual(Container):
    """y = x + f(x), f the layers given in order (a sub-network, fused like Sequential's).

    Backward: ∂L/∂x = ∂L/∂y + f'ᵀ ∂L/∂y — the identity path passes the gradient through."""

    def __init__(self, *layers: Layer):
        if not layers:
            raise ValueError("Residual() needs at least one layer")
        super().__init__(*layers)
        takes, gives = self.widths
        if takes is not None and gives is not None and takes != gives:
            raise ValueError(
                f"Residual: f maps {takes} features to {gives}; y = x + f(x) needs f to keep "
                "the width"
            )
        width = takes if takes is not None else gives
        self.widths = (width, width)


ACTIVATION_LAYERS: dict[str, type[Activation]] = {
    cls.__name__: cls for cls in (Identity, ReLU, LeakyReLU, Sigmoid, Tanh, GELU, SiLU)
}
# Every layer type a config may name; model.py adds "Sequential".
LAYER_TYPES: dict[str, type[Layer]] = {
    "Dense": Dense,
    "Standardize": Standardize,
    "Residual": Residual,
    **ACTIVATION_LAYERS,
}
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


# Deeper configs are refused with a ValueError (a hostile file must not hit the recursion limit).
MAX_CONFIG_DEPTH = 64


def layer_from_config(config: dict, depth: int = 0) -> Layer:
    """Build a layer from ``config()`` output (fresh parameters); unknown types and keys, and
    containers nested deeper than MAX_CONFIG_DEPTH, raise ValueError."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"layer config {config!r:.200} is not a dict with a 'type' key")
    kind = config["type"]
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        raise ValueError(f"layer type {kind!r} is unknown; expected one of {sorted(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    if issubclass(cls, Container):
        if depth >= MAX_CONFIG_DEPTH:
            raise ValueError(
                f"the model config nests containers deeper than {MAX_CONFIG_DEPTH} levels"
            )
        return cls.from_config(config, depth)
    return cls.from_config(config)


def init_for_activation(activation: str) -> str:
    """The weight init for a Dense followed by ``activation``: He for ReLU-like activations
    (they zero about half the inputs, so Var(W) = 2/fan_in keeps the activations' variance),
    Xavier for the saturating and linear ones (derivative about 1 near 0)."""
    check_activation(activation)
    if activation in ("sigmoid", "tanh", "identity"):
        return "xavier_uniform"
    return "he_uniform"
