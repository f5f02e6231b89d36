"""Compile every kernels/ module a kernel backend may launch, in parallel processes.

A first run on a fresh machine pays one compile per module variant (NVRTC on a GPU: several
seconds each for gemm.cu; g++ on the emulator) one after another, inside whatever runs first.
Both compilers keep what they built on disk (CuPy's kernel cache, the emulator's build cache,
each keyed by the source text and options), so compiling every module once, spread over the
machine's cores, lets every later process load them instead: ``bench/device_check.sh`` does this
before its parity step, ``python -m gpubackprop.backends.warm --backend cupy --jobs 16``.

The modules are those of ``module_specs``: for float and double, each kernels/*.cu the
launchers compile, with gemm.cu in every GEMM version (tiled, warptiled, naive) and every small
tile of the adaptive plan, and gemm_mma.cu (float only).  CuPy's elementwise kernels are left
to their first call (their compile needs the argument types of a call; they are small).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from ..dtypes import C_TYPES, DTYPES
from .gemm_config import GEMM_VERSIONS, SMALL_TILES, GemmConfig
from .kernel_backend import KERNEL_DEFINES, MMA_FILE, module_defines

__all__ = ["module_specs", "warm_up"]

Spec = tuple[str, dict[str, str]]


def module_specs(gemm_versions: tuple[str, ...] = GEMM_VERSIONS) -> list[Spec]:
    """(kernels/ file, #defines) of every module the launchers of a default-tiled backend, and
    of one per GEMM version, compile (kernel_backend.module_defines names them alike)."""
    specs: list[Spec] = []
    for dtype in DTYPES:
        kind = C_TYPES[dtype]
        for file in KERNEL_DEFINES:
            specs.append((file, module_defines(file, kind, GemmConfig())))
        for version in gemm_versions:
            config = GemmConfig(version)
            variants = ("", *SMALL_TILES) if config.adaptive else ("",)
            specs += [("gemm.cu", module_defines("gemm.cu", kind, config, v)) for v in variants]
    specs.append((MMA_FILE, module_defines(MMA_FILE, C_TYPES["float32"], GemmConfig())))
    return specs


def _compile_one(backend_name: str, spec: Spec) -> tuple[str, float]:
    """In a worker process: compile one module through the named backend's seam."""
    from . import get_backend

    file, defines = spec
    started = time.perf_counter()
    get_backend(backend_name).seam.compile(file, defines)
    label = file + "".join(f" {k}={v}" for k, v in sorted(defines.items()) if k != "REAL_T")
    return f"{defines['REAL_T']} {label}", time.perf_counter() - started


def warm_up(
    backend_name: str, jobs: int | None = None, specs: list[Spec] | None = None
) -> list[tuple[str, float]]:
    """Compile ``specs`` (default: module_specs()) with ``backend_name``'s seam in ``jobs``
    worker processes (default: the CPU count); returns (module, seconds) per module.  Each
    worker is a fresh process (spawned: a CUDA context does not survive fork) that leaves the
    result in the compiler's disk cache."""
    specs = module_specs() if specs is None else specs
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_compile_one, [backend_name] * len(specs), specs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cupy", help="cupy or emu (default cupy)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    timings = warm_up(args.backend, args.jobs)
    for label, seconds in sorted(timings, key=lambda t: -t[1]):
        print(f"{seconds:7.2f} s  {label}")
    wall = time.perf_counter() - started
    serial = sum(seconds for _, seconds in timings)
    print(f"{len(timings)} modules compiled in {wall:.1f} s ({serial:.1f} s of compiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
