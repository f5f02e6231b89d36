"""Property test: the dense layer's three GEMMs on the emulator, for any M, N, K and any
operand alignment, against NumPy in float64 (hypothesis draws the shapes)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpubackprop.backends import available_backends
from gpubackprop.backends.emu_backend import EmuBackend
from gpubackprop.backends.numpy_backend import NumpyBackend

if not available_backends()["emu"][0]:
    pytest.skip(f"emu unavailable: {available_backends()['emu'][1]}", allow_module_level=True)

# The library's GEMM and the warp-tiled alternative (the naive one is their reference elsewhere).
EMU = {version: EmuBackend(gemm_version=version) for version in ("tiled", "warptiled")}


def _misaligned(array: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``array`` whose first element sits ``offset`` elements past a 256-byte boundary
    (a parameter view deep inside a flat buffer, say): the 16-byte-load path must not be taken
    wrongly."""
    flat = np.zeros(array.size + 64 + offset, dtype=array.dtype)
    start = (-flat.ctypes.data // array.itemsize) % 64 + offset
    view = flat[start : start + array.size].reshape(array.shape)
    view[...] = array
    return view


@pytest.mark.parametrize("version", sorted(EMU))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 260),
    n=st.integers(1, 260),
    k=st.integers(1, 70),
    offset=st.sampled_from([0, 1, 2, 3]),
    activation=st.sampled_from(["identity", "relu", "gelu", "sigmoid"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_forward_and_backward_any_shape(version, m, n, k, offset, activation, seed):
    emu, ref = EMU[version], NumpyBackend()
    rng = np.random.default_rng(seed)
    x, w, b = rng.normal(size=(m, k)), rng.normal(size=(n, k)), rng.normal(size=n)
    dout = rng.normal(size=(m, n))
    y_ref, saved_ref = ref.dense_forward(x, w, b, activation, 0.1)
    dw_ref, db_ref = np.empty((n, k)), np.empty(n)
    dx_ref = ref.dense_backward(dout, x, w, saved_ref, activation, 0.1, dw_ref, db_ref, True)

    f32 = np.float32
    xs, ws = _misaligned(x.astype(f32), offset), _misaligned(w.astype(f32), offset)
    y, saved = emu.dense_forward(xs, ws, b.astype(f32), activation, 0.1)
    dw, db = np.full((n, k), np.nan, f32), np.full(n, np.nan, f32)
    dx = emu.dense_backward(dout.astype(f32), xs, ws, saved, activation, 0.1, dw, db, True)
    for got, want, length in ((y, y_ref, k), (dx, dx_ref, n), (dw, dw_ref, m), (db, db_ref, m)):
        tolerance = 3e-6 * np.sqrt(length) * (np.abs(want).max() + 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
