"""The CPU emulator (gpubackprop/emulator/) on small kernels of its own (tests/emu_kernels/).

Each test exercises one feature (barriers, shuffles, dynamic shared memory, atomics, argument
passing) against a NumPy result, or one check the emulator adds to CUDA (out-of-bounds writes,
unwritten outputs, divergent barriers, compile errors, type mismatches), or what a GPU stops
with an error (faults, misaligned vector accesses: an EmuLaunchError, never a dead process),
or the build cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpubackprop.backends.seam import ElementwiseSpec
from gpubackprop.emulator import (
    EmuCompileError,
    EmuLaunchError,
    EmuSeam,
    EmuUnsupportedError,
    compiler,
    find_compiler,
)

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler for the emulator")

KERNELS = Path(__file__).resolve().parent / "emu_kernels"


def _text(name: str, real: str = "float") -> str:
    return f"#define REAL_T {real}\n" + (KERNELS / name).read_text()


@pytest.fixture(scope="module")
def seam(tmp_path_factory) -> EmuSeam:
    # A private cache: the first compile of each source really runs g++.
    mp = pytest.MonkeyPatch()
    mp.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path_factory.mktemp("emu_cache")))
    mp.delenv("GPUBACKPROP_EMU_SHUFFLE", raising=False)
    yield EmuSeam()
    mp.undo()


@pytest.fixture(scope="module")
def checks(seam):
    return seam.compile_text(_text("checks.cu"), "checks.cu")


@pytest.fixture(scope="module")
def checks64(seam):
    return seam.compile_text(_text("checks.cu", "double"), "checks.cu")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ---- features ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,k", [(129, 129, 129), (1, 7, 33), (33, 1, 17), (7, 40, 1)])
def test_tiled_sgemm_with_barriers_is_exact(seam, m, n, k):
    module = seam.compile_text((KERNELS / "sgemm_tiled.cu").read_text(), "sgemm_tiled.cu")
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    # Small integers: every partial sum is exact in float32, so any order gives numpy's answer.
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (k, n)).astype(np.float32)
    c = seam.empty((m, n), np.float32)
    start = time.perf_counter()
    seam.launch(
        module,
        "sgemm_tiled",
        (_ceil(n, 16), _ceil(m, 16), 1),
        (16, 16, 1),
        (a, b, c, np.int32(m), np.int32(n), np.int32(k)),
    )
    seconds = time.perf_counter() - start
    np.testing.assert_array_equal(c, a @ b)
    if (m, n, k) == (129, 129, 129):
        print(f"\nemulated 129x129x129 16x16-tiled SGEMM: {seconds * 1e3:.1f} ms")
        assert seconds < 2.0  # ~0.016 s with the x86-64 switch, ~0.2 s with ucontext


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 33), (33, 7), (16, 8)])
def test_shared_memory_transpose(seam, checks64, rows, cols):
    x = np.random.default_rng(rows * cols).standard_normal((rows, cols))
    out = seam.empty((cols, rows), np.float64)
    seam.launch(
        checks64,
        "transpose_tiled",
        (_ceil(cols, 8), _ceil(rows, 8), 1),
        (8, 8, 1),
        (x, out, np.int32(rows), np.int32(cols)),
    )
    np.testing.assert_array_equal(out, x.T)


@pytest.mark.parametrize("n,blocks,threads", [(1, 1, 32), (1000, 3, 128), (4097, 7, 256)])
def test_warp_shuffle_reduction(seam, checks64, n, blocks, threads):
    x = np.random.default_rng(n).standard_normal(n)
    partial = seam.empty((blocks,), np.float64)
    seam.launch(
        checks64,
        "warp_sum",
        (blocks, 1, 1),
        (threads, 1, 1),
        (x, partial, np.int64(n)),
        shared_mem=8 * (threads // 32),
    )
    np.testing.assert_allclose(partial.sum(), x.sum(), rtol=1e-12, atol=1e-12)


def test_dynamic_shared_memory(seam, checks):
    n, block = 100, 32
    x = np.arange(n, dtype=np.int32)
    out = seam.empty((n,), np.int32)
    seam.launch(
        checks,
        "reverse_block",
        (_ceil(n, block), 1, 1),
        (block, 1, 1),
        (x, out, np.int32(n)),
        shared_mem=4 * block,
    )
    padded = np.concatenate([x, np.full(128 - n, -1, np.int32)])
    expected = padded.reshape(4, block)[:, ::-1].reshape(-1)[:n]
    np.testing.assert_array_equal(out, expected)


def test_shuffle_flavours_and_votes(seam, checks):
    out = seam.empty((192,), np.int32)
    seam.launch(checks, "shuffle_flavours", (1, 1, 1), (32, 1, 1), (out,))
    lane = np.arange(32)
    np.testing.assert_array_equal(out[:32], 30)
    np.testing.assert_array_equal(out[32:64], np.where(lane >= 1, lane - 1, lane))
    np.testing.assert_array_equal(out[64:96], np.where(lane % 8 + 2 < 8, lane + 2, lane))
    np.testing.assert_array_equal(out[96:128], lane ^ 5)
    ballot = sum(1 << i for i in range(32) if i % 3 == 0)
    np.testing.assert_array_equal(out[128:160].view(np.uint32), ballot)
    np.testing.assert_array_equal(out[160:], 7)


def test_atomic_add_counter(seam, checks):
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    counter = np.zeros(1, np.int32)
    total = np.zeros(1, np.uint64)
    seam.launch(
        checks, "atomic_count", (8, 1, 1), (128, 1, 1), (x, counter, total, np.int64(x.size))
    )
    assert counter[0] == np.count_nonzero(x > 0) == total[0]


def test_scalar_types_reach_the_kernel(seam, checks):
    out = np.zeros(1, np.float64)
    seam.launch(
        checks,
        "scalar_types",
        1,
        1,
        (out, np.int32(-3), np.int64(2**40), np.float32(0.5), np.float64(0.25), np.uint32(7)),
    )
    assert out[0] == -3 + 2**40 + 0.5 + 0.25 + 7


def test_alignment_modulo_256_is_preserved(seam, checks):
    """The guarded copy keeps the address modulo 256, so the float4 path matches the GPU's."""
    base = np.arange(16, dtype=np.float32)
    for offset in (0, 1):
        x = base[offset : offset + 4]
        expected_path = 4 if x.ctypes.data % 16 == 0 else 1
        out = np.zeros(2, np.int32)
        seam.launch(checks, "alignment_path", 1, 1, (x, out))
        assert out[0] == expected_path
        assert out[1] == int(x.sum())


