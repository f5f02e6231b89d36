"""The op table: one description of each op of the backend contract.

Like llm.c's dev/cuda files (reference, versions, validate, benchmark), each ``Op`` says once:

- ``build``: its inputs for a shape and a variant (float64 host arrays, integer labels), random
  and of odd sizes; with ``nonfinite=True`` a NaN, a +Inf and a −Inf are written into the
  inputs named in ``Op.nonfinite`` (docs/derivation.md says what every op gives for them);
- ``run``: how to call it on any backend; run on the NumPy backend in float64 it is the
  reference every kernel is checked against;
- its tolerance: the dtype's entry of TOLERANCES times ``growth(shape)`` (how rounding error
  grows with the length of the sums the op computes);
- ``cost``: its FLOPs and bytes moved, for the benchmark's floors;
- ``cases``: the variants and shapes the parity suite runs.

Readers: ``gpubackprop.parity`` (tests/test_parity.py, ``gpubackprop parity``,
bench/run_all_kernels.py) turns every entry into parity cases; ``gpubackprop.benchmarks``
takes the tolerance, the reference and the cost of its rows from here.  Adding an op is a NumPy
reference, a kernel in kernels/, a launcher, and one entry in OPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import ACTIVATIONS, STEP_LR, STEP_SCALARS, STEP_T
from .backends.numpy_backend import NumpyBackend

__all__ = [
    "OPS",
    "TOLERANCES",
    "Op",
    "Tolerance",
    "tolerance",
]

Shape = tuple[int, ...]
Variant = dict[str, Any]


@dataclass(frozen=True)
class Tolerance:
    """How close a result must be to the float64 NumPy reference.

    ``rtol``: per element, |out − ref| ≤ rtol·g·(max|ref| + |ref|), g the op's growth factor
    (the parity suite).  ``normwise``: max|out − ref| / max|ref| over a tensor (the benchmark's
    check, on shapes too large for growth factors to stay meaningful).  ``train``: the per
    element rtol after 20 training steps of a small model (the whole-model parity rows)."""

    rtol: float
    normwise: float
    train: float
    reason: str
    # A tensor-core precision's rtol for a case whose kernel rounds an operand it computed
    # itself (Op.computes_operand); None where no such rounding happens.
    tie_rtol: float | None = None


# (dtype, precision) -> tolerance.  "fp32" is full precision in the dtype (float32 or float64
# arithmetic throughout); reduced-precision GEMMs ("tf32", "bf16") add their own entries.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "fp32"): Tolerance(
        rtol=2e-5,
        normwise=1e-4,
        train=1e-3,
        reason=(
            "float32 rounds each operation to 2^-24 ≈ 6e-8 relative, CUDA's expf/tanhf/erff "
            "(and -ftz) are within a few ulp: 2e-5 is ~300 ulp, room for a handful of roundings "
            "per element while a wrong index or a missed term (errors of order 1) fails; sums of "
            "k terms add √k·ulp, which the op's growth factor covers.  The benchmark's "
            "normwise 1e-4 covers k up to 4096 and 10^6-element reductions without a factor. "
            "Twenty SGD steps compound the rounding of every step: 1e-3."
        ),
    ),
    # The tensor-core precisions are judged against the NumPy model of the precision
    # (gpubackprop/precision.py), not against float64: the operands rounded the same way.
    ("float32", "tf32"): Tolerance(
        rtol=2e-5,
        normwise=1e-4,
        train=1e-3,
        tie_rtol=2.0**-11 / 4,
        reason=(
            "against the NumPy model of TF32 (operands rounded to nearest even, fp32 sums): "
            "the rounded operands are the same and their products exact in fp32 (11 + 11 "
            "significant bits), so only the summation order and the fp32 epilogue differ, as "
            "in fp32: the same rtol, which an unrounded GEMM fails (tests/test_ops.py).  "
            "tie_rtol: an operand the kernel computes itself (δ = dout·f′(z) of a smooth f, "
            "with CUDA's expf/erff) can differ from NumPy's by an fp32 ulp and round to the "
            "neighbouring TF32 value: one term off by u|δx|, u = 2^-11; u/4 with the op's √K "
            "growth covers such a tie while a wrong index or a missing term still fails."
        ),
    ),
    ("float32", "bf16"): Tolerance(
        rtol=2e-5,
        normwise=1e-3,
        train=1e-2,
        tie_rtol=2.0**-8 / 4,
        reason=(
            "as for TF32 (bf16 products are exact in fp32 too: 8 + 8 significant bits), with "
            "bf16's unit roundoff u = 2^-8 in tie_rtol = u/4; the normwise and training "
            "entries scale fp32's by about the ratio of the formats' roundoff, where the "
            "rounded operands of a model's 20 steps drift apart from the reference's."
        ),
    ),
    ("float64", "fp32"): Tolerance(
        rtol=1e-11,
        normwise=1e-10,
        train=1e-9,
        reason=(
            "float64 against float64: the same formulas in another order (blocked GEMM sums, "
            "tree reductions) and CUDA's double exp/erf/tanh (≤ 2 ulp of 2^-53 ≈ 1.1e-16) "
            "against NumPy's; 1e-11 is ~10^5 ulp, ample for that and far below any real defect."
        ),
    ),
}


def tolerance(dtype: Any, precision: str = "fp32") -> Tolerance:
    """The TOLERANCES entry of ``dtype`` ("float32"/"float64") at ``precision``."""
    key = (np.dtype(dtype).name, precision)
    if key not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype/precision {key}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[key]


@dataclass(frozen=True)
class Op:
    """One op of the backend contract (see the module docstring)."""

    name: str
    build: Callable[[np.random.Generator, Shape, Variant], dict[str, np.ndarray]]
    run: Callable[..., dict[str, Any]]  # run(backend, variant, **inputs) -> {tensor: array}
    cases: Callable[[bool], list[tuple[Variant, Shape]]]  # quick -> parity (variant, shape)s
    cost: Callable[[Shape, int, Variant], tuple[float, float]]  # (FLOPs, bytes moved)
    growth: Callable[[Shape], float] = lambda shape: 1.0
    label: Callable[[Variant], str] = lambda variant: ""  # "[relu]" in "dense_forward[relu]"
    strided: tuple[str, ...] = ()  # inputs the parity suite also passes as strided views
    # Whether, in a variant, the kernel rounds to a tensor-core precision an operand it computed
    # itself (dense_backward's δ = dout·f′(z) for a smooth f): judged with Tolerance.tie_rtol.
    computes_operand: Callable[[Variant], bool] = lambda variant: False
    nonfinite: tuple[str, ...] = ()  # inputs that receive NaN, +Inf and −Inf
    # The benchmark's rows for an op that no dedicated builder in benchmarks/cases.py times:
    # preset name ("gpu", "cpu_quick", "emu", ... of benchmarks.config.SIZES) -> the
    # (variant, shape)s to time; None: the op has no generic rows.
    bench: Callable[[str], list[tuple[Variant, Shape]]] | None = None

    def case_name(self, variant: Variant) -> str:
        return self.name + self.label(variant)

    def inputs(
        self, rng: np.random.Generator, shape: Shape, variant: Variant, nonfinite: bool = False
    ) -> dict[str, np.ndarray]:
        """Fresh inputs; with ``nonfinite`` a NaN, a +Inf and a −Inf in each input named in
        ``self.nonfinite``, at different rows (or positions) so each shows on its own."""
        inputs = self.build(rng, shape, variant)
        if nonfinite:
            for name in self.nonfinite:
                inputs[name] = with_nonfinite(inputs[name])
        return inputs

    def reference(self, variant: Variant, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """The op on the NumPy backend in float64."""
        as64 = {
            k: v if v.dtype.kind in "iu" else np.asarray(v, np.float64) for k, v in inputs.items()
        }
        with np.errstate(all="ignore"):  # NaN/Inf inputs give NaN/Inf as IEEE says, quietly
            outputs = self.run(NumpyBackend(), variant, **as64)
        return {k: np.asarray(v) for k, v in outputs.items()}


def with_nonfinite(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` with NaN, +Inf and −Inf at three different places (as many as fit)."""
    out = np.array(a, dtype=np.float64)
    flat = out.reshape(-1)
    if out.ndim == 2 and out.shape[0] >= 3:
        cols = out.shape[1]
        places = [0 * cols + 0, 1 * cols + (1 % cols), 2 * cols + (2 % cols)]
    else:
        places = [0, flat.size // 2, flat.size - 1]
    for place, value in zip(places, (np.nan, np.inf, -np.inf), strict=True):
        if place < flat.size:
            flat[place] = value
    return out


# -- dense layer ---------------------------------------------------------------------------------

DENSE_SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 129), (129, 65, 33), (1000, 33, 7)]
DENSE_SHAPES_QUICK = [(1, 1, 1), (7, 33, 5), (129, 65, 33)]
ALPHA = 0.1  # LeakyReLU's slope in the parity cases
# The GEMM precisions of the dense ops' cases: "fp32" in every dtype, the tensor-core ones
# ("tf32", "bf16": float32 arrays only) against the NumPy model of the precision.
GEMM_PRECISIONS = ("fp32", "tf32", "bf16")
# Activations whose δ = dout·f′ is the same float32 in a kernel and in NumPy (f′ ∈ {0, 1, α},
# one correctly rounded product at most), so a tensor-core kernel rounds the same δ.
EXACT_DERIVATIVES = ("identity", "relu", "leaky_relu")


