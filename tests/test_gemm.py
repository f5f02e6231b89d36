"""The GEMM kernels of gemm.cu on the CPU emulator: every version ("tiled", "warptiled",
"naive") against NumPy and against each other on odd shapes and misaligned operands, the tile
configurations (gemm_config.py's checks, bench/gemm_sweep.py's sweep), and that a backend
compiles only the version it launches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gpubackprop.backends.gemm_config import GEMM_TILES, GEMM_TILES_WARPTILED, GEMM_VERSIONS


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("offset", (0, 1, 2))  # 1, 2: views that defeat the 16-byte loads
@pytest.mark.parametrize("shape", ((130, 36, 136), (3, 260, 5), (1, 4, 1)))
def test_gemm_versions_and_alignments_agree(emu_backends, dtype, offset, shape):
    m, k, n = shape
    rng = np.random.default_rng(7)
    flat = rng.standard_normal(m * k + offset).astype(dtype)
    x = flat[offset:].reshape(m, k)
    w = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    dout = rng.standard_normal((m, n)).astype(dtype)
    x64, w64, d64 = x.astype(np.float64), w.astype(np.float64), dout.astype(np.float64)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for backend in emu_backends:
        _, z = backend.dense_forward(x, w, b, "gelu")
        np.testing.assert_allclose(z, x64 @ w64.T + b, **tol)
        dweight, dbias = np.empty((n, k), dtype), np.empty(n, dtype)
        dinp = backend.dense_backward(dout, x, w, None, "identity", 0.0, dweight, dbias, True)
        np.testing.assert_allclose(dinp, d64 @ w64, **tol)
        np.testing.assert_allclose(dweight, d64.T @ x64, **tol)
        np.testing.assert_allclose(dbias, d64.sum(axis=0), **tol)


def _misaligned(array: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``array`` starting ``offset`` elements past a 256-byte boundary."""
    flat = np.zeros(array.size + 64 + offset, dtype=array.dtype)
    start = (-flat.ctypes.data // array.itemsize) % 64 + offset
    view = flat[start : start + array.size].reshape(array.shape)
    view[...] = array
    return view


@pytest.mark.parametrize("version", GEMM_VERSIONS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("offset", (0, 1, 3))  # 1, 3: every operand and dweight misaligned
# M, N, K: past one block tile in every dimension, single rows/columns, K = 1, K = 0.
@pytest.mark.parametrize(
    "shape", ((257, 129, 67), (1, 300, 5), (300, 1, 9), (129, 257, 1), (130, 65, 0))
)
def test_every_gemm_version_matches_numpy(version, dtype, offset, shape):
    from gpubackprop.backends.emu_backend import EmuBackend
    from gpubackprop.backends.numpy_backend import NumpyBackend

    backend = EmuBackend(gemm_version=version)
    if not backend.available:
        pytest.skip(f"emulator unavailable: {backend.reason}")
    m, n, k = shape
    rng = np.random.default_rng(m * 1000 + n + k)
    x, w, dout = rng.normal(size=(m, k)), rng.normal(size=(n, k)), rng.normal(size=(m, n))
    bias = rng.normal(size=n) if offset != 1 else None
    activation = "gelu" if offset != 1 else "sigmoid"  # with z written, and without
    y_ref, saved_ref = NumpyBackend().dense_forward(x, w, bias, activation, 0.1)

    xs, ws = (_misaligned(a.astype(dtype), offset) for a in (x, w))
    ds = _misaligned(dout.astype(dtype), offset)
    bs = None if bias is None else bias.astype(dtype)
    y, saved = backend.dense_forward(xs, ws, bs, activation, 0.1)
    dweight = _misaligned(np.full((n, k), np.nan, dtype), offset)
    dinp = backend.dense_backward(ds, xs, ws, None, "identity", 0.0, dweight, None, True)

    scale = 1e-5 if dtype == np.float32 else 1e-13
    for got, want, length in (
        (y, y_ref, k),
        (saved, saved_ref, k),  # z for gelu, y for sigmoid
        (dinp, dout @ w, n),
        (dweight, dout.T @ x, m),
    ):
        assert got.shape == want.shape and got.dtype == dtype
        tolerance = scale * np.sqrt(length + 1) * (np.abs(want).max(initial=0) + 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


def test_warptiled_gemm_is_race_free_and_deterministic():
    """The threads of a block run in shuffled orders between barriers: bit-identical results."""
    from gpubackprop.backends.emu_backend import EmuBackend

    rng = np.random.default_rng(3)
    x = rng.normal(size=(257, 67)).astype(np.float32)
    w = rng.normal(size=(129, 67)).astype(np.float32)
    dout = rng.normal(size=(257, 129)).astype(np.float32)
    results = []
    for seed in (None, 1, 2):
        backend = EmuBackend(gemm_version="warptiled", shuffle_seed=seed)
        if not backend.available:
            pytest.skip(f"emulator unavailable: {backend.reason}")
        y, _ = backend.dense_forward(x, w, None, "identity")
        dweight = np.empty((129, 67), np.float32)
        dinp = backend.dense_backward(dout, x, w, None, "identity", 0.0, dweight, None, True)
        results.append((y, dinp, dweight))
    for other in results[1:]:
        for got, first in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(got, first)


def _gemm_sweep_module():
    """bench/gemm_sweep.py as a module (it is a script, not part of the package)."""

    from gpubackprop.backends import available_backends

    if not available_backends()["emu"][0]:
        pytest.skip(f"emu unavailable: {available_backends()['emu'][1]}")
    path = Path(__file__).resolve().parents[1] / "bench" / "gemm_sweep.py"
    spec = importlib.util.spec_from_file_location("gemm_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_every_gemm_tile_configuration_of_the_sweep_is_correct_on_the_emulator():
    """bench/gemm_sweep.py times these on a GPU; each must first give the right answer."""
    sweep = _gemm_sweep_module()
    rng = np.random.default_rng(0)
    assert {version for version, _ in sweep.CONFIGS} == {"tiled", "warptiled"}
    for version, config in sweep.CONFIGS:
        assert sweep._check(sweep._backend("emu", version, config), rng) < 1e-5, config


def test_gemm_sweep_runs_on_the_emulator_and_records_each_version(tmp_path):
    sweep = _gemm_sweep_module()
    configs = [c for c in sweep.CONFIGS if c[1][:2] == (128, 128)][:1] + [
        c for c in sweep.CONFIGS if c[0] == "warptiled"
    ][:1]
    record = sweep.sweep("emu", 40, 1, configs)
    assert [row["version"] for row in record["rows"]] == ["tiled", "warptiled"]
    assert all(row["status"] == "ok" for row in record["rows"]), record["rows"]
    assert set(record["best_per_version"]) == {"tiled", "warptiled"}
    assert record["best"]["version"] in ("tiled", "warptiled")


def test_gemm_tiles_are_validated_up_front():
    from gpubackprop.backends.emu_backend import EmuSeam
    from gpubackprop.backends.kernel_backend import KernelBackend

    with pytest.raises(ValueError, match="TILE_K, MICRO_M and MICRO_N must be multiples of 4"):
        KernelBackend(EmuSeam(), gemm_tiles={"float": {"TILE_K": 6}})
    with pytest.raises(ValueError, match="2048 threads per block"):
        KernelBackend(
            EmuSeam(),
            gemm_tiles={"float": {"TILE_M": 256, "TILE_N": 512, "MICRO_M": 8, "MICRO_N": 8}},
        )
    with pytest.raises(ValueError, match="bytes of static shared memory"):
        KernelBackend(EmuSeam(), gemm_tiles={"double": {"TILE_K": 32}})


def test_warptiled_gemm_tiles_are_validated_up_front():
    from gpubackprop.backends.emu_backend import EmuSeam
    from gpubackprop.backends.kernel_backend import KernelBackend

    def backend(**tiles):
        return KernelBackend(EmuSeam(), gemm_version="warptiled", gemm_tiles={"float": tiles})

    assert backend().gemm_tiles["float"]["WT_BK"] == 16
    with pytest.raises(ValueError, match="WT_BK, WT_TM and WT_TN must be multiples of 4"):
        backend(WT_TN=2)
    with pytest.raises(ValueError, match="WT_WM must divide WT_BM"):
        backend(WT_WM=48)
    with pytest.raises(ValueError, match="2048 threads per block"):
        backend(WT_BM=256, WT_BN=256, WT_WM=32, WT_WN=32)
    with pytest.raises(ValueError, match="must be a multiple of 32·WT_TM·WT_TN·WT_WNITER"):
        backend(WT_WNITER=8)
    with pytest.raises(ValueError, match=r"must divide the warp sub-tile 4x256 \(WT_WMITER=16\)"):
        backend(WT_BN=256, WT_WN=256, WT_WNITER=1, WT_BK=8)
    with pytest.raises(ValueError, match="bytes of static shared memory"):
        backend(WT_BK=32)


def test_gemm_sweep_measures_the_library_defaults_first():
    """A sweep stopped by its time limit has then timed what the library runs now."""
    sweep = _gemm_sweep_module()
    (v1, c1), (v2, c2) = sweep.CONFIGS[:2]
    assert (v1, sweep._tiles(v1, c1)) == ("tiled", GEMM_TILES["float"])
    assert (v2, sweep._tiles(v2, c2)) == ("warptiled", GEMM_TILES_WARPTILED["float"])


def test_gemm_sweep_past_its_budget_lists_the_rest_as_not_run(tmp_path):
    sweep = _gemm_sweep_module()
    path = tmp_path / "sweep.json"
    record = sweep.sweep("emu", 40, 1, sweep.CONFIGS[:2], str(path), budget_s=0.0)
    assert [row["status"] for row in record["rows"]] == ["not run: the 0 s budget was spent"] * 2
    assert record["best"] is None
    assert json.loads(path.read_text())["rows"] == record["rows"]


@pytest.mark.parametrize("version", ["tiled", "warptiled", "naive"])
def test_a_backend_compiles_only_the_gemm_version_it_launches(version):
    """gemm.cu's GEMM_<VERSION> switches: a compile holds one version's kernels (faster NVRTC
    and g++), and the emulator finds exactly the kernels the compiler kept."""
    from gpubackprop.backends.emu_backend import EmuSeam
    from gpubackprop.backends.kernel_backend import KernelBackend

    backend = KernelBackend(EmuSeam(), gemm_version=version)
    module = backend._module("gemm.cu", np.dtype(np.float32))
    suffix = "" if version == "tiled" else f"_{version}"
    layouts = ("dense_forward", "dense_backward_data", "dense_backward_weight")
    expected = {f"{name}{suffix}" for name in layouts}
    if version == "tiled":  # and its variants: δ formed on load, split-K and its reduction
        expected |= {"dense_backward_weight_act", "dense_backward_data_act", "gemm_splitk_reduce"}
        expected |= {f"{name}_splitk" for name in layouts}
        expected |= {"dense_backward_weight_act_splitk", "dense_backward_data_act_splitk"}
        expected |= {"gemm_splitk_reduce_backward"}
    if version == "warptiled":
        expected |= {"dense_backward_weight_act_warptiled", "dense_backward_data_act_warptiled"}
    assert set(module.kernels) == expected
