"""Layer 4 of the test plan: every kernel backend against the NumPy float64 reference.

"emu" runs in every CI run (the CUDA sources on the CPU emulator, each launch twice to catch
reads out of bounds: tests/conftest.py), and again as "emu-device-arrays", whose arrays follow
CuPy's rules (no implicit conversion to NumPy); "cupy" runs where a GPU is present (marker
``gpu``).  Each is skipped, with the reason, where unusable."""

import functools
import os

import numpy as np
import pytest

from gpubackprop.backends import available_backends, get_backend
from gpubackprop.backends.base import ACTIVATIONS
from gpubackprop.parity import MODEL_LOSSES, check_case, model_rows, op_cases

KERNEL_BACKENDS = [
    pytest.param("emu", id="emu"),
    pytest.param("emu-device-arrays", id="emu-device-arrays"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]
CASES = op_cases(seed=2024)


@pytest.fixture
def kernel_backend(request, monkeypatch):
    name = request.param
    if name == "emu-device-arrays":
        ok, reason = available_backends()["emu"]
        if not ok:
            pytest.skip(f"backend 'emu' is unavailable here: {reason}")
        return _emu_with_device_arrays()
    ok, reason = available_backends()[name]
    if not ok and name == "cupy" and os.environ.get("GPUBACKPROP_REQUIRE_GPU"):
        pytest.fail(f"GPUBACKPROP_REQUIRE_GPU is set but cupy is unavailable: {reason}")
    if not ok:
        pytest.skip(f"backend {name!r} is unavailable here: {reason}")
    backend = get_backend(name)
    if name == "cupy":
        # Poison every output the launchers allocate, so an unwritten element fails.
        # (The emulator poisons on its own, with a pattern it checks after each launch.)
        plain_empty = backend.seam.empty

        def poisoned_empty(shape, dtype):
            array = plain_empty(shape, dtype)
            array.fill(np.nan)
            return array

        monkeypatch.setattr(backend.seam, "empty", poisoned_empty)
    return backend


@functools.cache
def _emu_with_device_arrays():
    from gpubackprop.backends.emu_backend import EmuBackend

    return EmuBackend(device_arrays=True)


def _assert_rows(rows):
    failures = [r for r in rows if not r.passed]
    assert not failures, "\n".join(
        f"{r.op} {r.shape} {r.dtype} {r.tensor}: max abs {r.max_abs_error:.3e}, "
        f"max rel {r.max_rel_error:.3e} {r.note}"
        for r in failures
    )


# Each case in each dtype it runs in (the tensor-core precisions take float32 arrays only).
DTYPE_CASES = [
    pytest.param(dtype, case, id=f"{dtype}-{case.op}-{case.shape}")
    for dtype in ("float32", "float64")
    for case in CASES
    if case.runs_in(dtype)
]


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize(("dtype", "case"), DTYPE_CASES)
def test_op_matches_float64_reference(kernel_backend, dtype, case):
    """Against NumPy in float64, or the NumPy model of a tensor-core precision."""
    _assert_rows(check_case(case, kernel_backend, dtype))


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss_name", MODEL_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_twenty_training_steps_match_reference(kernel_backend, dtype, activation, loss_name):
    _assert_rows(model_rows(kernel_backend, dtype, activation, loss_name))


def test_parity_covers_every_op_of_the_contract():
    covered = {case.op.split("[")[0] for case in CASES}
    assert covered >= {
        "dense_forward",
        "dense_backward",
        "activation_forward",
        "activation_backward",
        "softmax_cross_entropy",
        "mse_loss",
        "bce_with_logits",
        "bce",
        "sgd_step",
        "adam_step",
        "adamw_step",
        "sum_of_squares",
        "scale_",
        "add",
        "standardize_forward",
        "standardize_backward",
    }
    shapes = {case.shape for case in CASES if case.op.startswith("dense_forward")}
    assert {"1x1x1", "1000x33x7", "33x7x129"} <= shapes


def test_the_comparison_catches_a_wrong_or_unwritten_output():
    from gpubackprop.parity import compare

    ref = np.linspace(-1, 1, 50)
    assert compare(ref.astype(np.float32), ref, 2e-5)[2]
    wrong = ref.copy()
    wrong[7] += 1e-3
    assert not compare(wrong, ref, 2e-5)[2]
    unwritten = ref.copy()
    unwritten[3] = np.nan
    assert not compare(unwritten, ref, 2e-5)[2]


def test_emulator_is_available_wherever_a_host_compiler_is():
    """The emu parity suite must never skip itself into green on a CI machine with g++."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no host C++ compiler on this machine")
    ok, reason = available_backends()["emu"]
    assert ok, f"the emulator backend is unavailable although g++ exists: {reason}"
