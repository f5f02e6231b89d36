"""Run every kernel once on odd shapes (float32 and float64) on a kernel backend: "cupy" (the
default, the first argument says otherwise) or "emu" (with the emulator's guard check on).

compute-sanitizer wraps this script in bench/device_check.sh; it exits non-zero when an op
disagrees with the NumPy reference, so a sanitizer run also checks results."""

from __future__ import annotations

import os
import sys

from gpubackprop.dtypes import DTYPES
from gpubackprop.parity import check_case, op_cases


def main() -> int:
    from gpubackprop.backends import get_backend

    name = sys.argv[1] if len(sys.argv) > 1 else "cupy"
    if name == "cupy":
        import cupy

        # Every array its own cudaMalloc: CuPy's pool rounds sizes up and carves blocks out of
        # larger ones, so a write just past an output would land in pool memory and memcheck,
        # which checks allocation bounds, would not see it.
        cupy.cuda.set_allocator(None)
    if name == "emu":
        # compute-sanitizer's part on the CPU: reads out of bounds that reach an output.
        os.environ.setdefault("GPUBACKPROP_EMU_GUARD_CHECK", "1")
    backend = get_backend(name)
    failed = 0
    for dtype in DTYPES:
        for case in op_cases(seed=7, quick=True):
            if not case.runs_in(dtype):
                continue
            for row in check_case(case, backend, dtype):
                if not row.passed:
                    failed += 1
                    print(f"FAIL {row.op} {row.shape} {dtype} {row.tensor} {row.note}")
    print(f"run_all_kernels: {failed} failing tensors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
