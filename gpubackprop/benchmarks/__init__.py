"""Throughput benchmarks: ``gpubackprop bench``.

What is measured, per backend (cupy and numpy by default; emu only when asked for):

- the GEMM of each dense-layer layout over a sweep of sizes, through the backend ops:
  forward Y = X·Wᵀ (``dense_forward``, identity activation), dW = dZᵀ·X alone
  (``dense_backward`` with need_dinp=False) and dX = dZ·W together with dW (need_dinp=True);
- every activation's forward and backward, softmax cross-entropy (value and gradient),
  the SGD-with-momentum and Adam updates of one flat buffer;
- whole training steps (forward, loss, backward, optimizer step) through the public API.

How: each op's output is first checked against the NumPy reference in float64 on the same
inputs; a row that fails the check is marked failed and not timed.  Then every implementation of
the row (ours and the baselines) is warmed up and timed in alternating rounds in one process:
CUDA events on a GPU, ``time.perf_counter`` on the CPU; each round times a batch of calls long
enough to hide the timer's resolution, and the row reports the median over rounds.  Inputs of
memory-bound ops are rotated through enough copies to exceed the last-level cache, so that a
small op is not timed from a warm cache.

Against what: ceilings measured in the same run (a large device copy for bandwidth, a large
vendor GEMM for arithmetic: cupy.matmul at 4096³ with TF32 off on a GPU, numpy.matmul on the
CPU) give each row a floor, max(FLOPs / GEMM peak, bytes / copy bandwidth), summed over the
parts of a training step; ``vs`` holds baseline_time / our_time for each baseline (cuBLAS via
cupy.matmul, PyTorch eager, torch.compile where it works), so above 1 means gpubackprop is faster.

Modules: config.py (sizes, tolerances, timing settings), timing.py (timers, alternating
rounds), cases.py (each row: ours, baselines, reference check), ceilings.py (copy bandwidth,
vendor GEMM), machine.py (commit, CPU, versions, device), run.py (the run and its record),
report.py (table, JSON, plot), cli.py (``gpubackprop bench``).
"""

from .cases import Case, Prepared, activation_case, gemm_case, max_rel_error
from .ceilings import disable_cupy_tf32
from .cli import add_arguments, main, run_from_args
from .config import RTOL, BenchConfig, TimingSettings
from .report import write_json, write_plot
from .run import run_benchmarks
from .timing import CpuTimer, CupyEventTimer, Impl, measure, speed_ratio

__all__ = [
    "RTOL",
    "BenchConfig",
    "Case",
    "CpuTimer",
    "CupyEventTimer",
    "Impl",
    "Prepared",
    "TimingSettings",
    "activation_case",
    "add_arguments",
    "disable_cupy_tf32",
    "gemm_case",
    "main",
    "max_rel_error",
    "measure",
    "run_benchmarks",
    "run_from_args",
    "speed_ratio",
    "write_json",
    "write_plot",
]