def _dense_shapes(quick: bool) -> list[Shape]:
    return DENSE_SHAPES_QUICK if quick else DENSE_SHAPES


def _dense_forward_build(rng, shape, variant):
    m, k, n = shape
    inputs = {"x": rng.normal(size=(m, k)), "weight": rng.normal(size=(n, k)) / math.sqrt(k)}
    if variant.get("bias", True):
        inputs["bias"] = rng.normal(size=n)
    return inputs


def _dense_forward_run(backend, variant, x, weight, bias=None):
    alpha = variant.get("alpha", ALPHA)
    precision = variant.get("precision", "fp32")
    y, _ = backend.dense_forward(x, weight, bias, variant["activation"], alpha, precision)
    return {"y": y}


def _dense_forward_cases(quick):
    """Every activation at one shape; ReLU and a bias-free identity at every shape; the same
    in each tensor-core precision (float32 only)."""
    shapes = _dense_shapes(quick)
    cases = []
    for precision in GEMM_PRECISIONS:
        tag = {} if precision == "fp32" else {"precision": precision}
        cases += [({"activation": a, **tag}, shapes[1]) for a in ACTIVATIONS]
        for shape in shapes:
            cases.append(({"activation": "relu", **tag}, shape))
            cases.append(({"activation": "identity", "bias": False, **tag}, shape))
    return cases