def test_math_builtins_compile_and_run(seam, checks):
    x = np.linspace(-3, 3, 37, dtype=np.float32)
    y = seam.empty((37,), np.float32)
    z = seam.empty((37,), np.float64)
    seam.launch(checks, "math_builtins", (2, 1, 1), (32, 1, 1), (x, y, z, np.int32(37)))
    np.testing.assert_allclose(y, np.tanh(x.astype(np.float64)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, np.tanh(x.astype(np.float64)), rtol=1e-12)


def test_ucontext_fallback_gives_the_same_result(seam, monkeypatch):
    monkeypatch.setenv("GPUBACKPROP_EMU_UCONTEXT", "1")
    module = seam.compile_text(_text("checks.cu", "double"), "checks.cu")
    x = np.random.default_rng(5).standard_normal(777)
    partial = seam.empty((3,), np.float64)
    seam.launch(module, "warp_sum", 3, 64, (x, partial, np.int64(777)), shared_mem=16)
    np.testing.assert_allclose(partial.sum(), x.sum(), rtol=1e-12)


# ---- checks a GPU does not give ------------------------------------------------------------------


def test_out_of_bounds_write_names_kernel_and_buffer(seam, checks):
    out = np.zeros(50, np.float32)
    with pytest.raises(EmuLaunchError) as error:
        seam.launch(checks, "write_past_end", (2, 1, 1), (32, 1, 1), (out, np.int32(50)))
    message = str(error.value)
    assert "write_past_end" in message and "'out'" in message
    assert "grid=(2, 1, 1)" in message and "block=(32, 1, 1)" in message
    assert "after its end (first at element 50" in message
    np.testing.assert_array_equal(out, np.arange(50))  # the in-bounds part is copied back


def test_guard_check_catches_a_read_past_the_end_that_nan_hides(seam, checks, monkeypatch):
    x = np.arange(40, dtype=np.float32)
    expected = np.maximum(x, np.append(x[1:], -np.inf))
    monkeypatch.delenv("GPUBACKPROP_EMU_GUARD_CHECK", raising=False)
    out = np.zeros(40, np.float32)
    seam.launch(checks, "neighbour_max_past_end", (2, 1, 1), (32, 1, 1), (x, out, np.int32(40)))
    np.testing.assert_array_equal(out, expected)  # the NaN guard byte was read and ignored

    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "1")
    out = np.zeros(40, np.float32)
    with pytest.raises(EmuLaunchError, match=r"argument 'out'.*read out of bounds") as error:
        seam.launch(checks, "neighbour_max_past_end", (2, 1, 1), (32, 1, 1), (x, out, np.int32(40)))
    assert "neighbour_max_past_end" in str(error.value)
    np.testing.assert_array_equal(out, 0)  # left unchanged
    # A kernel that stays in bounds passes the check, and its results are copied back.
    partial = np.zeros(1, np.float32)
    seam.launch(checks, "warp_sum", (1, 1, 1), (64, 1, 1), (x, partial, np.int64(40)), 8)
    assert partial[0] == x.sum()

    # Shared memory nobody wrote, read through fmaxf: the same check catches it.
    out = np.zeros(32, np.float32)
    with pytest.raises(EmuLaunchError, match=r"shared memory nobody wrote"):
        seam.launch(checks, "unwritten_shared_max", (1, 1, 1), (32, 1, 1), (out,))
    np.testing.assert_array_equal(out, 0)

    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "yes")
    with pytest.raises(ValueError, match="GPUBACKPROP_EMU_GUARD_CHECK='yes'"):
        seam.launch(checks, "neighbour_max_past_end", (2, 1, 1), (32, 1, 1), (x, out, np.int32(40)))


