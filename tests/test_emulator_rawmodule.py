"""gpubackprop.emulator.RawModule / RawKernel: CuPy's entry points for a user's own kernel, on
the CPU emulator.  A CuPy user changes one import; what the emulator cannot run is refused by
name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from gpubackprop.emulator import (
    EmuCompileError,
    EmuLaunchError,
    RawKernel,
    RawModule,
    UnsupportedCupyFeature,
    find_compiler,
)
from gpubackprop.emulator.device_arrays import DeviceArray

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler for the emulator")

SCALE = r"""
template <typename T>
__global__ void scale(const T* x, T* y, T a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i];
}

extern "C" __global__ void tile_reverse(const float* x, float* y, int n) {
    extern __shared__ float tile[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = tile[blockDim.x - 1 - threadIdx.x] * SCALE_BY + __CUDA_ARCH__;
}
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "raw_cache"))
    monkeypatch.delenv("GPUBACKPROP_EMU_SHUFFLE", raising=False)


@pytest.mark.parametrize("page", ["README.md", "docs/emulator.md"])
def test_the_five_line_example_on_the_front_page_and_in_the_docs_runs(page):
    text = (Path(__file__).resolve().parents[1] / page).read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "RawModule" in b]
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 5, blocks
    assert "from gpubackprop.emulator import RawModule" in blocks[0]
    namespace: dict = {}
    exec(compile(blocks[0], page, "exec"), namespace)
    np.testing.assert_array_equal(namespace["y"], 2 * np.arange(32))


def test_a_templated_kernel_with_options():
    code = SCALE
    module = RawModule(code=code, options=("-DSCALE_BY=1",), name_expressions=["scale<float>"])
    kernel = module.get_function("scale<float>")
    x = np.arange(1000, dtype=np.float32)
    y = np.empty_like(x)
    kernel((4,), (256,), (x, y, np.float32(2.0), np.int32(x.size)))
    np.testing.assert_array_equal(y, 2 * x)


def test_options_defines_arch_and_dynamic_shared_memory():
    module = RawModule(code=SCALE, options=("-DSCALE_BY=3", "--std=c++17", "-arch=sm_75"))
    kernel = module.get_function("tile_reverse")
    n = 70
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    y = np.zeros(n, np.float32)
    kernel((3,), (32,), (x, y, np.int32(n)), shared_mem=32 * 4)
    padded = np.concatenate([x, np.zeros(96 - n, np.float32)]).reshape(3, 32)[:, ::-1]
    np.testing.assert_allclose(y, padded.reshape(-1)[:n] * 3 + 750, rtol=1e-6)


def test_device_arrays_and_a_template_per_type():
    module = RawModule(
        code=SCALE, options=("-DSCALE_BY=1",), name_expressions=("scale<double>", "scale<int>")
    )
    x = DeviceArray(np.arange(5, dtype=np.float64))
    y = DeviceArray(np.zeros(5, np.float64))
    module.get_function("scale<double>")((1,), (32,), (x, y, np.float64(-1.5), np.int32(5)))
    np.testing.assert_array_equal(y.get(), -1.5 * np.arange(5))
    xi, yi = np.arange(5, dtype=np.int32), np.zeros(5, np.int32)
    module.get_function("scale<int>")((1,), (32,), (xi, yi, np.int32(7), np.int32(5)))
    np.testing.assert_array_equal(yi, 7 * np.arange(5))


def test_raw_kernel_and_its_checks():
    kernel = RawKernel(SCALE, "tile_reverse", options=("-DSCALE_BY=1",))
    x = np.ones(8, np.float32)
    y = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match=r"grid must be a tuple, got list"):
        kernel([1], (8,), (x, y, np.int32(8)), shared_mem=32)
    with pytest.raises(TypeError, match=r"parameter 'n' is int, got int 8; pass np.int32"):
        kernel((1,), (8,), (x, y, 8), shared_mem=32)
    with pytest.raises(EmuLaunchError, match=r"wrote out of bounds of argument 'y'"):
        kernel((1,), (16,), (x, y, np.int32(16)), shared_mem=64)
    # More than 48 KiB of dynamic shared memory needs the opt-in attribute, as on a GPU.
    with pytest.raises(ValueError, match=r"shared_mem=65536 bytes; expected 0 to 49152"):
        kernel((1,), (8,), (x, y, np.int32(8)), shared_mem=65536)
    kernel.max_dynamic_shared_size_bytes = 65536
    kernel((1,), (8,), (x, y, np.int32(8)), shared_mem=65536)
    np.testing.assert_array_equal(y, np.ones(8) + 800)