def _precision_label(variant):
    precision = variant.get("precision", "fp32")
    return "" if precision == "fp32" else f"[{precision}]"


def _gemm_cost(shape: Shape, itemsize: int) -> tuple[float, float]:
    """One GEMM of the layer: 2mnk FLOPs; reads two operands, writes the third."""
    m, k, n = shape
    return 2.0 * m * n * k, float(itemsize * (m * k + n * k + m * n))


def _dense_backward_build(rng, shape, variant):
    m, k, n = shape
    x = rng.normal(size=(m, k))
    weight = rng.normal(size=(n, k)) / math.sqrt(k)
    _, saved = NumpyBackend().dense_forward(
        x, weight, rng.normal(size=n), variant["activation"], ALPHA
    )
    inputs = {"dout": rng.normal(size=(m, n)), "x": x, "weight": weight}
    if saved is not None:
        inputs["saved"] = saved
    return inputs


def _dense_backward_run(backend, variant, dout, x, weight, saved=None):
    n, k = dout.shape[1], x.shape[1]
    bias, need_dinp = variant.get("bias", True), variant.get("need_dinp", True)
    dtype = x.dtype
    dweight = backend.xp.full((n, k), np.nan, dtype=dtype)  # poisoned: all must be written
    dbias = backend.xp.full((n,), np.nan, dtype=dtype) if bias else None
    dinp = backend.dense_backward(
        dout,
        x,
        weight,
        saved,
        variant["activation"],
        variant.get("alpha", ALPHA),
        dweight,
        dbias,
        need_dinp,
        variant.get("precision", "fp32"),
    )
    outputs = {"dweight": dweight}
    if bias:
        outputs["dbias"] = dbias
    if need_dinp:
        outputs["dinp"] = dinp
    return outputs


def _dense_backward_cases(quick):
    shapes = _dense_shapes(quick)
    cases = []
    for precision in GEMM_PRECISIONS:
        tag = {} if precision == "fp32" else {"precision": precision}
        cases += [({"activation": a, **tag}, shapes[1]) for a in ACTIVATIONS]
        for shape in shapes:
            cases.append(({"activation": "identity", **tag}, shape))
            no_extras = {"activation": "relu", "need_dinp": False, "bias": False, **tag}
            cases.append((no_extras, shape))
    return cases


