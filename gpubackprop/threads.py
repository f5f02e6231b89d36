"""How many threads NumPy's BLAS uses while the numpy backend trains, evaluates or predicts.

The policy (measured in bench/blas_threads.py, recorded in bench/results/, explained in
docs/benchmarks.md): **one BLAS thread for small GEMMs, unless the user chose a number.**

The layers of a small MLP make GEMMs of a few million multiply-adds per batch.  Split over
several OpenBLAS threads, each share is microseconds of work, and the threads spin waiting for
each other; when any other process wants a core, a spinning thread loses it and every GEMM waits
for the scheduler.  On the 2-core machine of the record, the default `gpubackprop train` took
2.9 s (3 epochs) with one thread and 89 s with OpenBLAS's default of one thread per core, and
7.8 s against 166 s beside one busy process.  One thread was fastest in both conditions.

A GEMM of ``SMALL_GEMM_MACS`` multiply-adds or more keeps OpenBLAS's own default, where several
cores have enough work to share (not measured here).  A thread count the user set in the
environment (``THREAD_VARIABLES``) is never overridden.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["SMALL_GEMM_MACS", "THREAD_VARIABLES", "blas_threads_for", "user_chose_threads"]

# Variables by which a user sets the BLAS thread count (OpenBLAS, OpenMP builds, MKL, BLIS).
THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
)
# Largest per-batch GEMM (rows × in_features × out_features) that runs on one thread.  The
# default job's largest is 64 × 512 × 256 = 8.4 M in training, and 360 × 512 × 256 = 47 M when
# it evaluates its 360 test rows in one batch; a 784-1024-1024 MLP at batch 256 has 268 M.
SMALL_GEMM_MACS = 1 << 26


def user_chose_threads() -> bool:
    """True when one of THREAD_VARIABLES is set to a non-empty value."""
    return any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES)


def largest_gemm(model: Any, rows: int) -> int:
    """Multiply-adds of the largest Dense GEMM of ``model`` on a batch of ``rows`` rows."""
    weights = [p.size for p in model.parameters() if len(p.shape) == 2]
    return rows * max(weights, default=0)


@contextlib.contextmanager
def blas_threads_for(model: Any, rows: int) -> Iterator[None]:
    """Inside the block, NumPy's BLAS runs on one thread when ``model`` is on the numpy
    backend, its largest GEMM on ``rows`` rows is small, and the user set no thread count;
    otherwise nothing changes.  The previous setting is restored on exit."""
    backend = getattr(model, "backend", None)
    if (
        getattr(backend, "name", None) != "numpy"
        or user_chose_threads()
        or largest_gemm(model, rows) >= SMALL_GEMM_MACS
    ):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
