"""CUDA written the way it is usually written, on the emulator (tests/emu_conformance/*.cu).

Each kernel uses one construct as CUDA code found elsewhere does (not this project's macros):
half and bfloat16, `extern __shared__`, templates launched by name expression, cooperative
groups, float32 subnormals under -ftz=true.  Each is checked against NumPy on the emulator in
every CI run and, through the ``seam`` fixture's "cupy" case (gpu marker), on a real GPU by the
device check (bench/device_check.sh); every source also compiles with NVRTC for sm_75..sm_90
(no GPU needed), so the emulator accepts nothing a GPU build would reject.  Planted races (a
removed __syncthreads, a missing __syncwarp) must be caught by the shuffle mode, and reads and
writes past a buffer's ends by the emulator's guard zones.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpubackprop.emulator import (
    EmuCompileError,
    EmuLaunchError,
    EmuSeam,
    EmuUnsupportedError,
    find_compiler,
)

CONFORMANCE = Path(__file__).resolve().parent / "emu_conformance"
SOURCES = sorted(path.name for path in CONFORMANCE.glob("*.cu"))
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")

needs_compiler = pytest.mark.skipif(
    find_compiler() is None, reason="no C++ compiler for the emulator"
)


class CupySeam:
    """The conformance kernels through CuPy on a GPU, with the emulator seam's calls: arrays are
    NumPy arrays, copied to the device for the launch and back into themselves after it."""

    name = "cupy"

    def __init__(self, cupy: Any) -> None:
        self.cupy = cupy

    def compile_text(self, text, label, name_expressions=(), nvrtc_options=None):
        from gpubackprop.kernels import NVRTC_OPTIONS

        # CuPy adds -ftz=true itself: the GPU runs only the flushed variants.
        assert not nvrtc_options or tuple(nvrtc_options) == ("-ftz=true",), nvrtc_options
        raw = self.cupy.RawModule(
            code=text, options=NVRTC_OPTIONS, name_expressions=list(name_expressions) or None
        )
        raw.compile()
        return raw

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def launch(self, module, kernel, grid, block, args, shared_mem=0):
        def dims(value):
            return (int(value),) if isinstance(value, (int, np.integer)) else tuple(value)

        device = [self.cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        function = module.get_function(kernel)
        function(dims(grid), dims(block), tuple(device), shared_mem=shared_mem)
        self.cupy.cuda.Device().synchronize()
        for host, on_device in zip(args, device, strict=True):
            if isinstance(host, np.ndarray) and host.flags.writeable:
                host[...] = on_device.get()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulator alone: its own checks and messages."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GPUBACKPROP_CACHE_DIR", str(tmp_path_factory.mktemp("emu_cache")))
    mp.delenv("GPUBACKPROP_EMU_SHUFFLE", raising=False)
    yield EmuSeam()
    mp.undo()


@pytest.fixture(scope="module", params=["emu", pytest.param("cupy", marks=pytest.mark.gpu)])
def seam(request, emu):
    """Where a conformance kernel runs: the emulator (every CI run) or a GPU through CuPy."""
    if request.param == "emu":
        if find_compiler() is None:
            pytest.skip("no C++ compiler for the emulator")
        return emu
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(0).compute_capability  # noqa: B018 (raises without a driver)
    except Exception as error:
        pytest.skip(f"no CUDA GPU: {type(error).__name__}: {error}")
    return CupySeam(cupy)


_modules: dict[tuple[str, str], object] = {}


def module(seam, name: str):
    if (seam.name, name) not in _modules:
        _modules[seam.name, name] = seam.compile_text((CONFORMANCE / name).read_text(), name)
    return _modules[seam.name, name]


# ---- NVRTC: every conformance source compiles for every target -------------------------------


def cuda_include_dirs() -> list[str]:
    """The CUDA toolkit's include folders (cuda_fp16.h, cooperative_groups.h and the CCCL
    headers they include), as CuPy finds them: $CUDA_PATH, else /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    try:
        from cupy.cuda import get_cuda_path

        candidates.insert(1, get_cuda_path() or "")
    except Exception:  # no CuPy: the other candidates
        pass
    for root in filter(None, candidates):
        include = Path(root) / "include"
        if (include / "cuda_fp16.h").is_file():
            return [str(include)] + [str(include / "cccl")] * (include / "cccl").is_dir()
    return []


def _nvrtc_reason() -> str:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:
        return f"NVRTC cannot load: {type(error).__name__}: {error}"
    if not cuda_include_dirs():
        return "no CUDA toolkit headers (cuda_fp16.h) under $CUDA_PATH or /usr/local/cuda"
    return ""


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SOURCES)
def test_conformance_source_compiles_with_nvrtc(name, arch):
    reason = _nvrtc_reason()
    if reason:
        pytest.skip(reason)
    from gpubackprop.kernels import nvrtc_compile

    text = (CONFORMANCE / name).read_text()
    options = [f"-I{folder}" for folder in cuda_include_dirs()]
    cubin, _ = nvrtc_compile(text, arch, options)
    assert cubin[:4] == b"\x7fELF"


# ---- half and bfloat16 (float16_conversions.cu) ---------------------------------------------