def test_unwritten_output_is_reported(seam, checks):
    out = seam.empty((9,), np.float32)
    with pytest.raises(
        EmuLaunchError,
        match=r"left 4 elements of argument 'out' .*first at "
        r"index 1",
    ):
        seam.launch(checks, "write_even", (1, 1, 1), (32, 1, 1), (out, np.int32(9)))


def test_reading_an_unwritten_input_is_reported(seam, checks64):
    x = seam.empty((4, 4), np.float64)
    out = np.zeros((4, 4))
    with pytest.raises(EmuLaunchError, match=r"read-only argument 'in' .* holds 16 elements"):
        seam.launch(checks64, "transpose_tiled", 1, (8, 8, 1), (x, out, np.int32(4), np.int32(4)))


def test_divergent_syncthreads_is_reported_not_hung(seam, checks):
    out = np.zeros(64, np.float32)
    with pytest.raises(
        EmuLaunchError,
        match=r"divergent_barrier.*block \(0,0,0\).*__syncthreads"
        r"\(\) is not reached by every thread.*40 threads "
        r"wait.*24 have exited",
    ):
        seam.launch(checks, "divergent_barrier", 1, 64, (out, np.int32(40)))


def test_divergent_warp_shuffle_is_reported_not_hung(seam, checks):
    out = np.zeros(16, np.float32)
    with pytest.raises(EmuLaunchError, match=r"__shfl_down_sync.*16 of them have exited"):
        seam.launch(checks, "divergent_shuffle", 1, 32, (out,))


def test_device_assert_is_reported(seam, checks):
    out = np.zeros(8, np.float32)
    with pytest.raises(EmuLaunchError, match=r"thread \(5,0,0\): assertion `i < n` failed"):
        seam.launch(checks, "failing_assert", 1, 8, (out, np.int32(5)))


def test_uninitialised_shared_memory_and_shuffled_order_expose_a_race(seam, checks, monkeypatch):
    expected = (np.arange(64) + 63) % 64 + 1
    out = np.zeros(64, np.int32)
    # With the guard check, the read of a slot nobody wrote yet is an error of its own:
    with pytest.raises(EmuLaunchError, match="shared memory nobody wrote"):
        seam.launch(checks, "racy_neighbour", 1, 64, (out,))
    # without it, the 0xFF bytes come through as -1.
    monkeypatch.delenv("GPUBACKPROP_EMU_GUARD_CHECK", raising=False)
    seam.launch(checks, "racy_neighbour", 1, 64, (out,))
    assert out[0] == -1  # slot[63] read before thread 63 wrote it: 0xFF bytes
    np.testing.assert_array_equal(out[1:], expected[1:])  # thread order hides the rest
    wrong = 0
    for seed in (1, 2, 3):
        shuffled = EmuSeam(shuffle_seed=seed)
        module = shuffled.compile_text(_text("checks.cu"), "checks.cu")
        shuffled.launch(module, "racy_neighbour", 1, 64, (out,))
        wrong += int(np.count_nonzero(out != expected))
    assert wrong > 3


