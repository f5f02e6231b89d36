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
"""

from __future__ import annotations

import argparse
import datetime as _datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RTOL",
    "BenchConfig",
    "Case",
    "Prepared",
    "TimingSettings",
    "add_arguments",
    "main",
    "max_rel_error",
    "run_benchmarks",
    "run_from_args",
    "speed_ratio",
    "write_plot",
]

SCHEMA = "gpubackprop-bench/1"
# Normwise tolerance of the correctness check: max|out − ref| / max|ref| against float64.
RTOL = {"float32": 1e-4, "float64": 1e-10}
ACTIVATION_NAMES = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")
LEAKY_ALPHA = 0.01
ENV_KEYS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_THREAD_TIMEOUT",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "CUPY_TF32",
    "NVIDIA_TF32_OVERRIDE",
    "CUDA_VISIBLE_DEVICES",
    "GPUBACKPROP_BACKEND",
)


# ---------------------------------------------------------------------------------------------
# Sizes: one table per device class and mode
# ---------------------------------------------------------------------------------------------

MLP_784 = (784, 1024, 1024, 10)
MLP_SMALL = (64, 128, 128, 10)
MLP_NARROW = (64, 64, 64, 64, 64, 10)  # 64 wide, 4 hidden layers


@dataclass(frozen=True)
class Sizes:
    """The sweep for one device class.  gemm: (M, N, K) = (batch, out_features, in_features)."""

    gemm: tuple[tuple[int, int, int], ...]
    activation: tuple[tuple[int, int], ...]  # (rows, cols)
    activation_names: tuple[str, ...]
    loss: tuple[tuple[int, int], ...]  # (rows, classes)
    optimizer: tuple[int, ...]  # flat buffer lengths
    train: tuple[tuple[tuple[int, ...], int], ...]  # (layer sizes, batch)


_MLP_PARAMS = sum(a * b + b for a, b in itertools.pairwise(MLP_784))  # 1 863 690

SIZES: dict[str, Sizes] = {
    "gpu": Sizes(
        gemm=(
            (256, 256, 256),
            (512, 512, 512),
            (1024, 1024, 1024),
            (2048, 2048, 2048),
            (4096, 4096, 4096),
            (256, 1024, 784),
            (4096, 1024, 784),
            (4096, 1024, 1024),
            (4096, 10, 1024),
            (65536, 64, 64),
        ),
        activation=((4096, 1024), (65536, 1024)),
        activation_names=ACTIVATION_NAMES,
        loss=((4096, 10), (65536, 10), (4096, 1000), (65536, 1000)),
        optimizer=(_MLP_PARAMS, 1 << 26),
        train=((MLP_784, 256), (MLP_784, 4096), (MLP_NARROW, 65536), (MLP_SMALL, 32)),
    ),
    "gpu_quick": Sizes(
        gemm=((1024, 1024, 1024), (4096, 4096, 4096), (4096, 1024, 784), (65536, 64, 64)),
        activation=((4096, 1024),),
        activation_names=("relu", "gelu", "silu"),
        loss=((65536, 10), (4096, 1000)),
        optimizer=(_MLP_PARAMS,),
        train=((MLP_784, 256), (MLP_784, 4096), (MLP_NARROW, 65536)),
    ),
    "cpu": Sizes(
        gemm=(
            (128, 128, 128),
            (256, 256, 256),
            (512, 512, 512),
            (1024, 1024, 1024),
            (256, 1024, 784),
            (256, 1024, 1024),
            (256, 10, 1024),
            (4096, 64, 64),
        ),
        activation=((256, 1024), (4096, 1024)),
        activation_names=ACTIVATION_NAMES,
        loss=((256, 10), (4096, 10), (4096, 1000)),
        optimizer=(1 << 16, _MLP_PARAMS),
        train=((MLP_784, 256), (MLP_SMALL, 32), (MLP_784, 4096), (MLP_NARROW, 65536)),
    ),
    "cpu_quick": Sizes(
        gemm=((256, 256, 256), (1024, 1024, 1024), (256, 1024, 784)),
        activation=((256, 1024),),
        activation_names=("relu", "tanh", "gelu_tanh"),
        loss=((4096, 1000),),
        optimizer=(_MLP_PARAMS,),
        train=((MLP_784, 256), (MLP_SMALL, 32)),
    ),
    # The CPU emulator runs every CUDA thread as a fiber: a 129³ GEMM takes tens of ms.
    "emu": Sizes(
        gemm=((64, 64, 64), (33, 129, 65)),
        activation=((64, 256),),
        activation_names=("relu", "gelu"),
        loss=((64, 10),),
        optimizer=(1 << 14,),
        train=((MLP_SMALL, 32),),
    ),
    # For the test suite: a few of everything, tiny.
    "tiny": Sizes(
        gemm=((33, 17, 9),),
        activation=((7, 33),),
        activation_names=("relu", "tanh"),
        loss=((16, 10),),
        optimizer=(1000,),
        train=(((12, 16, 5), 8),),
    ),
}


@dataclass(frozen=True)
class TimingSettings:
    """warmup_calls/warmup_s: calls before timing (at least the count, and for at least the
    time).  Each round times ``inner`` calls, chosen so that one round lasts about batch_s;
    rounds alternate between the implementations of a row until each has had budget_s (and
    at least min_rounds, at most max_rounds).  The row reports the median over rounds."""

    warmup_calls: int = 3
    warmup_s: float = 0.05
    batch_s: float = 0.002
    min_rounds: int = 7
    max_rounds: int = 200
    budget_s: float = 0.5


TIMING: dict[str, TimingSettings] = {
    "gpu": TimingSettings(
        warmup_calls=5, warmup_s=0.1, batch_s=0.002, min_rounds=15, max_rounds=400, budget_s=0.6
    ),
    "gpu_quick": TimingSettings(
        warmup_calls=5, warmup_s=0.05, batch_s=0.002, min_rounds=11, max_rounds=200, budget_s=0.2
    ),
    "cpu": TimingSettings(
        warmup_calls=2, warmup_s=0.05, batch_s=0.005, min_rounds=9, max_rounds=200, budget_s=1.0
    ),
    "cpu_quick": TimingSettings(
        warmup_calls=2, warmup_s=0.02, batch_s=0.005, min_rounds=5, max_rounds=100, budget_s=0.3
    ),
    "emu": TimingSettings(
        warmup_calls=1, warmup_s=0.0, batch_s=0.0, min_rounds=3, max_rounds=5, budget_s=0.05
    ),
    "tiny": TimingSettings(
        warmup_calls=1, warmup_s=0.0, batch_s=0.0002, min_rounds=3, max_rounds=5, budget_s=0.005
    ),
}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def speed_ratio(baseline_s: float | None, ours_s: float | None) -> float | None:
    """baseline_time / our_time: above 1 means gpubackprop is faster."""
    if not baseline_s or not ours_s or not math.isfinite(baseline_s) or not math.isfinite(ours_s):
        return None
    return baseline_s / ours_s


def max_rel_error(outputs: Sequence[Any], references: Sequence[np.ndarray]) -> float:
    """max over tensors of max|out − ref| / max|ref| (normwise, so that entries near zero do
    not dominate); NaN or Inf in an output gives inf."""
    worst = 0.0
    for out, ref in zip(outputs, references, strict=True):
        out = np.asarray(out, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if out.shape != ref.shape:
            return math.inf
        if out.size == 0:
            continue
        if not np.all(np.isfinite(out)):
            return math.inf
        scale = float(np.max(np.abs(ref)))
        diff = float(np.max(np.abs(out - ref)))
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _median_and_quartiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    if len(ordered) < 4:
        return statistics.median(ordered), ordered[0], ordered[-1]
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return median, q1, q3


def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def _run_quiet(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _source_root() -> Path | None:
    """The source checkout that holds this package, if any (it has a bench/ folder)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "bench").is_dir() else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package, or (None, None)."""
    root = Path(__file__).resolve().parent.parent
    commit = _run_quiet(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return None, None
    status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, bool(status)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_cache_bytes() -> int:
    """Last-level cache plus the per-core caches below it: what rotation must exceed."""
    total = 0
    seen = set()
    base = Path("/sys/devices/system/cpu")
    try:
        for index in sorted(base.glob("cpu[0-9]*/cache/index[0-9]*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
            size = (index / "size").read_text().strip()
            if kind == "Instruction" or (level, shared) in seen:
                continue
            seen.add((level, shared))
            number = int(re.sub(r"\D", "", size) or 0)
            total += number * (1024 * 1024 if size.endswith("M") else 1024)
    except (OSError, ValueError):
        total = 0
    return total or 32 * 1024 * 1024


def numpy_threads() -> int:
    """Threads NumPy's BLAS uses (threadpoolctl if installed, else the environment)."""
    try:
        import threadpoolctl

        counts = [
            info["num_threads"]
            for info in threadpoolctl.threadpool_info()
            if info.get("user_api") == "blas"
        ]
        if counts:
            return int(max(counts))
    except Exception:  # threadpoolctl missing or unable to inspect: fall back
        pass
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def _blas_info() -> dict[str, Any]:
    try:
        import threadpoolctl

        for info in threadpoolctl.threadpool_info():
            if info.get("user_api") == "blas":
                return {
                    k: info.get(k)
                    for k in (
                        "internal_api",
                        "version",
                        "architecture",
                        "num_threads",
                        "threading_layer",
                    )
                }
    except Exception:
        pass
    return {}


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------


