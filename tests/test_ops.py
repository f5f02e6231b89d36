"""The op table (gpubackprop/ops.py): every op of the contract described once, and read by the
parity suite and the benchmark alike, so that a new entry reaches both with no other edit."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import ops, parity
from gpubackprop.backends.base import Backend
from gpubackprop.benchmarks import cases as bench_cases
from gpubackprop.benchmarks.config import RTOL, SIZES
from gpubackprop.dtypes import DTYPES
from gpubackprop.precision import UNIT_ROUNDOFF

# Methods of the contract that are no ops: arrays, synchronisation, what the backend can run.
NOT_OPS = {
    "asarray",
    "to_numpy",
    "empty",
    "zeros",
    "synchronize",
    "device_name",
    "precisions",
    "check_precision",
}


def test_every_op_of_the_backend_contract_has_an_entry():
    contract = {
        name
        for name, member in inspect.getmembers(Backend, inspect.isfunction)
        if not name.startswith("_") and name not in NOT_OPS
    }
    optimizers = {"adamw_step"}  # adam_step with decoupled=True: an entry of its own
    assert set(ops.OPS) == contract | optimizers


def test_one_tolerance_per_dtype_with_its_reason():
    for dtype in DTYPES:
        tol = ops.tolerance(dtype)
        assert 0 < tol.rtol < tol.normwise < 1 and 0 < tol.train < 1
        assert len(tol.reason) > 80, f"{dtype}: say why the numbers are what they are"
    assert RTOL == {dtype: ops.tolerance(dtype).normwise for dtype in DTYPES}
    with pytest.raises(ValueError, match="no tolerance"):
        ops.tolerance("float32", "fp8")


def test_the_benchmark_takes_its_costs_from_the_table():
    m, n, k = 129, 65, 33
    forward = bench_cases.gemm_case(m, n, k, "forward", 4)
    both = bench_cases.gemm_case(m, n, k, "dX+dW", 4)
    assert forward.flops == 2 * m * n * k and forward.bytes == 4 * (m * k + n * k + m * n)
    assert both.flops == 2 * forward.flops and len(both.parts) == 2
    relu = bench_cases.activation_case("relu", 7, 9, "backward", 8)
    assert relu.bytes == 3 * 8 * 7 * 9
    adam = bench_cases.optimizer_case("adam", 1000, 4)
    assert adam.bytes == 7 * 4 * 1000


def test_nonfinite_inputs_hold_nan_and_both_infinities_in_different_rows():
    a = ops.with_nonfinite(np.zeros((7, 5)))
    assert np.isnan(a[0, 0]) and a[1, 1] == np.inf and a[2, 2] == -np.inf
    assert np.isfinite(a).sum() == a.size - 3
    flat = ops.with_nonfinite(np.zeros(10))
    assert np.isnan(flat).sum() == 1 and np.isinf(flat).sum() == 2


def test_every_op_has_nonfinite_parity_cases():
    names = {case.op.split("[")[0] for case in parity.op_cases(seed=1) if "[nan,inf]" in case.op}
    assert names == set(ops.OPS)


def _double_add(backend, variant, a, b):
    return {"sum": backend.add(backend.add(a, b), b)}


@pytest.fixture
def new_op(monkeypatch):
    """An op added the way the README says: one entry (its kernel and launcher already exist:
    a + 2b through two launches of the add kernel)."""
    entry = dataclasses.replace(
        ops.OPS["add"],
        name="double_add",
        run=_double_add,
        bench=lambda preset: [({}, (257,))],
    )
    monkeypatch.setitem(ops.OPS, "double_add", entry)
    return entry


def test_a_new_entry_reaches_the_parity_suite(new_op):
    cases = [c for c in parity.op_cases(seed=3, quick=True) if c.op.startswith("double_add")]
    assert {c.op for c in cases} == {"double_add", "double_add[nan,inf]"}
    rows = parity.check_case(cases[0], gb.get_backend("numpy"), "float32")
    assert rows and all(r.passed for r in rows)


@pytest.mark.parametrize("backend_name", ["numpy", "emu"])
def test_a_new_entry_reaches_the_benchmark_checked(new_op, backend_name):
    if not gb.available_backends()[backend_name][0]:
        pytest.skip(gb.available_backends()[backend_name][1])
    rows = bench_cases.cases_for(SIZES["tiny"], 4, only=("double_add",), preset="tiny")
    assert [c.name for c in rows] == ["double_add.257"]
    assert rows[0].bytes == 3 * 4 * 257 and rows[0].memory_bound
    config = bench_cases.BenchConfig(torch=False)
    ctx = bench_cases.Context(gb.get_backend(backend_name), np.float32, config, "cpu")
    prepared = rows[0].build(ctx, 2)
    prepared.run()
    outputs, references = prepared.check()
    error = bench_cases.max_rel_error(outputs, references)
    assert error <= RTOL["float32"]
    # the check sees a wrong result: a + b instead of a + 2b
    wrong = [o - r / 3 for o, r in zip(outputs, references, strict=True)]
    assert bench_cases.max_rel_error(wrong, references) > RTOL["float32"]


def test_growth_factors_follow_the_length_of_the_sums():
    assert ops.OPS["dense_forward"].growth((7, 33, 5)) == math.sqrt(33)
    assert ops.OPS["mse_loss"].growth((7, 3)) == math.sqrt(21)
    assert ops.OPS["add"].growth((1000,)) == 1.0


class _UnroundedGemms(gb.backends.numpy_backend.NumpyBackend):
    """The NumPy backend with every tensor-core precision silently run in fp32: what a kernel
    that forgot to round its operands would return."""

    def dense_forward(self, x, weight, bias, activation, alpha=0.01, precision="fp32"):
        return super().dense_forward(x, weight, bias, activation, alpha, "fp32")

    def dense_backward(self, *args, **kwargs):
        return super().dense_backward(*args[:9], "fp32")


def test_tensor_core_tolerances_catch_a_gemm_that_does_not_round():
    """The bf16/tf32 entries judge against the NumPy model of the precision with fp32's rtol,
    tight enough that unrounded operands fail, except where the kernel rounds a δ it computed
    itself (a smooth activation's backward): there tie_rtol = u/4 admits one rounding tie."""
    caught, tie_cases = set(), 0
    for case in parity.op_cases(seed=5):
        if case.precision == "fp32" or "[nan,inf]" in case.op or case.shape != "7x33x5":
            continue
        rows = parity.check_case(case, _UnroundedGemms(), "float32")
        if case.rounds_computed_operand:
            tie_cases += 1
            tol = ops.tolerance("float32", case.precision)
            assert tol.rtol < tol.tie_rtol <= UNIT_ROUNDOFF[case.precision] / 4
        elif not all(row.passed for row in rows):
            caught.add(case.op)
    expected = {
        f"{op}[{activation}]{extra}[{precision}]"
        for precision in ("tf32", "bf16")
        for op, extra in (("dense_forward", ""), ("dense_backward", ""))
        for activation in ("identity", "relu", "leaky_relu", "tanh", "gelu", "silu")
        if op == "dense_forward" or activation in ops.EXACT_DERIVATIVES
    }
    assert expected <= caught, sorted(expected - caught)
    assert tie_cases == 2 * 5  # sigmoid, tanh, gelu, gelu_tanh, silu in tf32 and bf16