def test_compile_error_shows_file_and_line(seam):
    with pytest.raises(EmuCompileError) as error:
        seam.compile_text((KERNELS / "bad_compile.cu").read_text(), "bad_compile.cu")
    message = str(error.value)
    assert "bad_compile.cu:5:" in message and "undeclared_value" in message


def test_inline_ptx_is_refused_with_file_and_line(seam):
    text = '#line 1 "inline_ptx.cu"\n' + (KERNELS / "inline_ptx.cu").read_text()
    with pytest.raises(EmuUnsupportedError, match=r"inline_ptx.cu:5: inline PTX"):
        seam.compile_text(text, "inline_ptx.cu")


@pytest.mark.parametrize(
    "args,pattern",
    [
        (
            (np.zeros(4, np.float64), np.int32(4)),
            r"'out' is float\*, got an array of dtype "
            r"float64",
        ),
        ((np.zeros(4, np.float32), 4), r"'n' is int, got int 4; pass np.int32"),
        ((np.zeros(4, np.float32), np.int64(4)), r"'n' is int, got np.int64"),
        ((np.float32(1), np.int32(4)), r"'out' is float\*, got float32"),
        ((np.zeros((4, 4), np.float32)[:, 0], np.int32(4)), r"non-contiguous"),
        ((np.zeros(4, np.float32),), r"takes 2 arguments \(float\* out, int n\), got 1"),
    ],
)
def test_argument_types_are_checked(seam, checks, args, pattern):
    with pytest.raises(TypeError, match=r"kernel 'write_even' .*" + pattern):
        seam.launch(checks, "write_even", 1, 32, args)


def test_same_array_twice_shares_one_copy_and_overlap_is_refused(seam, checks64):
    x = np.arange(16.0).reshape(4, 4)
    with pytest.raises(ValueError, match=r"'out' overlaps parameter 'in'"):
        seam.launch(
            checks64,
            "transpose_tiled",
            1,
            (8, 8, 1),
            (x[:2], x.reshape(-1)[4:12].reshape(2, 4), np.int32(2), np.int32(4)),
        )
    y = np.arange(16.0).reshape(4, 4)
    out = np.zeros(1)
    # the same array for in and out of a square transpose: one guarded copy, a racy in-place
    # transpose whose only claim here is that it runs and writes within bounds
    seam.launch(checks64, "transpose_tiled", 1, (8, 8, 1), (y, y, np.int32(4), np.int32(4)))
    assert out.shape == (1,)


def test_unknown_kernel_and_bad_launch_sizes(seam, checks):
    out = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"kernel='nope' is not"):
        seam.launch(checks, "nope", 1, 1, ())
    with pytest.raises(ValueError, match=r"2048 threads"):
        seam.launch(checks, "write_even", 1, (64, 32, 1), (out, np.int32(4)))
    with pytest.raises(ValueError, match=r"grid=\(0,\)"):
        seam.launch(checks, "write_even", (0,), 1, (out, np.int32(4)))


# ---- faults: a launch error, never a dead process ------------------------------------------------


@pytest.fixture(scope="module")
def faults(seam):
    return seam.compile_text((KERNELS / "faults.cu").read_text(), "faults.cu")


def _assert_still_works(seam, faults, checks):
    """After a fault, the same library and another one run correctly, and the process's own
    floating point mode is back (a float32 launch flushes subnormals; Python must not)."""
    assert np.float32(1e-40) * np.float32(1.0) != 0
    x = np.arange(64, dtype=np.float32)
    out = seam.empty((16,), np.float32)
    seam.launch(faults, "misaligned_load", 2, 8, (x, out, np.int32(4)))  # aligned: offset 4
    expected = np.full(16, 6.0, np.float32)
    expected[11] = 4 + 5 + 6 + 7  # block 1 thread 3 reads x[4:8]
    np.testing.assert_array_equal(out, expected)
    even = np.zeros(40, np.float32)
    seam.launch(checks, "write_even", 2, 32, (even, np.int32(33)))
    np.testing.assert_array_equal(even[:33:2], np.arange(0, 33, 2))
    np.testing.assert_array_equal(even[1::2], 0)


