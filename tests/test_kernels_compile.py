"""Every CUDA source compiles with NVRTC, on the CPU, for every target architecture.

(GEMM results: test_gemm.py; launcher argument errors: test_launchers.py.)

NVRTC needs no GPU: these tests run in every CI job.  They also check the conventions the
emulator relies on (entry points listed in each file's header, dynamic shared memory only through
GB_DYNAMIC_SHARED, no system includes) and that the library's kernels do not spill registers.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from gpubackprop import kernels
from gpubackprop.backends.elementwise import ELEMENTWISE_HEADERS, elementwise_specs
from gpubackprop.backends.gemm_config import GEMM_TILES, GEMM_TILES_WARPTILED
from gpubackprop.backends.kernel_backend import KERNEL_DEFINES
from gpubackprop.kernels import (
    KernelCompileError,
    elementwise_as_kernel_source,
    kernel_files,
    load_source,
    nvrtc_compile,
    ptxas_report,
)

try:
    from cupy_backends.cuda.libs import nvrtc

    nvrtc.getVersion()
    NVRTC_REASON = ""
except Exception as error:  # no CuPy or no NVRTC library: nothing can compile here
    NVRTC_REASON = f"NVRTC cannot load: {type(error).__name__}: {error}"

needs_nvrtc = pytest.mark.skipif(bool(NVRTC_REASON), reason=NVRTC_REASON or "ok")

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
REAL_TYPES = ("float", "double")
SOURCES = kernel_files()

# Kernels the library launches (the naive GEMMs are validation-only and may spill freely), and
# the tuning values it compiles them with.
LIBRARY_KERNELS = {
    "gemm.cu": {
        "dense_forward",
        "dense_backward_data",
        "dense_backward_weight",
        "dense_forward_warptiled",
        "dense_backward_data_warptiled",
        "dense_backward_weight_warptiled",
        "dense_backward_weight_act",
        "dense_backward_data_act",
        "dense_backward_weight_act_splitk",
        "dense_backward_data_act_splitk",
        "gemm_splitk_reduce_backward",
        "dense_backward_weight_act_warptiled",
        "dense_backward_data_act_warptiled",
    },
    "reduce.cu": {"sum_squares_partial", "sum_partial", "sum_finalize", "column_sum"},
    "loss.cu": {
        "softmax_xent_labels_forward_backward",
        "softmax_xent_probs_forward_backward",
        "mse_forward_backward",
        "bce_with_logits_forward_backward",
        "bce_forward_backward",
    },
    "train_step.cu": {"clip_coefficient", "clip_scale", "sgd_update", "adam_update"},
}

LIBRARY_DEFINES = {
    "gemm.cu": {real: {**GEMM_TILES[real], **GEMM_TILES_WARPTILED[real]} for real in REAL_TYPES},
    **{file: dict.fromkeys(REAL_TYPES, values) for file, values in KERNEL_DEFINES.items()},
}

ELEMENTWISE_SPECS = elementwise_specs()

_compiled_cache: dict[tuple, tuple[bytes, str]] = {}


def compile_cached(file: str, real: str, arch: str) -> tuple[bytes, str]:
    """Compiled with the tuning values the library passes for ``real`` (the file's defaults are
    the float ones)."""
    defines = {"REAL_T": real}
    defines.update({k: str(v) for k, v in LIBRARY_DEFINES.get(file, {}).get(real, {}).items()})
    key = (file, arch, tuple(sorted(defines.items())))
    if key not in _compiled_cache:
        _compiled_cache[key] = nvrtc_compile(load_source(file, defines), arch, verbose=True)
    return _compiled_cache[key]


def test_the_library_kernel_sources_are_found():
    assert {"gemm.cu", "reduce.cu", "loss.cu"} <= set(SOURCES)
    assert (kernels.kernel_dir() / "activations.cuh").is_file()


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("real", REAL_TYPES)
@pytest.mark.parametrize("file", SOURCES)
def test_source_compiles(file, real, arch):
    cubin, log = compile_cached(file, real, arch)
    assert len(cubin) > 0
    report = ptxas_report(log)
    source_kernels = set(kernels.entry_points(load_source(file).text))
    assert source_kernels, f'{file} has no extern "C" __global__ entry points'
    assert source_kernels <= set(report), f"ptxas did not report {source_kernels - set(report)}"


@needs_nvrtc
@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
@pytest.mark.parametrize("real", REAL_TYPES)
@pytest.mark.parametrize("file", sorted(LIBRARY_KERNELS))
def test_library_kernels_do_not_spill(file, real, arch):
    _, log = compile_cached(file, real, arch)
    report = ptxas_report(log)
    for kernel in LIBRARY_KERNELS[file]:
        stats = report[kernel]
        assert stats["spill_stores"] == 0 and stats["spill_loads"] == 0, (kernel, stats)
        assert 0 < stats["registers"] <= 255, (kernel, stats)


@pytest.mark.parametrize("file", SOURCES)
def test_header_lists_every_entry_point(file):
    text = (kernels.kernel_dir() / file).read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("//"))
    for kernel in kernels.entry_points(text):
        base = kernel.removesuffix("_naive")
        assert base in header, f"{file}: entry point {kernel} is not described in the header"


def test_conventions_the_emulator_relies_on():
    for path in sorted(kernels.kernel_dir().iterdir()):
        if path.suffix not in (".cu", ".cuh"):
            continue
        text = path.read_text()
        assert not re.search(r"#\s*include\s*<", text), f"{path.name}: system include"
        assert not re.search(r"template\s*<[^>]*>\s*(extern|__global__)", text), path.name
        for line in text.splitlines():
            if "extern __shared__" in line and not line.lstrip().startswith("//"):
                assert "#define GB_DYNAMIC_SHARED" in line, f"{path.name}: {line.strip()}"
    common = (kernels.kernel_dir() / "common.cuh").read_text()
    assert "#ifndef REAL_T" in common and "typedef REAL_T real_t;" in common
    assert "#ifndef GB_DYNAMIC_SHARED" in common


def test_activation_codes_match_base():
    from gpubackprop.backends.base import ACTIVATION_CODES

    text = (kernels.kernel_dir() / "activations.cuh").read_text()
    for name, code in ACTIVATION_CODES.items():
        assert re.search(rf"#define ACT_{name.upper()} {code}\b", text), name


@needs_nvrtc
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("spec", ELEMENTWISE_SPECS, ids=lambda spec: spec.name)
def test_elementwise_spec_compiles(spec, dtype):
    text = elementwise_as_kernel_source(spec, dtype)
    ctype = "float" if dtype == np.float32 else "double"
    assert f"#define REAL_T {ctype}" in text
    assert f'extern "C" __global__ void {spec.name}(' in text
    cubin, log = nvrtc_compile(text, "sm_80", verbose=True)
    assert cubin
    assert spec.name in ptxas_report(log)


def test_every_elementwise_function_is_a_kernel():
    """Each GB_ELEMENTWISE function of the headers became a spec, typed from its signature."""
    defined = []
    for header in ELEMENTWISE_HEADERS:
        text = (kernels.kernel_dir() / header).read_text()
        defined += re.findall(r"^GB_ELEMENTWISE (\w+)_element\(", text, flags=re.M)
    assert defined and defined == [spec.name for spec in ELEMENTWISE_SPECS]
    adam = next(s for s in ELEMENTWISE_SPECS if s.name == "gb_adam")
    assert adam.in_params.startswith("T grad, float64 lr, float64 beta1")
    assert adam.out_params == "T param, T exp_avg, T exp_avg_sq"
    assert adam.operation.startswith("gb_adam_element(grad, lr,")


def test_an_elementwise_signature_that_is_not_understood_is_refused(tmp_path, monkeypatch):
    from gpubackprop.backends import elementwise

    (tmp_path / "elementwise.cuh").write_text(
        "GB_ELEMENTWISE gb_bad_element(real_t x, real_t& y) { y = x; }\n"
    )
    (tmp_path / "optimizers.cuh").write_text("")
    monkeypatch.setattr(elementwise, "kernel_dir", lambda: tmp_path)
    elementwise._specs.cache_clear()
    try:
        with pytest.raises(ValueError, match="input 'x' of gb_bad must be const"):
            elementwise.elementwise_specs()
    finally:
        monkeypatch.undo()
        elementwise._specs.cache_clear()


def test_elementwise_wrapper_signature():
    spec = next(s for s in ELEMENTWISE_SPECS if s.name == "gb_activation_backward")
    text = elementwise_as_kernel_source(spec, np.float64)
    assert (
        "gb_activation_backward(const double* __restrict__ dout_array, "
        "const double* __restrict__ saved_array, int code, double alpha, "
        "double* __restrict__ dinp_array, long long n)"
    ) in text
    assert "double& dinp = dinp_array[i];" in text


def test_load_source_defines_and_key():
    plain = load_source("reduce.cu", {"REAL_T": "float"})
    other = load_source("reduce.cu", {"REAL_T": "double"})
    assert plain.text.startswith("#define REAL_T float\n")
    assert plain.key != other.key and len(plain.key) == 64
    # Headers are inlined once, with #line directives back to the original files.
    assert plain.text.count("#define GB_COMMON_CUH") == 1
    assert '#line 1 "block_reduce.cuh"' in plain.text
    assert "#include" not in plain.text


def test_missing_file_and_include_are_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.cu"):
        load_source("nope.cu")
    (tmp_path / "bad_include.cu").write_text('// x\n#include "absent.cuh"\n')
    with pytest.raises(FileNotFoundError, match=r'bad_include.cu:2 includes "absent.cuh"'):
        load_source("bad_include.cu")
    (tmp_path / "system.cu").write_text("#include <cmath>\n")
    with pytest.raises(ValueError, match="system headers"):
        load_source("system.cu")


@needs_nvrtc
def test_compile_error_names_file_kernel_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    (tmp_path / "helper.cuh").write_text("// helper\n#define HELPER 1\n")
    (tmp_path / "broken.cu").write_text(
        '#include "helper.cuh"\n'
        "// a comment line\n"
        'extern "C" __global__ void broken_forward(float* out) {\n'
        "    out[0] = undefined_name;\n"
        "}\n"
    )
    source = load_source("broken.cu", {"REAL_T": "float"})
    with pytest.raises(KernelCompileError) as info:
        nvrtc_compile(source, "sm_80")
    message = str(info.value)
    assert "broken.cu" in message and "broken_forward" in message
    assert "undefined_name" in message
    # The offending line is shown with its number in the original file (line 4).
    assert re.search(r">\s+4 \|\s+out\[0\] = undefined_name;", message), message
    assert info.value.file == "broken.cu"


def test_ptxas_report_parses_log():
    log = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n"
        "ptxas info    : Function properties for k1\n"
        "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers\n"
        "ptxas info    : Compiling entry function 'k2' for 'sm_90'\n"
        "ptxas info    : Function properties for k2\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 7 registers\n"
    )
    assert ptxas_report(log) == {
        "k1": {"registers": 40, "spill_stores": 4, "spill_loads": 12, "stack": 8},
        "k2": {"registers": 7, "spill_stores": 0, "spill_loads": 0, "stack": 0},
    }


def test_inventory_lists_kernels():
    inventory = kernels.kernel_inventory()
    assert "dense_forward" in inventory["files"]["gemm.cu"]["kernels"]
    assert "column_sum" in inventory["files"]["reduce.cu"]["kernels"]


def cupy_elementwise_source(spec, dtype) -> str:
    """The source CuPy's ElementwiseKernel builds for ``spec`` on contiguous 1-D arrays of
    ``dtype`` (cupy/_core/_kernel.pyx, _get_elementwise_kernel_code; CuPy's own headers are
    prepended by compile_with_cache): ``typedef <c type> T;``, the preamble, array parameters
    as ``CArray`` named ``_raw_<name>``, scalars as const parameters of their C type, and in the
    loop a const reference to each input element and a reference to each output element."""
    import cupy._core.core as cupy_core

    ctype = kernels.real_type(dtype)
    scalar_c = {"float64": "double", "float32": "float", "int32": "int", "int64": "long long"}
    params, bindings = [], []
    for is_input, text in ((True, spec.in_params), (False, spec.out_params)):
        for item in text.split(","):
            type_name, name = item.split()
            const = "const " if is_input else ""
            if type_name == "T":
                params.append(f"{const}CArray<{ctype}, 1, true, true> _raw_{name}")
                bindings.append(f"{const}T &{name} = _raw_{name}[_ind.get()];")
            else:
                params.append(f"{const}{scalar_c[type_name]} {name}")
    params.append("CIndexer<1, true> _ind")
    headers = "".join(f"#include <{h}>\n" for h in cupy_core._cupy_header_list)
    body = "\n".join(bindings)
    return (
        f"{headers}typedef {ctype} T;\n{kernels.elementwise_preamble(spec, dtype)}"
        f'extern "C" __global__ void {spec.name}({", ".join(params)}) {{\n'
        f"  #pragma unroll 1\n  CUPY_FOR(i, _ind.size()) {{\n    _ind.set(i);\n"
        f"    {body}\n    {spec.operation};\n  }}\n}}\n"
    )


def cupy_include_options() -> tuple[str, ...]:
    """The options CuPy adds to ours (include paths of its headers and CUDA's)."""
    import cupy._core.core as cupy_core

    options = cupy_core.assemble_cupy_compiler_options(kernels.NVRTC_OPTIONS)
    return tuple(option for option in options if option not in kernels.NVRTC_OPTIONS)


@needs_nvrtc
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("spec", ELEMENTWISE_SPECS, ids=lambda spec: spec.name)
def test_elementwise_spec_compiles_as_cupy_builds_it(spec, dtype):
    """The kernel CuPy generates, with CuPy's headers and include paths and the options the
    seam passes: catches a name clash with CuPy's headers or a parameter CuPy would type
    differently, which the emulator's wrapper (elementwise_as_kernel_source) cannot."""
    text = cupy_elementwise_source(spec, dtype)
    cubin, log = nvrtc_compile(text, "sm_90", cupy_include_options(), verbose=True)
    assert cubin
    assert spec.name in ptxas_report(log)


def _nvrtc_log(text: str, options: tuple[str, ...] = ()) -> str:
    with pytest.raises(KernelCompileError) as info:
        nvrtc_compile(text, "sm_90", options)
    return info.value.log


@needs_nvrtc
def test_cupy_elementwise_compile_error_points_at_the_operation():
    """CuPy compiles an ElementwiseKernel at its first call; the seam turns CuPy's exception into
    a KernelCompileError that names the spec and shows the operation's line, not a header's."""
    import dataclasses
    import types

    from cupy.cuda.compiler import CompileException

    from gpubackprop.backends.cupy_backend import _Elementwise

    spec = dataclasses.replace(ELEMENTWISE_SPECS[0], operation="y = undefined_name;")
    text = cupy_elementwise_source(spec, np.float32)
    log = _nvrtc_log(text, cupy_include_options())

    def failing_kernel(*args):
        raise CompileException(log, text, spec.name, kernels.NVRTC_OPTIONS)

    launcher = _Elementwise(failing_kernel, spec)
    with pytest.raises(KernelCompileError) as info:
        launcher(types.SimpleNamespace())
    message = str(info.value)
    assert f"ElementwiseKernel {spec.name}" in message
    assert "elementwise.cuh" in message  # the preamble files are named
    assert re.search(r">\s+\d+ \|\s+y = undefined_name;", message), message
    assert info.value.file == f"{spec.name}.elementwise"


@needs_nvrtc
def test_cupy_seam_compile_error_names_file_and_line(tmp_path, monkeypatch):
    """CupySeam.compile wraps CuPy's CompileException the way nvrtc_compile does (a stand-in
    for cupy supplies RawModule and the current device; the log is NVRTC's own)."""
    import types

    from cupy.cuda.compiler import CompileException

    from gpubackprop.backends.cupy_backend import CupySeam

    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    (tmp_path / "broken.cu").write_text(
        'extern "C" __global__ void broken_forward(float* out) {\n    out[0] = undefined_name;\n}\n'
    )
    source = load_source("broken.cu", {"REAL_T": "float"})
    log = _nvrtc_log(source.text)

    class RawModule:
        def __init__(self, code, options):
            assert options == kernels.NVRTC_OPTIONS
            self.code = code

        def compile(self):
            raise CompileException(log, self.code, "broken", kernels.NVRTC_OPTIONS)

    fake_cupy = types.SimpleNamespace(
        RawModule=RawModule,
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)),
    )
    with pytest.raises(KernelCompileError) as info:
        CupySeam(fake_cupy).compile("broken.cu", {"REAL_T": "float"})
    message = str(info.value)
    assert "kernels/broken.cu" in message and "broken_forward" in message
    assert re.search(r">\s+2 \|\s+out\[0\] = undefined_name;", message), message