def _dense_backward_cost(shape, itemsize, variant):
    """dW = δᵀx, and dX = δW when asked: a GEMM each."""
    flops, moved = _gemm_cost(shape, itemsize)
    times = 2 if variant.get("need_dinp", True) else 1
    return times * flops, times * moved


def _dense_backward_label(variant):
    return (
        f"[{variant['activation']}]"
        + ("" if variant.get("need_dinp", True) else "[no dinp]")
        + ("" if variant.get("bias", True) else "[no bias]")
        + _precision_label(variant)
    )


# -- activations ------------------------------------------------------------------------------

ELEMENTWISE_SHAPES = [(1, 1), (7, 33), (129, 1000)]


def _elementwise_shapes(quick: bool) -> list[Shape]:
    return ELEMENTWISE_SHAPES[: 2 if quick else None]


def _elementwise_cases(quick, activations=ACTIVATIONS):
    return [({"activation": a}, shape) for shape in _elementwise_shapes(quick) for a in activations]


def _activation_forward_run(backend, variant, x):
    y, _ = backend.activation_forward(x, variant["activation"], variant.get("alpha", ALPHA))
    return {"y": y}


def _activation_backward_build(rng, shape, variant):
    x = rng.normal(0, 2, size=shape)
    alpha = variant.get("alpha", ALPHA)
    _, saved = NumpyBackend().activation_forward(x, variant["activation"], alpha)
    return {"dout": rng.normal(size=shape), "saved": saved}


def _activation_backward_run(backend, variant, dout, saved):
    alpha = variant.get("alpha", ALPHA)
    return {"dinp": backend.activation_backward(dout, saved, variant["activation"], alpha)}


def _bytes_per_element(count: int) -> Callable[[Shape, int, Variant], tuple[float, float]]:
    """A memory-bound op reading and writing ``count`` arrays of the shape's size."""

    def cost(shape, itemsize, variant):
        return 0.0, float(count * itemsize * math.prod(shape))

    return cost


def _standardize_build(rng, shape, variant):
    """σ from 0.01 to 100, so that the division is exercised at several scales."""
    cols = shape[1]
    std = np.exp(rng.uniform(np.log(0.01), np.log(100.0), size=cols))
    if variant["direction"] == "forward":
        return {"x": rng.normal(0, 10, size=shape), "mean": rng.normal(0, 5, size=cols), "std": std}
    return {"dout": rng.normal(size=shape), "std": std}


def _standardize_cost(shape, itemsize, variant):
    """Reads x (or ∂L/∂y) and the per-column statistics, writes y (or ∂L/∂x)."""
    rows, cols = shape
    stats = 2 if variant["direction"] == "forward" else 1
    return 0.0, float(itemsize * (2 * rows * cols + stats * cols))


# -- losses ---------------------------------------------------------------------------------------

LOSS_SHAPES = [(1, 1), (7, 3), (33, 10), (1000, 129)]


def _loss_shapes(quick):
    return LOSS_SHAPES[:3] if quick else LOSS_SHAPES


def _softmax_build(rng, shape, variant):
    n, c = shape
    logits = rng.normal(0, 3, size=(n, c))
    if variant["target"] == "labels":
        return {"logits": logits, "target": rng.integers(0, c, size=n)}
    return {"logits": logits, "target": rng.dirichlet(np.ones(c), size=n)}


def _pair(loss, grad):
    return {"loss": loss, "grad": grad}


def _softmax_run(backend, variant, logits, target):
    return _pair(*backend.softmax_cross_entropy(logits, target))


def _softmax_cost(shape, itemsize, variant):
    """Reads the logits (and labels or probabilities), writes the gradient."""
    n, c = shape
    target = 8 * n if variant["target"] == "labels" else itemsize * n * c
    return 0.0, float(itemsize * 2 * n * c + target)


def _targets_build(first: str, first_values: Callable) -> Callable:
    def build(rng, shape, variant):
        n, c = shape
        values = first_values(rng, (n, c))
        return {first: values, "target": rng.dirichlet(np.ones(c), size=n)}

    return build