class CpuTimer:
    """Wall time with time.perf_counter; ``sync`` runs before the clock stops (a no-op for
    NumPy, the emulator's synchronize for emu)."""

    kind = "perf_counter"

    def __init__(self, sync: Callable[[], None] | None = None):
        self._sync = sync or (lambda: None)

    def sync(self) -> None:
        self._sync()

    def time(self, fn: Callable[[], Any], calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self._sync()
        return (time.perf_counter() - start) / calls


class CupyEventTimer:
    """GPU time between two CUDA events recorded on CuPy's current stream (the stream the
    cupy backend and cupy.matmul launch on)."""

    kind = "cuda_events"

    def __init__(self, cupy: Any):
        self.cupy = cupy

    def sync(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def time(self, fn: Callable[[], Any], calls: int) -> float:
        start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls


class TorchCudaTimer:
    """CUDA events on PyTorch's current stream."""

    kind = "cuda_events"

    def __init__(self, torch: Any):
        self.torch = torch

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], calls: int) -> float:
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


@dataclass
class Impl:
    """One implementation of a row: a zero-argument callable (it rotates its own inputs)
    and the timer that measures it."""

    fn: Callable[[], Any]
    timer: Any


@dataclass
class Stats:
    median_s: float
    q1_s: float
    q3_s: float
    calls: int


def measure(
    impls: dict[str, Impl], settings: TimingSettings, failures: dict[str, str] | None = None
) -> dict[str, Stats]:
    """Warm up each implementation, then time them in alternating rounds (the order reversed
    every other round so that none always runs after the same neighbour).  An implementation
    that raises is dropped, its error kept in ``failures``; "ours" raising propagates."""
    failures = {} if failures is None else failures
    inner: dict[str, int] = {}
    for name, impl in list(impls.items()):
        try:
            start = time.perf_counter()
            calls = 0
            while calls < settings.warmup_calls or (
                time.perf_counter() - start < settings.warmup_s and calls < 10_000
            ):
                impl.fn()
                # A GPU launch returns at once: without the sync the host clock would let
                # thousands of launches queue up, seconds of work for a large GEMM.
                impl.timer.sync()
                calls += 1
            one = min(impl.timer.time(impl.fn, 1) for _ in range(2))
        except Exception as error:
            if name == "ours":
                raise
            failures[name] = f"{type(error).__name__}: {str(error)[:300]}"
            del impls[name]
            continue
        inner[name] = int(min(10_000, max(1, math.ceil(settings.batch_s / max(one, 1e-9)))))
    samples: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    start = time.perf_counter()
    for round_index in range(settings.max_rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            if name not in impls:
                continue
            try:
                samples[name].append(impls[name].timer.time(impls[name].fn, inner[name]))
            except Exception as error:
                if name == "ours":
                    raise
                failures[name] = f"{type(error).__name__}: {str(error)[:300]}"
                del impls[name]
        elapsed = time.perf_counter() - start
        if round_index + 1 >= settings.min_rounds and elapsed > settings.budget_s * len(order):
            break
    stats = {}
    for name, values in samples.items():
        if name in impls and values:
            median, q1, q3 = _median_and_quartiles(values)
            stats[name] = Stats(median, q1, q3, len(values) * inner[name])
    return stats


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Part:
    """A piece of work with its FLOP count and bytes moved (a training step has many)."""

    flops: float
    bytes: float


@dataclass
class Prepared:
    """What a case builds on one backend.

    run: one call of our op (rotating through its input copies).
    check: runs our op once on fresh inputs and returns (outputs, float64 references).
    baselines: name -> (callable, timer) for the same work in another implementation.
    skipped: name -> why a baseline is absent.
    copies: how many input copies ``run`` rotates through."""

    run: Callable[[], Any]
    check: Callable[[], tuple[list[Any], list[np.ndarray]]]
    baselines: dict[str, Impl] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copies: int = 1


@dataclass
class Case:
    """One row: ``name`` (train steps contain "train_step"), its shape, the work (parts), its
    working set in bytes (to decide input rotation), and a builder."""

    name: str
    shape: dict[str, Any]
    parts: list[Part]
    working_set: float
    memory_bound: bool
    build: Callable[[Context, int], Prepared]  # (context, copies) -> Prepared

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)


