"""One benchmark run: for each backend, measure the ceilings, then check and time every row,
with its floor and its ratios to the baselines, into the JSON record.
"""

from __future__ import annotations

import datetime as _datetime
import math
import os
import platform
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from . import data_parallel
from .cases import Case, Context, cases_for, max_rel_error
from .ceilings import disable_cupy_tf32, measure_ceilings
from .config import (
    ENV_KEYS,
    RTOL,
    SCHEMA,
    SIZES,
    TIMING,
    BenchConfig,
    TimingSettings,
    blank_row,
)
from .host import host_cases
from .machine import blas_info, cpu_model, device_info, git_commit, library_versions, numpy_threads
from .report import shape_text
from .timing import Impl, Stats, format_time, measure, speed_ratio


def _device_class(backend: Any) -> str:
    return "gpu" if backend.name == "cupy" else "cpu"


def _backend_plan(config: BenchConfig) -> tuple[list[tuple[str, Any]], list[dict[str, str]]]:
    """[(name, backend)] to run, and {"backend", "name": "*", "reason"} for each skipped."""
    from ..backends import get_backend
    from ..backends.recording import HostBackend

    names = list(config.backends) if config.backends else ["cupy", "numpy", "host"]
    plan, skipped = [], []
    for name in names:
        try:
            # "host": the launchers over a seam that records launches (the host.* rows).
            plan.append((name, HostBackend() if name == "host" else get_backend(name)))
        except (RuntimeError, ValueError) as error:
            skipped.append({"backend": name, "name": "*", "reason": str(error)})
    return plan, skipped


def _preset_for(backend: Any, config: BenchConfig) -> str:
    if backend.name == "host":
        return "host"
    if config.preset:
        return config.preset
    if backend.name == "emu":
        return "emu"
    base = _device_class(backend)
    return f"{base}_quick" if config.quick else base


def copies_for(case: Case, cache_bytes: int) -> int:
    """Input copies cycled so that a memory-bound op's data comes from memory, not cache:
    enough to cover three times the cache, at most 1024."""
    if not case.memory_bound or case.working_set <= 0 or case.working_set >= 3 * cache_bytes:
        return 1
    return int(min(1024, math.ceil(3 * cache_bytes / case.working_set)))


def _roofline(case: Case, ceilings: dict[str, Any]) -> tuple[float | None, str]:
    """(floor_s, bound): the time the row's parts take at the measured ceilings, each part at
    max(FLOPs / GEMM peak, bytes / copy bandwidth), and which of the two sums is larger.
    Without ceilings: (None, the case's own guess)."""
    peak = ceilings.get("gemm_tflops", 0) * 1e12
    bandwidth = ceilings.get("copy_gbps", 0) * 1e9
    if not peak or not bandwidth or not case.parts:
        return None, "memory" if case.memory_bound else "compute"
    floor = sum(max(p.flops / peak, p.bytes / bandwidth) for p in case.parts)
    compute = sum(p.flops / peak for p in case.parts)
    memory = sum(p.bytes / bandwidth for p in case.parts)
    return floor, "compute" if compute >= memory else "memory"


def _progress(config: BenchConfig, message: str) -> None:
    if config.verbose:
        print(message, file=sys.stderr, flush=True)


def _new_row(case: Case, ctx: Context, ceilings: dict[str, Any]) -> dict[str, Any]:
    floor_s, bound = _roofline(case, ceilings)
    return blank_row(
        case.name,
        ctx.backend.name,
        case.shape,
        ctx.dtype.name,
        flops=case.flops,
        bytes_moved=case.bytes,
        bound=bound,
        floor_s=floor_s,
    )


def _timing_fields(stats: Stats) -> dict[str, Any]:
    return {
        "median_s": stats.median_s,
        "q1_s": stats.q1_s,
        "q3_s": stats.q3_s,
        "calls": stats.calls,
    }


