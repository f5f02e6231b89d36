"""Timers (``time.perf_counter``; CUDA events on CuPy's or PyTorch's stream) and ``measure``,
which warms up each implementation of a row and times them in alternating rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import TimingSettings


def speed_ratio(baseline_s: float | None, ours_s: float | None) -> float | None:
    """baseline_time / our_time: above 1 means gpubackprop is faster."""
    if not baseline_s or not ours_s or not math.isfinite(baseline_s) or not math.isfinite(ours_s):
        return None
    return baseline_s / ours_s


def median_and_quartiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    if len(ordered) < 4:
        return statistics.median(ordered), ordered[0], ordered[-1]
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return median, q1, q3


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


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


class ThreadTimeTimer(CpuTimer):
    """CPU time of the calling thread (time.thread_time): for the host rows, whose work is
    all on this thread, so that other processes sharing the cores do not inflate them."""

    kind = "thread_time"

    def time(self, fn: Callable[[], Any], calls: int) -> float:
        start = time.thread_time()
        for _ in range(calls):
            fn()
        return (time.thread_time() - start) / calls


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
            median, q1, q3 = median_and_quartiles(values)
            stats[name] = Stats(median, q1, q3, len(values) * inner[name])
    return stats
