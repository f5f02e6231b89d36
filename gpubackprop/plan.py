"""The execution plan: the steps ``Sequential.to()`` builds from the user's layers.

The layers describe a model; the plan runs it.  ``build_steps`` walks every container
(a Sequential inside a Sequential is inlined, a Residual becomes a ResidualStep over its own
steps) and turns the layers into steps:

- ``DenseStep``: z = x Wᵀ + b and, when an activation follows the Dense, y = f(z) in the
  same kernel (the GEMM's epilogue); the activation layer gets no step of its own.
- ``ActivationStep``: y = f(x) for an activation that follows no Dense.
- ``ResidualStep``: y = x + g(x), g its own list of steps.
- ``StandardizeStep``: y = (x − mean) / std per feature, mean and std copied to the backend.

A step's ``forward(x)`` keeps what its ``backward(dout)`` needs and nothing more; ``backward``
overwrites the gradients of the parameters it uses and returns ∂L/∂x.  Steps refer to the
layers' Parameter objects (whose ``data`` and ``grad`` are views into the model's FlatStore)
but write nothing into the layers, so a model's layers are the same before and after
``to()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layers import Activation, Container, Dense, Layer, Residual, Standardize
from .parameters import FlatStore, Parameter, _bf16_copy


class Step:
    """One unit of the plan, run on ``backend``."""

    backend: Any

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout, need_dinp: bool = True):
        raise NotImplementedError


@dataclass(eq=False)
class DenseStep(Step):
    """y = f(x Wᵀ + b) in one fused launch; f = ``activation`` ("identity" when the Dense is
    not followed by an activation).

    In precision "bf16" (``bf16_activations``) the activations are stored in bf16 between
    layers: the step holds bf16(x), read by its forward GEMM (x Wᵀ) and its dW GEMM (δᵀx).  It
    takes that copy from ``source``, the step whose output it takes: a DenseStep, whose forward
    epilogue wrote bf16(y) beside the fp32 y (``write_bf16``, set when a bf16 DenseStep takes
    its output), or a ResidualStep, whose add wrote it; it rounds x once per batch where no
    such step precedes (the first layer, after an activation or Standardize step).  The same
    round-to-nearest-even of the same fp32 values as converting x in every GEMM call: the same
    bits, fewer launches (link_bf16_activations sets the links)."""

    backend: Any = field(repr=False)
    weight: Parameter
    bias: Parameter | None
    activation: str = "identity"
    alpha: float = 0.0
    precision: str = "fp32"  # of the GEMMs (gpubackprop/precision.py)
    bf16_activations: bool = False  # build_steps: precision == "bf16"
    source: Step | None = field(default=None, repr=False)
    write_bf16: bool = False
    y_bf16: Any = field(default=None, repr=False)  # bf16(y) of the last forward (write_bf16)
    _x: Any = field(default=None, repr=False)
    _x_bf16: Any = field(default=None, repr=False)
    _y: Any = field(default=None, repr=False)
    _saved: Any = field(default=None, repr=False)

    def _input_bf16(self, x):
        """bf16(x): the source step's copy (a DenseStep's or a ResidualStep's) when x is that
        step's output, else rounded now."""
        source = self.source
        if source is not None and source._y is x and source.y_bf16 is not None:
            return source.y_bf16
        return _bf16_copy(self.backend, x)

    def forward(self, x):
        """Keeps x (for ∂L/∂W) and y or z (for f'); in bf16 also bf16(x), and bf16(y) for the
        next step."""
        bias = self.bias.data if self.bias is not None else None
        x16 = y16 = None
        if self.bf16_activations:
            x16 = self._input_bf16(x)
            if self.write_bf16:
                y16 = self.backend.empty((x.shape[0], self.weight.data.shape[0]), np.uint16)
        y, self._saved = self.backend.dense_forward(
            x,
            self.weight.data,
            bias,
            self.activation,
            self.alpha,
            precision=self.precision,
            weight_bf16=self.weight.bf16,  # the optimizer's bf16 copy (None unless "bf16")
            x_bf16=x16,
            y_bf16=y16,
            params_checked=True,  # the store's own views, checked when it was placed
        )
        self._x, self._x_bf16 = x, x16
        self._y, self.y_bf16 = (y, y16) if y16 is not None else (None, None)
        return y

    def backward(self, dout, need_dinp: bool = True):
        """δ = dout ⊙ f'(z); ∂L/∂W = δᵀ x; ∂L/∂b = Σ_rows δ; returns ∂L/∂x = δ W."""
        if self._x is None:
            raise RuntimeError("backward called before forward")
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
            precision=self.precision,
            weight_bf16=self.weight.bf16,
            x_bf16=self._x_bf16,
            params_checked=True,
        )