def measure_case(
    case: Case, ctx: Context, settings: TimingSettings, ceilings: dict[str, Any]
) -> dict[str, Any]:
    """Build, check, then time one row.  Returns the row dict (see bench/README.md): status
    "failed" (wrong result, not timed) or "error" (an exception) with the reason, else the
    timings of ours and of each baseline and their ratios."""
    row = _new_row(case, ctx, ceilings)
    try:
        copies = copies_for(case, ceilings.get("cache_bytes", 32 << 20))
        prepared = case.build(ctx, copies)
        row["input_copies"] = prepared.copies
        row["launches"] = prepared.launches
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
    ours = stats.pop("ours")
    row.update(_timing_fields(ours))
    row["gbps"] = case.bytes / ours.median_s / 1e9 if case.bytes else None
    row["tflops"] = case.flops / ours.median_s / 1e12 if case.flops else None
    if row["floor_s"] is not None:
        row["floor_fraction"] = row["floor_s"] / ours.median_s
    for name, stat in stats.items():
        row["baselines"][name] = _timing_fields(stat)
        row["vs"][name] = speed_ratio(stat.median_s, ours.median_s)
    row["baselines_skipped"] = {**prepared.skipped, **failures}
    return row


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
    record = _new_record(config, dtype)
    plan, skipped = _backend_plan(config)
    record["skipped"].extend(skipped)
    for entry in skipped:
        _progress(config, f"skipping backend {entry['backend']}: {entry['reason']}")
    torch_threads = _set_torch_threads(config)
    for name, backend in plan:
        _run_backend(config, record, name, backend, dtype)
        data_parallel.append_rows(config, record, name)
    record["threads"] = {"numpy": numpy_threads(), "torch": torch_threads, "blas": blas_info()}
    record["complete"] = True
    return record


def _new_record(config: BenchConfig, dtype: np.dtype) -> dict[str, Any]:
    """The record before any row: what ran where, with which code and settings."""
    commit, dirty = git_commit()
    return {
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
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
        "versions": library_versions(),
        "threads": {},
        "devices": {},
        "ceilings": {},
        "results": [],
        "skipped": [],
        "complete": False,
    }


def _run_backend(
    config: BenchConfig, record: dict[str, Any], name: str, backend: Any, dtype: np.dtype
) -> None:
    """One backend's device facts, ceilings and rows, appended to ``record`` (handed to
    config.on_row after every row)."""
    device_class = _device_class(backend)
    preset = _preset_for(backend, config)
    settings = TIMING[preset]
    if backend.name == "host":
        cases = host_cases(config.only)
    else:
        versions = ()
        if config.gemm_versions and not config.quick and hasattr(backend, "gemm_version"):
            from ..backends.gemm_config import GEMM_VERSIONS

            versions = tuple(v for v in GEMM_VERSIONS if v != backend.gemm_version)
        # Tensor-core rows (bf16, tf32) where the backend runs them: float32 on a GPU of
        # compute capability 8.0+ or the emulator.
        precisions: tuple[str, ...] = ()
        if dtype == np.float32 and hasattr(backend, "to_bf16"):
            precisions = tuple(p for p in backend.precisions() if p != "fp32")
        graph_rows = hasattr(getattr(backend, "seam", None), "capture")
        cases = cases_for(
            SIZES[preset], dtype.itemsize, config.only, versions, precisions, preset, graph_rows
        )
    if not cases:
        return  # --only left this backend no row: no ceilings to measure either
    if device_class == "gpu":
        disable_cupy_tf32(backend.xp)
    # The host rows time the host alone: no torch baselines, no ceilings (no device).
    ctx = Context(
        backend,
        dtype,
        replace(config, torch=False) if backend.name == "host" else config,
        device_class,
    )
    record["devices"][name] = device_info(ctx)
    if backend.name == "host":
        ceilings: dict[str, Any] = {}
    else:
        _progress(config, f"[{name}] {record['devices'][name]['name']}: measuring ceilings")
        try:
            ceilings = measure_ceilings(ctx, settings)
        except Exception as error:
            ceilings = {"error": f"{type(error).__name__}: {error}"}
    record["ceilings"][name] = ceilings
    if ctx.torch is None and backend.name != "host":
        record["skipped"].append(
            {"backend": name, "name": "torch baselines", "reason": ctx.torch_reason}
        )
    for i, case in enumerate(cases):
        row = measure_case(case, ctx, settings, ceilings)
        record["results"].append(row)
        _progress(
            config,
            f"[{name}] {i + 1}/{len(cases)} {case.name} {shape_text(case.shape)}: "
            f"{row['status']} {format_time(row['median_s'])}",
        )
        if config.on_row is not None:
            config.on_row(record)
    if device_class == "gpu":
        ctx.cupy.get_default_memory_pool().free_all_blocks()


def _set_torch_threads(config: BenchConfig) -> int | None:
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
