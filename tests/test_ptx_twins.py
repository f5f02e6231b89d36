"""The emulator twins of the PTX instructions in kernels/ptx_twins.cuh against a NumPy model of
the PTX ISA's tables (fragment layouts of mma.m16n8k16 .bf16 and mma.m16n8k8 .tf32, ldmatrix
with and without .trans), its rounding (cvt.rn.bf16x2.f32 against ml_dtypes; tf32 to nearest
even) and its cp.async semantics (a copy lands at the wait that retires its group; reading or
writing the destination before is reported).  The NumPy model below is written from the ISA's
tables, not from the twins.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gpubackprop import kernels
from gpubackprop.emulator import EmuLaunchError, EmuSeam, EmuUnsupportedError, find_compiler

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler for the emulator")

PROBES = Path(__file__).resolve().parent / "emu_kernels" / "ptx_probe.cu"


def probe_source() -> str:
    twins = (kernels.kernel_dir() / "ptx_twins.cuh").read_text()
    return f'#line 1 "ptx_twins.cuh"\n{twins}\n#line 1 "ptx_probe.cu"\n{PROBES.read_text()}'


def test_the_probes_are_cuda_that_nvrtc_compiles():
    """What the emulator runs here is CUDA as a GPU takes it (sm_80: the tensor-core twins)."""
    cubin, _ = kernels.nvrtc_compile(probe_source(), "sm_80")
    assert cubin


@pytest.fixture(scope="module")
def seam() -> EmuSeam:
    return EmuSeam(shuffle_seed=0)


@pytest.fixture(scope="module")
def probes(seam):
    return seam.compile_text(probe_source(), "ptx_probe.cu")


# ---- NumPy model of the ISA's fragment tables ----------------------------------------------
# groupID = lane >> 2, threadID_in_group = lane % 4 (PTX ISA, "Matrix Fragments for mma").


def bf16_bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def bf16_a_element(lane: int, index: int) -> tuple[int, int]:
    """(row, col) of element a_index (0..7) of lane's A fragment, m16n8k16 .bf16."""
    group, thread = lane >> 2, lane % 4
    row = group if index in (0, 1, 4, 5) else group + 8
    col = thread * 2 + (index & 1) + (8 if index >= 4 else 0)
    return row, col


def bf16_b_element(lane: int, index: int) -> tuple[int, int]:
    """(row k, col n) of element b_index (0..3) of lane's B fragment, m16n8k16 .bf16."""
    group, thread = lane >> 2, lane % 4
    return thread * 2 + (index & 1) + (8 if index >= 2 else 0), group


def tf32_a_element(lane: int, index: int) -> tuple[int, int]:
    """(row, col) of a_index (0..3), m16n8k8 .tf32."""
    group, thread = lane >> 2, lane % 4
    return group + (8 if index in (1, 3) else 0), thread + (4 if index >= 2 else 0)


def tf32_b_element(lane: int, index: int) -> tuple[int, int]:
    """(row k, col n) of b_index (0..1), m16n8k8 .tf32."""
    group, thread = lane >> 2, lane % 4
    return thread + 4 * index, group


def accumulator_element(lane: int, index: int) -> tuple[int, int]:
    """(row, col) of c_index / d_index (0..3), both shapes."""
    group, thread = lane >> 2, lane % 4
    return group + (8 if index >= 2 else 0), thread * 2 + (index & 1)


def pack_pairs(halves: np.ndarray) -> np.ndarray:
    """uint16 (..., 2n) → uint32 (..., n), element 2j in the low half."""
    halves = halves.astype(np.uint32)
    return halves[..., 0::2] | (halves[..., 1::2] << 16)


def bf16_fragments(a: np.ndarray, b: np.ndarray, c: np.ndarray):
    a_bits, b_bits = bf16_bits(a), bf16_bits(b)
    ra = np.zeros((32, 8), np.uint16)
    rb = np.zeros((32, 4), np.uint16)
    rc = np.zeros((32, 4), np.float32)
    for lane in range(32):
        for index in range(8):
            ra[lane, index] = a_bits[bf16_a_element(lane, index)]
        for index in range(4):
            rb[lane, index] = b_bits[bf16_b_element(lane, index)]
            rc[lane, index] = c[accumulator_element(lane, index)]
    return pack_pairs(ra), pack_pairs(rb), rc