@pytest.mark.parametrize(
    "kernel,dtype,offset,what",
    [
        (
            "misaligned_load",
            np.float32,
            1,
            r"a load of float4, which needs 16-byte alignment \(address % 16 = 4\), "
            r"at faults.cu:10",
        ),
        ("misaligned_load", np.float32, 2, r"a load of float4, .* \(address % 16 = 8\)"),
        ("misaligned_store", np.float32, 3, r"a store to float4, .* \(address % 16 = 12\)"),
        ("misaligned_double2", np.float64, 1, r"a load of double2, .* \(address % 16 = 8\)"),
        ("misaligned_float2", np.float32, 1, r"a load of float2, which needs 8-byte alignment"),
    ],
)
def test_misaligned_vector_access_is_a_launch_error(
    seam, faults, checks, kernel, dtype, offset, what
):
    x = np.arange(64, dtype=dtype)
    before = x.copy()
    args = (
        (x, np.int32(offset))
        if kernel == "misaligned_store"
        else (x, np.zeros(16, dtype), np.int32(offset))
    )
    for _ in range(2):  # every time, not by chance of layout
        with pytest.raises(EmuLaunchError) as error:
            seam.launch(faults, kernel, 2, 8, args)
        message = str(error.value)
        assert f"kernel {kernel!r} (grid=(2, 1, 1), block=(8, 1, 1))" in message
        assert "misaligned address 0x" in message and "on a GPU: misaligned address" in message
        assert re.search(what, message), message
        if kernel in ("misaligned_load", "misaligned_store"):
            assert "block (1,0,0) thread (3,0,0)" in message
    np.testing.assert_array_equal(x, before)  # the guarded copy was discarded
    _assert_still_works(seam, faults, checks)


def _unmapped_address() -> int:
    """An address in the wide gap between the heap and the mmap area, with nothing mapped
    within 16 GiB of it (x86-64 Linux layout)."""
    target, margin = 0x6000_0000_0000, 16 << 30
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if start < target + margin and target - margin < end:
                pytest.skip(f"something is mapped near {target:#x}: {line.strip()}")
    return target


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fault addresses: Linux layout")
@pytest.mark.parametrize(
    "case", ["far_write", "null_read", "integer_division", "deep_recursion", "big_local_array"]
)
def test_fault_is_a_launch_error_and_the_emulator_recovers(seam, faults, checks, case):
    out = np.arange(16, dtype=np.float32)
    before = out.copy()
    if case == "far_write":
        call = ("far_write", 2, 8, (out, np.int64(_unmapped_address())))
        expect = (
            r"SIGSEGV \(segmentation fault\) at address 0x[0-9a-f]+: an out-of-bounds access "
            r"beyond the guard zones, a null pointer, or a misaligned vector"
        )
    elif case == "null_read":
        call = ("pointer_read", 2, 8, (out, np.int64(0)))
        expect = r"SIGSEGV \(segmentation fault\) at address 0x0: a null pointer"
    elif case == "integer_division":
        out = np.arange(16, dtype=np.int32)
        before = out.copy()
        call = ("integer_divide", 2, 8, (out, np.int32(0)))
        expect = (
            r"SIGFPE \(arithmetic exception\) at instruction 0x[0-9a-f]+: integer division by zero"
        )
    elif case == "deep_recursion":
        out = np.zeros(2, np.int64)
        before = out.copy()
        call = ("recursion", 1, 2, (out, np.int32(100_000)))
        expect = (
            r"SIGSEGV .*fiber stack overflow: the kernel uses more than 256 KiB of stack per "
            r"thread \(GPUBACKPROP_EMU_STACK_KIB to raise it\)"
        )
    else:
        out = np.zeros(2, np.int32)
        before = out.copy()
        call = ("big_local_array", 1, 2, (out, np.int32(1000)))
        expect = r"fiber stack overflow: the kernel uses more than 256 KiB"
    kernel, grid, block, args = call
    with pytest.raises(EmuLaunchError) as error:
        seam.launch(faults, kernel, grid, block, args)
    message = str(error.value)
    assert message.startswith(f"kernel {kernel!r} (grid=({grid}, 1, 1), block=({block}, 1, 1)): ")
    thread = "block (1,0,0) thread (3,0,0)" if grid == 2 else "block (0,0,0) thread (0,0,0)"
    assert thread in message, message
    assert re.search(expect, message), message
    assert "the arguments were left unchanged" in message
    if case == "far_write":
        assert "at address 0x600000000000: " in message
        assert "(nearest argument: argument 'out' (float32[16])" in message
    np.testing.assert_array_equal(out, before)
    _assert_still_works(seam, faults, checks)


