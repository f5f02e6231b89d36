"""The tensor-core GEMMs (kernels/gemm_mma.cu) on the emulator against the NumPy model of each
precision (gpubackprop/precision.py), every layout and every epilogue, on odd shapes, with the
tolerance gemm_error_bound derives from K and the unit roundoffs; and their NVRTC compiles for
the architectures that have bf16/tf32 mma.sync, without spills.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubackprop import kernels
from gpubackprop.backends.base import ACTIVATION_CODES, ACTIVATIONS
from gpubackprop.backends.numpy_backend import activation_value
from gpubackprop.emulator import EmuSeam, find_compiler
from gpubackprop.precision import (
    UNIT_ROUNDOFF,
    bf16_bits,
    bf16_from_bits,
    gemm_error_bound,
    matmul,
    round_operand,
)

needs_emulator = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler")

BLOCK_M = BLOCK_N = 64
THREADS = 128
# Dynamic shared memory per layout: 3 stages × (A tile + B tile), as gemm_mma.cu's MmaShared
# (the same bytes for bf16 and tf32: half the elements, twice the size).
SHARED = {"forward": 30720, "data": 29184, "weight": 27648}
# (M, N, K): odd sizes, K not a multiple of 16 or 8, edges of every tile, leading dimensions
# that allow the 16-byte cp.async path (multiples of 8) and ones that do not; K = 0 and M = 0.
SHAPES = [(33, 17, 45), (70, 130, 100), (64, 72, 64), (1, 7, 1), (129, 9, 24), (5, 3, 0), (0, 6, 5)]


@pytest.fixture(scope="module")
def seam() -> EmuSeam:
    return EmuSeam()


@pytest.fixture(scope="module")
def module(seam):
    return seam.compile("gemm_mma.cu", {"REAL_T": "float"})


def grid(rows: int, cols: int) -> tuple[int, int]:
    return (max(1, -(-rows // BLOCK_M)), max(1, -(-cols // BLOCK_N)))


def operand(x: np.ndarray, precision: str) -> np.ndarray:
    """What the kernel reads: bf16 bits, or fp32 (rounded to tf32 inside the kernel)."""
    return bf16_bits(x) if precision == "bf16" else np.ascontiguousarray(x, np.float32)


def i32(v: int) -> np.int32:
    return np.int32(v)


def assert_within(out: np.ndarray, ref: np.ndarray, bound: np.ndarray, what: str) -> None:
    error = np.abs(out.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else ()
    assert np.all(error <= bound), (
        f"{what}: |out - ref| = {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


@needs_emulator
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_layout_matches_the_reference(seam, module, precision, shape):
    M, N, K = shape
    rng = np.random.default_rng(M * 1000 + N * 10 + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    delta = rng.standard_normal((M, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    xr, wr, dr = (round_operand(a, precision).astype(np.float64) for a in (x, w, delta))

    y, z = seam.empty((M, N), np.float32), seam.empty((M, N), np.float32)
    y16 = seam.empty((M, N), np.uint16)
    extra = (y16,) if precision == "bf16" else ()
    flags = (i32(1),) if precision == "bf16" else ()
    args = (operand(x, precision), operand(w, precision), bias, y, z, *extra)
    args += (i32(M), i32(N), i32(K), i32(1), i32(1), *flags, i32(ACTIVATION_CODES["tanh"]))
    seam.launch(
        module,
        f"dense_forward_{precision}",
        grid(M, N),
        THREADS,
        (*args, np.float32(0)),
        SHARED["forward"],
    )
    # Z against the same rounded operands (only the fp32 summation order differs), plus the
    # rounding of the bias addition; Y = tanh(Z) within |tanh'| ≤ 1 of that and 4 u of itself.
    z_ref = xr @ wr.T + bias
    z_bound = gemm_error_bound(x, w.T, precision, exact=False) + 2**-24 * np.abs(z_ref)
    assert_within(z, z_ref, z_bound, "Z")
    assert_within(y, np.tanh(z_ref), z_bound + 4 * 2**-24 * np.abs(np.tanh(z_ref)), "Y")
    # Z against float64 on the unrounded operands: the precision's own rounding error.
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    assert_within(
        z,
        exact,
        gemm_error_bound(x, w.T, precision, exact=True) + 2**-24 * np.abs(exact),
        "Z exact",
    )
    if precision == "bf16":  # the next layer's operand: Y rounded to nearest even
        np.testing.assert_array_equal(y16, bf16_bits(y))

    dx = seam.empty((M, K), np.float32)
    seam.launch(
        module,
        f"dense_backward_data_{precision}",
        grid(M, K),
        THREADS,
        (operand(delta, precision), operand(w, precision), dx, i32(M), i32(N), i32(K)),
        SHARED["data"],
    )
    assert_within(dx, dr @ wr, gemm_error_bound(delta, w, precision, exact=False), "dX")

    dw = seam.empty((N, K), np.float32)
    seam.launch(
        module,
        f"dense_backward_weight_{precision}",
        grid(N, K),
        THREADS,
        (operand(delta, precision), operand(x, precision), dw, i32(M), i32(N), i32(K)),
        SHARED["weight"],
    )
    assert_within(dw, dr.T @ xr, gemm_error_bound(delta.T, x, precision, exact=False), "dW")


@needs_emulator
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_epilogue(seam, module, precision, activation):
    M, N, K = 37, 21, 19
    rng = np.random.default_rng(ACTIVATION_CODES[activation])
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    alpha = np.float32(0.1)
    for has_bias, write_z in ((1, 0), (0, 1)):
        y, z = seam.empty((M, N), np.float32), np.full((M, N), 7.0, np.float32)
        y16 = seam.empty((M, N), np.uint16)
        extra = (y16,) if precision == "bf16" else ()
        flags = (i32(1),) if precision == "bf16" else ()
        args = (operand(x, precision), operand(w, precision), bias, y, z, *extra)
        args += (i32(M), i32(N), i32(K), i32(has_bias), i32(write_z), *flags)
        args += (i32(ACTIVATION_CODES[activation]), alpha)
        seam.launch(
            module, f"dense_forward_{precision}", grid(M, N), THREADS, args, SHARED["forward"]
        )
        z_ref = matmul(x, w.T, precision).astype(np.float64) + (bias if has_bias else 0.0)
        z_bound = gemm_error_bound(x, w.T, precision, exact=False) + 2**-24 * np.abs(z_ref)
        y_ref = activation_value(activation, z_ref, float(alpha))
        # |f'| ≤ 1.13 for every activation here (GELU's maximum); f evaluated in fp32.
        y_bound = 1.13 * z_bound + 8 * 2**-24 * (np.abs(y_ref) + 1.0)
        assert_within(y, y_ref, y_bound, f"Y ({activation}, bias={has_bias})")
        if write_z:
            assert_within(z, z_ref, z_bound, "Z")
        else:
            assert np.all(z == 7.0), "Z was written although write_z = 0"
        if precision == "bf16":
            np.testing.assert_array_equal(y16, bf16_bits(y))


@pytest.fixture(scope="module")
def emu_backend():
    from gpubackprop.backends import get_backend

    return get_backend("emu")


@needs_emulator
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(37, 21, 19), (45, 40, 24)], ids=lambda s: "x".join(map(str, s)))
def test_fused_backward_kernels_match_the_unfused_ones_and_the_reference(
    emu_backend, precision, activation, shape
):
    """dense_backward_weight_act_<p>: δ = dout ⊙ f'(saved) formed in fp32 as the A operand is
    loaded (scalar loads and stores at N = 21, 16-byte ones at N = 40), rounded to the
    precision, db summed from the fp32 δ, the rounded δ stored for dense_backward_data_<p>.
    dW, dX and the stored δ equal, bit for bit, the unfused path (the elementwise δ, to_bf16,
    the plain kernels); db and both products match float64 within the precision's bound
    (gemm_error_bound, exact) at K and M not multiples of 16."""
    from gpubackprop.backends.numpy_backend import NumpyBackend

    backend = emu_backend
    M, N, K = shape
    rng = np.random.default_rng(ACTIVATION_CODES[activation] * 10 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    dout = rng.standard_normal((M, N)).astype(np.float32)
    _, saved = NumpyBackend().dense_forward(x, w, bias, activation, 0.1)
    saved = dout if saved is None else saved
    dev = [backend.asarray(a) for a in (dout, x, w, saved)]
    dw, db = backend.empty((N, K), np.float32), backend.empty((N,), np.float32)
    dx = backend.dense_backward(*dev, activation, 0.1, dw, db, True, precision)
    dw, db, dx = (np.asarray(backend.to_numpy(a), np.float64) for a in (dw, db, dx))

    delta = backend.activation_backward(dev[0], dev[3], activation, 0.1)
    dims = (i32(M), i32(N), i32(K))
    plain_dw, plain_dx = backend.empty((N, K), np.float32), backend.empty((M, K), np.float32)
    delta_op, x_op, w_op = (backend._mma_operand(a, precision) for a in (delta, dev[1], dev[2]))
    backend._mma("dense_backward_weight", N, K, (delta_op, x_op, plain_dw, *dims), precision)
    backend._mma("dense_backward_data", M, K, (delta_op, w_op, plain_dx, *dims), precision)
    np.testing.assert_array_equal(dw, backend.to_numpy(plain_dw))
    np.testing.assert_array_equal(dx, backend.to_numpy(plain_dx))
    # The δ the dW kernel stores for dX: every element once, by the blocks of column tile 0.
    stored = backend.empty((M, N), np.uint16 if precision == "bf16" else np.float32)
    args = (dev[0], dev[3], x_op, plain_dw, plain_dw, stored, *dims)  # no db: has_bias = 0
    args += (i32(ACTIVATION_CODES[activation]), np.float32(0.1), i32(0), i32(1))
    backend._mma("dense_backward_weight_act", N, K, args, precision)
    np.testing.assert_array_equal(backend.to_numpy(stored), backend.to_numpy(delta_op))

    delta64 = backend.to_numpy(delta).astype(np.float64)
    np.testing.assert_allclose(db, delta64.sum(0), rtol=0, atol=M * 2**-23 * np.abs(delta64).max())
    for out, (a, b) in ((dw, (delta64.T, x)), (dx, (delta64, w))):
        exact = a @ b.astype(np.float64)
        bound = gemm_error_bound(a, b, precision, exact=True)
        assert_within(out, exact, bound, f"{precision} {activation}")


@needs_emulator
def test_to_bf16_rounds_to_nearest_even(seam, module):
    x = np.random.default_rng(0).standard_normal(1001).astype(np.float32) * 1e3
    x[:3] = [1 + 2.0**-8, 1 + 3 * 2.0**-8, -np.inf]
    out = seam.empty(x.size, np.uint16)
    seam.launch(module, "to_bf16", 4, 128, (x, out, np.int64(x.size)))
    np.testing.assert_array_equal(out, bf16_bits(x))
    assert bf16_from_bits(out[:2]).tolist() == [1.0, 1 + 2.0**-6]


@needs_emulator
def test_the_result_does_not_depend_on_thread_order(module):
    """Each warp's lanes run in a shuffled order between barriers: a missing barrier or a
    cp.async read before its wait would change the result or be reported."""
    M, N, K = 65, 40, 50
    rng = np.random.default_rng(9)
    delta = bf16_bits(rng.standard_normal((M, N)))
    x = bf16_bits(rng.standard_normal((M, K)))
    dout = rng.standard_normal((M, N)).astype(np.float32)
    saved = rng.standard_normal((M, N)).astype(np.float32)
    code, alpha = i32(ACTIVATION_CODES["tanh"]), np.float32(0)
    results = []
    for seed in (0, 3, 11):
        shuffled = EmuSeam(shuffle_seed=seed)
        compiled = shuffled.compile("gemm_mma.cu", {"REAL_T": "float"})
        dw = np.zeros((N, K), np.float32)
        shuffled.launch(
            compiled,
            "dense_backward_weight_bf16",
            grid(N, K),
            THREADS,
            (delta, x, dw, i32(M), i32(N), i32(K)),
            SHARED["weight"],
        )
        # δ formed on load: stored into a stage after the mma's, db through shared memory.
        dw_act, db = np.zeros((N, K), np.float32), np.zeros(N, np.float32)
        delta16 = np.zeros((M, N), np.uint16)
        args = (dout, saved, x, dw_act, db, delta16, i32(M), i32(N), i32(K), code, alpha)
        args += (i32(1), i32(1))
        shuffled.launch(
            compiled, "dense_backward_weight_act_bf16", grid(N, K), THREADS, args, SHARED["weight"]
        )
        results.append((dw, dw_act, db, delta16))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_tolerances_are_derived_from_k_and_the_unit_roundoff():
    a, b = np.ones((1, 100)), np.ones((100, 1))
    gamma = 100 * 2.0**-24 / (1 - 100 * 2.0**-24)
    for precision, u in UNIT_ROUNDOFF.items():
        assert gemm_error_bound(a, b, precision, exact=False)[0, 0] == pytest.approx(200 * gamma)
        assert gemm_error_bound(a, b, precision, exact=True)[0, 0] == pytest.approx(
            100 * (2 * u + u * u + gamma)
        )


# ---- NVRTC -------------------------------------------------------------------------------

try:
    from cupy_backends.cuda.libs import nvrtc

    nvrtc.getVersion()
    NVRTC_REASON = ""
except Exception as error:  # no CuPy or no NVRTC library
    NVRTC_REASON = f"NVRTC cannot load: {type(error).__name__}: {error}"

MMA_LAYOUTS = ("forward", "backward_data", "backward_weight")
MMA_KERNELS = {
    f"dense_{layout}_{precision}"
    for layout in (*MMA_LAYOUTS, "backward_weight_act")
    for precision in ("bf16", "tf32")
}


@pytest.mark.skipif(bool(NVRTC_REASON), reason=NVRTC_REASON or "ok")
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_tensor_core_kernels_compile_without_spills(arch):
    _, log = kernels.nvrtc_compile(
        kernels.load_source("gemm_mma.cu", {"REAL_T": "float"}), arch, verbose=True
    )
    report = kernels.ptxas_report(log)
    assert MMA_KERNELS <= set(report)
    for name in MMA_KERNELS:
        stats = report[name]
        assert stats["spill_stores"] == 0 and stats["spill_loads"] == 0, (arch, name, stats)
        assert 32 < stats["registers"] <= 255, (arch, name, stats)  # a real body, not a trap