def tf32_fragments(a: np.ndarray, b: np.ndarray, c: np.ndarray):
    ra = np.zeros((32, 4), np.uint32)
    rb = np.zeros((32, 2), np.uint32)
    rc = np.zeros((32, 4), np.float32)
    a_bits, b_bits = a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32)
    for lane in range(32):
        for index in range(4):
            ra[lane, index] = a_bits[tf32_a_element(lane, index)]
            rc[lane, index] = c[accumulator_element(lane, index)]
        for index in range(2):
            rb[lane, index] = b_bits[tf32_b_element(lane, index)]
    return ra, rb, rc


def unfragment_accumulator(d: np.ndarray) -> np.ndarray:
    out = np.full((16, 8), np.nan, np.float32)
    for lane in range(32):
        for index in range(4):
            out[accumulator_element(lane, index)] = d[lane, index]
    return out


def run_mma(seam, probes, kernel, fragments, warps):
    a = np.concatenate([f[0] for f in fragments])
    b = np.concatenate([f[1] for f in fragments])
    c = np.concatenate([f[2] for f in fragments])
    d = seam.empty((32 * warps, 4), np.float32)
    seam.launch(probes, kernel, warps, 32, (a, b, c, d))
    return [unfragment_accumulator(d[32 * w : 32 * w + 32]) for w in range(warps)]


# ---- mma ---------------------------------------------------------------------------------


def test_mma_bf16_fragment_layout_is_exact_on_small_integers(seam, probes):
    rng = np.random.default_rng(1)
    cases = [
        (
            rng.integers(-8, 9, (16, 16)),
            rng.integers(-8, 9, (16, 8)),
            rng.integers(-50, 50, (16, 8)),
        )
        for _ in range(2)
    ]
    fragments = [bf16_fragments(a, b, c.astype(np.float32)) for a, b, c in cases]
    results = run_mma(seam, probes, "probe_mma_bf16", fragments, warps=2)
    for (a, b, c), d in zip(cases, results, strict=True):
        np.testing.assert_array_equal(d, (a @ b + c).astype(np.float32))


def test_mma_bf16_rounds_nothing_and_accumulates_in_fp32(seam, probes):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((16, 16)).astype(ml_dtypes.bfloat16).astype(np.float64)
    b = rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16).astype(np.float64)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    (d,) = run_mma(seam, probes, "probe_mma_bf16", [bf16_fragments(a, b, c)], warps=1)
    exact = a @ b + c
    # 17 fp32 additions of exact products: |error| <= 17 u Σ|terms|, u = 2^-24.
    bound = 17 * 2.0**-24 * (np.abs(a) @ np.abs(b) + np.abs(c))
    assert np.all(np.abs(d - exact) <= bound)


def test_mma_tf32_fragment_layout_and_the_ignored_low_bits(seam, probes):
    rng = np.random.default_rng(3)
    a = rng.integers(-8, 9, (16, 8)).astype(np.float32)
    b = rng.integers(-8, 9, (8, 8)).astype(np.float32)
    c = rng.integers(-50, 50, (16, 8)).astype(np.float32)
    (d,) = run_mma(seam, probes, "probe_mma_tf32", [tf32_fragments(a, b, c)], warps=1)
    np.testing.assert_array_equal(d, a @ b + c)
    # The tensor core reads 10 mantissa bits: 1 + 2^-12 is read as 1 (the kernels round first).
    noisy = (a.view(np.uint32) | np.uint32(0x00000FFF) * (a != 0)).view(np.float32)
    (d,) = run_mma(seam, probes, "probe_mma_tf32", [tf32_fragments(noisy, b, c)], warps=1)
    np.testing.assert_array_equal(d, a @ b + c)