def test_stack_size_setting(seam, faults, monkeypatch):
    out = np.zeros(2, np.int64)
    depth = 1000  # ~0.5 MiB of stack: more than the default 256 KiB
    with pytest.raises(EmuLaunchError, match=r"more than 256 KiB of stack"):
        seam.launch(faults, "recursion", 1, 2, (out, np.int32(depth)))
    monkeypatch.setenv("GPUBACKPROP_EMU_STACK_KIB", "4096")
    seam.launch(faults, "recursion", 1, 2, (out, np.int32(depth)))
    np.testing.assert_array_equal(out, depth * (depth + 1) // 2)
    with pytest.raises(EmuLaunchError, match=r"more than 4096 KiB of stack"):
        seam.launch(faults, "recursion", 1, 2, (out, np.int32(100_000)))
    monkeypatch.setenv("GPUBACKPROP_EMU_STACK_KIB", "lots")
    with pytest.raises(ValueError, match=r"GPUBACKPROP_EMU_STACK_KIB='lots' is not a stack size"):
        seam.launch(faults, "recursion", 1, 2, (out, np.int32(1)))
    monkeypatch.delenv("GPUBACKPROP_EMU_STACK_KIB")
    seam.launch(faults, "recursion", 1, 2, (out, np.int32(10)))
    np.testing.assert_array_equal(out, 55)


def test_fault_with_the_ucontext_switch(seam, monkeypatch):
    monkeypatch.setenv("GPUBACKPROP_EMU_UCONTEXT", "1")
    module = seam.compile_text((KERNELS / "faults.cu").read_text(), "faults.cu")
    out = np.zeros(2, np.int64)
    with pytest.raises(EmuLaunchError, match=r"fiber stack overflow"):
        seam.launch(module, "recursion", 1, 2, (out, np.int32(100_000)))
    with pytest.raises(EmuLaunchError, match=r"thread \(3,0,0\): SIGFPE"):
        seam.launch(module, "integer_divide", 2, 8, (np.ones(16, np.int32), np.int32(0)))
    seam.launch(module, "recursion", 1, 2, (out, np.int32(10)))
    np.testing.assert_array_equal(out, 55)


def test_misaligned_gemm_operand_with_a_forced_vector_path(monkeypatch):
    """The property test's failure mode: 16-byte loads forced on operands at an odd offset."""
    from gpubackprop.backends import operands
    from gpubackprop.backends.emu_backend import EmuBackend

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from test_gemm_properties import _misaligned
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(operands, "vec4_flag", lambda a, leading: np.int32(1))
    backend = EmuBackend()
    rng = np.random.default_rng(11)
    for dtype, vector in ((np.float32, "float4"), (np.float64, "double2")):
        x = _misaligned(rng.standard_normal((7, 12)).astype(dtype), 1)
        w = _misaligned(rng.standard_normal((5, 12)).astype(dtype), 1)
        with pytest.raises(
            EmuLaunchError,
            match=rf"kernel 'dense_forward' .*misaligned address 0x[0-9a-f]+: "
            rf"a load of {vector}.* at gemm.cu:\d+",
        ):
            backend.dense_forward(x, w, np.zeros(5, dtype), "relu", 0.1)
    monkeypatch.undo()
    y, _ = backend.dense_forward(x, w, np.zeros(5, dtype), "identity", 0.1)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-12)