@dataclass(eq=False)
class ActivationStep(Step):
    """y = f(x) elementwise, for an activation no Dense precedes."""

    backend: Any = field(repr=False)
    kind: str
    alpha: float = 0.0
    _saved: Any = field(default=None, repr=False)

    def forward(self, x):
        y, self._saved = self.backend.activation_forward(x, self.kind, self.alpha)
        return y

    def backward(self, dout, need_dinp: bool = True):
        return self.backend.activation_backward(dout, self._saved, self.kind, self.alpha)


@dataclass(eq=False)
class ResidualStep(Step):
    """y = x + g(x); ∂L/∂x = ∂L/∂y + g'ᵀ ∂L/∂y (the identity path passes the gradient on).
    ``write_bf16``: also bf16(y) from the same launch, for the bf16 DenseStep after it."""

    backend: Any = field(repr=False)
    steps: list[Step]
    write_bf16: bool = False
    y_bf16: Any = field(default=None, repr=False)
    _y: Any = field(default=None, repr=False)

    def forward(self, x):
        h = x
        for step in self.steps:
            h = step.forward(h)
        if tuple(h.shape) != tuple(x.shape):
            raise ValueError(
                f"Residual: f(x) has shape {tuple(h.shape)} but x has {tuple(x.shape)}; "
                "y = x + f(x) needs f to keep the shape"
            )
        if not self.write_bf16:
            return self.backend.add(x, h)
        self.y_bf16 = self.backend.empty(tuple(x.shape), np.uint16)
        self._y = self.backend.add(x, h, out_bf16=self.y_bf16)
        return self._y

    def backward(self, dout, need_dinp: bool = True):
        grad = dout
        for step in reversed(self.steps):
            grad = step.backward(grad, True)
        return self.backend.add(dout, grad)


@dataclass(eq=False)
class StandardizeStep(Step):
    """y = (x − mean) / std per feature; ∂L/∂x = ∂L/∂y / std.  ``mean`` and ``std`` are
    device copies of the layer's buffers, made when the plan is built."""

    backend: Any = field(repr=False)
    mean: Any = field(repr=False)
    std: Any = field(repr=False)

    def forward(self, x):
        return self.backend.standardize_forward(x, self.mean, self.std)

    def backward(self, dout, need_dinp: bool = True):
        if not need_dinp:
            return None  # nothing below it to pass a gradient to, and no parameters
        return self.backend.standardize_backward(dout, self.std)


@dataclass(eq=False)
class UnsupportedStep(Step):
    """A layer the plan cannot run (a Layer subclass of the user's own).  The model can still
    be placed, saved or exported (the exporters say what they support); running it says why
    it cannot."""

    backend: Any = field(repr=False)
    layer: Layer

    def _refuse(self):
        raise TypeError(
            f"layer {self.layer!r} has no execution step; the plan runs Dense, Standardize, "
            "the activations, Residual and Sequential"
        )

    def forward(self, x):
        self._refuse()

    def backward(self, dout, need_dinp: bool = True):
        self._refuse()


