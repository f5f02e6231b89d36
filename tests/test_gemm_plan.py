"""The GEMM plan (gemm_config.GemmConfig.plan): smaller tiles and a deterministic split-K for
outputs with few blocks, each checked on the emulator at odd shapes against NumPy float64."""

from __future__ import annotations

import numpy as np
import pytest

from gpubackprop.backends import get_backend
from gpubackprop.backends.gemm_config import GemmConfig

RTOL = 2e-5  # float32 against float64, inner dimensions up to ~1100


@pytest.mark.parametrize(
    ("rows", "cols", "inner", "sms", "variant", "splits"),
    [
        (4096, 4096, 64, 132, "", 1),  # 1024 blocks of 128×128: the configured tile
        # 16 blocks of 128×128 -> 64 of 64×64, still under half the SMs: 2 slices of 392
        (256, 1024, 784, 132, "64x64", 2),
        (32, 1024, 128, 132, "32x128", 1),  # a small batch: short, wide output
        (10, 64, 4096, 132, "64x64", 8),  # one block, a long inner dimension: split-K
        (10, 64, 4096, 1, "", 1),  # one SM: one block fills it
    ],
)
def test_the_plan_follows_the_documented_rule(rows, cols, inner, sms, variant, splits):
    plan = GemmConfig().plan("dense_forward", "float", rows, cols, inner, sms)
    assert (plan.variant, plan.splits) == (variant, splits)
    if splits > 1:
        assert plan.chunk % 8 == 0 and (splits - 1) * plan.chunk < inner <= splits * plan.chunk
        assert plan.launch.kernel == "dense_forward_splitk" and plan.launch.grid[2] == splits
    # Explicit tiles (a sweep) and other versions are launched as configured.
    fixed = GemmConfig(tiles={"float": {"TILE_K": 8}}).plan(
        "dense_forward", "float", 10, 64, 4096, 132
    )
    assert (fixed.variant, fixed.splits) == ("", 1)
    assert GemmConfig("naive").plan("dense_forward", "float", 10, 64, 4096, 132).splits == 1


@pytest.fixture(scope="module")
def emu():
    backend = get_backend("emu")
    return backend