_FAULTHANDLER_SCRIPT = """
import ctypes, faulthandler, sys
import numpy as np
from gpubackprop.emulator import EmuLaunchError, EmuSeam
faulthandler.enable()
seam = EmuSeam()
module = seam.compile_text(open(sys.argv[1]).read(), "faults.cu")
try:
    seam.launch(module, "pointer_read", 2, 8, (np.zeros(16, np.float32), np.int64(0)))
except EmuLaunchError as error:
    print("caught:", str(error)[:60], flush=True)
ctypes.string_at(0)  # outside a launch: Python's faulthandler must report it
print("not reached", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_previous_signal_handlers_are_restored_after_a_launch(seam):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run(
        [sys.executable, "-c", _FAULTHANDLER_SCRIPT, str(KERNELS / "faults.cu")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "caught: kernel 'pointer_read'" in result.stdout, result.stdout + result.stderr
    assert "not reached" not in result.stdout
    assert "Fatal Python error: Segmentation fault" in result.stderr, result.stderr
    assert result.returncode == -11


# ---- elementwise, cache -------------------------------------------------------------------------

AXPY = ElementwiseSpec(
    name="test_axpy",
    in_params="T x, T y, float64 alpha",
    out_params="T z",
    operation="z = (T)alpha * x + y;",
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_spec(seam, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 33)).astype(dtype)
    y = rng.standard_normal((7, 33)).astype(dtype)
    axpy = seam.elementwise(AXPY, dtype)
    z = seam.empty(x.shape, dtype)
    assert axpy(x, y, np.float64(2.5), z) is z
    np.testing.assert_array_equal(z, dtype(2.5) * x + y)
    np.testing.assert_array_equal(axpy(x, y, 0.5), dtype(0.5) * x + y)  # output allocated
    before = y.copy()
    axpy(x, y, np.float64(1.0), y)  # in place: y is input and output
    np.testing.assert_array_equal(y, x + before)
    with pytest.raises(ValueError, match=r"'y' has 3 elements"):
        axpy(x, y[0, :3], np.float64(1.0))
    with pytest.raises(TypeError, match=r"must be a"):
        axpy(x.astype(np.float16), y, np.float64(1.0))


def test_elementwise_with_kernel_preamble(seam):
    spec = ElementwiseSpec(
        name="test_act",
        in_params="T x, int32 code, float64 alpha",
        out_params="T y",
        operation="y = act_forward(code, x, (real_t)alpha);",
        preamble_files=("common.cuh", "activations.cuh"),
    )
    x = np.linspace(-2, 2, 129)
    y = seam.elementwise(spec, np.float64)(x, np.int32(4), np.float64(0.0))  # 4: tanh
    np.testing.assert_allclose(y, np.tanh(x), rtol=1e-14)


def test_disk_cache_skips_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path))
    text = _text("checks.cu") + "\n// cache test\n"
    before = dict(compiler.stats)
    EmuSeam().compile_text(text, "checks.cu")
    assert compiler.stats["compiles"] == before["compiles"] + 1
    assert list((tmp_path / "emu").glob("*.so"))

    def no_compiler(*args, **kwargs):
        raise AssertionError("g++ was called although the library is cached")

    monkeypatch.setattr(compiler.subprocess, "run", no_compiler)
    module = EmuSeam().compile_text(text, "checks.cu")  # a fresh seam: no in-memory cache
    assert compiler.stats["compiles"] == before["compiles"] + 1
    assert compiler.stats["cache_hits"] == before["cache_hits"] + 1
    out = np.zeros(4, np.float32)
    EmuSeam().launch(module, "write_even", 1, 32, (out, np.int32(3)))
    np.testing.assert_array_equal(out, [0, 0, 2, 0])


# A kernel small enough that several processes compile it at once in a few seconds.
TINY_KERNEL = """
extern "C" __global__ void scale_by_index(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2.0f * i;
}
"""

_RACE_SCRIPT = """
import os, sys, time
import numpy as np
from gpubackprop.emulator import EmuSeam
start = sys.argv[1]
while not os.path.exists(start):
    time.sleep(0.005)