def _reduction_cases(quick):
    return [({"reduction": r}, shape) for shape in _loss_shapes(quick) for r in ("mean", "sum")]


def _reduction_label(variant):
    return f"[{variant['reduction']}]"


def _sum_growth(shape):
    return math.sqrt(math.prod(shape))


# -- optimizers and flat buffers ------------------------------------------------------------------

FLAT_SIZES = [1, 7, 1000, 4099]

SGD_VARIANTS = [
    {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.1},
]
ADAM_HYPER = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1, "step": 3}


def _flat_sizes(quick):
    return [(size,) for size in FLAT_SIZES[: 3 if quick else None]]


def _normal(*names, scale=1.0):
    def build(rng, shape, variant):
        return {name: rng.normal(size=shape) * scale for name in names}

    return build


def _sgd_run(backend, variant, param, grad, buf):
    hyper = variant["hyper"]
    param, buf = param.copy(), buf.copy()
    backend.sgd_step(
        param, grad, buf if hyper["momentum"] else None, first_step=variant["first_step"], **hyper
    )
    return {"param": param, "momentum_buf": buf}


def _sgd_cases(quick):
    return [
        ({"index": i, "hyper": hyper, "first_step": first}, size)
        for size in _flat_sizes(quick)
        for i, hyper in enumerate(SGD_VARIANTS)
        for first in (True, False)
    ]


def _sgd_update_cases(quick):
    """_sgd_cases, and each SGD variant once more with the clip inside the update."""
    clipped = [
        ({"index": i, "hyper": hyper, "first_step": False, "max_norm": 0.5}, size)
        for size in _flat_sizes(quick)
        for i, hyper in enumerate(SGD_VARIANTS)
    ]
    return _sgd_cases(quick) + clipped


def _sgd_cost(shape, itemsize, variant):
    """Reads θ and g (and b), writes θ (and b)."""
    buffers = 1 if variant["hyper"]["momentum"] else 0
    return 0.0, float(itemsize * shape[0] * (3 + 2 * buffers))


def _adam_build(rng, shape, variant):
    return {
        "param": rng.normal(size=shape),
        "grad": rng.normal(size=shape),
        "m": rng.normal(size=shape),
        "v": rng.uniform(size=shape),
    }


def _adam_run(decoupled: bool):
    def run(backend, variant, param, grad, m, v):
        hyper = {**ADAM_HYPER, **variant.get("hyper", {})}
        param, m, v = param.copy(), m.copy(), v.copy()
        backend.adam_step(param, grad, m, v, **hyper, decoupled=decoupled)
        return {"param": param, "exp_avg": m, "exp_avg_sq": v}

    return run


def _scale_run(backend, variant, x):
    x = x.copy()
    backend.scale_(x, 0.37)
    return {"x": x}


def _step_scalars(backend, step: int, lr: float):
    """The float64 step scalars [t, lr, 0, 0, 0] an optimizer's update reads, t = step − 1:
    the update takes step t + 1 and counts it there."""
    host = np.zeros(len(STEP_SCALARS))
    host[STEP_T], host[STEP_LR] = step - 1.0, lr
    return backend.asarray(host, np.float64)


def _update_clip(backend, variant, grad):
    """(the gradient the update reads and may scale, the clip coefficient or None): a variant
    with ``max_norm`` clips inside the update (clip_coefficient's c, applied by the launch)."""
    grad = grad.copy()
    max_norm = variant.get("max_norm")
    if max_norm is None:
        return grad, None
    return grad, backend.clip_coefficient([grad], max_norm)[1]


def _sgd_update_run(backend, variant, param, grad, buf):
    hyper = dict(variant["hyper"])
    scalars = _step_scalars(backend, 1 if variant["first_step"] else 3, hyper.pop("lr"))
    param, buf = param.copy(), buf.copy()
    grad, clip = _update_clip(backend, variant, grad)
    backend.sgd_update(param, grad, buf if hyper["momentum"] else None, scalars, **hyper, clip=clip)
    # The scalars the launch advanced are float64 on every backend; compared in param's dtype.
    return {"param": param, "momentum_buf": buf, "grad": grad, "scalars": _as(scalars, param)}


