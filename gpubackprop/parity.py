"""Backend parity: every op of the backend contract, and whole training runs, on a
backend under test against the NumPy reference in float64.

Used by the test suite (tests/test_parity.py) and by ``gpubackprop parity``.  An op
case is data: its inputs (float64 host arrays) and a function that runs it on any
backend and returns the named output tensors.  The error of a tensor is judged as
|out − ref| ≤ atol + rtol·|ref| with atol = rtol·max|ref| (so a value that is the small
difference of large ones is judged at the scale of its neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .backends import get_backend
from .backends.base import ACTIVATIONS
from .backends.numpy_backend import NumpyBackend

# rtol per dtype: float32 kernels against a float64 reference; float64 against float64.
RTOL = {"float32": 2e-5, "float64": 1e-11}


@dataclass
class OpCase:
    op: str
    shape: str
    inputs: dict[str, np.ndarray]
    run: Callable[..., dict[str, object]]
    rtol_scale: float = 1.0  # > 1 where float32 rounding grows with a reduction length
    labels: tuple[str, ...] = ()  # inputs that are integer labels, not floats
    noncontiguous: tuple[str, ...] = ()  # inputs passed as strided views


@dataclass
class ParityRow:
    op: str
    shape: str
    backend: str
    dtype: str
    tensor: str
    max_abs_error: float
    max_rel_error: float
    passed: bool
    note: str = ""


@dataclass
class ParityReport:
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def format(self, failures_only: bool = False) -> str:
        """The table (only the failing rows with ``failures_only``) and the counts of all rows."""
        header = (
            f"{'op':<28} {'shape':<18} {'backend':<7} {'dtype':<8} {'tensor':<12} "
            f"{'max abs err':>11} {'max rel err':>11}  result"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            if failures_only and r.passed:
                continue
            lines.append(
                f"{r.op:<28} {r.shape:<18} {r.backend:<7} {r.dtype:<8} {r.tensor:<12} "
                f"{r.max_abs_error:>11.2e} {r.max_rel_error:>11.2e}  "
                f"{'pass' if r.passed else 'FAIL'}{'  ' + r.note if r.note else ''}"
            )
        failed = sum(not r.passed for r in self.rows)
        lines.append(f"{len(self.rows) - failed} passed, {failed} failed")
        return "\n".join(lines)


def compare(out: np.ndarray, ref: np.ndarray, rtol: float) -> tuple[float, float, bool]:
    """(max abs error, max relative error, passed).  NaN anywhere in ``out`` fails."""
    out = np.atleast_1d(np.asarray(out, dtype=np.float64))
    ref = np.atleast_1d(np.asarray(ref, dtype=np.float64))
    if out.shape != ref.shape:
        return math.inf, math.inf, False
    if out.size == 0:
        return 0.0, 0.0, True
    error = np.abs(out - ref)
    error[np.isnan(out) != np.isnan(ref)] = math.inf
    error[np.isnan(out) & np.isnan(ref)] = 0.0
    scale = float(np.nanmax(np.abs(ref))) if np.any(~np.isnan(ref)) else 0.0
    relative = error / np.maximum(np.abs(ref), 1e-30)
    passed = bool(np.all(error <= rtol * scale + rtol * np.abs(ref)))
    return float(error.max()), float(relative.max()), passed


# -- op cases ------------------------------------------------------------------------------

DENSE_SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 129), (129, 65, 33), (1000, 33, 7)]
DENSE_SHAPES_QUICK = [(1, 1, 1), (7, 33, 5), (129, 65, 33)]
ELEMENTWISE_SHAPES = [(1, 1), (7, 33), (129, 1000)]
FLAT_SIZES = [1, 7, 1000, 4099]


def _dense_forward_case(rng, m, k, n, activation, bias=True):
    inputs = {"x": rng.normal(size=(m, k)), "weight": rng.normal(size=(n, k)) / math.sqrt(k)}
    if bias:
        inputs["bias"] = rng.normal(size=n)

    def run(backend, x, weight, bias=None):
        y, _ = backend.dense_forward(x, weight, bias, activation, 0.1)
        return {"y": y}

    return OpCase(
        f"dense_forward[{activation}]" + ("" if bias else "[no bias]"),
        f"{m}x{k}x{n}",
        inputs,
        run,
        rtol_scale=math.sqrt(k),
        noncontiguous=("x",),
    )


def _dense_backward_case(rng, m, k, n, activation, need_dinp=True, bias=True):
    x = rng.normal(size=(m, k))
    weight = rng.normal(size=(n, k)) / math.sqrt(k)
    reference = NumpyBackend()
    _, saved = reference.dense_forward(x, weight, rng.normal(size=n), activation, 0.1)
    inputs = {"dout": rng.normal(size=(m, n)), "x": x, "weight": weight}
    if saved is not None:
        inputs["saved"] = saved

    def run(backend, dout, x, weight, saved=None):
        dtype = x.dtype
        dweight = backend.xp.full((n, k), np.nan, dtype=dtype)  # poisoned: all must be written
        dbias = backend.xp.full((n,), np.nan, dtype=dtype) if bias else None
        dinp = backend.dense_backward(
            dout, x, weight, saved, activation, 0.1, dweight, dbias, need_dinp
        )
        outputs = {"dweight": dweight}
        if bias:
            outputs["dbias"] = dbias
        if need_dinp:
            outputs["dinp"] = dinp
        return outputs

    name = (
        f"dense_backward[{activation}]"
        + ("" if need_dinp else "[no dinp]")
        + ("" if bias else "[no bias]")
    )
    return OpCase(
        name,
        f"{m}x{k}x{n}",
        inputs,
        run,
        rtol_scale=math.sqrt(max(m, k, n)),
        noncontiguous=("dout",),
    )


def _activation_cases(rng, shape, activation):
    x = rng.normal(0, 2, size=shape)

    def forward(backend, x):
        y, _ = backend.activation_forward(x, activation, 0.1)
        return {"y": y}

    _, saved = NumpyBackend().activation_forward(x, activation, 0.1)
    cases = [
        OpCase(
            f"activation_forward[{activation}]",
            "x".join(map(str, shape)),
            {"x": x},
            forward,
            noncontiguous=("x",),
        )
    ]
    if saved is not None:

        def backward(backend, dout, saved):
            return {"dinp": backend.activation_backward(dout, saved, activation, 0.1)}

        cases.append(
            OpCase(
                f"activation_backward[{activation}]",
                "x".join(map(str, shape)),
                {"dout": rng.normal(size=shape), "saved": saved},
                backward,
            )
        )
    return cases


def _loss_cases(rng, n, c):
    logits = rng.normal(0, 3, size=(n, c))
    probs = rng.dirichlet(np.ones(c), size=n)
    shape = f"{n}x{c}"

    def pair(loss, grad):
        return {"loss": loss, "grad": grad}

    cases = [
        OpCase(
            "softmax_cross_entropy[labels]",
            shape,
            {"logits": logits, "target": rng.integers(0, c, size=n)},
            lambda b, logits, target: pair(*b.softmax_cross_entropy(logits, target)),
            rtol_scale=math.sqrt(c),
            labels=("target",),
            noncontiguous=("logits",),
        ),
        OpCase(
            "softmax_cross_entropy[probs]",
            shape,
            {"logits": logits, "target": probs},
            lambda b, logits, target: pair(*b.softmax_cross_entropy(logits, target)),
            rtol_scale=math.sqrt(c),
        ),
    ]
    for reduction in ("mean", "sum"):
        cases += [
            OpCase(
                f"mse_loss[{reduction}]",
                shape,
                {"pred": logits, "target": probs},
                lambda b, pred, target, r=reduction: pair(*b.mse_loss(pred, target, r)),
                rtol_scale=math.sqrt(n * c),
            ),
            OpCase(
                f"bce_with_logits[{reduction}]",
                shape,
                {"logits": logits, "target": probs},
                lambda b, logits, target, r=reduction: pair(*b.bce_with_logits(logits, target, r)),
                rtol_scale=math.sqrt(n * c),
            ),
            OpCase(
                f"bce[{reduction}]",
                shape,
                {"probs": rng.uniform(0.02, 0.98, size=(n, c)), "target": probs},
                lambda b, probs, target, r=reduction: pair(*b.bce(probs, target, r)),
                rtol_scale=math.sqrt(n * c),
            ),
        ]
    return cases


SGD_VARIANTS = [
    {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.1},
]


def _optimizer_cases(rng, size):
    """SGD (every momentum/Nesterov/decay variant, first and later steps), Adam and AdamW."""
    cases = []
    for i, hyper in enumerate(SGD_VARIANTS):
        for first_step in (True, False):

            def run(backend, param, grad, buf, hyper=hyper, first_step=first_step):
                param, buf = param.copy(), buf.copy()
                backend.sgd_step(
                    param, grad, buf if hyper["momentum"] else None, first_step=first_step, **hyper
                )
                return {"param": param, "momentum_buf": buf}

            cases.append(
                OpCase(
                    f"sgd_step[{i}{'+first' if first_step else ''}]",
                    str(size),
                    {
                        "param": rng.normal(size=size),
                        "grad": rng.normal(size=size),
                        "buf": rng.normal(size=size),
                    },
                    run,
                )
            )
    for decoupled in (False, True):

        def run(backend, param, grad, m, v, decoupled=decoupled):
            param, m, v = param.copy(), m.copy(), v.copy()
            backend.adam_step(
                param,
                grad,
                m,
                v,
                lr=0.01,
                beta1=0.9,
                beta2=0.99,
                eps=1e-8,
                weight_decay=0.1,
                step=3,
                decoupled=decoupled,
            )
            return {"param": param, "exp_avg": m, "exp_avg_sq": v}

        cases.append(
            OpCase(
                "adamw_step" if decoupled else "adam_step",
                str(size),
                {
                    "param": rng.normal(size=size),
                    "grad": rng.normal(size=size),
                    "m": rng.normal(size=size),
                    "v": rng.uniform(size=size),
                },
                run,
            )
        )
    return cases


def _flat_buffer_cases(rng, size):
    """The other ops on flat buffers: Σx² (gradient clipping), x *= c, a + b (residuals)."""
    cases = []
    cases.append(
        OpCase(
            "sum_of_squares",
            str(size),
            {"x": rng.normal(size=size)},
            lambda b, x: {"sum": b.sum_of_squares(x)},
            rtol_scale=math.sqrt(size),
        )
    )

    def scale(backend, x):
        x = x.copy()
        backend.scale_(x, 0.37)
        return {"x": x}

    cases.append(OpCase("scale_", str(size), {"x": rng.normal(size=size)}, scale))
    cases.append(
        OpCase(
            "add",
            str(size),
            {"a": rng.normal(size=size), "b": rng.normal(size=size)},
            lambda backend, a, b: {"sum": backend.add(a, b)},
        )
    )
    return cases


def _standardize_cases(rng, shape):
    """Input standardisation (gb.Standardize): y = (x − μ)/σ and ∂L/∂x = ∂L/∂y / σ, σ from
    0.01 to 100 so that the division is exercised at several scales."""
    cols = shape[1]
    mean = rng.normal(0, 5, size=cols)
    std = np.exp(rng.uniform(np.log(0.01), np.log(100.0), size=cols))
    label = "x".join(map(str, shape))
    return [
        OpCase(
            "standardize_forward",
            label,
            {"x": rng.normal(0, 10, size=shape), "mean": mean, "std": std},
            lambda backend, x, mean, std: {"y": backend.standardize_forward(x, mean, std)},
            noncontiguous=("x",),
        ),
        OpCase(
            "standardize_backward",
            label,
            {"dout": rng.normal(size=shape), "std": std},
            lambda backend, dout, std: {"dinp": backend.standardize_backward(dout, std)},
            noncontiguous=("dout",),
        ),
    ]


def op_cases(seed: int = 0, quick: bool = False) -> list[OpCase]:
    """Every op of the contract on odd shapes (fresh random inputs for each seed)."""
    rng = np.random.default_rng(seed)
    cases: list[OpCase] = []
    dense_shapes = DENSE_SHAPES_QUICK if quick else DENSE_SHAPES
    for activation in ACTIVATIONS:
        m, k, n = dense_shapes[1]
        cases.append(_dense_forward_case(rng, m, k, n, activation))
        cases.append(_dense_backward_case(rng, m, k, n, activation))
    for m, k, n in dense_shapes:
        cases.append(_dense_forward_case(rng, m, k, n, "relu"))
        cases.append(_dense_forward_case(rng, m, k, n, "identity", bias=False))
        cases.append(_dense_backward_case(rng, m, k, n, "identity"))
        cases.append(_dense_backward_case(rng, m, k, n, "relu", need_dinp=False, bias=False))
    for shape in ELEMENTWISE_SHAPES[: 2 if quick else None]:
        for activation in ACTIVATIONS:
            cases += _activation_cases(rng, shape, activation)
        cases += _standardize_cases(rng, shape)
    for n, c in [(1, 1), (7, 3), (33, 10)] + ([] if quick else [(1000, 129)]):
        cases += _loss_cases(rng, n, c)
    for size in FLAT_SIZES[: 3 if quick else None]:
        cases += _optimizer_cases(rng, size)
        cases += _flat_buffer_cases(rng, size)
    return cases


def _to_backend(backend, name: str, value: np.ndarray, dtype, case: OpCase):
    if name in case.labels:
        return backend.asarray(value, np.int64)
    array = backend.asarray(value, dtype)
    if name in case.noncontiguous and array.ndim == 2 and array.shape[1] > 1:
        # A strided view of a wider array: the launcher must copy it, not misread it.
        wide = backend.xp.zeros((array.shape[0], 2 * array.shape[1]), dtype=array.dtype)
        wide[:, ::2] = array
        array = wide[:, ::2]
    return array


def check_case(case: OpCase, backend, dtype: str) -> list[ParityRow]:
    reference = NumpyBackend()
    ref_inputs = {
        k: (v if k in case.labels else np.asarray(v, np.float64)) for k, v in case.inputs.items()
    }
    expected = case.run(reference, **ref_inputs)
    on_backend = {k: _to_backend(backend, k, v, dtype, case) for k, v in case.inputs.items()}
    rows = []
    try:
        outputs = case.run(backend, **on_backend)
        backend.synchronize()
    except Exception as error:  # reported per row; the suite decides what to do with it
        return [
            ParityRow(
                case.op,
                case.shape,
                backend.name,
                dtype,
                "-",
                math.inf,
                math.inf,
                False,
                f"{type(error).__name__}: {error}",
            )
        ]
    rtol = RTOL[dtype] * case.rtol_scale
    for tensor, ref in expected.items():
        out = np.asarray(backend.to_numpy(outputs[tensor]))
        dtype_ok = out.dtype == np.dtype(dtype)
        max_abs, max_rel, passed = compare(out, np.asarray(ref), rtol)
        rows.append(
            ParityRow(
                case.op,
                case.shape,
                backend.name,
                dtype,
                tensor,
                max_abs,
                max_rel,
                passed and dtype_ok,
                "" if dtype_ok else f"dtype {out.dtype}",
            )
        )
    return rows


# -- whole models ---------------------------------------------------------------------------

MODEL_LOSSES = ("softmax_cross_entropy", "mse", "bce_with_logits")


def training_run(
    backend, dtype: str, activation: str, loss_name: str, steps: int = 20, seed: int = 0
) -> dict[str, np.ndarray]:
    """Train a small residual MLP for ``steps`` SGD-momentum steps; return the final
    parameters and the loss curve (as arrays)."""
    import gpubackprop as gb

    from .layers import activation_layer

    def act():
        return activation_layer(activation, alpha=0.1)

    gb.seed(seed)
    model = gb.Sequential(
        gb.Dense(13, 33),
        act(),
        gb.Residual(gb.Dense(33, 33), act()),
        gb.Dense(33, 7),
        act(),
        gb.Dense(7, 5),
    ).to(backend, dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(37, 13))
    if loss_name == "softmax_cross_entropy":
        loss, y = gb.SoftmaxCrossEntropyLoss(), rng.integers(0, 5, size=37)
    elif loss_name == "mse":
        loss, y = gb.MSELoss(), rng.normal(size=(37, 5))
    else:
        loss, y = gb.BCEWithLogitsLoss(), rng.integers(0, 2, size=(37, 5)).astype(float)
    loss.to(model.backend)
    opt = gb.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    losses = []
    for _ in range(steps):
        value = loss.forward(model.forward(x), y)
        losses.append(float(value))
        model.backward(loss.backward())
        opt.step()
    result = {f"param:{k}": v for k, v in model.state_dict().items()}
    result["loss_curve"] = np.array(losses)
    return result


def model_rows(backend, dtype: str, activation: str, loss_name: str) -> list[ParityRow]:
    expected = training_run(NumpyBackend(), "float64", activation, loss_name)
    got = training_run(backend, dtype, activation, loss_name)
    # 20 steps compound float32 rounding; float64 must agree closely.
    rtol = 1e-3 if dtype == "float32" else 1e-9
    rows = []
    for tensor, ref in expected.items():
        max_abs, max_rel, passed = compare(got[tensor], ref, rtol)
        rows.append(
            ParityRow(
                f"train20[{activation},{loss_name}]",
                "13-33-33-7-5",
                backend.name,
                dtype,
                tensor.replace("param:", ""),
                max_abs,
                max_rel,
                passed,
            )
        )
    return rows


def parity_report(
    backends: list[str], dtypes=("float32",), quick: bool = True, seed: int = 0
) -> ParityReport:
    """Every op case and every whole-model run on each named backend."""
    report = ParityReport()
    for name in backends:
        backend = get_backend(name)
        for dtype in dtypes:
            for case in op_cases(seed, quick):
                report.rows += check_case(case, backend, dtype)
            for activation in ("relu", "gelu") if quick else ACTIVATIONS:
                for loss_name in MODEL_LOSSES:
                    report.rows += model_rows(backend, dtype, activation, loss_name)
    return report
