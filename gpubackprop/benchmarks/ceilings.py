"""Ceilings measured in the same run, from which each row's floor follows: device-to-device
copy bandwidth and a large vendor GEMM (cupy.matmul with TF32 off on a GPU, numpy.matmul on
the CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .cases import Context
from .config import TimingSettings
from .machine import cpu_cache_bytes
from .timing import CpuTimer, Impl, measure


def measure_ceilings(ctx: Context, settings: TimingSettings) -> dict[str, Any]:
    """Copy bandwidth and GEMM throughput of the device, measured now.

    GPU: a 256 MiB device-to-device copy (cudaMemcpyAsync) and cupy.matmul at 4096³ with the
    cuBLAS compute type forced to plain 32F (no TF32).  CPU: numpy.copyto of 64 MiB and
    numpy.matmul at 2048³ (1024³ with --quick)."""
    dtype = ctx.dtype
    if ctx.device_class == "gpu":
        cp = ctx.cupy
        n_copy = (256 << 20) // dtype.itemsize
        src, dst = cp.ones(n_copy, dtype=dtype), cp.empty(n_copy, dtype=dtype)

        def copy():
            dst.data.copy_from_device_async(src.data, src.nbytes)

        size = 4096
        a, b = cp.ones((size, size), dtype=dtype), cp.ones((size, size), dtype=dtype)
        c = cp.empty((size, size), dtype=dtype)
        timer = ctx.timer
        impls = {"copy": Impl(copy, timer), "gemm": Impl(lambda: cp.matmul(a, b, out=c), timer)}
        cache = gpu_l2_bytes(cp)
        compute_type = cupy_compute_type(dtype)
    else:
        n_copy = (64 << 20) // dtype.itemsize
        src, dst = np.ones(n_copy, dtype=dtype), np.empty(n_copy, dtype=dtype)
        size = 1024 if ctx.config.quick or ctx.config.preset in ("tiny", "emu") else 2048
        if ctx.config.preset == "tiny":
            size, n_copy = 256, 1 << 16
            src, dst = src[:n_copy], dst[:n_copy]
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size)).astype(dtype)
        b = rng.standard_normal((size, size)).astype(dtype)
        c = np.empty((size, size), dtype=dtype)
        timer = CpuTimer()
        impls = {
            "copy": Impl(lambda: np.copyto(dst, src), timer),
            "gemm": Impl(lambda: np.matmul(a, b, out=c), timer),
        }
        cache = cpu_cache_bytes()
        compute_type = None
    # At least 5 rounds even in the tiny presets: every row's floor is derived from these.
    stats = measure(impls, dataclasses.replace(settings, min_rounds=max(settings.min_rounds, 5)))
    copy_bytes = 2.0 * src.nbytes  # read + write
    result = {
        "copy_gbps": copy_bytes / stats["copy"].median_s / 1e9,
        "copy_bytes": int(src.nbytes),
        "gemm_tflops": 2.0 * size**3 / stats["gemm"].median_s / 1e12,
        "gemm_size": size,
        "cache_bytes": int(cache),
        "dtype": dtype.name,
        "method": (
            "cudaMemcpyAsync D2D; cupy.matmul"
            if ctx.device_class == "gpu"
            else "numpy.copyto; numpy.matmul"
        ),
    }
    if compute_type is not None:
        result["cublas_compute_type"] = compute_type
    return result


def gpu_l2_bytes(cp: Any) -> int:
    """The GPU's L2 cache (50 MiB, an H100's, when the driver does not say): what input
    rotation must exceed."""
    try:
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        return int(props.get("l2CacheSize", 0)) or 50 * 1024 * 1024
    except Exception:
        return 50 * 1024 * 1024


def disable_cupy_tf32(cp: Any) -> None:
    """cupy.matmul on float32 uses CUBLAS_COMPUTE_32F unless CUPY_TF32 > 0 (read on the first
    matmul) or set_compute_type chose TF32; force the plain 32F compute type either way."""
    try:
        from cupy._core import _routines_linalg as linalg

        for dtype in (np.float32, np.complex64):
            linalg.set_compute_type(dtype, linalg.COMPUTE_TYPE_DEFAULT)
    except Exception:  # a CuPy without the private hook: the env default (CUPY_TF32 unset) holds
        pass


def cupy_compute_type(dtype: np.dtype) -> str | None:
    """The cuBLAS compute type cupy.matmul uses for ``dtype`` (to record that TF32 was off)."""
    try:
        from cupy._core import _routines_linalg as linalg

        return str(linalg.compute_type_to_str(linalg.get_compute_type(dtype)))
    except Exception:
        return None