def _adam_update_run(backend, variant, param, grad, m, v):
    hyper = dict(ADAM_HYPER)
    scalars = _step_scalars(backend, hyper.pop("step"), hyper.pop("lr"))
    param, m, v = param.copy(), m.copy(), v.copy()
    grad, clip = _update_clip(backend, variant, grad)
    backend.adam_update(param, grad, m, v, scalars, **hyper, decoupled=False, clip=clip)
    return {
        "param": param,
        "exp_avg": m,
        "exp_avg_sq": v,
        "grad": grad,
        "scalars": _as(scalars, param),
    }


def _as(scalars, like):
    """The float64 step scalars in the dtype of ``like`` (the dtype the parity suite compares)."""
    return scalars.astype(like.dtype)


def _update_cases(quick):
    # Unclipped, and clipped inside the update with c < 1 (scaled) and c ≥ 1 (left as is).
    return [
        (variant, size)
        for size in _flat_sizes(quick)
        for variant in ({}, {"max_norm": 0.5}, {"max_norm": 1e6})
    ]


def _clip_label(variant):
    return f"[max_norm={variant['max_norm']:g}]" if "max_norm" in variant else ""


def _clip_coefficient_run(backend, variant, g):
    norm, coefficient = backend.clip_coefficient([g.copy()], variant["max_norm"])
    # c is float64 on every backend; compared in the dtype under test, as the norm it comes from.
    return {"norm": norm, "coefficient": coefficient.astype(g.dtype)}


def _clip_run(backend, variant, g):
    g = g.copy()
    norm = backend.clip_grad_norm_([g], variant["max_norm"])
    return {"norm": norm, "grad": g}


def _clip_cases(quick):
    # A max_norm below the norm (the gradients scaled) and one above it (left as they are).
    return [({"max_norm": m}, size) for size in _flat_sizes(quick) for m in (0.5, 1e6)]


def _sizes_only(quick):
    return [({}, size) for size in _flat_sizes(quick)]


# -- the table ------------------------------------------------------------------------------------