seam = EmuSeam()
module = seam.compile_text(sys.argv[2], "tiny.cu")
out = np.zeros(70, np.float32)
seam.launch(module, "scale_by_index", 3, 32, (out, np.int32(70)))
assert (out == 2.0 * np.arange(70)).all(), out
print("ok")
"""


def test_processes_starting_at_once_on_an_empty_cache_all_load_a_whole_library(tmp_path):
    """Issue 10 item 4: 8 processes on an empty cache crashed with 'undefined symbol' because
    one rewrote the shared <key>.cpp while another compiled it."""
    env = {**os.environ, "GPUBACKPROP_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])
    go = tmp_path / "go"
    text = TINY_KERNEL + f"// {tmp_path.name}\n"  # a key no other test has built
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, str(go), text],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(1.0)  # let every interpreter start and wait at the line
    go.write_text("")
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    for status, out, err in results:
        assert status == 0 and out.strip() == "ok", err[-2000:]
    entries = sorted(path.name for path in (tmp_path / "cache" / "emu").iterdir())
    assert [Path(name).suffix for name in entries] == [".cpp", ".json", ".so"], entries


def test_a_source_rewritten_during_a_compile_does_not_reach_the_library(tmp_path, monkeypatch):
    """The race of item 4 made deterministic: while g++ runs, another process writes the
    published <key>.cpp (here: empties it).  The compile reads only its private copy."""
    monkeypatch.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path))
    real_run = compiler.subprocess.run

    def run_while_another_process_writes(command, **kwargs):
        if "-E" not in command:  # the compile itself: empty the published <key>.cpp
            (tmp_path / "emu" / Path(command[-3]).name).write_text("")
        return real_run(command, **kwargs)

    monkeypatch.setattr(compiler.subprocess, "run", run_while_another_process_writes)
    _, kernels = compiler.build(TINY_KERNEL, "tiny.cu")
    assert [k.name for k in kernels] == ["scale_by_index"]
    module = EmuSeam().compile_text(TINY_KERNEL, "tiny.cu")
    out = np.zeros(5, np.float32)
    EmuSeam().launch(module, "scale_by_index", 1, 32, (out, np.int32(5)))
    np.testing.assert_array_equal(out, [0, 2, 4, 6, 8])


@pytest.fixture(scope="module")
def tiny_cache_entry(tmp_path_factory):
    """A cache folder holding one built (never loaded) entry for TINY_KERNEL."""
    root = tmp_path_factory.mktemp("tiny_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("GPUBACKPROP_CACHE_DIR", str(root))
    compiler.build(TINY_KERNEL + "// damage\n", "tiny.cu")
    mp.undo()
    return root / "emu"


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "one byte changed", "record missing", "record garbled"],
)
def test_a_damaged_cached_library_is_rebuilt_not_loaded(
    tmp_path, monkeypatch, tiny_cache_entry, damage
):
    """Issue 10 item 5: a truncated cached .so killed the process with SIGBUS, an empty one
    failed with 'file too short' and was never rebuilt."""
    shutil.copytree(tiny_cache_entry, tmp_path / "emu")
    monkeypatch.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path))
    text = TINY_KERNEL + "// damage\n"
    (library,) = (tmp_path / "emu").glob("*.so")
    record = library.with_suffix(".json")
    data = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        library.write_bytes(b"")
    elif damage == "one byte changed":
        middle = len(data) // 2
        library.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif damage == "record missing":
        record.unlink()
    else:
        record.write_text("{not json")
    before = dict(compiler.stats)
    with pytest.warns(RuntimeWarning, match=r"cached library .* is damaged .*; rebuilding it"):
        module = EmuSeam().compile_text(text, "tiny.cu")
    assert compiler.stats["compiles"] == before["compiles"] + 1
    assert library.read_bytes() == data  # the same bytes as the first build
    out = np.zeros(3, np.float32)
    EmuSeam().launch(module, "scale_by_index", 1, 32, (out, np.int32(3)))
    np.testing.assert_array_equal(out, [0, 2, 4])
    # and the rebuilt entry is a cache hit again
    EmuSeam().compile_text(text, "tiny.cu")
    assert compiler.stats["compiles"] == before["compiles"] + 1


def test_emu_backend_reports_availability():
    from gpubackprop.backends.emu_backend import EmuBackend

    backend = EmuBackend()
    assert backend.available, backend.reason
    assert backend.name == "emu" and backend.xp is np
    assert "CPU emulator" in backend.device_name()
