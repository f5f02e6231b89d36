"""Backend parity: every op of the backend contract, and whole training runs, on a
backend under test against the NumPy reference in float64.

Used by the test suite (tests/test_parity.py), by ``gpubackprop parity`` and by
bench/run_all_kernels.py.  The cases come from the op table (ops.py): every entry's variants
and shapes, each also with NaN and ±Inf inputs.  An op case is data: its inputs (float64 host
arrays) and a function that runs it on any backend and returns the named output tensors.  The
error of a tensor is judged as |out − ref| ≤ atol + rtol·|ref| with atol = rtol·max|ref| over
the finite reference values (so a value that is the small difference of large ones is judged
at the scale of its neighbours), rtol the op table's for the dtype times the op's growth
factor; where the reference is NaN or ±Inf the output must be the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .backends import get_backend
from .backends.base import ACTIVATIONS
from .backends.numpy_backend import NumpyBackend
from .ops import OPS, Op, tolerance


@dataclass
class OpCase:
    op: str
    shape: str
    inputs: dict[str, np.ndarray]
    run: Callable[..., dict[str, object]]
    rtol_scale: float = 1.0  # > 1 where float32 rounding grows with a reduction length
    labels: tuple[str, ...] = ()  # inputs that are integer labels, not floats
    noncontiguous: tuple[str, ...] = ()  # inputs passed as strided views
    # The GEMM precision ("fp32", or a tensor-core "tf32"/"bf16" case, float32 only, judged
    # against the NumPy model of the precision in float32 instead of float64).
    precision: str = "fp32"
    rounds_computed_operand: bool = False  # judged with Tolerance.tie_rtol (ops.Op)

    def runs_in(self, dtype: str) -> bool:
        """Whether the case applies to arrays of ``dtype`` (tensor-core cases: float32)."""
        return self.precision == "fp32" or dtype == "float32"


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
    """(max abs error, max relative error, passed) over the finite reference values; where the
    reference is NaN, +Inf or −Inf the output must be exactly that (else the error is inf)."""
    out = np.atleast_1d(np.asarray(out, dtype=np.float64))
    ref = np.atleast_1d(np.asarray(ref, dtype=np.float64))
    if out.shape != ref.shape:
        return math.inf, math.inf, False
    if out.size == 0:
        return 0.0, 0.0, True
    finite = np.isfinite(ref)
    same_special = (np.isnan(out) & np.isnan(ref)) | (~finite & (out == ref))
    with np.errstate(invalid="ignore"):
        error = np.where(finite, np.abs(out - ref), np.where(same_special, 0.0, math.inf))
    error[np.isnan(error)] = math.inf  # a NaN output where the reference is finite
    scale = float(np.max(np.abs(ref[finite]))) if finite.any() else 0.0
    safe_ref = np.where(finite, np.abs(ref), 1.0)
    relative = error / np.maximum(safe_ref, 1e-30)
    passed = bool(np.all(error <= rtol * scale + rtol * safe_ref))
    return float(error.max()), float(relative.max()), passed


# -- op cases ------------------------------------------------------------------------------


def _case(op: Op, variant: dict, shape: tuple[int, ...], rng, nonfinite: bool) -> OpCase:
    inputs = op.inputs(rng, shape, variant, nonfinite)

    def run(backend, **arrays):
        return op.run(backend, variant, **arrays)

    return OpCase(
        op.case_name(variant) + ("[nan,inf]" if nonfinite else ""),
        "x".join(map(str, shape)),
        inputs,
        run,
        rtol_scale=op.growth(shape),
        labels=tuple(k for k, v in inputs.items() if v.dtype.kind in "iu"),
        noncontiguous=op.strided,
        precision=variant.get("precision", "fp32"),
        rounds_computed_operand=op.computes_operand(variant),
    )


def _nonfinite_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The smallest shape with room for a NaN, a +Inf and a −Inf in three different rows (and
    columns): each then shows on its own in the output."""
    roomy = [s for s in shapes if s[0] >= 3 and math.prod(s) >= 9]
    return min(roomy or shapes, key=math.prod)


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
    """Every case of every op of the table (ops.OPS) on odd shapes, fresh random inputs for
    each seed; then each op's variants once more with NaN and ±Inf inputs (ops.with_nonfinite)
    at a small shape of its cases with several rows."""
    rng = np.random.default_rng(seed)
    cases: list[OpCase] = []
    special: list[OpCase] = []
    for op in OPS.values():
        variants = op.cases(quick)
        for variant, shape in variants:
            cases.append(_case(op, variant, shape, rng, nonfinite=False))
        shape = _nonfinite_shape([shape for _, shape in variants])
        names = list(dict.fromkeys(op.case_name(v) for v, _ in variants))
        for name in names:
            variant = next(v for v, _ in variants if op.case_name(v) == name)
            special.append(_case(op, variant, shape, rng, nonfinite=True))
    return cases + special


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
    if not case.runs_in(dtype):
        raise ValueError(f"{case.op} runs in float32 only; got dtype={dtype!r}")
    reference = NumpyBackend()
    # float64, or the NumPy model of a tensor-core precision, which rounds float32 operands
    ref_dtype = np.float64 if case.precision == "fp32" else np.float32
    ref_inputs = {
        k: (v if k in case.labels else np.asarray(v, ref_dtype)) for k, v in case.inputs.items()
    }
    with np.errstate(all="ignore"):  # NaN/Inf inputs give NaN/Inf as IEEE says, quietly
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
    judged_by = tolerance(dtype, case.precision)
    rtol = judged_by.tie_rtol if case.rounds_computed_operand else judged_by.rtol
    rtol *= case.rtol_scale
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
    rtol = tolerance(dtype).train  # 20 steps compound the rounding of each
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
                if case.runs_in(dtype):
                    report.rows += check_case(case, backend, dtype)
            for activation in ("relu", "gelu") if quick else ACTIVATIONS:
                for loss_name in MODEL_LOSSES:
                    report.rows += model_rows(backend, dtype, activation, loss_name)
    return report