class Context:
    """Everything a case builder needs for one backend: the backend, its dtype, the float64
    reference backend, and the baseline frameworks that are usable on its device."""

    def __init__(self, backend: Any, dtype: np.dtype, config: BenchConfig, device_class: str):
        from .backends.numpy_backend import NumpyBackend

        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.config = config
        self.device_class = device_class  # "gpu" or "cpu" (emu runs on the CPU)
        self.reference = NumpyBackend()
        self.rng = np.random.default_rng(config.seed)
        self.timer = self._our_timer()
        self.torch, self.torch_device, self.torch_reason = self._torch()
        self.torch_timer = None
        if self.torch is not None:
            self.torch_timer = (
                TorchCudaTimer(self.torch) if self.torch_device == "cuda" else CpuTimer()
            )
        self.cupy = getattr(backend, "xp", None) if backend.name == "cupy" else None

    def _our_timer(self):
        if self.backend.name == "cupy":
            return CupyEventTimer(self.backend.xp)
        return CpuTimer(self.backend.synchronize)

    def _torch(self) -> tuple[Any, str | None, str]:
        if not self.config.torch:
            return None, None, "torch baselines turned off (--no-torch)"
        try:
            import torch
        except Exception as error:
            return None, None, f"torch is not importable ({type(error).__name__})"
        if self.device_class == "gpu":
            if not torch.cuda.is_available():
                return None, None, "torch.cuda.is_available() is False"
            # Full float32 on both sides: no TF32 in cuBLAS through torch either.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            return torch, "cuda", ""
        return torch, "cpu", ""

    def torch_compile_enabled(self, what: str) -> bool:
        """torch.compile per row kind: 'auto' compiles training steps everywhere except the CPU
        in --quick (an inductor C++ build per shape costs tens of seconds on few cores), and
        elementwise ops only on a GPU without --quick."""
        mode = self.config.torch_compile
        if self.torch is None or mode == "off":
            return False
        if mode == "on":
            return True
        if what == "train":
            return not (self.device_class == "cpu" and self.config.quick)
        return self.device_class == "gpu" and not self.config.quick

    # -- arrays ------------------------------------------------------------------------------
    def host(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """Random host data rounded to the benchmark dtype, returned in float64 (so that the
        reference sees exactly the values our op sees)."""
        values = self.rng.standard_normal(shape) * scale
        return values.astype(self.dtype).astype(np.float64)

    def ours(self, host: np.ndarray, dtype: Any = None) -> Any:
        return self.backend.asarray(host, dtype or self.dtype)

    def torch_tensor(self, host: np.ndarray, dtype: Any = None) -> Any:
        torch = self.torch
        np_dtype = np.dtype(dtype or self.dtype)
        tensor = torch.from_numpy(np.ascontiguousarray(host.astype(np_dtype)))
        return tensor.to(self.torch_device) if self.torch_device != "cpu" else tensor.clone()

    def torch_impl(self, fn: Callable[[], Any]) -> Impl:
        return Impl(fn, self.torch_timer)


def _cycle(items: list[Any]) -> Callable[[], Any]:
    """A callable returning the next item of ``items`` each call (input rotation)."""
    state = {"i": -1}
    count = len(items)

    def next_item():
        state["i"] = (state["i"] + 1) % count
        return items[state["i"]]

    return next_item


def _gemm_parts(m: int, n: int, k: int, itemsize: int, layout: str) -> list[Part]:
    forward = Part(2.0 * m * n * k, itemsize * (m * k + n * k + m * n))  # read X, W; write Y
    weight = Part(2.0 * m * n * k, itemsize * (m * n + m * k + n * k))  # read dZ, X; write dW
    data = Part(2.0 * m * n * k, itemsize * (m * n + n * k + m * k))  # read dZ, W; write dX
    return {"forward": [forward], "dW": [weight], "dX+dW": [weight, data]}[layout]


def gemm_case(
    m: int, n: int, k: int, layout: str, itemsize: int, gemm_version: str | None = None
) -> Case:
    """One dense-layer GEMM layout at batch m, out_features n, in_features k."""
    parts = _gemm_parts(m, n, k, itemsize, layout)
    working = sum(p.bytes for p in parts)
    suffix = f"@{gemm_version}" if gemm_version else ""
    name = f"gemm.{layout}{suffix}"

    def build(ctx: Context, copies: int) -> Prepared:
        backend = ctx.backend
        if gemm_version is not None:
            backend = type(ctx.backend)(gemm_version=gemm_version)
        x_h, w_h, dz_h = ctx.host((m, k)), ctx.host((n, k)), ctx.host((m, n))
        sets = []
        for _ in range(copies):
            x, w, dz = ctx.ours(x_h), ctx.ours(w_h), ctx.ours(dz_h)
            sets.append((x, w, dz, backend.empty((n, k), ctx.dtype)))
        take = _cycle(sets)

        if layout == "forward":

            def run():
                x, w, _, _ = take()
                return backend.dense_forward(x, w, None, "identity")[0]
        else:
            need_dinp = layout == "dX+dW"

            def run():
                x, w, dz, dw = take()
                return backend.dense_backward(dz, x, w, None, "identity", 0.0, dw, None, need_dinp)

        def check():
            x, w, dz = ctx.ours(x_h), ctx.ours(w_h), ctx.ours(dz_h)
            if layout == "forward":
                out = backend.dense_forward(x, w, None, "identity")[0]
                return [backend.to_numpy(out)], [x_h @ w_h.T]
            dw = backend.empty((n, k), ctx.dtype)
            dx = backend.dense_backward(
                dz, x, w, None, "identity", 0.0, dw, None, layout == "dX+dW"
            )
            outs, refs = [backend.to_numpy(dw)], [dz_h.T @ x_h]
            if layout == "dX+dW":
                outs.append(backend.to_numpy(dx))
                refs.append(dz_h @ w_h)
            return outs, refs

        prepared = Prepared(run, check, copies=copies)
        if ctx.cupy is not None:
            cp = ctx.cupy
            cublas = {"forward": _cublas_forward, "dW": _cublas_dw, "dX+dW": _cublas_dx_dw}[layout]
            prepared.baselines["cublas"] = Impl(lambda: cublas(cp, take), ctx.timer)
        if ctx.torch is not None:
            torch = ctx.torch
            tsets = [
                (ctx.torch_tensor(x_h), ctx.torch_tensor(w_h), ctx.torch_tensor(dz_h))
                for _ in range(copies)
            ]
            ttake = _cycle(tsets)
            linear = torch.nn.functional.linear
            if layout == "forward":

                def torch_run():
                    x, w, _ = ttake()
                    return linear(x, w)  # x Wᵀ, as nn.Linear without bias
            elif layout == "dW":

                def torch_run():
                    x, _, dz = ttake()
                    return torch.matmul(dz.t(), x)
            else:

                def torch_run():
                    x, w, dz = ttake()
                    return torch.matmul(dz.t(), x), torch.matmul(dz, w)

            prepared.baselines["torch"] = ctx.torch_impl(torch_run)
        else:
            prepared.skipped["torch"] = ctx.torch_reason
        return prepared

    return Case(name, {"M": m, "N": n, "K": k}, parts, working, False, build)


def _cublas_forward(cp: Any, take: Callable[[], Any]) -> Any:
    x, w, _, _ = take()
    return cp.matmul(x, w.T)


def _cublas_dw(cp: Any, take: Callable[[], Any]) -> Any:
    x, _, dz, _ = take()
    return cp.matmul(dz.T, x)


def _cublas_dx_dw(cp: Any, take: Callable[[], Any]) -> Any:
    x, w, dz, _ = take()
    return cp.matmul(dz.T, x), cp.matmul(dz, w)


def _torch_activation(torch: Any, name: str, alpha: float):
    """(forward, backward) in PyTorch eager: the functional op and the aten backward kernel
    autograd would call, taking the same saved tensor as ours (y or z)."""
    F = torch.nn.functional
    aten = torch.ops.aten
    table = {
        "relu": (torch.relu, lambda d, s: aten.threshold_backward(d, s, 0)),
        "leaky_relu": (
            lambda x: F.leaky_relu(x, alpha),
            lambda d, s: aten.leaky_relu_backward(d, s, alpha, False),
        ),
        "sigmoid": (torch.sigmoid, aten.sigmoid_backward),
        "tanh": (torch.tanh, aten.tanh_backward),
        "gelu": (F.gelu, lambda d, s: aten.gelu_backward(d, s, approximate="none")),
        "gelu_tanh": (
            lambda x: F.gelu(x, approximate="tanh"),
            lambda d, s: aten.gelu_backward(d, s, approximate="tanh"),
        ),
        "silu": (F.silu, aten.silu_backward),
    }
    return table[name]


def activation_case(name: str, rows: int, cols: int, direction: str, itemsize: int) -> Case:
    """y = f(x) (reads x, writes y) or dinp = dout ⊙ f'(saved) (reads dout and saved)."""
    n = rows * cols
    moved = itemsize * n * (2 if direction == "forward" else 3)
    alpha = LEAKY_ALPHA

    def build(ctx: Context, copies: int) -> Prepared:
        backend, ref = ctx.backend, ctx.reference
        x_h, d_h = ctx.host((rows, cols), 2.0), ctx.host((rows, cols))
        saved_h = ref.activation_forward(x_h, name, alpha)[1]
        sets = []
        for _ in range(copies):
            x, dout = ctx.ours(x_h), ctx.ours(d_h)
            sets.append((x, dout, backend.activation_forward(x, name, alpha)[1]))
        take = _cycle(sets)
        if direction == "forward":

            def run():
                return backend.activation_forward(take()[0], name, alpha)[0]
        else:

            def run():
                _, dout, saved = take()
                return backend.activation_backward(dout, saved, name, alpha)

        def check():
            x = ctx.ours(x_h)
            y, saved = backend.activation_forward(x, name, alpha)
            if direction == "forward":
                return [backend.to_numpy(y)], [ref.activation_forward(x_h, name, alpha)[0]]
            dinp = backend.activation_backward(ctx.ours(d_h), saved, name, alpha)
            return [backend.to_numpy(dinp)], [ref.activation_backward(d_h, saved_h, name, alpha)]

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch
        forward, backward = _torch_activation(torch, name, alpha)
        with torch.no_grad():
            tsets = []
            for _ in range(copies):
                x = ctx.torch_tensor(x_h)
                tsets.append((x, ctx.torch_tensor(d_h), ctx.torch_tensor(saved_h)))
        ttake = _cycle(tsets)
        fn = forward if direction == "forward" else backward

        def call(f):
            def run_torch():
                x, dout, saved = ttake()
                return f(x) if direction == "forward" else f(dout, saved)

            return run_torch

        prepared.baselines["torch"] = ctx.torch_impl(call(fn))
        if ctx.torch_compile_enabled("elementwise"):
            try:
                prepared.baselines["torch_compile"] = ctx.torch_impl(call(torch.compile(fn)))
            except Exception as error:
                prepared.skipped["torch_compile"] = f"{type(error).__name__}: {error}"[:300]
        return prepared

    label = f"{name}.{direction}"
    return Case(label, {"rows": rows, "cols": cols}, [Part(0.0, moved)], moved, True, build)


def loss_case(rows: int, classes: int, itemsize: int) -> Case:
    """Softmax cross-entropy with integer labels: the loss and ∂L/∂logits in one call."""
    moved = itemsize * 2 * rows * classes + 8 * rows  # read logits and labels, write the gradient

    def build(ctx: Context, copies: int) -> Prepared:
        backend, ref = ctx.backend, ctx.reference
        z_h = ctx.host((rows, classes), 3.0)
        labels_h = ctx.rng.integers(0, classes, rows)
        sets = [(ctx.ours(z_h), backend.asarray(labels_h, np.int64)) for _ in range(copies)]
        take = _cycle(sets)

        def run():
            z, labels = take()
            return backend.softmax_cross_entropy(z, labels)

        def check():
            loss, grad = backend.softmax_cross_entropy(
                ctx.ours(z_h), backend.asarray(labels_h, np.int64)
            )
            ref_loss, ref_grad = ref.softmax_cross_entropy(z_h, labels_h)
            return ([backend.to_numpy(loss), backend.to_numpy(grad)], [ref_loss, ref_grad])

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch
        F = torch.nn.functional
        tsets = [
            (ctx.torch_tensor(z_h), ctx.torch_tensor(labels_h.astype(np.int64), np.int64))
            for _ in range(copies)
        ]
        ttake = _cycle(tsets)

        def torch_eager():
            z, labels = ttake()
            z = z.detach().requires_grad_(True)
            loss = F.cross_entropy(z, labels)
            (grad,) = torch.autograd.grad(loss, z)
            return loss, grad

        prepared.baselines["torch"] = ctx.torch_impl(torch_eager)
        if ctx.torch_compile_enabled("elementwise"):

            def value_and_grad(z, labels):
                # L = mean(lse(z) − z_y);  ∂L/∂z = (softmax(z) − onehot(y)) / N
                lse = torch.logsumexp(z, dim=1)
                loss = (lse - z.gather(1, labels[:, None])[:, 0]).mean()
                onehot = F.one_hot(labels, z.shape[1]).to(z.dtype)
                return loss, (torch.softmax(z, dim=1) - onehot) / z.shape[0]

            try:
                compiled = torch.compile(value_and_grad)
                prepared.baselines["torch_compile"] = ctx.torch_impl(lambda: compiled(*ttake()))
            except Exception as error:
                prepared.skipped["torch_compile"] = f"{type(error).__name__}: {error}"[:300]
        return prepared

    return Case(
        "softmax_cross_entropy",
        {"rows": rows, "classes": classes},
        [Part(0.0, moved)],
        moved,
        True,
        build,
    )


SGD_HYPER = {"lr": 1e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
ADAM_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
ADAM_STEP = 10  # a step past the first, so that the bias corrections are not trivial


def optimizer_case(kind: str, n: int, itemsize: int) -> Case:
    """One update of a flat buffer of n parameters: SGD with momentum reads θ, g, b and writes
    θ, b; Adam reads θ, g, m, v and writes θ, m, v."""
    buffers = 1 if kind == "sgd_momentum" else 2
    moved = itemsize * n * (2 + buffers + 1 + buffers)

    def build(ctx: Context, copies: int) -> Prepared:
        backend, ref = ctx.backend, ctx.reference
        p_h, g_h = ctx.host((n,)), ctx.host((n,), 0.1)
        m_h = ctx.host((n,), 0.1)
        v_h = np.abs(ctx.host((n,), 0.01)).astype(ctx.dtype).astype(np.float64)

        def state(put):
            return [put(p_h), put(g_h), put(m_h)] + ([put(v_h)] if buffers == 2 else [])

        def step(bk, arrays):
            if kind == "sgd_momentum":
                p, g, b = arrays
                bk.sgd_step(p, g, b, **SGD_HYPER, first_step=False)
            else:
                p, g, m, v = arrays
                bk.adam_step(p, g, m, v, **ADAM_HYPER, step=ADAM_STEP, decoupled=False)

        take = _cycle([state(ctx.ours) for _ in range(copies)])

        def run():
            return step(backend, take())

        def check():
            ours = state(ctx.ours)
            step(backend, ours)
            refs = state(lambda a: a.copy())
            step(ref, refs)
            keep = [0, 2, 3][: 1 + buffers]  # θ and the state buffers, not the gradient
            return [backend.to_numpy(ours[i]) for i in keep], [refs[i] for i in keep]

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch

        def torch_optimizers(**extra):
            opts = []
            for _ in range(copies):
                param = torch.nn.Parameter(ctx.torch_tensor(p_h))
                param.grad = ctx.torch_tensor(g_h)
                if kind == "sgd_momentum":
                    opt = torch.optim.SGD(
                        [param], lr=SGD_HYPER["lr"], momentum=SGD_HYPER["momentum"], **extra
                    )
                else:
                    opt = torch.optim.Adam(
                        [param],
                        lr=ADAM_HYPER["lr"],
                        betas=(ADAM_HYPER["beta1"], ADAM_HYPER["beta2"]),
                        eps=ADAM_HYPER["eps"],
                        **extra,
                    )
                opt.step()  # creates the state buffers outside the timed region
                opts.append(opt)
            return _cycle(opts)

        next_opt = torch_optimizers()
        prepared.baselines["torch"] = ctx.torch_impl(lambda: next_opt().step())
        try:
            next_fused = torch_optimizers(fused=True)
            prepared.baselines["torch_fused"] = ctx.torch_impl(lambda: next_fused().step())
        except Exception as error:  # fused needs a recent torch (and, on old ones, CUDA)
            prepared.skipped["torch_fused"] = f"{type(error).__name__}: {error}"[:300]
        return prepared

    return Case(f"{kind}.step", {"n": n}, [Part(0.0, moved)], moved, True, build)


def _train_parts(sizes: Sequence[int], batch: int, itemsize: int) -> list[Part]:
    """Work of one step, layer by layer: forward GEMM with its epilogue (read x, W; write y),
    backward dW (read δ, x; write dW) and dX (read δ, W; write dX; the first layer has none),
    the activation derivative (read dout, y; write δ), the loss (read logits; write the
    gradient), and the SGD-with-momentum update (read θ, g, b; write θ, b)."""
    parts: list[Part] = []
    params = 0
    layers = list(itertools.pairwise(sizes))
    for i, (fan_in, fan_out) in enumerate(layers):
        gemm = 2.0 * batch * fan_in * fan_out
        weights = fan_in * fan_out + fan_out
        params += weights
        parts.append(Part(gemm, itemsize * (batch * fan_in + weights + batch * fan_out)))
        parts.append(Part(gemm, itemsize * (batch * fan_out + batch * fan_in + weights)))
        if i > 0:
            parts.append(Part(gemm, itemsize * (batch * fan_out + weights + batch * fan_in)))
        if i < len(layers) - 1:
            parts.append(Part(0.0, itemsize * 3 * batch * fan_out))
    parts.append(Part(0.0, itemsize * 2 * batch * sizes[-1] + 8 * batch))
    parts.append(Part(0.0, itemsize * 5 * params))
    return parts


def build_mlp(sizes: Sequence[int]):
    """Dense + ReLU for every hidden layer, a Dense to the logits."""
    from . import Dense, ReLU, Sequential

    layers: list[Any] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(Dense(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    return Sequential(*layers)


def train_case(sizes: Sequence[int], batch: int, itemsize: int) -> Case:
    """One training step through the public API: forward, softmax cross-entropy, backward
    (no input gradient), SGD with momentum 0.9."""
    parts = _train_parts(sizes, batch, itemsize)
    label = "-".join(str(s) for s in sizes)

    def build(ctx: Context, copies: int) -> Prepared:
        from . import SGD, SoftmaxCrossEntropyLoss
        from .random import seed

        seed(ctx.config.seed)
        x_h = ctx.host((batch, sizes[0]))
        labels_h = ctx.rng.integers(0, sizes[-1], batch)

        def make(backend, dtype):
            seed(ctx.config.seed)
            model = build_mlp(sizes).to(backend, dtype=dtype)
            loss = SoftmaxCrossEntropyLoss().to(backend)
            opt = SGD(model.parameters(), lr=1e-3, momentum=0.9)
            return model, loss, opt

        model, loss, opt = make(ctx.backend, ctx.dtype)
        x = ctx.ours(x_h)
        labels = ctx.backend.asarray(labels_h, np.int64)

        def one_step(model, loss, opt, x, labels):
            pred = model.forward(x)
            value = loss.forward(pred, labels)
            model.backward(loss.backward(), need_input_grad=False)
            opt.step()
            return value

        def run():
            return one_step(model, loss, opt, x, labels)

        def check():
            fresh = make(ctx.backend, ctx.dtype)
            reference = make(ctx.reference, np.float64)
            reference[0].load_state_dict(fresh[0].state_dict())
            value = one_step(*fresh, x, labels)
            ref_value = one_step(*reference, x_h, labels_h)
            outs = [
                ctx.backend.to_numpy(value),
                ctx.backend.to_numpy(fresh[0].store.grad),
                ctx.backend.to_numpy(fresh[0].store.data),
            ]
            refs = [np.asarray(ref_value), reference[0].store.grad, reference[0].store.data]
            return outs, refs

        prepared = Prepared(run, check, copies=1)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch
        state = {
            k: torch.from_numpy(np.array(v, dtype=ctx.dtype)) for k, v in model.state_dict().items()
        }
        tx = ctx.torch_tensor(x_h)
        tlabels = ctx.torch_tensor(labels_h.astype(np.int64), np.int64)

        def torch_model():
            layers: list[Any] = []
            for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
                layers.append(torch.nn.Linear(fan_in, fan_out))
                if i < len(sizes) - 2:
                    layers.append(torch.nn.ReLU())
            net = torch.nn.Sequential(*layers).to(dtype=getattr(torch, ctx.dtype.name))
            net.load_state_dict(state)  # the same indices: "0.weight", "2.weight", ...
            net = net.to(ctx.torch_device)
            return net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def torch_step(net, opt):
            def step():
                opt.zero_grad(set_to_none=True)
                value = torch.nn.functional.cross_entropy(net(tx), tlabels)
                value.backward()
                opt.step()
                return value

            return step

        prepared.baselines["torch"] = ctx.torch_impl(torch_step(*torch_model()))
        if ctx.torch_compile_enabled("train"):
            try:
                net, topt = torch_model()
                prepared.baselines["torch_compile"] = ctx.torch_impl(
                    torch_step(torch.compile(net), topt)
                )
            except Exception as error:
                prepared.skipped["torch_compile"] = f"{type(error).__name__}: {error}"[:300]
        elif "torch_compile" not in prepared.skipped:
            prepared.skipped["torch_compile"] = "not compiled in this mode (--torch-compile on)"
        return prepared

    return Case(
        f"train_step.mlp_{label}", {"layers": list(sizes), "batch": batch}, parts, 0.0, False, build
    )


def cases_for(
    sizes: Sizes, itemsize: int, only: Sequence[str] = (), gemm_versions: Sequence[str] = ()
) -> list[Case]:
    cases: list[Case] = []
    for m, n, k in sizes.gemm:
        for layout in ("forward", "dW", "dX+dW"):
            cases.append(gemm_case(m, n, k, layout, itemsize))
            for version in gemm_versions:
                cases.append(gemm_case(m, n, k, layout, itemsize, version))
    for name in sizes.activation_names:
        for rows, cols in sizes.activation:
            for direction in ("forward", "backward"):
                cases.append(activation_case(name, rows, cols, direction, itemsize))
    for rows, classes in sizes.loss:
        cases.append(loss_case(rows, classes, itemsize))
    for n in sizes.optimizer:
        cases.append(optimizer_case("sgd_momentum", n, itemsize))
        cases.append(optimizer_case("adam", n, itemsize))
    for layer_sizes, batch in sizes.train:
        cases.append(train_case(layer_sizes, batch, itemsize))
    if only:
        cases = [c for c in cases if any(word in c.name for word in only)]
    return cases


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


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
        cache = _gpu_l2_bytes(cp)
        compute_type = _cupy_compute_type(cp, dtype)
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
        cache = _cpu_cache_bytes()
        compute_type = None
    ceiling_settings = TimingSettings(
        settings.warmup_calls,
        settings.warmup_s,
        settings.batch_s,
        max(settings.min_rounds, 5),
        settings.max_rounds,
        settings.budget_s,
    )
    stats = measure(impls, ceiling_settings)
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


def _gpu_l2_bytes(cp: Any) -> int:
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


def _cupy_compute_type(cp: Any, dtype: np.dtype) -> str | None:
    try:
        from cupy._core import _routines_linalg as linalg

        return str(linalg.compute_type_to_str(linalg.get_compute_type(dtype)))
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What to run.  preset: None picks gpu/cpu (+ _quick) per backend, emu for the emulator;
    "tiny" is for tests.  only: substrings that row names must contain (any of them)."""

    backends: Sequence[str] | None = None
    quick: bool = False
    dtype: str = "float32"
    only: Sequence[str] = ()
    torch: bool = True
    torch_compile: str = "auto"  # auto | on | off
    preset: str | None = None
    seed: int = 0
    verbose: bool = True
    gemm_versions: bool = True  # also time the kernel backends' other GEMM versions (full mode)
    # Called with the record so far after each row: a run cut short by a time limit keeps what
    # it measured (the CLI's --json rewrites its file here; "complete" stays false until the end).
    on_row: Callable[[dict[str, Any]], None] | None = None


def _backend_plan(config: BenchConfig) -> tuple[list[tuple[str, Any]], list[dict[str, str]]]:
    """[(name, backend)] to run and [{"backend", "reason"}] for those skipped."""
    from .backends import get_backend

    names = list(config.backends) if config.backends else ["cupy", "numpy"]
    plan, skipped = [], []
    for name in names:
        try:
            plan.append((name, get_backend(name)))
        except (RuntimeError, ValueError) as error:
            skipped.append({"backend": name, "name": "*", "reason": str(error)})
    return plan, skipped


def _device_class(backend: Any) -> str:
    return "gpu" if backend.name == "cupy" else "cpu"


def _preset_for(backend: Any, config: BenchConfig) -> str:
    if config.preset:
        return config.preset
    if backend.name == "emu":
        return "emu"
    base = _device_class(backend)
    return f"{base}_quick" if config.quick else base


def _copies_for(case: Case, cache_bytes: int) -> int:
    """Input copies cycled so that a memory-bound op's data comes from memory, not cache:
    enough to cover three times the cache, at most 1024."""
    if not case.memory_bound or case.working_set <= 0 or case.working_set >= 3 * cache_bytes:
        return 1
    return int(min(1024, math.ceil(3 * cache_bytes / case.working_set)))


def _floor_seconds(case: Case, ceilings: dict[str, Any]) -> float | None:
    peak = ceilings.get("gemm_tflops", 0) * 1e12
    bandwidth = ceilings.get("copy_gbps", 0) * 1e9
    if not peak or not bandwidth:
        return None
    return sum(max(p.flops / peak, p.bytes / bandwidth) for p in case.parts)


def _log(config: BenchConfig, message: str) -> None:
    if config.verbose:
        print(message, file=sys.stderr, flush=True)


def run_case(
    case: Case, ctx: Context, settings: TimingSettings, ceilings: dict[str, Any]
) -> dict[str, Any]:
    """Build, check, then time one row.  Returns the row dict (see bench/README.md)."""
    row: dict[str, Any] = {
        "name": case.name,
        "backend": ctx.backend.name,
        "shape": case.shape,
        "dtype": ctx.dtype.name,
        "status": "ok",
        "median_s": None,
        "q1_s": None,
        "q3_s": None,
        "calls": 0,
        "tflops": None,
        "gbps": None,
        "flops": case.flops,
        "bytes": case.bytes,
        "bound": "memory" if case.memory_bound else "compute",
        "floor_s": _floor_seconds(case, ceilings),
        "floor_fraction": None,
        "max_rel_error": None,
        "rtol": RTOL[ctx.dtype.name],
        "input_copies": 1,
        "vs": {},
        "baselines": {},
        "baselines_skipped": {},
        "reason": "",
    }
    if row["floor_s"] is not None and case.parts:
        # What limits the row at the ceilings: compute or memory (summed over parts).
        peak, bandwidth = ceilings["gemm_tflops"] * 1e12, ceilings["copy_gbps"] * 1e9
        compute = sum(p.flops / peak for p in case.parts)
        memory = sum(p.bytes / bandwidth for p in case.parts)
        row["bound"] = "compute" if compute >= memory else "memory"
    try:
        copies = _copies_for(case, ceilings.get("cache_bytes", 32 << 20))
        prepared = case.build(ctx, copies)
        row["input_copies"] = prepared.copies
        outputs, references = prepared.check()
        error = max_rel_error([ctx.backend.to_numpy(o) for o in outputs], references)
        row["max_rel_error"] = error
        if not error <= row["rtol"]:
            row["status"] = "failed"
            row["reason"] = (
                f"max relative error {error:.3g} exceeds {row['rtol']:g} against "
                "the float64 NumPy reference; not timed"
            )
            return row
        impls = {"ours": Impl(prepared.run, ctx.timer), **prepared.baselines}
        failures: dict[str, str] = {}
        stats = measure(impls, settings, failures)
    except Exception as error:
        row["status"] = "error"
        row["reason"] = f"{type(error).__name__}: {str(error)[:500]}"
        return row
    ours = stats["ours"]
    row.update(median_s=ours.median_s, q1_s=ours.q1_s, q3_s=ours.q3_s, calls=ours.calls)
    row["gbps"] = case.bytes / ours.median_s / 1e9 if case.bytes else None
    row["tflops"] = case.flops / ours.median_s / 1e12 if case.flops else None
    if row["floor_s"] is not None:
        row["floor_fraction"] = row["floor_s"] / ours.median_s
    for name, stat in stats.items():
        if name == "ours":
            continue
        row["baselines"][name] = {
            "median_s": stat.median_s,
            "q1_s": stat.q1_s,
            "q3_s": stat.q3_s,
            "calls": stat.calls,
        }
        row["vs"][name] = speed_ratio(stat.median_s, ours.median_s)
    row["baselines_skipped"] = {**prepared.skipped, **failures}
    return row


def device_info(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {"class": ctx.device_class, "name": ctx.backend.device_name()}
    if ctx.device_class == "gpu":
        cp = ctx.cupy
        try:
            props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
            name = props.get("name", b"")
            info["name"] = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            info["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
            info["multiprocessors"] = props.get("multiProcessorCount")
            info["memory_bytes"] = props.get("totalGlobalMem")
            info["l2_bytes"] = props.get("l2CacheSize")
            info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
        except Exception as error:
            info["error"] = f"{type(error).__name__}: {error}"
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if smi:
            info["driver_version"] = smi.splitlines()[0].strip()
    else:
        info["cpu"] = _cpu_model()
        info["cores"] = os.cpu_count()
    return info


def run_benchmarks(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark and return the JSON record (see bench/README.md)."""
    dtype = np.dtype(config.dtype)
    if dtype.name not in RTOL:
        raise ValueError(f"dtype={config.dtype!r} is not supported; expected one of {tuple(RTOL)}")
    if config.torch_compile not in ("auto", "on", "off"):
        raise ValueError(f"torch_compile={config.torch_compile!r}; expected auto, on or off")
    os.environ.setdefault("CUPY_TF32", "0")  # before CuPy's first matmul reads it
    if config.torch and "torch" not in sys.modules:
        # Two threaded runtimes timed alternately in one process: OpenMP threads that spin
        # after each parallel region take the cores from OpenBLAS's threads (and from anyone
        # else on a shared machine).  libgomp reads this once, when torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    commit, dirty = git_commit()
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "settings": {
            "quick": config.quick,
            "dtype": dtype.name,
            "only": list(config.only),
            "torch_compile": config.torch_compile,
            "preset": config.preset,
            "seed": config.seed,
        },
        "host": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
        "versions": _versions(),
        "threads": {},
        "devices": {},
        "ceilings": {},
        "results": [],
        "skipped": [],
        "complete": False,
    }
    plan, skipped = _backend_plan(config)
    record["skipped"].extend(skipped)
    for entry in skipped:
        _log(config, f"skipping backend {entry['backend']}: {entry['reason']}")
    torch_threads = _set_torch_threads(config, record)
    for name, backend in plan:
        device_class = _device_class(backend)
        if device_class == "gpu":
            disable_cupy_tf32(backend.xp)
        ctx = Context(backend, dtype, config, device_class)
        preset = _preset_for(backend, config)
        settings = TIMING[preset]
        record["devices"][name] = device_info(ctx)
        _log(config, f"[{name}] {record['devices'][name]['name']}: measuring ceilings")
        try:
            ceilings = measure_ceilings(ctx, settings)
        except Exception as error:
            ceilings = {"error": f"{type(error).__name__}: {error}"}
        record["ceilings"][name] = ceilings
        if ctx.torch is None:
            record["skipped"].append(
                {"backend": name, "name": "torch baselines", "reason": ctx.torch_reason}
            )
        versions = ()
        if config.gemm_versions and not config.quick and hasattr(backend, "gemm_version"):
            from .backends.kernel_backend import GEMM_VERSIONS

            versions = tuple(v for v in GEMM_VERSIONS if v != backend.gemm_version)
        cases = cases_for(SIZES[preset], dtype.itemsize, config.only, versions)
        for i, case in enumerate(cases):
            row = run_case(case, ctx, settings, ceilings)
            record["results"].append(row)
            _log(
                config,
                f"[{name}] {i + 1}/{len(cases)} {case.name} {_shape_text(case.shape)}: "
                f"{row['status']} {_format_time(row['median_s'])}",
            )
            if config.on_row is not None:
                config.on_row(record)
        if device_class == "gpu":
            ctx.cupy.get_default_memory_pool().free_all_blocks()
    record["threads"] = {"numpy": numpy_threads(), "torch": torch_threads, "blas": _blas_info()}
    record["complete"] = True
    return record


def _set_torch_threads(config: BenchConfig, record: dict[str, Any]) -> int | None:
    """PyTorch on the CPU gets as many threads as NumPy's BLAS, so the comparison is fair."""
    if not config.torch:
        return None
    try:
        import torch
    except Exception:
        return None
    threads = numpy_threads()
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _versions() -> dict[str, Any]:
    from . import __version__

    versions: dict[str, Any] = {
        "gpubackprop": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for module in ("cupy", "torch", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = None
    return versions


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _shape_text(shape: dict[str, Any]) -> str:
    if "layers" in shape:
        return f"b={shape['batch']}"
    if "M" in shape:
        return f"{shape['M']}x{shape['N']}x{shape['K']}"
    return "x".join(str(v) for v in shape.values())


BASELINE_ORDER = ("cublas", "torch", "torch_compile", "torch_fused")


def format_table(record: dict[str, Any]) -> str:
    """The rows as a text table; ratios are baseline_time / our_time (>1: we are faster)."""
    rows = record["results"]
    names = [b for b in BASELINE_ORDER if any(b in r["vs"] for r in rows)]
    header = (
        ["op", "backend", "shape", "median", "TFLOP/s", "GB/s", "floor", "of floor", "max rel err"]
        + [f"vs {b}" for b in names]
        + ["status"]
    )
    lines = [header]
    for r in rows:
        line = [
            r["name"],
            r["backend"],
            _shape_text(r["shape"]),
            _format_time(r["median_s"]),
            f"{r['tflops']:.3f}" if r["tflops"] else "-",
            f"{r['gbps']:.1f}" if r["gbps"] else "-",
            _format_time(r["floor_s"]),
            f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] else "-",
            f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "-",
        ]
        line += [f"{r['vs'][b]:.2f}x" if r["vs"].get(b) else "-" for b in names]
        line.append(r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:60]}")
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for backend, ceiling in record["ceilings"].items():
        if "gemm_tflops" in ceiling:
            notes.append(
                f"ceilings [{backend}]: GEMM {ceiling['gemm_tflops']:.2f} TFLOP/s "
                f"({ceiling['gemm_size']}^3), copy {ceiling['copy_gbps']:.1f} GB/s"
            )
    threads = record.get("threads", {})
    if threads:
        notes.append(f"threads: numpy {threads.get('numpy')}, torch {threads.get('torch')}")
    for entry in record["skipped"]:
        notes.append(f"skipped [{entry['backend']}] {entry['name']}: {entry['reason']}")
    return "\n".join([*out, "", *notes])


def format_markdown(record: dict[str, Any]) -> str:
    """The rows as a markdown table, for the README."""
    rows = record["results"]
    names = [b for b in BASELINE_ORDER if any(b in r["vs"] for r in rows)]
    head = ["op", "backend", "shape", "median", "TFLOP/s or GB/s", "of floor", "max rel err"]
    head += [f"vs {b}" for b in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = (
            f"{r['tflops']:.3f} TFLOP/s"
            if r["bound"] == "compute" and r["tflops"]
            else f"{r['gbps']:.1f} GB/s"
            if r["gbps"]
            else "-"
        )
        cells = [
            f"`{r['name']}`",
            r["backend"],
            _shape_text(r["shape"]),
            _format_time(r["median_s"]) if r["status"] == "ok" else r["status"],
            rate if r["status"] == "ok" else "-",
            f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] else "-",
            f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "-",
        ]
        cells += [f"{r['vs'][b]:.2f}x" if r["vs"].get(b) else "-" for b in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _clean(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(record), indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def default_results_dir() -> Path:
    root = _source_root()
    return (root if root is not None else Path.cwd()) / "bench" / "results"


def results_path(record: dict[str, Any], directory: str | os.PathLike) -> Path:
    """<date>_<device>_<short commit>.json under ``directory``; _2, _3, ... if taken."""
    date = record["timestamp"][:10]
    devices = record["devices"]
    main_device = devices.get("cupy") or next(iter(devices.values()), {"name": "none"})
    device = _slug(str(main_device.get("name", "device")))
    commit = (record.get("git_commit") or "nocommit")[:8]
    if record.get("git_dirty"):
        commit += "-dirty"
    directory = Path(directory)
    path = directory / f"{date}_{device}_{commit}.json"
    counter = 2
    while path.exists():
        path = directory / f"{date}_{device}_{commit}_{counter}.json"
        counter += 1
    return path


def write_plot(record: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Throughput against size: TFLOP/s against FLOPs for compute-bound rows, GB/s against
    bytes for memory-bound ones, one line per op and backend (baselines dashed), ceilings as
    horizontal lines.  Returns None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:
        print(
            f"--plot skipped: matplotlib is not usable ({type(error).__name__}: {error}); "
            "install gpubackprop[plot]",
            file=sys.stderr,
        )
        return None
    rows = [r for r in record["results"] if r["status"] == "ok" and r["median_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(16, 10))
    panels = (
        ("compute", "flops", 1e12, "TFLOP/s", "FLOPs per call"),
        ("memory", "bytes", 1e9, "GB/s", "bytes moved per call"),
    )
    for ax, (bound, work_key, unit, ylabel, xlabel) in zip(axes, panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["bound"] != bound or not r[work_key]:
                continue
            family = r["name"].split("@")[0] if "train_step" not in r["name"] else "train_step"
            key = f"{family} [{r['backend']}]"
            series.setdefault(key, []).append((r[work_key], r[work_key] / r["median_s"] / unit))
            device = record["devices"].get(r["backend"], {}).get("class", r["backend"])
            for base, stat in r["baselines"].items():
                bkey = f"{family} [{base} on {device}]"
                series.setdefault(bkey, []).append(
                    (r[work_key], r[work_key] / stat["median_s"] / unit)
                )
        for key, points in sorted(series.items()):
            points.sort()
            style = "--" if " on " in key else "-"
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                marker="o",
                markersize=3,
                label=key,
                linewidth=1,
            )
        for backend, ceiling in record["ceilings"].items():
            value = ceiling.get("gemm_tflops" if bound == "compute" else "copy_gbps")
            if value:
                ax.axhline(value, color="gray", linestyle=":", linewidth=1)
                ax.annotate(
                    f"{backend} ceiling {value:.3g} {ylabel}",
                    (0.01, value),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="gray",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{bound}-bound rows")
        if series:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    devices = ", ".join(f"{k}: {v.get('name')}" for k, v in record["devices"].items())
    fig.suptitle(f"gpubackprop bench {record['timestamp']} ({devices})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``gpubackprop bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a representative subset (< 5 min on one H100, ~2 min on 2 CPU "
        "cores); what bench/device_check.sh runs",
    )
    parser.add_argument(
        "--backend",
        action="append",
        default=None,
        metavar="NAME",
        help="numpy, cupy or emu; repeat or comma-separate for several "
        "(default: cupy and numpy, those available; emu only when named)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the JSON record to PATH")
    parser.add_argument(
        "--append-results",
        action="store_true",
        help="also write the record to bench/results/<date>_<device>_<commit>.json",
    )
    parser.add_argument(
        "--results-dir",
        metavar="DIR",
        default=None,
        help="where --append-results writes (default: bench/results of the "
        "source checkout, else ./bench/results)",
    )
    parser.add_argument("--plot", metavar="PATH", help="draw throughput against size to a PNG")
    parser.add_argument("--dtype", default="float32", choices=tuple(RTOL))
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only rows whose name contains TEXT (repeatable)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    parser.add_argument(
        "--torch-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile baselines (auto: training steps, and elementwise "
        "ops on a GPU without --quick; never on the CPU with --quick)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as markdown (for the README)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _split_backends(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``gpubackprop bench`` with parsed arguments.  Returns the exit status: 0 when every
    row that ran passed its correctness check, 1 otherwise."""
    config = BenchConfig(
        backends=_split_backends(args.backend),
        quick=args.quick,
        dtype=args.dtype,
        only=tuple(args.only),
        torch=not args.no_torch,
        torch_compile=args.torch_compile,
        verbose=not args.quiet,
        preset=getattr(args, "preset", None),
        on_row=(lambda record: write_json(record, args.json)) if args.json else None,
    )
    try:
        record = run_benchmarks(config)
    except ValueError as error:
        print(f"gpubackprop bench: {error}", file=sys.stderr)
        return 2
    print(format_markdown(record) if args.markdown else format_table(record))
    if args.json:
        print(f"wrote {write_json(record, args.json)}")
    if args.append_results:
        directory = Path(args.results_dir) if args.results_dir else default_results_dir()
        print(f"wrote {write_json(record, results_path(record, directory))}")
    if args.plot:
        written = write_plot(record, args.plot)
        if written is not None:
            print(f"wrote {written}")
    bad = [r for r in record["results"] if r["status"] != "ok"]
    if not record["results"]:
        print(
            "gpubackprop bench: no row ran (no backend available, or --only matched nothing)",
            file=sys.stderr,
        )
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpubackprop bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--preset", default=None, choices=tuple(SIZES), help=argparse.SUPPRESS)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
