"""The compile warm-up (gpubackprop/backends/warm.py): its module list covers every module the
launchers compile, so that a device check that warms first compiles nothing later."""

from __future__ import annotations

import numpy as np
import pytest

from gpubackprop import parity
from gpubackprop.backends.gemm_config import GEMM_VERSIONS
from gpubackprop.backends.recording import HostBackend
from gpubackprop.backends.warm import module_specs, warm_up
from gpubackprop.emulator import find_compiler


def _key(file: str, defines: dict[str, str]) -> tuple:
    return file, tuple(sorted(defines.items()))


@pytest.mark.parametrize("version", GEMM_VERSIONS)
def test_the_warm_list_holds_every_module_the_op_cases_compile(version):
    """Every op case of the parity suite (each dtype and precision), a large layer whose GEMMs
    take the small tiles and split-K, run through the launchers over the recording seam (which
    notes each compile and runs nothing): each compiled (file, defines) is in module_specs()."""
    backend = HostBackend(gemm_version=version)
    for case in parity.op_cases(seed=0):
        for dtype in ("float32", "float64"):
            if case.runs_in(dtype):
                arrays = {
                    k: np.asarray(v, np.int64 if k in case.labels else dtype)
                    for k, v in case.inputs.items()
                }
                with np.errstate(all="ignore"):  # outputs are whatever np.empty held
                    case.run(backend, **arrays)
    for dtype in (np.float32, np.float64):
        x, w = np.ones((256, 4096), dtype), np.ones((64, 4096), dtype)
        y, saved = backend.dense_forward(x, w, None, "relu")
        dw = np.empty_like(w)
        backend.dense_backward(y, x, w, saved, "relu", 0.0, dw, None, True)
    compiled = {_key(file, defines) for file, defines in backend.seam.compiles}
    listed = {_key(file, defines) for file, defines in module_specs()}
    assert compiled, "the recording seam noted no compile"
    assert compiled <= listed, sorted(compiled - listed)
    if version == "tiled":  # the adaptive plan reached its small tiles
        assert sum(1 for file, _ in compiled if file == "gemm.cu") >= 4


@pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler for the emulator")
def test_warm_up_compiles_in_worker_processes_into_the_shared_cache(tmp_path, monkeypatch):
    """Two small modules built by two spawned workers on the emulator land in the build cache
    that a fresh backend in this process then loads without building."""
    monkeypatch.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path))
    specs = [spec for spec in module_specs() if spec[0] in ("standardize.cu", "train_step.cu")]
    specs = [spec for spec in specs if spec[1]["REAL_T"] == "float"]
    timings = warm_up("emu", jobs=2, specs=specs)
    assert [label.split()[1] for label, _ in timings] == [file for file, _ in specs]

    def cache_files():
        return {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    built = cache_files()
    assert sum(name.endswith(".so") for name in built) >= len(specs), sorted(built)
    warm_up("emu", jobs=1, specs=specs)  # loaded from the cache: nothing built or rewritten
    assert cache_files() == built
