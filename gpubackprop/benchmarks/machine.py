"""Facts about the machine and the code a record is taken on: commit, CPU model and cache,
BLAS threads, library versions, and the device behind each backend.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from .cases import Context

# gpubackprop/benchmarks/machine.py -> the folder holding gpubackprop/ (a checkout, or
# site-packages for an installed wheel).
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def _run_quiet(command: list[str], cwd: Path | None = None) -> str | None:
    """The command's stdout, or None when it cannot run or fails."""
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_root() -> Path | None:
    """The source checkout that holds this package, if any (it has a bench/ folder)."""
    return _PACKAGE_PARENT if (_PACKAGE_PARENT / "bench").is_dir() else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package, or (None, None)."""
    root = source_root()
    if root is None:
        return None, None
    commit = _run_quiet(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return None, None
    status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, bool(status)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cache_bytes() -> int:
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


def blas_info() -> dict[str, Any]:
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
        info["cpu"] = cpu_model()
        info["cores"] = os.cpu_count()
    return info


def library_versions() -> dict[str, Any]:
    from .. import __version__

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
