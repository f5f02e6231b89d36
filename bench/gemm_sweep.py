"""Time gemm.cu's GEMM versions under several tile configurations against cuBLAS, in one process.

Each configuration (a GEMM version and its tuning values) is first checked against NumPy float64
on an odd shape (a wrong one is reported, not timed), then Y = X·Wᵀ (dense_forward) and dX + dW
(dense_backward) are timed at ``--size``³ with CUDA events, alternating with cupy.matmul (TF32
off) doing the same products.  The winner of each version is the configuration to put in its
tiles dict (GEMM_TILES or GEMM_TILES_WARPTILED in gpubackprop/backends/gemm_config.py); the
overall winner says which version the library should use.

    python bench/gemm_sweep.py --json sweep.json            # on a GPU (cupy backend)
    python bench/gemm_sweep.py --backend emu --size 96      # plumbing check on the CPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

# The tuning values of each version, in the order the CONFIGS tuples give them.
TILE_KEYS = {
    "tiled": ("TILE_M", "TILE_N", "TILE_K", "MICRO_M", "MICRO_N"),
    "warptiled": ("WT_BM", "WT_BN", "WT_BK", "WT_WM", "WT_WN", "WT_WNITER", "WT_TM", "WT_TN"),
}
# (version, tuning values): the library's default of each version first (a sweep stopped by its
# time limit has then measured what the library runs now), then the alternatives.
CONFIGS = [
    ("tiled", (128, 128, 8, 8, 8)),
    ("warptiled", (128, 128, 16, 64, 64, 4, 8, 4)),
    ("tiled", (128, 128, 16, 8, 8)),
    ("tiled", (128, 64, 8, 8, 4)),
    ("tiled", (64, 128, 8, 4, 8)),
    ("tiled", (64, 64, 8, 4, 4)),
    ("tiled", (64, 64, 16, 4, 4)),
    ("tiled", (128, 256, 8, 8, 8)),
    ("tiled", (256, 128, 8, 8, 8)),
    # 4 warps of 64×64, 8×16 outputs per thread (the default above, with 8-deep slices)
    ("warptiled", (128, 128, 8, 64, 64, 4, 8, 4)),
    # 8 warps of 32×64 (256 threads), 4×16 outputs per thread
    ("warptiled", (128, 128, 16, 32, 64, 4, 4, 4)),
    # 4 warps of 64×32, 8×8 outputs per thread
    ("warptiled", (128, 64, 16, 64, 32, 2, 8, 4)),
    # 8 warps of 64×64 (256 threads), 8×16 outputs per thread
    ("warptiled", (128, 256, 8, 64, 64, 4, 8, 4)),
]
CHECK_SHAPE = (257, 129, 67)  # M, N, K: every edge of a 128-wide tile, K not a multiple of 4


def _tiles(version: str, config: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(TILE_KEYS[version], config, strict=True))


def _backend(name: str, version: str, config: tuple[int, ...]):
    tiles = {"float": _tiles(version, config)}
    if name == "cupy":
        from gpubackprop.backends.cupy_backend import CupyBackend

        backend = CupyBackend(gemm_version=version, gemm_tiles=tiles)
    else:
        from gpubackprop.backends.emu_backend import EmuSeam
        from gpubackprop.backends.kernel_backend import KernelBackend

        backend = KernelBackend(EmuSeam(), gemm_version=version, gemm_tiles=tiles)
    if not backend.available:
        raise RuntimeError(f"backend {name!r} is not available: {backend.reason}")
    return backend


def _check(backend, rng) -> float:
    """Max error of forward, dX and dW on CHECK_SHAPE relative to each output's largest entry."""
    m, n, k = CHECK_SHAPE
    x, w, dy = rng.normal(size=(m, k)), rng.normal(size=(n, k)), rng.normal(size=(m, n))
    xd, wd = backend.asarray(x, np.float32), backend.asarray(w, np.float32)
    y, _ = backend.dense_forward(xd, wd, None, "identity")
    dw = backend.zeros((n, k), np.float32)
    dx = backend.dense_backward(
        backend.asarray(dy, np.float32), xd, wd, None, "identity", 0.0, dw, None, True
    )
    from gpubackprop.benchmarks import max_rel_error

    outputs = [backend.to_numpy(a) for a in (y, dx, dw)]
    return max_rel_error(outputs, [x @ w.T, dy @ w, dy.T @ x])


def _timer(backend):
    from gpubackprop.benchmarks import CpuTimer, CupyEventTimer

    if backend.name == "cupy":
        return CupyEventTimer(backend.xp)
    return CpuTimer(backend.synchronize)


def _median_time(timer, fn, repeats: int) -> float:
    fn()
    timer.sync()
    return float(np.median([timer.time(fn, 1) for _ in range(repeats)]))