_OPS = [
    Op(
        "dense_forward",
        build=_dense_forward_build,
        run=_dense_forward_run,
        cases=_dense_forward_cases,
        cost=lambda shape, itemsize, variant: _gemm_cost(shape, itemsize),
        growth=lambda shape: math.sqrt(shape[1]),
        label=lambda v: (
            f"[{v['activation']}]"
            + ("" if v.get("bias", True) else "[no bias]")
            + _precision_label(v)
        ),
        strided=("x",),
        nonfinite=("x",),
    ),
    Op(
        "dense_backward",
        build=_dense_backward_build,
        run=_dense_backward_run,
        cases=_dense_backward_cases,
        cost=_dense_backward_cost,
        growth=lambda shape: math.sqrt(max(shape)),
        label=_dense_backward_label,
        computes_operand=lambda v: (
            v.get("precision", "fp32") != "fp32" and v["activation"] not in EXACT_DERIVATIVES
        ),
        strided=("dout",),
        nonfinite=("dout",),
    ),
    Op(
        "activation_forward",
        build=lambda rng, shape, variant: {"x": rng.normal(0, 2, size=shape)},
        run=_activation_forward_run,
        cases=_elementwise_cases,
        cost=_bytes_per_element(2),
        label=lambda v: f"[{v['activation']}]",
        strided=("x",),
        nonfinite=("x",),
    ),
    Op(
        "activation_backward",
        build=_activation_backward_build,
        run=_activation_backward_run,
        cases=lambda quick: _elementwise_cases(quick, [a for a in ACTIVATIONS if a != "identity"]),
        cost=_bytes_per_element(3),
        label=lambda v: f"[{v['activation']}]",
        nonfinite=("dout", "saved"),
    ),
    Op(
        "standardize_forward",
        build=_standardize_build,
        run=lambda backend, v, x, mean, std: {"y": backend.standardize_forward(x, mean, std)},
        cases=lambda quick: [({"direction": "forward"}, s) for s in _elementwise_shapes(quick)],
        cost=_standardize_cost,
        strided=("x",),
        nonfinite=("x",),
    ),
    Op(
        "standardize_backward",
        build=_standardize_build,
        run=lambda backend, v, dout, std: {"dinp": backend.standardize_backward(dout, std)},
        cases=lambda quick: [({"direction": "backward"}, s) for s in _elementwise_shapes(quick)],
        cost=_standardize_cost,
        strided=("dout",),
        nonfinite=("dout",),
    ),
    Op(
        "softmax_cross_entropy",
        build=_softmax_build,
        run=_softmax_run,
        cases=lambda quick: [
            ({"target": t}, shape) for shape in _loss_shapes(quick) for t in ("labels", "probs")
        ],
        cost=_softmax_cost,
        growth=lambda shape: math.sqrt(shape[1]),
        label=lambda v: f"[{v['target']}]",
        strided=("logits",),
        nonfinite=("logits",),
    ),
    Op(
        "mse_loss",
        build=_targets_build("pred", lambda rng, shape: rng.normal(0, 3, size=shape)),
        run=lambda b, v, pred, target: _pair(*b.mse_loss(pred, target, v["reduction"])),
        cases=_reduction_cases,
        cost=_bytes_per_element(3),
        growth=_sum_growth,
        label=_reduction_label,
        nonfinite=("pred",),
    ),
    Op(
        "bce_with_logits",
        build=_targets_build("logits", lambda rng, shape: rng.normal(0, 3, size=shape)),
        run=lambda b, v, logits, target: _pair(*b.bce_with_logits(logits, target, v["reduction"])),
        cases=_reduction_cases,
        cost=_bytes_per_element(3),
        growth=_sum_growth,
        label=_reduction_label,
        nonfinite=("logits",),
    ),
    Op(
        "bce",
        build=_targets_build("probs", lambda rng, shape: rng.uniform(0.02, 0.98, size=shape)),
        run=lambda b, v, probs, target: _pair(*b.bce(probs, target, v["reduction"])),
        cases=_reduction_cases,
        cost=_bytes_per_element(3),
        growth=_sum_growth,
        label=_reduction_label,
        nonfinite=("probs",),
    ),
    Op(
        "sgd_step",
        build=_normal("param", "grad", "buf"),
        run=_sgd_run,
        cases=_sgd_cases,
        cost=_sgd_cost,
        label=lambda v: f"[{v['index']}{'+first' if v['first_step'] else ''}]",
        nonfinite=("grad",),
    ),
    Op(
        "adam_step",
        build=_adam_build,
        run=_adam_run(decoupled=False),
        cases=_sizes_only,
        cost=_bytes_per_element(7),
        nonfinite=("grad",),
    ),
    Op(
        "adamw_step",
        build=_adam_build,
        run=_adam_run(decoupled=True),
        cases=_sizes_only,
        cost=_bytes_per_element(7),
        nonfinite=("grad",),
    ),
    Op(
        "sgd_update",
        build=_normal("param", "grad", "buf"),
        run=_sgd_update_run,
        cases=_sgd_update_cases,
        cost=_sgd_cost,
        label=lambda v: f"[{v['index']}{'+first' if v['first_step'] else ''}]" + _clip_label(v),
    ),
    Op(
        "adam_update",
        build=_adam_build,
        run=_adam_update_run,
        cases=_update_cases,
        cost=_bytes_per_element(7),
        label=_clip_label,
    ),
    Op(
        "clip_coefficient",
        build=_normal("g"),
        run=_clip_coefficient_run,
        cases=_clip_cases,
        cost=_bytes_per_element(1),
        growth=_sum_growth,
        label=lambda v: f"[max_norm={v['max_norm']:g}]",
    ),
    Op(
        "clip_grad_norm_",
        build=_normal("g"),
        run=_clip_run,
        cases=_clip_cases,
        cost=_bytes_per_element(3),
        growth=_sum_growth,
        label=lambda v: f"[max_norm={v['max_norm']:g}]",
    ),
    Op(
        "sum_of_squares",
        build=_normal("x"),
        run=lambda backend, variant, x: {"sum": backend.sum_of_squares(x)},
        cases=_sizes_only,
        cost=lambda shape, itemsize, variant: (2.0 * shape[0], float(itemsize * shape[0])),
        growth=_sum_growth,
        nonfinite=("x",),
    ),
    Op(
        "scale_",
        build=_normal("x"),
        run=_scale_run,
        cases=_sizes_only,
        cost=_bytes_per_element(2),
        nonfinite=("x",),
    ),
    Op(
        "add",
        build=_normal("a", "b"),
        run=lambda backend, variant, a, b: {"sum": backend.add(a, b)},
        cases=_sizes_only,
        cost=_bytes_per_element(3),
        nonfinite=("a",),
    ),
]

OPS: dict[str, Op] = {op.name: op for op in _OPS}