def _float32_cases(rng: np.random.Generator) -> np.ndarray:
    """Every class of float32 the conversions treat apart: zeros, float32 subnormals, half
    subnormals and their ties, the half overflow boundary, exact ties of both formats, infinities,
    NaNs with payloads and signs, and random bit patterns over all exponents."""
    special = np.array(
        [
            0.0,
            2.0**-149,
            2.0**-126 - 2.0**-149,
            2.0**-126,
            2.0**-25,
            2.0**-24,
            1.5 * 2.0**-24,
            2.5 * 2.0**-24,
            2.0**-14,
            2.0**-14 - 2.0**-24,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            3.0e38,
            3.4028235e38,
            1.0,
            1.0 + 2.0**-11,
            1.0 + 3 * 2.0**-11,
            1.0 + 2.0**-8,
            1.0 + 3 * 2.0**-8,
            np.inf,
        ],
        dtype=np.float64,
    ).astype(np.float32)
    special = np.concatenate([special, -special])
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF80A5A5], np.uint32)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # Exact ties: the bits a half (13) or a bf16 (16) conversion drops are exactly one half ulp.
    high = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    half_ties = (high & ~np.uint32(0x1FFF)) | np.uint32(0x1000)
    bf16_ties = (high & ~np.uint32(0xFFFF)) | np.uint32(0x8000)
    bits = np.concatenate([special.view(np.uint32), nans, random_bits, half_ties, bf16_ties])
    return bits.view(np.float32)


def _bf16_model(x: np.ndarray, mode: str) -> np.ndarray:
    """bfloat16 bits of float64 values ``x`` in a rounding mode, from the two neighbours on the
    bf16 grid compared in exact float64 arithmetic (the kernel instead adds a rounding bias to
    the bits): a model built another way."""
    x = np.asarray(x, np.float64)
    result = np.zeros(x.shape, np.uint16)
    nan = np.isnan(x)
    magnitude = np.abs(np.where(nan, 0.0, x))
    exponent = np.frexp(magnitude)[1]  # magnitude in [2^(e-1), 2^e)
    quantum = np.maximum(exponent - 1, -126) - 7  # log2 of the bf16 ulp at this magnitude
    with np.errstate(over="ignore", invalid="ignore"):
        low = np.floor(np.ldexp(magnitude, -quantum))  # an integer count of ulps
        high = low + 1
        below, above = magnitude - np.ldexp(low, quantum), np.ldexp(high, quantum) - magnitude
        negative = np.signbit(x)
        if mode == "rn":
            take_high = (above < below) | ((above == below) & (low % 2 == 1))
        elif mode == "rz":
            take_high = np.zeros(x.shape, bool)
        elif mode == "ru":
            take_high = (below > 0) & ~negative
        else:  # rd
            take_high = (below > 0) & negative
        count = np.where(take_high, high, low)
        value = np.ldexp(count, quantum)  # the rounded magnitude, exact in float64
        finite = value <= 3.3895313892515355e38  # the largest bf16
        bits = np.where(finite, value, 0.0).astype(np.float32).view(np.uint32) >> 16
        overflow_to_largest = (
            (mode == "rz") | ((mode == "ru") & negative) | ((mode == "rd") & ~negative)
        )
        bits = np.where(finite, bits, np.where(overflow_to_largest, 0x7F7F, 0x7F80))
        bits = np.where(np.isinf(magnitude), 0x7F80, bits)
    result[:] = bits | np.where(negative, 0x8000, 0)
    result[nan] = 0x7FFF
    return result


def _half_model(x: np.ndarray, mode: str) -> np.ndarray:
    """float16 bits of float64 values: NumPy's conversion (to nearest even), then one step along
    the half grid (np.nextafter) where a directed mode must land on the other neighbour."""
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16)
    hx = h.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # nextafter(65504, inf) is inf
        if mode == "rz":
            h = np.where(np.abs(hx) > np.abs(x), np.nextafter(h, np.float16(0)), h)
        elif mode == "rd":
            h = np.where(hx > x, np.nextafter(h, np.float16(-np.inf)), h)
        elif mode == "ru":
            h = np.where(hx < x, np.nextafter(h, np.float16(np.inf)), h)
    bits = h.astype(np.float16).view(np.uint16).copy()
    bits[np.isnan(x)] = 0x7FFF
    return bits


def _assert_bits_equal(got: np.ndarray, expected: np.ndarray, x: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(got != expected)
    if bad.size:
        i = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {got.size} differ; first x={x[i]!r} "
            f"(bits 0x{np.float32(x[i]).view(np.uint32):08x}): got 0x{got[i]:04x}, "
            f"expected 0x{expected[i]:04x}"
        )