# (M, N, K) = (batch, out_features, in_features) of a dense layer, and the SM count that makes
# the plan pick each path for it.
CASES = {
    "128x128": ((37, 19, 23), 1),
    "64x64": ((67, 45, 29), 132),
    "32x128": ((9, 133, 21), 132),
    "64x64+splitk": ((7, 5, 1031), 132),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_plan_matches_float64_at_odd_shapes(emu, name):
    (m, n, k), sms = CASES[name]
    backend = emu.with_gemm_version("tiled")
    backend._sm_count = sms
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((n, k))
    b = rng.standard_normal(n)
    # dW's inner dimension is the batch: give it a long one for the split-K case.
    big_batch = 1031 if "splitk" in name else m
    xb, doutb = rng.standard_normal((big_batch, k)), rng.standard_normal((big_batch, n))
    f32 = lambda a: backend.asarray(a, np.float32)  # noqa: E731
    as64 = lambda a: np.asarray(backend.to_numpy(a), np.float64)  # noqa: E731

    _, z = backend.dense_forward(f32(x), f32(w), f32(b), "gelu")
    ref_z = x @ w.T + b
    np.testing.assert_allclose(as64(z), ref_z, rtol=RTOL, atol=RTOL * np.abs(ref_z).max())
    dw = backend.empty((n, k), np.float32)
    dx = backend.dense_backward(f32(doutb), f32(xb), f32(w), None, "identity", 0.0, dw, None, True)
    ref_dw, ref_dx = doutb.T @ xb, doutb @ w
    np.testing.assert_allclose(as64(dw), ref_dw, rtol=RTOL, atol=RTOL * np.abs(ref_dw).max())
    np.testing.assert_allclose(as64(dx), ref_dx, rtol=RTOL, atol=RTOL * np.abs(ref_dx).max())
    # Deterministic: the same call gives the same bits.
    again = backend.dense_forward(f32(x), f32(w), f32(b), "gelu")[1]
    assert np.array_equal(backend.to_numpy(again), backend.to_numpy(z))
    plans = {key[0]: plan for key, plan in backend.gemm._plans.items()}
    if name == "128x128":
        assert all(p.variant == "" and p.splits == 1 for p in plans.values())
    elif "splitk" in name:
        assert plans["dense_forward"].splits > 1 and plans["dense_backward_weight"].splits > 1
    else:
        assert plans["dense_forward"].variant == name


ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")


def _dense_reference(m, n, k, activation, seed):
    """Fresh float64 operands of a dense layer and NumPy's forward and backward of them:
    (dout, x, w, b, saved, (dw, db, dx))."""
    from gpubackprop.backends.numpy_backend import NumpyBackend

    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((m, k)), rng.standard_normal((n, k)), rng.standard_normal(n)
    dout = rng.standard_normal((m, n))
    reference = NumpyBackend()
    _, saved = reference.dense_forward(x, w, b, activation, 0.1)
    dw, db = np.empty((n, k)), np.empty(n)
    dx = reference.dense_backward(dout, x, w, saved, activation, 0.1, dw, db, True)
    return dout, x, w, b, saved, (dw, db, dx)


def _assert_fused_matches(results, expected):
    """The fused dW and dX bit for bit the unfused ones, db within fp32 rounding of theirs, and
    all three within float32 rounding of NumPy float64's."""
    (dw, db, dx), (dw_plain, db_plain, dx_plain) = results[True], results[False]
    assert np.array_equal(dw, dw_plain) and np.array_equal(dx, dx_plain)
    np.testing.assert_allclose(db, db_plain, rtol=1e-5, atol=1e-5 * np.abs(db_plain).max())
    for ours, ref in zip((dw, db, dx), expected):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_dense_backward_is_two_launches_and_matches_the_reference(emu, activation):
    """δ = ∂L/∂y ⊙ f' formed as the GEMMs load it and db from the dW GEMM: dW and dX equal the
    unfused path's bits (the same δ, the same GEMM), db matches Σ_rows δ in float64."""
    from gpubackprop.backends.recording import HostBackend

    dout, x, w, b, _, expected = _dense_reference(37, 19, 23, activation, seed=3)
    f32 = lambda a: emu.asarray(a, np.float32)  # noqa: E731
    _, saved = emu.dense_forward(f32(x), f32(w), f32(b), activation, 0.1)
    arrays = (f32(dout), f32(x), f32(w), saved)
    results = {
        fused: _dense_backward_results(emu.with_gemm_version("tiled"), arrays, activation, fused)
        for fused in (True, False)
    }
    _assert_fused_matches(results, expected)
    dw, db = results[True][:2]
    host = HostBackend()
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    host.dense_backward(f(dout), f(x), f(w), f(dout), activation, 0.1, f(dw), f(db), True)
    assert [launch.kernel for launch in host.seam.launches] == [
        "dense_backward_weight_act",
        "dense_backward_data_act",
    ]


# (version, (M, N, K), SM count) of a dense backward, and which of its GEMMs the plan splits:
# the warp-tiled version, a long batch (dW split), a long output width (dX split), both.
FUSED_CASES = {
    "warptiled": ("warptiled", (37, 19, 23), 132, set()),
    "splitk-dW": ("tiled", (1031, 5, 7), 132, {"dense_backward_weight"}),
    "splitk-dX": ("tiled", (7, 1031, 5), 132, {"dense_backward_data"}),
    "splitk-both": ("tiled", (600, 600, 3), 132, {"dense_backward_weight", "dense_backward_data"}),
}


def _dense_backward_results(backend, arrays, activation, fused):
    """dW, db, dX of one dense_backward, fused (δ formed on load) or through the unfused path
    (the elementwise δ, the GEMMs and column_sum)."""
    dout, x, w, saved = arrays
    if not fused:
        backend._fused_backward = lambda *shape: None
    n, k = w.shape
    dw, db = backend.empty((n, k), np.float32), backend.empty((n,), np.float32)
    dx = backend.dense_backward(dout, x, w, saved, activation, 0.1, dw, db, True)
    return [np.asarray(backend.to_numpy(a), np.float64) for a in (dw, db, dx)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_backward_of_every_version_and_split_matches_the_unfused_bits(emu, case, activation):
    """The warp-tiled *_act kernels and the split-K ones (δ formed on load in each slice, the
    slices' dW, db and dX added by gemm_splitk_reduce_backward) give the unfused path's dW and
    dX bit for bit (the same δ, the same products, the same slice order) and db within fp32
    rounding of Σ_rows δ; all of them match NumPy float64."""
    version, (m, n, k), sms, split = FUSED_CASES[case]
    seed = ACTIVATIONS.index(activation)
    dout, x, w, _, saved_ref, expected = _dense_reference(m, n, k, activation, seed)

    f32 = lambda a: emu.asarray(a, np.float32)  # noqa: E731
    saved = None if saved_ref is None else f32(saved_ref)
    arrays = (f32(dout), f32(x), f32(w), saved)
    results = {}
    for fused in (True, False):
        backend = emu.with_gemm_version(version)
        backend._sm_count = sms
        results[fused] = _dense_backward_results(backend, arrays, activation, fused)
        if fused:
            plans = backend._fused_backward(m, n, k, np.dtype(np.float32))
            assert {
                plan.launch.kernel.removesuffix("_splitk") for plan, _ in plans if plan.splits > 1
            } == split
            assert all(
                name.startswith(("dense_backward_weight_act", "dense_backward_data_act"))
                for _, name in plans
            )
    _assert_fused_matches(results, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_backward_of_every_version_and_split_on_the_gpu(case):
    """The same kernels compiled by NVRTC and run on a GPU (its SM count replaced by the case's,
    so that the plan splits as on the emulator), against NumPy float64."""
    import gpubackprop as gb

    available, reason = gb.available_backends()["cupy"]
    if not available:
        pytest.skip(f"backend 'cupy' is unavailable: {reason}")
    version, (m, n, k), sms, split = FUSED_CASES[case]
    backend = get_backend("cupy").with_gemm_version(version)
    backend._sm_count = sms
    dout, x, w, _, saved, expected = _dense_reference(m, n, k, "gelu", seed=12)
    arrays = [backend.asarray(a, np.float32) for a in (dout, x, w, saved)]
    dw, db = backend.empty((n, k), np.float32), backend.empty((n,), np.float32)
    dx = backend.dense_backward(*arrays, "gelu", 0.1, dw, db, True)
    plans = backend._fused_backward(m, n, k, np.dtype(np.float32))
    assert {p.launch.kernel.removesuffix("_splitk") for p, _ in plans if p.splits > 1} == split
    for ours, ref in zip((dw, db, dx), expected):
        ours = np.asarray(backend.to_numpy(ours), np.float64)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("case", ["warptiled", "splitk-both"])
def test_fused_backward_in_float64_matches_the_reference(emu, case):
    """The same kernels compiled for double (the warp-tiled version with its double tiles)."""
    version, (m, n, k), sms, _ = FUSED_CASES[case]
    dout, x, w, _, saved, expected = _dense_reference(m, n, k, "silu", seed=11)
    backend = emu.with_gemm_version(version)
    backend._sm_count = sms
    arrays = [backend.asarray(a, np.float64) for a in (dout, x, w, saved)]
    dw, db = backend.empty((n, k), np.float64), backend.empty((n,), np.float64)
    dx = backend.dense_backward(*arrays, "silu", 0.1, dw, db, True)
    for ours, ref in zip((dw, db, dx), expected):
        ours = backend.to_numpy(ours)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


# bf16 and tf32 run gemm_mma.cu whatever the fp32 GEMM version.
@pytest.mark.parametrize(
    ("version", "precision"),
    [("tiled", "fp32"), ("warptiled", "fp32"), ("tiled", "tf32"), ("tiled", "bf16")],
)
@pytest.mark.parametrize("shape", [(37, 19, 23), (1031, 5, 7), (7, 1031, 5)], ids=str)
def test_a_dense_backward_is_two_launches_or_three_when_split(version, precision, shape):
    """What one dense backward launches (recorded, not run): the dW GEMM with db and the dX
    GEMM, in every version and precision (no elementwise δ, no column_sum, no bf16
    conversion); a split GEMM adds one reduction for every split output."""
    from gpubackprop.backends.recording import HostBackend

    m, n, k = shape
    host = HostBackend(gemm_version=version)
    f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    u16 = lambda *s: np.zeros(s, np.uint16)  # noqa: E731
    # bf16: the layer passes bf16(x) (kept since its forward) and bf16(W) (kept by the optimizer)
    bf16 = {"weight_bf16": u16(n, k), "x_bf16": u16(m, k)} if precision == "bf16" else {}
    host.dense_backward(
        f(m, n), f(m, k), f(n, k), f(m, n), "gelu", 0.0, f(n, k), f(n), True, precision, **bf16
    )
    kernels = [launch.kernel for launch in host.seam.launches]
    if precision != "fp32":
        # dX reads the δ the dW kernel stored (bf16 bits, or fp32 for tf32)
        assert kernels == [
            f"dense_backward_weight_act_{precision}",
            f"dense_backward_data_{precision}",
        ]
        return
    split = version == "tiled" and shape != (37, 19, 23)
    suffix = {"tiled": "", "warptiled": "_warptiled"}[version]
    expected = ["dense_backward_weight_act", "dense_backward_data_act"]
    if split:
        which = 0 if shape[0] > shape[1] else 1
        expected[which] += "_splitk"
        expected[1 - which] += suffix
        expected.append("gemm_splitk_reduce_backward")
    else:
        expected = [name + suffix for name in expected]
    assert kernels == expected


def test_the_naive_version_keeps_the_unfused_backward():
    """The naive GEMMs validate the others: their dense backward stays the four launches of the
    unfused path (elementwise δ, dW, column_sum, dX), the documented exception."""
    from gpubackprop.backends.recording import HostBackend

    host = HostBackend(gemm_version="naive")
    f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    host.dense_backward(f(9, 5), f(9, 7), f(5, 7), f(9, 5), "tanh", 0.0, f(5, 7), f(5), True)
    assert [launch.kernel for launch in host.seam.launches] == [
        "gb_activation_backward",
        "dense_backward_weight_naive",
        "column_sum",
        "dense_backward_data_naive",
    ]