def test_mma_needs_the_whole_warp(seam, probes):
    a, b, c = bf16_fragments(np.ones((16, 16)), np.ones((16, 8)), np.zeros((16, 8), np.float32))
    with pytest.raises(EmuLaunchError, match=r"mma.sync.*needs all 32 lanes.*only 16"):
        seam.launch(probes, "probe_mma_bf16", 1, 16, (a, b, c, np.zeros((16, 4), np.float32)))


# ---- ldmatrix ----------------------------------------------------------------------------


def ldmatrix_model(tile: np.ndarray, offsets: np.ndarray, trans: bool) -> np.ndarray:
    """Registers (32, 4) of ldmatrix.m8n8.x4[.trans].b16: matrix i's rows are given by lanes
    8i..8i+7; without .trans lane l gets elements 2(l%4), 2(l%4)+1 of row l/4, with .trans
    element l/4 of rows 2(l%4) and 2(l%4)+1."""
    out = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        for i in range(4):
            rows = [tile[o : o + 8] for o in offsets[8 * i : 8 * i + 8]]
            if trans:
                low, high = rows[2 * (lane % 4)][lane // 4], rows[2 * (lane % 4) + 1][lane // 4]
            else:
                row = rows[lane // 4]
                low, high = row[2 * (lane % 4)], row[2 * (lane % 4) + 1]
            out[lane, i] = int(low) | (int(high) << 16)
    return out


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_fragment_layout(seam, probes, trans):
    rng = np.random.default_rng(4 + trans)
    tile = rng.permutation(1024).astype(np.uint16)  # every element distinct
    offsets = (8 * rng.permutation(128)[:32]).astype(np.int32)  # 32 distinct 16-byte rows
    out = seam.empty((32, 4), np.uint32)
    seam.launch(probes, "probe_ldmatrix", 1, 32, (tile, offsets, np.int32(trans), out))
    np.testing.assert_array_equal(out, ldmatrix_model(tile, offsets, bool(trans)))


def test_ldmatrix_refuses_misaligned_and_global_addresses(seam, probes):
    tile = np.arange(1024, dtype=np.uint16)
    offsets = (8 * np.arange(32)).astype(np.int32)
    offsets[5] += 1  # 2 bytes off a 16-byte boundary
    out = np.zeros((32, 4), np.uint32)
    with pytest.raises(EmuLaunchError, match=r"lane 5 gives row address .* not 16-byte aligned"):
        seam.launch(probes, "probe_ldmatrix", 1, 32, (tile, offsets, np.int32(0), out))
    with pytest.raises(EmuLaunchError, match=r"not in shared memory"):
        seam.launch(probes, "probe_ldmatrix_global", 1, 32, (tile, out))


# ---- cp.async ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["probe_cp_async", "probe_cp_async_template"])
@pytest.mark.parametrize("src_bytes", [16, 8, 0])
def test_cp_async_lands_at_the_wait_of_its_group(seam, probes, src_bytes, kernel, monkeypatch):
    """The buffer a kernel's static __shared__, or a template's (kept out of the emulator's
    shared section by g++, filled and tracked all the same)."""
    src = np.random.default_rng(5).standard_normal(3 * 128).astype(np.float32)
    early = np.zeros((32, 3, 4), np.float32)
    out = np.zeros((32, 3, 4), np.float32)
    args = (src, np.int32(src_bytes), early, out)
    # The probe reads its newest group before the wait that lands it: the guard-check run (its
    # shared memory holds other bytes) reports that read ...
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "1")
    with pytest.raises(EmuLaunchError, match=r"'early' .* changed when .* shared memory"):
        seam.launch(probes, kernel, 1, 32, args)
    # ... and a single run shows what it read.
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "0")
    seam.launch(probes, kernel, 1, 32, args)
    groups = src.reshape(3, 32, 4).transpose(1, 0, 2).copy()
    groups[:, 2, src_bytes // 4 :] = 0.0  # the bytes past src-size are zero-filled
    # After wait_group 1 the two oldest groups have landed; the newest reads as uninitialised
    # shared memory (NaN) until wait_group 0.
    np.testing.assert_array_equal(early[:, :2], groups[:, :2])
    assert np.isnan(early[:, 2]).all()
    np.testing.assert_array_equal(out, np.roll(groups, -1, axis=0))


def test_reading_or_writing_a_copy_in_flight_is_reported(seam, probes):
    src = np.arange(256, dtype=np.uint16)
    with pytest.raises(EmuLaunchError, match=r"ldmatrix.*before the cp.async that writes it"):
        seam.launch(
            probes, "probe_ldmatrix_before_wait", 1, 32, (src, np.zeros((32, 4), np.uint32))
        )
    with pytest.raises(EmuLaunchError, match=r"written while a cp.async to it was in flight"):
        seam.launch(
            probes,
            "probe_store_during_copy",
            1,
            32,
            (np.ones(128, np.float32), np.zeros(32, np.float32)),
        )


# ---- conversions -------------------------------------------------------------------------


def test_cvt_bf16x2_rounds_to_nearest_even_like_ml_dtypes(seam, probes):
    rng = np.random.default_rng(6)
    ties = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2.0**-130 * 3], np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 65504.0], np.float32)
    x = np.concatenate(
        [ties, specials, (rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500))]
    ).astype(np.float32)
    x = np.concatenate([x, x[:1]]) if x.size % 2 else x
    out = seam.empty(x.size // 2, np.uint32)
    seam.launch(
        probes, "probe_cvt_bf16x2", (x.size // 2 + 63) // 64, 64, (x, out, np.int32(x.size // 2))
    )
    halves = np.stack([out & 0xFFFF, out >> 16], axis=1).reshape(-1).astype(np.uint16)
    np.testing.assert_array_equal(halves, bf16_bits(x))
    nan = np.array([np.nan, -np.nan], np.float32)
    out = np.zeros(1, np.uint32)
    seam.launch(probes, "probe_cvt_bf16x2", 1, 1, (nan, out, np.int32(1)))
    assert np.isnan(
        np.array([out[0] & 0xFFFF, out[0] >> 16], np.uint16)
        .view(ml_dtypes.bfloat16)
        .astype(np.float32)
    ).all()


def tf32_model(x: np.ndarray) -> np.ndarray:
    """Round to 11 significant bits, ties to even (np.rint), through frexp/ldexp in float64."""
    mantissa, exponent = np.frexp(x.astype(np.float64))  # x = m 2^e, 0.5 <= |m| < 1
    return np.ldexp(np.rint(mantissa * 2.0**11), exponent - 11).astype(np.float32)


def test_round_tf32_to_nearest_even(seam, probes):
    rng = np.random.default_rng(7)
    ties = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-11 + 2.0**-20])
    x = np.concatenate([ties, rng.standard_normal(1000) * 10.0 ** rng.integers(-20, 20, 1000)])
    x = x.astype(np.float32)
    y = seam.empty(x.size, np.float32)
    seam.launch(probes, "probe_round_tf32", (x.size + 127) // 128, 128, (x, y, np.int32(x.size)))
    np.testing.assert_array_equal(y, tf32_model(x))
    assert y[0] == 1.0 and y[1] == np.float32(1 + 4 * 2.0**-11) and y[3] == np.float32(1 + 2.0**-10)


# ---- what the emulator still refuses -----------------------------------------------------


def test_inline_ptx_outside_the_twins_or_not_a_twin_is_refused_by_name(seam):
    other = '#line 1 "mine.cu"\nextern "C" __global__ void k(float* x) {\n    asm volatile('
    other += '"mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0};" : "=f"(x[0]));\n}\n'
    with pytest.raises(EmuUnsupportedError, match=r"mine.cu:2: inline PTX assembly \('mma.sync"):
        seam.compile_text(other, "mine.cu")
    not_a_twin = '#line 1 "ptx_twins.cuh"\n__device__ void f(unsigned* x) {\n'
    not_a_twin += '    asm("mov.u32 %0, %%laneid;" : "=r"(x[0]));\n}\n'
    with pytest.raises(
        EmuUnsupportedError, match=r"ptx_twins.cuh:2: inline PTX assembly \('mov.u32'\)"
    ):
        seam.compile_text(not_a_twin, "ptx_twins.cuh")