def _launch_1d(seam, mod, kernel, n, args, block=256):
    seam.launch(mod, kernel, (-(-n // block), 1, 1), (block, 1, 1), args)


@needs_compiler
def test_float_to_half_and_bfloat16_round_as_their_names_say(seam):
    x = _float32_cases(np.random.default_rng(1))
    n = x.size
    outs = {name: np.empty(n, np.uint16) for name in ("h_rn", "h_rz", "h_rd", "h_ru")}
    outs.update({name: np.empty(n, np.uint16) for name in ("b_rn", "b_rz", "b_rd", "b_ru")})
    half_back, bf16_back = np.empty(n, np.float32), np.empty(n, np.float32)
    mod = module(seam, "float16_conversions.cu")
    _launch_1d(
        seam, mod, "float_to_16bit", n, (x, *outs.values(), half_back, bf16_back, np.int32(n))
    )
    with np.errstate(invalid="ignore"):  # signalling NaNs quieten
        x64 = x.astype(np.float64)
    for mode in ("rn", "rz", "rd", "ru"):
        _assert_bits_equal(outs[f"h_{mode}"], _half_model(x64, mode), x, f"__float2half_{mode}")
        _assert_bits_equal(outs[f"b_{mode}"], _bf16_model(x64, mode), x, f"__float2bfloat16_{mode}")
    # The round trips are exact: the 16-bit value itself, NaN staying NaN.
    np.testing.assert_array_equal(half_back, outs["h_rn"].view(np.float16).astype(np.float32))
    np.testing.assert_array_equal(bf16_back.view(np.uint32), outs["b_rn"].astype(np.uint32) << 16)
    # A third opinion where PyTorch is installed: its bfloat16 cast rounds to nearest even too.
    try:
        import torch
    except ImportError:
        return
    finite = ~np.isnan(x)
    reference = torch.from_numpy(x[finite]).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(outs["b_rn"][finite], reference.view(np.uint16))


@needs_compiler
def test_double_to_half_and_bfloat16_round_once(seam):
    rng = np.random.default_rng(2)
    # Doubles a float would round first: the double rounding a direct conversion must avoid.
    base = rng.standard_normal(50_000) * np.exp2(rng.integers(-140, 130, 50_000))
    near_ties = np.concatenate(
        [
            np.float16(rng.standard_normal(2000)).astype(np.float64) * (1 + 2.0**-11 + 2.0**-40),
            (rng.standard_normal(2000).astype(np.float32).view(np.uint32) & 0xFFFF0000 | 0x8000)
            .view(np.float32)
            .astype(np.float64)
            * (1 + 2.0**-30),
        ]
    )
    x = np.concatenate([base, near_ties, [np.nan, -np.inf, 1e300, -1e-300, 65519.999999]])
    n = x.size
    half_out, bf16_out = np.empty(n, np.float16), np.empty(n, np.uint16)
    mod = module(seam, "float16_conversions.cu")
    _launch_1d(seam, mod, "double_to_16bit", n, (x, half_out, bf16_out, np.int32(n)))
    _assert_bits_equal(half_out.view(np.uint16), _half_model(x, "rn"), x, "__double2half")
    _assert_bits_equal(bf16_out, _bf16_model(x, "rn"), x, "__double2bfloat16")


def _random_16bit(rng, n, dtype_bits_to_value):
    """Random finite 16-bit patterns (subnormals and every exponent)."""
    bits = rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16)
    values = dtype_bits_to_value(bits)
    return bits[np.isfinite(values)]


@needs_compiler
def test_half_arithmetic_is_correctly_rounded(seam):
    rng = np.random.default_rng(3)
    n = 20_000
    a, b, c = (
        _random_16bit(rng, 3 * n, lambda bits: bits.view(np.float16))[:n].view(np.float16)
        for _ in range(3)
    )
    out = np.empty(5 * n, np.float16)
    _launch_1d(
        seam,
        module(seam, "float16_conversions.cu"),
        "half_arithmetic",
        n,
        (a, b, c, out, np.int32(n)),
    )
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    with np.errstate(all="ignore"):
        expected = [a64 + b64, a64 - b64, a64 * b64, a64 / b64]  # +, -, * exact in float64
        for k, name in enumerate(("+", "-", "*", "/")):
            got = out[k::5].view(np.uint16)
            _assert_bits_equal(got, _half_model(expected[k], "rn"), a, f"half {name}")
    _check_fma(
        out[4::5].view(np.uint16), a64, b64, c64, a, lambda v: _half_model(v, "rn"), "__hfma"
    )


def _check_fma(got, a64, b64, c64, x, model, what: str, count: int = 3000) -> None:
    """fma(a, b, c) rounds once: where a * b + c is exact in float64 (checked with fractions),
    the model's rounding of that float64 is the answer."""
    with np.errstate(all="ignore"):
        fused = a64[:count] * b64[:count] + c64[:count]
    exact = np.array(
        [
            np.isfinite(s) and Fraction(p) * Fraction(q) + Fraction(r) == Fraction(s)
            for p, q, r, s in zip(a64, b64, c64, fused, strict=False)
        ]
    )
    assert exact.mean() > 0.5, "too few exact cases to check"
    _assert_bits_equal(got[:count][exact], model(fused[exact]), x[:count][exact], what)


@needs_compiler
def test_bfloat16_arithmetic_is_correctly_rounded(seam):
    rng = np.random.default_rng(4)
    n = 20_000

    def bf16_value(bits):
        return (bits.astype(np.uint32) << 16).view(np.float32)

    a, b, c = (_random_16bit(rng, 3 * n, bf16_value)[: n - 2] for _ in range(3))
    # Products in float32's subnormal range stay subnormal (sm_80's bf16 instructions keep
    # them; a float32 computation under -ftz=true would give 0): 2^-70 * 2^-60 = 2^-130.
    a = np.concatenate([_bf16_model(np.array([2.0**-70, -(2.0**-66)]), "rn"), a])
    b = np.concatenate([_bf16_model(np.array([2.0**-60, 3 * 2.0**-62]), "rn"), b])
    c = np.concatenate([np.zeros(2, np.uint16), c])
    # fma's addend near the product, where the sum's rounding is interesting (and exact in float64)
    with np.errstate(all="ignore"):
        product = bf16_value(a).astype(np.float64) * bf16_value(b).astype(np.float64)
        near = _bf16_model(product * rng.uniform(-2, 2, product.size), "rn")
    c = np.where(np.isfinite(bf16_value(near)) & (np.arange(n) % 2 == 0), near, c)
    out = np.empty(5 * n, np.uint16)
    _launch_1d(
        seam,
        module(seam, "float16_conversions.cu"),
        "bf16_arithmetic",
        n,
        (a, b, c, out, np.int32(n)),
    )
    a64, b64, c64 = (bf16_value(v).astype(np.float64) for v in (a, b, c))
    with np.errstate(all="ignore"):
        # float64 has 53 >= 2 * 8 + 2 bits: rounding its +, -, *, / again to bf16 is exact.
        expected = [a64 + b64, a64 - b64, a64 * b64, a64 / b64]
    for k, name in enumerate(("+", "-", "*", "/")):
        _assert_bits_equal(out[k::5], _bf16_model(expected[k], "rn"), a, f"bf16 {name}")
    assert out[2] == 0x0008 and out[7] == 0x8060  # 2^-130 and -3 * 2^-128 as bf16 bits
    _check_fma(out[4::5], a64, b64, c64, a, lambda v: _bf16_model(v, "rn"), "bf16 __hfma")


@needs_compiler
def test_bfloat16_pair_types_feed_a_float_dot_product(seam):
    rng = np.random.default_rng(5)
    rows, pairs = 37, 9
    x = rng.standard_normal((rows, 2 * pairs)).astype(np.float32)
    w = rng.standard_normal(2 * pairs).astype(np.float32)
    x_bits, w_bits = _bf16_model(x, "rn"), _bf16_model(w, "rn")
    out = np.empty(rows, np.float32)
    _launch_1d(
        seam,
        module(seam, "float16_conversions.cu"),
        "bf16_dot_pairs",
        rows,
        (x_bits, w_bits, out, np.int32(pairs), np.int32(rows)),
        block=32,
    )
    xv = (x_bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    wv = (w_bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    np.testing.assert_allclose(out, xv @ wv, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_16bit_parameters_take_matching_arrays_only(emu):
    seam = emu
    mod = module(seam, "float16_conversions.cu")
    a = np.zeros(4, np.uint16)
    out = np.empty(20, np.uint16)
    with pytest.raises(TypeError, match=r"'a' is const __nv_bfloat16\*.*float32.*uint16"):
        seam.launch(mod, "bf16_arithmetic", 1, 4, (a.astype(np.float32), a, a, out, np.int32(4)))
    half_in = np.zeros(4, np.float16)
    with pytest.raises(TypeError, match=r"'a' is const __half\*, got an array of dtype uint16"):
        seam.launch(mod, "half_arithmetic", 1, 4, (a, half_in, half_in, out, np.int32(4)))


# ---- dynamic shared memory and templates (dynamic_shared_and_templates.cu) -------------------

TEMPLATES = ("block_sum<float, 128>", "block_sum<double, 64>", "demo::affine_fill<3>")


@pytest.fixture(scope="module")
def templates(seam):
    text = (CONFORMANCE / "dynamic_shared_and_templates.cu").read_text()
    return seam.compile_text(text, "dynamic_shared_and_templates.cu", TEMPLATES)


@needs_compiler
@pytest.mark.parametrize("n,block", [(1, 32), (100, 32), (257, 64)])
def test_extern_shared_at_file_scope_is_sized_by_the_launch(seam, templates, n, block):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = seam.empty((n,), np.float32)
    blocks = -(-n // block)
    seam.launch(
        templates, "reverse_each_block", blocks, block, (x, out, np.int32(n)), shared_mem=4 * block
    )
    padded = np.concatenate([x, np.zeros(blocks * block - n, np.float32)])
    np.testing.assert_array_equal(out, padded.reshape(blocks, block)[:, ::-1].reshape(-1)[:n])


@needs_compiler
@pytest.mark.parametrize(
    "expression,dtype,block",
    [("block_sum<float, 128>", np.float32, 128), ("block_sum<double, 64>", np.float64, 64)],
)
def test_templated_kernel_launched_by_name_expression(seam, templates, expression, dtype, block):
    n, blocks = 5000, 7
    x = np.random.default_rng(7).standard_normal(n).astype(dtype)
    partial = seam.empty((blocks,), dtype)
    seam.launch(
        templates,
        expression,
        blocks,
        block,
        (x, partial, np.int32(n)),
        shared_mem=block * np.dtype(dtype).itemsize,
    )
    expected = [
        x.reshape(-1)[np.arange(n) % (block * blocks) // block == b].astype(np.float64).sum()
        for b in range(blocks)
    ]
    np.testing.assert_allclose(partial, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)
    if seam.name != "emu":
        return
    # The parameter types come from the instantiation: float* for one, double* for the other.
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match=r"parameter 'x' is const (float|double)\*"):
        seam.launch(templates, expression, 1, block, (x.astype(other), partial, np.int32(n)))


@needs_compiler
def test_namespaced_template_and_unlisted_instantiations(seam, templates):
    out = seam.empty((40,), np.int32)
    seam.launch(templates, "demo::affine_fill<3>", 2, 32, (out, np.int32(-5), np.int32(40)))
    np.testing.assert_array_equal(out, 3 * np.arange(40) - 5)
    if seam.name != "emu":
        return
    # As in CuPy, only the listed instantiations exist.
    with pytest.raises(ValueError, match=r"block_sum<float, 32>.*name expression"):
        seam.launch(templates, "block_sum<float, 32>", 1, 32, (out, out, np.int32(1)))


@needs_compiler
@pytest.mark.parametrize("cols", [1, 33, 700])
def test_dynamic_shared_row_buffer(seam, templates, cols):
    rows = 3
    x = np.random.default_rng(cols).standard_normal((rows, cols)).astype(np.float32) * 4
    y = seam.empty((rows, cols), np.float32)
    seam.launch(templates, "row_softmax", rows, 64, (x, y, np.int32(cols)), shared_mem=4 * cols)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(axis=1, keepdims=True), rtol=2e-6, atol=1e-7)


@needs_compiler
def test_a_name_expression_naming_no_kernel_is_a_compile_error_naming_it(emu):
    seam = emu
    text = (CONFORMANCE / "dynamic_shared_and_templates.cu").read_text()
    with pytest.raises(EmuCompileError, match=r"name expression no_such_kernel<int>"):
        seam.compile_text(text, "dynamic_shared_and_templates.cu", ("no_such_kernel<int>",))
    with pytest.raises(ValueError, match=r"'kern\{\}' is not a kernel name expression"):
        seam.compile_text(text, "dynamic_shared_and_templates.cu", ("kern{}",))


@needs_compiler
def test_an_extern_shared_form_the_emulator_cannot_read_is_refused_with_its_line(emu):
    seam = emu
    text = "\n\nextern __shared__ float rows[][4];\n" + 'extern "C" __global__ void k() {}\n'
    with pytest.raises(EmuUnsupportedError, match=r"odd.cu:3: .*extern __shared__ T name\[\];"):
        seam.compile_text(text, "odd.cu")


# ---- cooperative groups (cooperative_groups.cu) ---------------------------------------------

COOPERATIVE = ("tile_collectives<32>", "tile_collectives<16>", "tile_collectives<4>")


@pytest.fixture(scope="module")
def cooperative(seam):
    text = (CONFORMANCE / "cooperative_groups.cu").read_text()
    return seam.compile_text(text, "cooperative_groups.cu", COOPERATIVE)


def _butterfly_sum(values: np.ndarray) -> np.float32:
    """The float32 sum in cg::reduce's order: v = v + shfl_xor(v, m) for m = 16, 8, 4, 2, 1."""
    v = values.astype(np.float32).copy()
    lanes = np.arange(v.size)
    m = v.size // 2
    while m:
        v = (v + v[lanes ^ m]).astype(np.float32)
        m //= 2
    return v[0]


@needs_compiler
@pytest.mark.parametrize("n,block,blocks", [(1, 32, 1), (1000, 128, 3), (4099, 256, 2)])
def test_block_sum_with_tiles_and_cg_reduce(seam, cooperative, n, block, blocks):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    partial = seam.empty((blocks,), np.float32)
    seam.launch(cooperative, "block_sum_tiles", blocks, block, (x, partial, np.int32(n)))
    slices = np.arange(n) % (block * blocks) // block
    expected = [x[slices == b].astype(np.float64).sum() for b in range(blocks)]
    np.testing.assert_allclose(partial, expected, rtol=1e-5, atol=1e-5)
    if n == 1000:  # one tile's cg::reduce adds in the GPU's butterfly order, bit for bit
        one = seam.empty((1,), np.float32)
        seam.launch(cooperative, "block_sum_tiles", 1, 32, (x[:32].copy(), one, np.int32(32)))
        tile = x[:32]
        assert one[0] == _butterfly_sum(np.concatenate([[_butterfly_sum(tile)], np.zeros(31)]))


@needs_compiler
@pytest.mark.parametrize("tile", [32, 16, 4])
def test_tile_shuffles_reduce_and_meta_group(seam, cooperative, tile):
    block, n = 64, 120  # the last block's threads past n still take part in the collectives
    x = np.random.default_rng(tile).integers(-1000, 1000, n).astype(np.int32)
    out = seam.empty((4 * n,), np.int32)
    blocks = -(-n // block)
    seam.launch(cooperative, f"tile_collectives<{tile}>", blocks, block, (x, out, np.int32(n)))
    out = out.reshape(n, 4)
    padded = np.concatenate([x, np.zeros(blocks * block - n, np.int32)])
    groups = padded.reshape(-1, tile)
    valid = (np.arange(blocks * block) < n).reshape(-1, tile)
    sums = np.repeat(groups.sum(axis=1), tile)[:n]
    peaks = np.repeat(np.where(valid, groups, np.iinfo(np.int32).min).max(axis=1), tile)[:n]
    np.testing.assert_array_equal(out[:, 0], sums)
    np.testing.assert_array_equal(out[:, 1], peaks)
    np.testing.assert_array_equal(out[:, 2], np.arange(n) % block // tile)
    np.testing.assert_array_equal(out[:, 3], np.full(n, block // tile))


@needs_compiler
def test_cg_reduce_with_a_lambda_over_a_struct_and_ballot(seam, cooperative):
    n = 100
    x = np.random.default_rng(11).standard_normal(n).astype(np.float32)
    x[37] = x[45] = 5.0  # a tie: the lower index wins
    warps = -(-n // 32)
    value, index = seam.empty((warps,), np.float32), seam.empty((warps,), np.int32)
    lanes = seam.empty((warps,), np.uint32)
    seam.launch(cooperative, "tile_argmax", 2, 64, (x, value, index, lanes, np.int32(n)))
    padded = np.concatenate([x, np.full(warps * 32 - n, -np.inf, np.float32)]).reshape(warps, 32)
    np.testing.assert_array_equal(value, padded.max(axis=1))
    np.testing.assert_array_equal(index, padded.argmax(axis=1) + 32 * np.arange(warps))
    assert index[1] == 37
    bits = (padded > 0) * (np.uint64(1) << np.arange(32, dtype=np.uint64))
    np.testing.assert_array_equal(lanes, bits.sum(axis=1).astype(np.uint32))


@needs_compiler
def test_a_tile_of_a_tile(seam, cooperative):
    x = np.random.default_rng(12).standard_normal(64) * 2
    sums, flags = seam.empty((64,), np.float64), seam.empty((128,), np.int32)
    seam.launch(cooperative, "nested_tiles", 1, 64, (x, sums, flags))
    groups = x.reshape(8, 8)
    np.testing.assert_allclose(sums, np.repeat(groups.sum(axis=1), 8), rtol=1e-14)
    flags = flags.reshape(64, 2)
    np.testing.assert_array_equal(flags[:, 0], np.repeat((groups > 1).any(axis=1), 8))
    meta = np.arange(64) % 32 // 8
    np.testing.assert_array_equal(flags[:, 1], np.repeat((groups > -1).all(axis=1), 8) + 2 * meta)


@needs_compiler
@pytest.mark.parametrize(
    "use,named",
    [
        ("cg::this_grid();", "this_grid"),
        ("cg::coalesced_threads();", "coalesced_threads"),
        ("float s = cg::reduce(cg::this_thread_block(), 1.0f, cg::plus<float>());", "reduce"),
    ],
)
def test_cooperative_groups_the_emulator_refuses_are_named_with_their_line(emu, use, named):
    seam = emu
    text = (
        "#include <cooperative_groups.h>\n#include <cooperative_groups/reduce.h>\n"
        "namespace cg = cooperative_groups;\n"
        f'extern "C" __global__ void k(float* out) {{\n    {use}\n}}\n'
    )
    with pytest.raises(EmuCompileError, match=rf"(?s)refused\.cu:5.*{named}"):
        seam.compile_text(text, "refused.cu")


# ---- float32 subnormals and -ftz=true (float32_subnormals.cu) --------------------------------

TINY32 = np.finfo(np.float32).smallest_normal  # 2^-126


def _subnormal_module(seam, flush: bool):
    text = (CONFORMANCE / "float32_subnormals.cu").read_text()
    options = (f"-ftz={'true' if flush else 'false'}",)
    return seam.compile_text(text, "float32_subnormals.cu", nvrtc_options=options)


def _flushed(values: np.ndarray) -> np.ndarray:
    return np.where(np.abs(values) < TINY32, 0.0, values)


@needs_compiler
def test_sigmoid_tail_is_flushed_as_cupy_builds_it(seam):
    _check_sigmoid_tail(seam, flush=True)


@needs_compiler
def test_sigmoid_tail_is_kept_by_a_build_without_ftz(emu):
    _check_sigmoid_tail(emu, flush=False)


def _check_sigmoid_tail(seam, flush: bool) -> None:
    x = -np.linspace(80, 110, 301).astype(np.float32)  # sigmoid from 1.8e-35 down to 1.7e-48
    y = seam.empty(x.shape, np.float32)
    seam.launch(_subnormal_module(seam, flush), "sigmoid", 2, 256, (x, y, np.int32(x.size)))
    exact = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    # Within a few ulps of 2^-126 expf's error decides the side: those points are left out.
    edge = np.abs(exact / TINY32 - 1) < 1e-5
    subnormal, normal = (exact < TINY32) & ~edge, (exact >= TINY32) & ~edge
    assert subnormal.sum() > 100 and normal.sum() > 50
    np.testing.assert_allclose(y[normal], exact[normal], rtol=1e-5)
    assert np.float32(1e-40) * np.float32(1.0) != 0  # the caller's mode is restored
    if flush:
        assert (y[subnormal] == 0).all()
    else:  # kept, to within the subnormal spacing (2^-149) and expf's error
        np.testing.assert_allclose(y[subnormal], exact[subnormal], rtol=1e-5, atol=3 * 2.0**-149)
        assert (y[subnormal] > 0).sum() > 50


@needs_compiler
def test_softmax_tail_and_subnormal_inputs_as_cupy_builds_them(seam):
    _check_softmax_tail(seam, flush=True)


@needs_compiler
def test_softmax_tail_and_subnormal_inputs_without_ftz(emu):
    _check_softmax_tail(emu, flush=False)


def _check_softmax_tail(seam, flush: bool) -> None:
    x = np.array([[0.0, -50.0, -95.0, -100.0, -103.0, -120.0]], np.float32)
    y = seam.empty(x.shape, np.float32)
    module = _subnormal_module(seam, flush)
    seam.launch(module, "softmax_rows", 1, 1, (x, y, np.int32(x.shape[1])))
    e = np.exp(x.astype(np.float64) - x.max())
    exact = e / e.sum()
    expected = _flushed(exact) if flush else exact
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=0 if flush else 3 * 2.0**-149)
    # A subnormal input reads as zero under -ftz=true; a product that lands below 2^-126 is 0.
    tiny = np.array([1e-40, -3e-39, 1e-30, 2e-38], np.float32)
    out = seam.empty(tiny.shape, np.float32)
    seam.launch(module, "scale_float", 1, 32, (tiny, out, np.float32(1e-3), np.int32(4)))
    exact = tiny.astype(np.float64) * np.float64(np.float32(1e-3))
    if flush:
        expected = _flushed(exact * (np.abs(tiny) >= TINY32)).astype(np.float32)
        np.testing.assert_array_equal(out, expected)
    else:
        np.testing.assert_allclose(out, exact, rtol=1e-6, atol=2.0**-149)


@needs_compiler
def test_float64_subnormals_are_never_flushed(seam):
    x = np.array([1e-310, -2.5e-320, 1e-300], np.float64)
    y = seam.empty(x.shape, np.float64)
    seam.launch(
        _subnormal_module(seam, True), "scale_double", 1, 32, (x, y, np.float64(1e-10), np.int32(3))
    )
    np.testing.assert_array_equal(y, x * 1e-10)
    assert y[2] != 0 and y[0] != 0


def test_ftz_is_read_from_the_gpu_build_flags():
    from gpubackprop.emulator.compiler import flushes_denormals
    from gpubackprop.kernels import CUPY_ADDED_OPTIONS, NVRTC_OPTIONS

    assert flushes_denormals((*NVRTC_OPTIONS, *CUPY_ADDED_OPTIONS))  # what CuPy compiles with
    assert not flushes_denormals(NVRTC_OPTIONS)  # NVRTC's own default
    assert not flushes_denormals(("-ftz=true", "--ftz=false"))  # the last one decides
    assert flushes_denormals(("--use_fast_math",))
    with pytest.raises(ValueError, match=r"'-ftz=yes'.*-ftz=true or -ftz=false"):
        flushes_denormals(("-ftz=yes",))


# ---- planted races and out-of-bounds accesses (races_and_bounds.cu), emulator only -----------

SHUFFLE_SEEDS = (1, 2, 3)


def _shift_right(x: np.ndarray, block: int) -> np.ndarray:
    y = np.roll(x.reshape(-1, block), 1, axis=1)
    y[:, 0] = x.reshape(-1, block)[:, 0]
    return y.reshape(-1)


def _race_is_seen(emu, mod, kernel, grid, block, args, out, expected) -> bool:
    """Whether the emulator exposes a race: an EmuLaunchError (in guard-check mode, a read of
    shared memory nobody wrote), or a result other than the race-free one."""
    try:
        emu.launch(mod, kernel, grid, block, args)
    except EmuLaunchError as error:
        assert "shared memory nobody wrote" in str(error), error
        return True
    return not np.array_equal(out, expected, equal_nan=False)


@needs_compiler
@pytest.mark.parametrize("guard_check", ["0", "1"])
def test_a_removed_syncthreads_is_caught_by_the_shuffle_mode(emu, monkeypatch, guard_check):
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", guard_check)
    mod = module(emu, "races_and_bounds.cu")
    block, n = 128, 256
    x = np.random.default_rng(20).standard_normal(n).astype(np.float32)
    expected = _shift_right(x, block)
    y = emu.empty((n,), np.float32)
    emu.launch(mod, "shift_right_no_barrier", 2, block, (x, y, np.int32(n)))
    # In thread order the race happens to give the right answer: only shuffling shows it.
    np.testing.assert_array_equal(y, expected)
    for seed in SHUFFLE_SEEDS:
        monkeypatch.setenv("GPUBACKPROP_EMU_SHUFFLE", str(seed))
        good, racy = emu.empty((n,), np.float32), emu.empty((n,), np.float32)
        emu.launch(mod, "shift_right", 2, block, (x, good, np.int32(n)))
        np.testing.assert_array_equal(good, expected)
        args = (x, racy, np.int32(n))
        assert _race_is_seen(emu, mod, "shift_right_no_barrier", 2, block, args, racy, expected)


@needs_compiler
@pytest.mark.parametrize("guard_check", ["0", "1"])
def test_a_missing_syncwarp_is_caught(emu, monkeypatch, guard_check):
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", guard_check)
    mod = module(emu, "races_and_bounds.cu")
    x = np.random.default_rng(21).integers(-8, 8, 256).astype(np.float32)  # exact sums
    expected = x.reshape(-1, 32).sum(axis=1)
    for seed in (0, *SHUFFLE_SEEDS):
        monkeypatch.setenv("GPUBACKPROP_EMU_SHUFFLE", str(seed))
        good, racy = emu.empty((8,), np.float32), emu.empty((8,), np.float32)
        emu.launch(mod, "warp_tree_sum", 2, 128, (x, good))
        np.testing.assert_array_equal(good, expected)
        racy_args = (x, racy)
        assert _race_is_seen(
            emu, mod, "warp_tree_sum_no_syncwarp", 2, 128, racy_args, racy, expected
        ), f"seed {seed}: the race went unseen"


@needs_compiler
def test_a_read_past_the_end_is_caught(emu, monkeypatch):
    mod = module(emu, "races_and_bounds.cu")
    n = 100
    x = np.random.default_rng(22).standard_normal(n).astype(np.float32)
    good = emu.empty((n,), np.float32)
    emu.launch(mod, "pair_sum", 1, 128, (x, good, np.int32(n)))
    np.testing.assert_array_equal(good, np.append(x[:-1] + x[1:], x[-1]))
    # Plain mode: the guard bytes past the end are NaN for a float, and show in the result.
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "0")
    y = emu.empty((n,), np.float32)
    emu.launch(mod, "pair_sum_reads_past_the_end", 1, 128, (x, y, np.int32(n)))
    assert np.isnan(y[-1]) and not np.isnan(y[:-1]).any()
    # Guard-check mode (on in this suite, conftest.py): a second run with other guard bytes
    # changes the output, and the launch fails naming the argument; an int read is caught too.
    monkeypatch.setenv("GPUBACKPROP_EMU_GUARD_CHECK", "1")
    with pytest.raises(EmuLaunchError, match=r"argument 'y' \(float32\[100\]\) changed when"):
        emu.launch(mod, "pair_sum_reads_past_the_end", 1, 128, (x, y, np.int32(n)))
    xi, yi = np.arange(n, dtype=np.int32), np.zeros(n, np.int32)
    with pytest.raises(EmuLaunchError, match=r"read out of bounds of an argument"):
        emu.launch(mod, "int_pair_sum_reads_past_the_end", 1, 128, (xi, yi, np.int32(n)))
    np.testing.assert_array_equal(yi, 0)  # left unchanged


@needs_compiler
@pytest.mark.parametrize(
    "kernel,message",
    [
        (
            "copy_writes_past_the_end",
            r"wrote out of bounds of argument 'y' \(float32\[50\]\): 4 bytes after its end "
            r"\(first at element 50, size 50\)",
        ),
        (
            "copy_writes_before_the_start",
            r"wrote out of bounds of argument 'y' \(float32\[50\]\): 4 bytes before its start "
            r"\(lowest at element -1\).*left 1 elements of argument 'y' \(float32\[50\]\) "
            r"unwritten \(first at index 49\)",
        ),
    ],
)
def test_a_write_past_either_end_is_caught(emu, kernel, message):
    mod = module(emu, "races_and_bounds.cu")
    x = np.ones(50, np.float32)
    y = emu.empty((50,), np.float32)
    with pytest.raises(EmuLaunchError, match=message):
        emu.launch(mod, kernel, 1, 64, (x, y, np.int32(50)))


@needs_compiler
def test_a_write_past_the_end_of_dynamic_shared_memory_is_caught(emu):
    mod = module(emu, "races_and_bounds.cu")
    x = np.arange(40, dtype=np.float32)
    y = emu.empty((40,), np.float32)
    emu.launch(mod, "stage_in_shared", 2, 32, (x, y, np.int32(40), np.int32(0)), shared_mem=128)
    np.testing.assert_array_equal(y, 2 * x)
    with pytest.raises(
        EmuLaunchError,
        match=r"block \(0,0,0\) wrote past the end of its dynamic shared memory \(shared_mem=128 "
        r"bytes; first byte written: 128\)",
    ):
        emu.launch(mod, "stage_in_shared", 2, 32, (x, y, np.int32(40), np.int32(1)), shared_mem=128)


@needs_compiler
def test_rewritten_extern_shared_keeps_the_line_numbers_of_errors(emu):
    text = (
        'extern "C" __global__ void k(float* y) {\n'
        "    extern __shared__\n"
        "        __align__(16) float staged[];\n"
        "    staged[threadIdx.x] = 1.0f;\n"
        "    y[0] = undefined_name;\n"
        "}\n"
    )
    with pytest.raises(EmuCompileError, match=r"lines\.cu:5:.*undefined_name"):
        emu.compile_text(text, "lines.cu")


@needs_compiler
def test_16bit_scalars_by_value(seam):
    n = 50
    rng = np.random.default_rng(30)
    x = rng.standard_normal(n).astype(np.float16)
    u = _bf16_model(rng.standard_normal(n), "rn")
    y, v = np.empty(n, np.float16), np.empty(n, np.uint16)
    scale, offset = np.float16(1.5), np.float16(-0.25)
    u_scale = _bf16_model(np.array([3.0]), "rn")[0]  # a np.uint16 holding bf16 bits
    seam.launch(
        module(seam, "float16_conversions.cu"),
        "axpb_16bit",
        1,
        64,
        (x, y, scale, offset, u, v, u_scale, np.int32(n)),
    )
    product = _half_model(x.astype(np.float64) * 1.5, "rn").view(np.float16)
    separate = _half_model(product.astype(np.float64) - 0.25, "rn")  # each op rounded
    fused = _half_model(x.astype(np.float64) * 1.5 - 0.25, "rn")  # one rounding (exact in f64)
    if seam.name == "emu":  # g++ never contracts a * b + c into an fma
        np.testing.assert_array_equal(y.view(np.uint16), separate)
    else:  # a GPU build may (-fmad=true, the default)
        assert ((y.view(np.uint16) == separate) | (y.view(np.uint16) == fused)).all()
    u64 = (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    np.testing.assert_array_equal(v, _bf16_model(u64 * 3.0, "rn"))


# ---- blocks in no promised order (last_block.cu) ---------------------------------------------


def _last_block_args(seam, x, blocks):
    count = np.zeros(1, np.uint32)
    partials = seam.empty((blocks,), np.float32)
    tickets, total = seam.empty((blocks,), np.uint32), seam.empty((1,), np.float32)
    return (x, np.int32(x.size), partials, count, tickets, total), count, tickets, total


@needs_compiler
def test_the_last_block_pattern_sums_in_any_block_order(seam, monkeypatch):
    """atomicAdd tickets and __threadfence: the block drawing the last ticket sees every other
    block's partial sum, and resets the counter; with the emulator's shuffle mode the blocks
    run in other orders (the tickets say which), and the pattern holds in each."""
    blocks, block = 7, 128
    x = np.random.default_rng(30).integers(-50, 50, blocks * block - 37).astype(np.float32)
    mod = module(seam, "last_block.cu")
    orders = set()
    for seed in (0, *SHUFFLE_SEEDS) if seam.name == "emu" else (0,):
        monkeypatch.setenv("GPUBACKPROP_EMU_SHUFFLE", str(seed))
        args, count, tickets, total = _last_block_args(seam, x, blocks)
        seam.launch(mod, "sum_by_last_block", (blocks, 1, 1), (block, 1, 1), args)
        assert total[0] == x.sum(dtype=np.float64)  # integers: exact in any order
        assert count[0] == 0
        assert sorted(tickets.tolist()) == list(range(blocks))
        orders.add(tuple(tickets.tolist()))
        if seam.name == "emu" and seed == 0:  # unshuffled: blocks in blockIdx order
            assert tickets.tolist() == list(range(blocks))
    if seam.name == "emu":
        assert len(orders) > 1, "the shuffle mode ran the blocks in blockIdx order only"


@needs_compiler
def test_assuming_the_highest_block_finishes_last_is_caught_by_the_shuffle_mode(emu, monkeypatch):
    blocks, block = 7, 128
    x = np.random.default_rng(31).integers(-50, 50, blocks * block).astype(np.float32)
    mod = module(emu, "last_block.cu")
    caught = 0
    for seed in (0, 1, 2, 3, 4, 5):
        monkeypatch.setenv("GPUBACKPROP_EMU_SHUFFLE", str(seed))
        args, _, tickets, total = _last_block_args(emu, x, blocks)
        emu.launch(mod, "sum_by_highest_block", (blocks, 1, 1), (block, 1, 1), args)
        ran_last = tickets[blocks - 1] == blocks - 1
        # Right exactly when the highest block happened to run last (always, unshuffled).
        assert (total[0] == x.sum(dtype=np.float64)) == ran_last, (seed, tickets)
        assert ran_last or seed != 0
        caught += not ran_last
    assert caught