def test_unknown_kernel_and_compile_errors_name_file_and_line():
    module = RawModule(code=SCALE, options=("-DSCALE_BY=1",))
    with pytest.raises(ValueError, match=r"get_function\('scale<float>'\): no such kernel"):
        module.get_function("scale<float>")
    broken = RawModule(code='extern "C" __global__ void k(float* y) {\n  y[0] = nope;\n}\n')
    with pytest.raises(EmuCompileError, match=r"RawModule\.cu:2:.*nope"):
        broken.compile()


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"path": "kernel.cubin"}, r"path='kernel.cubin' \(a compiled cubin"),
        ({"backend": "nvcc"}, r"backend='nvcc'"),
        ({"translate_cucomplex": True}, r"translate_cucomplex=True"),
        ({"enable_cooperative_groups": True}, r"enable_cooperative_groups=True \(grid-wide"),
        ({"jitify": True}, r"jitify=True"),
        ({"options": ("--use_fast_math",)}, r"'--use_fast_math'.*approximate division"),
        ({"options": ("-prec-div=false",)}, r"'-prec-div=false'.*approximate division"),
        ({"options": ("-I/usr/include",)}, r"'-I/usr/include'.*include folder"),
        ({"options": ("-ftz=false",)}, r"'-ftz=false'.*CuPy passes -ftz=true itself"),
        ({"options": ("--bogus",)}, r"'--bogus' is not supported by the emulator \(unknown"),
    ],
)
def test_unsupported_cupy_features_are_named(kwargs, named):
    with pytest.raises(UnsupportedCupyFeature, match=named):
        RawModule(code=SCALE, **kwargs)


def test_streams_globals_and_textures_are_refused_by_name():
    module = RawModule(code=SCALE, options=("-DSCALE_BY=1",))
    kernel = module.get_function("tile_reverse")
    x = np.ones(4, np.float32)
    with pytest.raises(UnsupportedCupyFeature, match=r"stream=.*pass no stream"):
        kernel((1,), (4,), (x, x.copy(), np.int32(4)), shared_mem=16, stream=object())
    with pytest.raises(UnsupportedCupyFeature, match=r"get_global\('table'\)"):
        module.get_global("table")
    with pytest.raises(UnsupportedCupyFeature, match=r"textures"):
        module.get_texref("tex")


def test_float32_subnormals_are_flushed_as_cupy_compiles():
    module = RawModule(
        code='extern "C" __global__ void half(float* x) { x[threadIdx.x] *= 0.5f; }\n'
    )
    x = np.array([2e-38, 3e-38, 4.0], np.float32)  # 1e-38 < 2^-126: flushed, as -ftz=true
    module.get_function("half")((1,), (3,), (x,))
    np.testing.assert_array_equal(x, np.array([0.0, 1.5e-38, 2.0], np.float32))


@pytest.mark.gpu
def test_the_same_code_gives_the_same_result_through_cupy_on_a_gpu():
    """The one-import promise, checked where a GPU is: cupy.RawModule and the emulator's
    RawModule, given the same code, options and name expressions, write the same arrays."""
    try:
        import cupy

        capability = int(cupy.cuda.Device(0).compute_capability)
    except Exception as error:
        pytest.skip(f"no CUDA GPU: {type(error).__name__}: {error}")
    n = 70
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    reversed_x = np.concatenate([x, np.zeros(26, np.float32)]).reshape(3, 32)[:, ::-1]
    for module_type, to_device, arch in (
        (RawModule, np.asarray, 800),  # the emulator's __CUDA_ARCH__
        (cupy.RawModule, cupy.asarray, capability * 10),
    ):
        module = module_type(
            code=SCALE, options=("-DSCALE_BY=3",), name_expressions=["scale<float>"]
        )
        y, z = to_device(np.zeros(n, np.float32)), to_device(np.zeros(n, np.float32))
        module.get_function("scale<float>")(
            (3,), (32,), (to_device(x), y, np.float32(-2.0), np.int32(n))
        )
        module.get_function("tile_reverse")(
            (3,), (32,), (to_device(x), z, np.int32(n)), shared_mem=32 * 4
        )
        y, z = (cupy.asnumpy(a) if module_type is cupy.RawModule else a for a in (y, z))
        np.testing.assert_array_equal(y, np.float32(-2.0) * x)
        expected = reversed_x.reshape(-1)[:n].astype(np.float64) * 3 + arch
        np.testing.assert_allclose(z, expected, rtol=1e-6)  # a GPU may fuse the * and +


UNWRITTEN_SHARED = r"""
template <typename T>
__device__ T stage(T value) {
    __shared__ T staged[4];  // a template's static local: g++ drops its section attribute
    if (threadIdx.x == 0 && blockIdx.x == 0) staged[1] = value;
    __syncthreads();
    return staged[threadIdx.x];
}

template <typename T>
__global__ void read_staged(T* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = stage<T>((T)5);
}
"""


def test_a_templates_static_shared_memory_is_uninitialised_in_every_block(monkeypatch):
    """Shared memory is uninitialised on a GPU, so the emulator fills it with NaN bytes before
    every block; a template's static __shared__ (which g++ keeps out of the filled section)
    must be filled too: block 0 sees only what it wrote, block 1 none of block 0's writes;
    and the guard check (a second run with 0x7F bytes) names the read of unwritten memory."""
    monkeypatch.delenv("GPUBACKPROP_EMU_GUARD_CHECK", raising=False)
    module = RawModule(code=UNWRITTEN_SHARED, name_expressions=["read_staged<float>"])
    out = np.zeros(8, np.float32)
    module.get_function("read_staged<float>")((2,), (4,), (out,))
    assert out[1] == 5.0, out
    unwritten = np.delete(out, 1)
    assert np.isnan(unwritten).all(), out  # not 0 (zeroed .bss) nor 5 (block 0's write)
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "1")
    with pytest.raises(EmuLaunchError, match="shared memory nobody wrote"):
        module.get_function("read_staged<float>")((2,), (4,), (np.zeros(8, np.float32),))