def _time_config(backend, size: int, repeats: int, rng, flops: float) -> dict:
    x = backend.asarray(rng.normal(size=(size, size)), np.float32)
    w = backend.asarray(rng.normal(size=(size, size)), np.float32)
    dw = backend.zeros((size, size), np.float32)
    timer = _timer(backend)
    start = time.perf_counter()
    forward = _median_time(timer, lambda: backend.dense_forward(x, w, None, "identity"), repeats)
    # dout = x: any (size, size) matrix will do, only the time of dX and dW is kept.
    backward = _median_time(
        timer,
        lambda: backend.dense_backward(x, x, w, None, "identity", 0.0, dw, None, True),
        repeats,
    )
    return {
        "status": "ok",
        "forward_s": forward,
        "forward_tflops": flops / forward / 1e12,
        "dx_dw_s": backward,
        "dx_dw_tflops": 2 * flops / backward / 1e12,
        "seconds": time.perf_counter() - start,
    }


def _cublas_time(backend, size: int, repeats: int, rng) -> float:
    """cupy.matmul's Y = X·Wᵀ with the plain FP32 compute type (no TF32)."""
    from gpubackprop.benchmarks import disable_cupy_tf32

    xp = backend.xp
    disable_cupy_tf32(xp)
    x = backend.asarray(rng.normal(size=(size, size)), np.float32)
    w = backend.asarray(rng.normal(size=(size, size)), np.float32)
    return _median_time(_timer(backend), lambda: xp.matmul(x, w.T), repeats)


def _write(path: str | None, record: dict) -> None:
    """Rewritten after every configuration (atomically), so a sweep stopped by its time limit
    keeps what it measured."""
    if path:
        from gpubackprop.benchmarks import write_json

        write_json(record, path)


def sweep(
    backend_name: str,
    size: int,
    repeats: int,
    configs,
    json_path: str | None = None,
    budget_s: float | None = None,
) -> dict:
    """Check and time every configuration; with ``json_path`` the rows so far are written after
    each one, so a run stopped by a time limit still leaves its measurements.  With
    ``budget_s``, configurations that would start after that many seconds are listed as "not
    run" and the record is completed, so the sweep ends before the limit of its caller."""
    rng = np.random.default_rng(0)
    flops = 2.0 * size**3
    rows = []
    cublas = None
    began = time.perf_counter()
    for version, config in configs:
        row = {"version": version, "tiles": _tiles(version, config)}
        if budget_s is not None and time.perf_counter() - began > budget_s:
            row["status"] = f"not run: the {budget_s:g} s budget was spent"
            rows.append(row)
            _write(json_path, {"kind": "gemm_sweep", "partial": True, "size": size, "rows": rows})
            continue
        rows.append(row)
        try:
            backend = _backend(backend_name, version, config)
            row["max_rel_error"] = _check(backend, rng)
            if not row["max_rel_error"] < 1e-5:
                row["status"] = "wrong result"
                continue
            row.update(_time_config(backend, size, repeats, rng, flops))
            if backend_name == "cupy":
                if cublas is None:
                    cublas = _cublas_time(backend, size, repeats, rng)
                row["vs_cublas_forward"] = cublas / row["forward_s"]
        except Exception as error:  # a configuration that fails to compile or launch
            row["status"] = f"{type(error).__name__}: {str(error)[:300]}"
        _write(json_path, {"kind": "gemm_sweep", "partial": True, "size": size, "rows": rows})

    def fastest(candidates):
        return max(
            (r for r in candidates if r.get("status") == "ok"),
            key=lambda r: r["forward_tflops"] + r["dx_dw_tflops"],
            default=None,
        )

    best = fastest(rows)
    best_per_version = {}
    for version in dict.fromkeys(r["version"] for r in rows):
        winner = fastest(r for r in rows if r["version"] == version)
        best_per_version[version] = winner["tiles"] if winner else None
    return {
        "kind": "gemm_sweep",
        "backend": backend_name,
        "size": size,
        "cublas_forward_s": cublas,
        "cublas_tflops": flops / cublas / 1e12 if cublas else None,
        "rows": rows,
        "best": {"version": best["version"], "tiles": best["tiles"]} if best else None,
        "best_per_version": best_per_version,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cupy", choices=("cupy", "emu"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the record here")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no configuration after this many s"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("CUPY_TF32", "0")
    record = sweep(args.backend, args.size, args.repeats, CONFIGS, args.json, args.budget_s)
    for row in record["rows"]:
        tiles = row["version"] + " " + "x".join(str(v) for v in row["tiles"].values())
        if row.get("status") != "ok":
            print(f"{tiles:<32} {row.get('status')}")
            continue
        versus = row.get("vs_cublas_forward")
        print(
            f"{tiles:<32} forward {row['forward_tflops']:7.2f} TFLOP/s"
            f"  dX+dW {row['dx_dw_tflops']:7.2f} TFLOP/s"
            + (f"  {versus:5.1%} of cuBLAS" if versus and math.isfinite(versus) else "")
        )
    for version, tiles in record["best_per_version"].items():
        print(f"best {version}:", tiles)
    print("best:", record["best"])
    _write(args.json, record)
    return 0 if record["best"] else 1


if __name__ == "__main__":
    sys.exit(main())