def _inline_containers(layers: list[Layer]) -> list[Layer]:
    """``layers`` with every container that is not a Residual replaced by its own layers,
    recursively: a nested Sequential is the same computation as its layers in its place."""
    flat: list[Layer] = []
    for layer in layers:
        if isinstance(layer, Container) and not isinstance(layer, Residual):
            flat += _inline_containers(layer.layers)
        else:
            flat.append(layer)
    return flat


def build_steps(layers: list[Layer], backend, dtype, precision: str = "fp32") -> list[Step]:
    """The steps for ``layers`` on ``backend`` in ``dtype``: a Dense followed by an activation
    becomes one fused DenseStep; containers are walked at every depth.  Every DenseStep runs
    its GEMMs in ``precision``; in "bf16" each DenseStep that takes another's output takes
    its bf16 copy as well (link_bf16_activations)."""
    steps = _build_steps(layers, backend, dtype, precision)
    if precision == "bf16":
        link_bf16_activations(steps)
    return steps


def _build_steps(layers: list[Layer], backend, dtype, precision: str) -> list[Step]:
    flat = _inline_containers(layers)
    steps: list[Step] = []
    i = 0
    while i < len(flat):
        layer = flat[i]
        if isinstance(layer, Dense):
            following = flat[i + 1] if i + 1 < len(flat) else None
            if isinstance(following, Activation):
                steps.append(
                    DenseStep(
                        backend,
                        layer.weight,
                        layer.bias,
                        following.kind,
                        following.alpha,
                        precision,
                    )
                )
                i += 1
            else:
                steps.append(DenseStep(backend, layer.weight, layer.bias, precision=precision))
        elif isinstance(layer, Activation):
            steps.append(ActivationStep(backend, layer.kind, layer.alpha))
        elif isinstance(layer, Residual):
            steps.append(
                ResidualStep(backend, _build_steps(layer.layers, backend, dtype, precision))
            )
        elif isinstance(layer, Standardize):
            steps.append(
                StandardizeStep(
                    backend, backend.asarray(layer.mean, dtype), backend.asarray(layer.std, dtype)
                )
            )
        else:
            steps.append(UnsupportedStep(backend, layer))
        i += 1
    return steps


def link_bf16_activations(steps: list[Step], before: Step | None = None) -> None:
    """Store activations in bf16 between the steps of a bf16 plan: each DenseStep holds
    bf16(x), and the step whose output it takes (a DenseStep, from its GEMM's epilogue, or a
    ResidualStep, from its add) writes bf16(y) for it: the step before it in its list, or,
    for the first step inside a Residual, the step before the Residual.  ``before``: the step
    whose output ``steps`` take as input."""
    for step in steps:
        if isinstance(step, ResidualStep):
            link_bf16_activations(step.steps, before)  # g(x) starts from the same x
        elif isinstance(step, DenseStep):
            step.bf16_activations = step.precision == "bf16"
            writes = isinstance(before, ResidualStep) or (
                isinstance(before, DenseStep) and before.bf16_activations
            )
            if writes and step.bf16_activations:
                before.write_bf16, step.source = True, before
        before = step


@dataclass(eq=False)
class Plan:
    """A model placed on a backend: its parameters in one FlatStore and its steps."""

    backend: Any
    dtype: np.dtype
    store: FlatStore
    steps: list[Step]
    precision: str = "fp32"

    @classmethod
    def build(
        cls,
        layers: list[Layer],
        parameters: list[Parameter],
        backend,
        dtype,
        precision: str = "fp32",
    ) -> Plan:
        store = FlatStore(backend, dtype, parameters, bf16_copy=precision == "bf16")
        steps = build_steps(layers, backend, dtype, precision)
        return cls(backend, np.dtype(dtype), store, steps, precision)

    def forward(self, h):
        for step in self.steps:
            h = step.forward(h)
        return h

    def backward(self, dout, need_input_grad: bool = True):
        grad = dout
        for i in range(len(self.steps) - 1, -1, -1):
            grad = self.steps[i].backward(grad, need_input_grad or i > 0)
        return grad
