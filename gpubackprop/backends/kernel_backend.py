"""Kernel launchers, written once against the device seam (seam.py).

Every op of base.Backend is a few launches of the kernels in kernels/ (or of the elementwise
kernels in ELEMENTWISE_SPECS): the cupy backend runs them on a GPU, the emu backend on the CPU
emulator, with the same grid, block and arguments.  The formulas are those of
numpy_backend.py; the comments give the kernel that computes each one.

Launchers check what a kernel cannot: dtypes (float32/float64, all operands alike), shapes and
contiguity.  A non-contiguous input is copied; an output the caller provides (dweight, dbias,
optimizer buffers) must be contiguous.  Scalars are passed as NumPy scalars of exactly the C
parameter type.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from ..arrays import to_host
from ..kernels import real_type
from .base import SAVES_OUTPUT, Backend, check_activation, check_reduction
from .seam import ElementwiseSpec

__all__ = ["ELEMENTWISE_SPECS", "GEMM_VERSIONS", "KERNEL_DEFINES", "KernelBackend"]

_PREAMBLE = ("common.cuh", "activations.cuh")

# y = f(x), from kernels/activations.cuh.
ACTIVATION_FORWARD = ElementwiseSpec(
    name="gb_activation_forward",
    in_params="T x, int32 code, float64 alpha",
    out_params="T y",
    operation="y = act_forward(code, x, (real_t)alpha);",
    preamble_files=_PREAMBLE,
)

# dinp = dout ⊙ f'(saved): the standalone activation's backward and the dense layer's
# δ = ∂L/∂y ⊙ f'(z) alike.
ACTIVATION_BACKWARD = ElementwiseSpec(
    name="gb_activation_backward",
    in_params="T dout, T saved, int32 code, float64 alpha",
    out_params="T dinp",
    operation="dinp = dout * act_derivative(code, saved, (real_t)alpha);",
    preamble_files=_PREAMBLE,
)

ADD = ElementwiseSpec(
    name="gb_add",
    in_params="T a, T b",
    out_params="T c",
    operation="c = a + b;",
)

# x *= factor (gradient clipping); factor is rounded to T first, as NumPy's x *= T(factor).
SCALE = ElementwiseSpec(
    name="gb_scale",
    in_params="float64 factor",
    out_params="T x",
    operation="x = x * (T)factor;",
)

# torch.optim.SGD without momentum: g = ∇ + λθ; θ −= η g.
SGD_PLAIN = ElementwiseSpec(
    name="gb_sgd_plain",
    in_params="T grad, float64 lr, float64 weight_decay",
    out_params="T param",
    operation=(
        "T g = grad;"
        " if (weight_decay != 0.0) g = grad + (T)weight_decay * param;"
        " param = param - (T)lr * g;"
    ),
)

# torch.optim.SGD with momentum μ, dampening τ: b = g (first step) or μb + (1 − τ)g;
# g = g + μb (Nesterov) or b; θ −= η g.
SGD_MOMENTUM = ElementwiseSpec(
    name="gb_sgd_momentum",
    in_params=(
        "T grad, float64 lr, float64 momentum, float64 dampening, int32 nesterov, "
        "float64 weight_decay, int32 first_step"
    ),
    out_params="T param, T momentum_buf",
    operation=(
        "T g = grad;"
        " if (weight_decay != 0.0) g = grad + (T)weight_decay * param;"
        " T b = first_step ? g : (T)momentum * momentum_buf + (T)(1.0 - dampening) * g;"
        " momentum_buf = b;"
        " if (nesterov) g = g + (T)momentum * b; else g = b;"
        " param = param - (T)lr * g;"
    ),
)

# torch.optim.Adam / AdamW (decoupled): θ ← θ(1 − ηλ) or g = ∇ + λθ;
# m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
# θ ← θ − (η / bc₁) · m / (√v / √bc₂ + ε), bc = 1 − βᵗ (passed precomputed in float64).
ADAM = ElementwiseSpec(
    name="gb_adam",
    in_params=(
        "T grad, float64 lr, float64 beta1, float64 beta2, float64 eps, float64 weight_decay, "
        "int32 decoupled, float64 bias_correction1, float64 bias_correction2_sqrt"
    ),
    out_params="T param, T exp_avg, T exp_avg_sq",
    operation=(
        "T p = param; T g = grad;"
        " if (weight_decay != 0.0) {"
        " if (decoupled) p = p * (T)(1.0 - lr * weight_decay);"
        " else g = g + (T)weight_decay * p; }"
        " T m = exp_avg * (T)beta1 + (T)(1.0 - beta1) * g;"
        " T v = exp_avg_sq * (T)beta2 + (T)(1.0 - beta2) * g * g;"
        " exp_avg = m; exp_avg_sq = v;"
        " T denom = sqrt(v) / (T)bias_correction2_sqrt + (T)eps;"
        " param = p - (T)(lr / bias_correction1) * m / denom;"
    ),
)

ELEMENTWISE_SPECS: list[ElementwiseSpec] = [
    ACTIVATION_FORWARD,
    ACTIVATION_BACKWARD,
    ADD,
    SCALE,
    SGD_PLAIN,
    SGD_MOMENTUM,
    ADAM,
]

# "tiled" is the library's GEMM; "warptiled" the warp-tiled alternative (to become the default
# once a GPU measurement says it is faster); "naive" the reference kernels kept to validate both.
GEMM_VERSIONS = ("tiled", "warptiled", "naive")

# The GEMMs' tuning values per scalar type (gemm.cu's #defines, whose defaults are the float
# entries); bench/gemm_sweep.py times alternatives on a GPU.  A backend can be given others for
# its version (KernelBackend(gemm_tiles=...)).
# tiled: GEMM_THREADS = (TILE_M/MICRO_M)·(TILE_N/MICRO_N).
GEMM_TILES = {
    "float": {"TILE_M": 128, "TILE_N": 128, "TILE_K": 8, "MICRO_M": 8, "MICRO_N": 8},
    "double": {"TILE_M": 128, "TILE_N": 128, "TILE_K": 8, "MICRO_M": 8, "MICRO_N": 8},
}
# warptiled: WT_THREADS = 32·(WT_BM/WT_WM)·(WT_BN/WT_WN); each thread holds
# (WT_WM·WT_WN/32) accumulators, so double gets a half-size block tile to stay within 255
# registers, and WT_BK = 8 to stay within 48 KiB of static shared memory.
GEMM_TILES_WARPTILED = {
    "float": {
        "WT_BM": 128,
        "WT_BN": 128,
        "WT_BK": 16,
        "WT_WM": 64,
        "WT_WN": 64,
        "WT_WNITER": 4,
        "WT_TM": 8,
        "WT_TN": 4,
    },
    "double": {
        "WT_BM": 128,
        "WT_BN": 64,
        "WT_BK": 8,
        "WT_WM": 64,
        "WT_WN": 32,
        "WT_WNITER": 2,
        "WT_TM": 4,
        "WT_TN": 4,
    },
}
_VERSION_TILES = {"tiled": GEMM_TILES, "warptiled": GEMM_TILES_WARPTILED, "naive": GEMM_TILES}
_NAIVE_BLOCK = 16
_REDUCE_THREADS = 256  # REDUCE_THREADS and LOSS_THREADS
_MAX_REDUCE_BLOCKS = 1024  # partial sums per reduction: fixed by n alone, so results are too
_COLUMN_SUM = (32, 8)  # COLUMN_SUM_COLS, COLUMN_SUM_ROWS
_COLUMN_SUM_MAX_CHUNKS = 256
_ELEMENTWISE_THREADS = 256
# The launch geometry reduce.cu and loss.cu are compiled for (their __launch_bounds__ and
# shared arrays), passed as defines so that the numbers above are the only ones that count.
KERNEL_DEFINES: dict[str, dict[str, int]] = {
    "reduce.cu": {
        "REDUCE_THREADS": _REDUCE_THREADS,
        "COLUMN_SUM_COLS": _COLUMN_SUM[0],
        "COLUMN_SUM_ROWS": _COLUMN_SUM[1],
    },
    "loss.cu": {"LOSS_THREADS": _REDUCE_THREADS},
}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT32_MAX = 2**31 - 1


# gemm_mma.cu (tensor cores, precision "bf16" / "tf32"): block tile MMA_BM = MMA_BN = 64,
# 128 threads, MMA_STAGES = 3 slices in flight; per precision the slice depth BK, the elements
# of one 16-byte copy and the element size.
MMA_FILE = "gemm_mma.cu"
MMA_BLOCK = 64
MMA_THREADS = 128
MMA_STAGES = 3
_MMA_SLICE = {"bf16": (32, 8, 2), "tf32": (16, 4, 4)}
# (A, B) staging of each layout: "inner" tiles are [r][BK + CHUNK], "outer" ones [BK][64 + 8].
MMA_LAYOUTS = {
    "dense_forward": ("inner", "inner"),
    "dense_backward_data": ("inner", "outer"),
    "dense_backward_weight": ("outer", "outer"),
}


def mma_shared_bytes(kernel: str, precision: str) -> int:
    """Dynamic shared memory of gemm_mma.cu's ``<kernel>_<precision>`` (its MmaShared::BYTES)."""
    depth, chunk, size = _MMA_SLICE[precision]

    def tile(layout: str) -> int:
        return MMA_BLOCK * (depth + chunk) if layout == "inner" else depth * (MMA_BLOCK + 8)

    layout_a, layout_b = MMA_LAYOUTS[kernel]
    return MMA_STAGES * (tile(layout_a) + tile(layout_b)) * size


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_int32(shape_name: str, shape: tuple[int, ...]) -> None:
    """The GEMM and loss kernels take each dimension as a C int (products are 64-bit)."""
    if any(d > _INT32_MAX for d in shape):
        raise ValueError(
            f"{shape_name}={tuple(shape)} is not accepted; each dimension must be "
            f"at most {_INT32_MAX}"
        )


class KernelBackend(Backend):
    """Backend whose ops launch the kernels of kernels/ through a DeviceSeam."""

    name = "kernel"

    def __init__(
        self, seam: Any, gemm_version: str = "tiled", gemm_tiles: dict | None = None
    ) -> None:
        if gemm_version not in GEMM_VERSIONS:
            raise ValueError(f"gemm_version={gemm_version!r}; expected one of {GEMM_VERSIONS}")
        self.seam = seam
        self.xp = seam.xp
        self.available = True  # subclasses that probe their device set it again
        self.reason = ""
        self.gemm_version = gemm_version
        defaults = _VERSION_TILES[gemm_version]
        self.gemm_tiles = {
            kind: dict(defaults[kind], **(gemm_tiles or {}).get(kind, {})) for kind in defaults
        }
        for kind, tiles in self.gemm_tiles.items():
            _check_gemm_tiles(kind, tiles)
        self._modules: dict[tuple, Any] = {}  # (file, defines) -> compiled module
        # (file, dtype) -> (module, gemm tiles): what a launch looks up, without rebuilding the
        # defines each time (that cost microseconds per launch); this backend's own tiles.
        self._launch_modules: dict[tuple[str, str], tuple[Any, dict | None]] = {}
        self._elementwise_kernels: dict[tuple, Any] = {}

    def with_gemm_version(self, gemm_version: str, gemm_tiles: dict | None = None):
        """This backend launching another GEMM version: the same seam (device, kind of array,
        compiled modules), so it takes this backend's arrays.  For benchmarks and sweeps."""
        if self.seam is None:
            raise RuntimeError(f"backend {self.name!r} is not available: {self.reason}")
        sibling = copy.copy(self)
        KernelBackend.__init__(sibling, self.seam, gemm_version, gemm_tiles)
        sibling.available, sibling.reason = self.available, self.reason
        sibling._modules, sibling._elementwise_kernels = self._modules, self._elementwise_kernels
        return sibling

    # -- arrays -------------------------------------------------------------------------
    def asarray(self, x, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_numpy(self, a):
        return to_host(a)

    def empty(self, shape, dtype):
        return self.seam.empty(tuple(shape), np.dtype(dtype))

    def zeros(self, shape, dtype):
        return self.xp.zeros(tuple(shape), dtype=np.dtype(dtype))

    # -- compiled code ------------------------------------------------------------------------
    def _compiled(self, file: str, dtype: np.dtype, extra: dict[str, Any] | None = None):
        values = {**KERNEL_DEFINES.get(file, {}), **(extra or {})}
        defines = {"REAL_T": real_type(dtype), **{k: str(v) for k, v in values.items()}}
        key = (file, tuple(sorted(defines.items())))
        if key not in self._modules:
            self._modules[key] = self.seam.compile(file, defines)
        return self._modules[key]

    def _module(self, file: str, dtype: np.dtype):
        key = (file, dtype.str)
        if key not in self._launch_modules:
            self._launch_modules[key] = (self._compiled(file, dtype), None)
        return self._launch_modules[key][0]

    def _gemm_module(self, dtype: np.dtype):
        key = ("gemm.cu", dtype.str)
        if key not in self._launch_modules:
            kind = real_type(dtype)
            tiles = self.gemm_tiles[kind]
            # gemm.cu holds every version; only the one this backend launches is compiled,
            # with the tuning values of both tiled versions for this type (the file's
            # defaults are float's).
            only = {f"GEMM_{v.upper()}": int(v == self.gemm_version) for v in GEMM_VERSIONS}
            defines = {**GEMM_TILES[kind], **GEMM_TILES_WARPTILED[kind], **tiles, **only}
            self._launch_modules[key] = (self._compiled("gemm.cu", dtype, defines), tiles)
        return self._launch_modules[key]

    def _elementwise(self, spec: ElementwiseSpec, dtype: np.dtype):
        key = (spec.name, dtype.str)
        if key not in self._elementwise_kernels:
            self._elementwise_kernels[key] = self.seam.elementwise(spec, dtype)
        return self._elementwise_kernels[key]

    def _launch(self, module, kernel, grid, block, args, shared_mem=0):
        self.seam.launch(
            module,
            kernel,
            tuple(int(g) for g in grid),
            tuple(int(b) for b in block),
            tuple(args),
            shared_mem,
        )

    # -- argument checks --------------------------------------------------------------------
    def _array(self, name: str, a) -> None:
        """An array of this backend's kind, on the device the kernels run on."""
        if not isinstance(a, self.xp.ndarray):
            raise TypeError(
                f"{name} is a {type(a).__name__}; expected a {self.xp.__name__}.ndarray "
                f"(move it with backend.asarray)"
            )
        check_device = getattr(self.seam, "check_device", None)
        if check_device is not None:
            check_device(name, a)

    def _float_operand(self, name: str, a, dtype: np.dtype | None = None, ndim: int | None = None):
        """Check a floating operand; return it C-contiguous (copied if it was not)."""
        self._array(name, a)
        if a.dtype not in _FLOATS:
            raise ValueError(
                f"{name}.dtype={a.dtype} is not supported; expected float32 or float64"
            )
        if dtype is not None and a.dtype != dtype:
            raise ValueError(
                f"{name}.dtype={a.dtype} differs from the other operands' {dtype}; "
                "all operands must share one dtype"
            )
        if ndim is not None and a.ndim != ndim:
            raise ValueError(
                f"{name}.shape={tuple(a.shape)} is not accepted; expected {ndim} dimensions"
            )
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    def _output(self, name: str, a, dtype: np.dtype, shape: tuple[int, ...]):
        """Check a caller-provided output (written in place, so never copied)."""
        self._array(name, a)
        if a.dtype != dtype:
            raise ValueError(f"{name}.dtype={a.dtype} is not accepted; expected {dtype}")
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name}.shape={tuple(a.shape)} is not accepted; expected {shape}")
        if not a.flags.c_contiguous:
            raise ValueError(
                f"{name} is not C-contiguous (strides {a.strides}); kernels write "
                "outputs in place, so pass a contiguous array"
            )
        return a

    @staticmethod
    def _same_shape(name: str, a, shape: tuple[int, ...]) -> None:
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name}.shape={tuple(a.shape)} is not accepted; expected {shape}")

    @staticmethod
    def _vec4_flag(a, leading: int) -> np.int32:
        """1 when 16-byte loads of 4 consecutive elements are aligned: base address a multiple
        of 16 and a leading dimension that is a multiple of 4."""
        return np.int32(leading % 4 == 0 and _data_address(a) % 16 == 0)

    # -- dense layer ----------------------------------------------------------------------
    def dense_forward(self, x, weight, bias, activation, alpha=0.01, precision="fp32"):
        """z = x Wᵀ + b, y = f(z) in one GEMM launch (gemm.cu: dense_forward; gemm_mma.cu:
        dense_forward_<precision> for "bf16" and "tf32")."""
        code = check_activation(activation)
        x = self._float_operand("x", x, ndim=2)
        dtype = x.dtype
        self._check_gemm_precision(precision, dtype)
        weight = self._float_operand("weight", weight, dtype, ndim=2)
        m, k = x.shape
        n = weight.shape[0]
        self._same_shape("weight", weight, (n, k))
        _check_int32("x.shape", x.shape)
        _check_int32("weight.shape", weight.shape)
        if bias is not None:
            bias = self._float_operand("bias", bias, dtype)
            self._same_shape("bias", bias, (n,))
        needs_z = activation != "identity" and activation not in SAVES_OUTPUT
        y = self.empty((m, n), dtype)
        z = self.empty((m, n), dtype) if needs_z else None
        if m and n and precision != "fp32":
            has_bias = bias is not None
            self._mma_forward(
                x,
                weight,
                bias if has_bias else y,
                y,
                z if needs_z else y,
                (m, n, k),
                has_bias,
                needs_z,
                code,
                alpha,
                precision,
            )
        elif m and n:
            real = dtype.type
            common = (
                x,
                weight,
                bias if bias is not None else x,
                y,
                z if needs_z else y,
                np.int32(m),
                np.int32(n),
                np.int32(k),
                np.int32(bias is not None),
                np.int32(needs_z),
                np.int32(code),
                real(alpha),
            )
            self._gemm(
                "dense_forward", m, n, common, (self._vec4_flag(x, k), self._vec4_flag(weight, k))
            )
        if activation == "identity":
            return y, None
        return y, (y if activation in SAVES_OUTPUT else z)

    def dense_backward(
        self, dout, x, weight, saved, activation, alpha, dweight, dbias, need_dinp, precision="fp32"
    ):
        """δ = dout ⊙ f'(saved) (elementwise), dW = δᵀx and dX = δW (gemm.cu, or gemm_mma.cu in
        "bf16" / "tf32"), db = Σ_rows δ (reduce.cu: column_sum, on the fp32 δ)."""
        check_activation(activation)
        dout = self._float_operand("dout", dout, ndim=2)
        dtype = dout.dtype
        self._check_gemm_precision(precision, dtype)
        x = self._float_operand("x", x, dtype, ndim=2)
        weight = self._float_operand("weight", weight, dtype, ndim=2)
        m, n = dout.shape
        k = x.shape[1]
        self._same_shape("x", x, (m, k))
        self._same_shape("weight", weight, (n, k))
        _check_int32("dout.shape", dout.shape)
        _check_int32("x.shape", x.shape)
        self._output("dweight", dweight, dtype, (n, k))
        if dbias is not None:
            self._output("dbias", dbias, dtype, (n,))
        if activation == "identity":
            delta = dout
        else:
            if saved is None:
                raise ValueError(
                    f"saved=None is not accepted for activation={activation!r}; "
                    "pass what dense_forward returned"
                )
            saved = self._float_operand("saved", saved, dtype)
            self._same_shape("saved", saved, (m, n))
            delta = self.activation_backward(dout, saved, activation, alpha)
        if precision != "fp32":
            return self._mma_backward(
                delta, x, weight, dweight, dbias, need_dinp, m, n, k, precision
            )
        self._gemm_backward_weight(delta, x, dweight, m, n, k)
        if dbias is not None:
            self._column_sum(delta, dbias)
        if not need_dinp:
            return None
        dinp = self.empty((m, k), dtype)
        self._gemm_backward_data(delta, weight, dinp, m, n, k)
        return dinp

    # -- tensor-core GEMMs (gemm_mma.cu) ------------------------------------------------------
    def _check_gemm_precision(self, precision: str, dtype: np.dtype) -> None:
        if precision == "fp32":
            return
        self.check_precision(precision)
        if dtype != np.float32:
            raise ValueError(f"precision={precision!r} needs float32 arrays; got {dtype}")

    def to_bf16(self, a):
        """A bf16 copy of the float32 array ``a`` (uint16 bits, round to nearest even;
        gemm_mma.cu: to_bf16)."""
        out = self.empty(tuple(a.shape), np.uint16)
        n = int(np.prod(a.shape))
        if n:
            grid = min(_ceil_div(n, 256), 4096)
            self._launch(
                self._module(MMA_FILE, np.dtype(np.float32)),
                "to_bf16",
                (grid, 1, 1),
                (256, 1, 1),
                (a, out, np.int64(n)),
            )
        return out

    def _mma_operand(self, a, precision: str):
        """What gemm_mma.cu reads: bf16 bits for "bf16", the float32 array itself for "tf32"."""
        return self.to_bf16(a) if precision == "bf16" else a

    def _mma(self, kernel: str, rows: int, cols: int, args: tuple, precision: str) -> None:
        grid = (max(1, _ceil_div(rows, MMA_BLOCK)), max(1, _ceil_div(cols, MMA_BLOCK)), 1)
        self._launch(
            self._module(MMA_FILE, np.dtype(np.float32)),
            f"{kernel}_{precision}",
            grid,
            (MMA_THREADS, 1, 1),
            args,
            mma_shared_bytes(kernel, precision),
        )

    def _mma_forward(self, x, weight, bias, y, z, dims, has_bias, write_z, code, alpha, precision):
        m, n, k = dims
        xa, wa = self._mma_operand(x, precision), self._mma_operand(weight, precision)
        y16 = (xa, np.int32(0)) if precision == "bf16" else ()  # bf16 Y not requested
        args = (xa, wa, bias, y, z, *y16[:1], np.int32(m), np.int32(n), np.int32(k))
        args += (np.int32(has_bias), np.int32(write_z), *y16[1:], np.int32(code), np.float32(alpha))
        self._mma("dense_forward", m, n, args, precision)

    def _mma_backward(self, delta, x, weight, dweight, dbias, need_dinp, m, n, k, precision):
        dims = (np.int32(m), np.int32(n), np.int32(k))
        delta_a = self._mma_operand(delta, precision)
        if n and k:
            xa = self._mma_operand(x, precision)
            self._mma("dense_backward_weight", n, k, (delta_a, xa, dweight, *dims), precision)
        if dbias is not None:
            self._column_sum(delta, dbias)
        if not need_dinp:
            return None
        dinp = self.empty((m, k), np.float32)
        if m and k:
            wa = self._mma_operand(weight, precision)
            self._mma("dense_backward_data", m, k, (delta_a, wa, dinp, *dims), precision)
        return dinp

    def _gemm(self, kernel: str, rows: int, cols: int, args: tuple, vec_flags: tuple) -> None:
        """Launch gemm.cu's ``kernel`` over a (rows, cols) output: the tiled version (``kernel``)
        or the warp-tiled one (``<kernel>_warptiled``) with its 16-byte-load flags, or
        ``<kernel>_naive`` (one thread per element) for validation."""
        dtype = args[0].dtype
        if self.gemm_version == "naive":
            grid = (_ceil_div(cols, _NAIVE_BLOCK), _ceil_div(rows, _NAIVE_BLOCK), 1)
            block = (_NAIVE_BLOCK, _NAIVE_BLOCK, 1)
            self._launch(self._gemm_module(dtype)[0], f"{kernel}_naive", grid, block, args)
            return
        module, tiles = self._gemm_module(dtype)
        block_rows, block_cols, threads = _gemm_block(tiles)
        grid = (_ceil_div(rows, block_rows), _ceil_div(cols, block_cols), 1)
        name = kernel if self.gemm_version == "tiled" else f"{kernel}_{self.gemm_version}"
        self._launch(module, name, grid, (threads, 1, 1), (*args, *vec_flags))

    def _gemm_backward_weight(self, delta, x, dweight, m, n, k) -> None:
        """dW (n, k) = δᵀ x."""
        if n and k:
            dims = (np.int32(m), np.int32(n), np.int32(k))
            flags = (self._vec4_flag(delta, n), self._vec4_flag(x, k))
            self._gemm("dense_backward_weight", n, k, (delta, x, dweight, *dims), flags)

    def _gemm_backward_data(self, delta, weight, dinp, m, n, k) -> None:
        """dX (m, k) = δ W."""
        if m and k:
            dims = (np.int32(m), np.int32(n), np.int32(k))
            flags = (self._vec4_flag(delta, n), self._vec4_flag(weight, k))
            self._gemm("dense_backward_data", m, k, (delta, weight, dinp, *dims), flags)

    def _column_sum(self, a, out) -> None:
        """out[j] = Σ_i a[i, j], deterministic: rows are cut into chunks (by the shape alone),
        each chunk summed by one block, then the chunk sums by one more pass."""
        rows, cols = a.shape
        if cols == 0:
            return
        module = self._module("reduce.cu", a.dtype)
        block = (_COLUMN_SUM[0], _COLUMN_SUM[1], 1)
        col_blocks = _ceil_div(cols, _COLUMN_SUM[0])
        # One chunk per ~256 rows, so that tall δ still fills the device.
        chunks = min(_COLUMN_SUM_MAX_CHUNKS, max(1, _ceil_div(rows, 256)))
        if chunks == 1:
            self._launch(
                module,
                "column_sum",
                (col_blocks, 1, 1),
                block,
                (a, np.int32(rows), np.int32(cols), np.int32(max(rows, 1)), out),
            )
            return
        per_chunk = _ceil_div(rows, chunks)
        chunks = _ceil_div(rows, per_chunk)
        partial = self.empty((chunks, cols), a.dtype)
        self._launch(
            module,
            "column_sum",
            (col_blocks, chunks, 1),
            block,
            (a, np.int32(rows), np.int32(cols), np.int32(per_chunk), partial),
        )
        self._launch(
            module,
            "column_sum",
            (col_blocks, 1, 1),
            block,
            (partial, np.int32(chunks), np.int32(cols), np.int32(chunks), out),
        )

    # -- standalone activation ------------------------------------------------------------------
    def activation_forward(self, x, activation, alpha=0.01):
        code = check_activation(activation)
        x = self._float_operand("x", x)
        if activation == "identity":
            return x, None
        y = self.empty(x.shape, x.dtype)
        if x.size:
            self._elementwise(ACTIVATION_FORWARD, x.dtype)(x, np.int32(code), np.float64(alpha), y)
        return y, (y if activation in SAVES_OUTPUT else x)

    def activation_backward(self, dout, saved, activation, alpha=0.01):
        code = check_activation(activation)
        dout = self._float_operand("dout", dout)
        if activation == "identity":
            return dout
        if saved is None:
            raise ValueError(
                f"saved=None is not accepted for activation={activation!r}; pass "
                "what the forward returned"
            )
        saved = self._float_operand("saved", saved, dout.dtype)
        self._same_shape("saved", saved, tuple(dout.shape))
        dinp = self.empty(dout.shape, dout.dtype)
        if dout.size:
            self._elementwise(ACTIVATION_BACKWARD, dout.dtype)(
                dout, saved, np.int32(code), np.float64(alpha), dinp
            )
        return dinp

    def add(self, a, b):
        a = self._float_operand("a", a)
        b = self._float_operand("b", b, a.dtype)
        self._same_shape("b", b, tuple(a.shape))
        out = self.empty(a.shape, a.dtype)
        if a.size:
            self._elementwise(ADD, a.dtype)(a, b, out)
        return out

    # -- reductions -----------------------------------------------------------------------------
    def _sum(
        self,
        kernel_file: str,
        kernel: str,
        inputs: tuple,
        n: int,
        scalars: tuple,
        grad,
        dtype: np.dtype,
        scale: float,
    ):
        """Launch a pass-1 kernel writing one partial per block, then sum_finalize:
        out = scale · Σ partials.  Returns the 0-d result."""
        blocks = max(1, min(_MAX_REDUCE_BLOCKS, _ceil_div(n, _REDUCE_THREADS * 4)))
        partials = self.empty((blocks,), dtype)
        out = self.empty((1,), dtype)
        args = inputs + (np.int64(n),) + scalars + ((grad,) if grad is not None else ())
        self._launch(
            self._module(kernel_file, dtype),
            kernel,
            (blocks, 1, 1),
            (_REDUCE_THREADS, 1, 1),
            (*args, partials),
        )
        self._launch(
            self._module("reduce.cu", dtype),
            "sum_finalize",
            (1, 1, 1),
            (_REDUCE_THREADS, 1, 1),
            (partials, np.int32(blocks), np.float64(scale), out),
        )
        return out.reshape(())

    def sum_of_squares(self, x):
        """Σ x² (reduce.cu: sum_squares_partial + sum_finalize), fixed order."""
        x = self._float_operand("x", x)
        return self._sum(
            "reduce.cu", "sum_squares_partial", (x.reshape(-1),), x.size, (), None, x.dtype, 1.0
        )

    # -- losses -----------------------------------------------------------------------------------
    def _float_pair(self, first: str, a, second: str, b):
        a = self._float_operand(first, a)
        b = self._float_operand(second, b, a.dtype)
        self._same_shape(second, b, tuple(a.shape))
        return a, b

    def _elementwise_loss(self, kernel, first, a, second, b, reduction, grad_scale):
        """The elementwise losses of loss.cu: ``kernel`` writes the gradient and per-block
        partial sums, sum_finalize scales their total by 1/n ("mean") or 1 ("sum").
        ``grad_scale(scale)`` is the kernel's gradient factor."""
        check_reduction(reduction)
        a, b = self._float_pair(first, a, second, b)
        scale = 1.0 / a.size if reduction == "mean" and a.size else 1.0
        grad = self.empty(a.shape, a.dtype)
        scalars = (a.dtype.type(grad_scale(scale)),)
        loss = self._sum("loss.cu", kernel, (a, b), a.size, scalars, grad, a.dtype, scale)
        return loss, grad

    def mse_loss(self, pred, target, reduction):
        """L = Σ (ŷ − y)² [/ n];  ∂L/∂ŷ = 2(ŷ − y) [/ n]  (loss.cu: mse_forward_backward)."""
        return self._elementwise_loss(
            "mse_forward_backward", "pred", pred, "target", target, reduction, lambda s: 2 * s
        )

    def bce_with_logits(self, logits, target, reduction):
        """ℓ = max(z,0) − zy + log1p(e^(−|z|));  ∂ℓ/∂z = σ(z) − y
        (loss.cu: bce_with_logits_forward_backward)."""
        return self._elementwise_loss(
            "bce_with_logits_forward_backward",
            "logits",
            logits,
            "target",
            target,
            reduction,
            lambda s: s,
        )

    def bce(self, probs, target, reduction):
        """ℓ = −(y max(log p, −100) + (1 − y) max(log(1 − p), −100));
        ∂ℓ/∂p = (p − y) / max(p(1 − p), 1e−12)  (loss.cu: bce_forward_backward)."""
        return self._elementwise_loss(
            "bce_forward_backward", "probs", probs, "target", target, reduction, lambda s: s
        )

    def softmax_cross_entropy(self, logits, target):
        """Per row: lse(z)·Σp − Σ p z, gradient (softmax(z)·Σp − p)/N, one block per row
        (loss.cu); then the mean over rows (reduce.cu).  A label outside [0, C) gives NaN."""
        logits = self._float_operand("logits", logits, ndim=2)
        n, c = logits.shape
        _check_int32("logits.shape", logits.shape)
        if c < 1:
            raise ValueError(
                f"logits.shape={tuple(logits.shape)} is not accepted; expected at least one class"
            )
        dtype = logits.dtype
        if not isinstance(target, self.xp.ndarray):
            raise TypeError(
                f"target is a {type(target).__name__}; expected a {self.xp.__name__}.ndarray"
            )
        if target.ndim == 1:
            if target.dtype.kind not in "iu":
                raise ValueError(
                    f"target.dtype={target.dtype} is not accepted for 1-D targets; "
                    "expected integer class labels"
                )
            self._same_shape("target", target, (n,))
            target = self.xp.ascontiguousarray(target, dtype=np.int64)
            kernel = "softmax_xent_labels_forward_backward"
        else:
            target = self._float_operand("target", target, dtype, ndim=2)
            self._same_shape("target", target, (n, c))
            kernel = "softmax_xent_probs_forward_backward"
        grad = self.empty((n, c), dtype)
        row_loss = self.empty((max(n, 1),), dtype)
        if n:
            threads = min(256, max(32, 1 << (c - 1).bit_length()))
            self._launch(
                self._module("loss.cu", dtype),
                kernel,
                (n, 1, 1),
                (threads, 1, 1),
                (logits, target, np.int32(n), np.int32(c), grad, row_loss),
            )
        else:
            row_loss.fill(0)
        loss = self._sum(
            "reduce.cu", "sum_partial", (row_loss,), n, (), None, dtype, 1.0 / n if n else 1.0
        )
        return loss, grad

    # -- optimizers -------------------------------------------------------------------------------
    def _updated_buffer(self, name: str, a, dtype: np.dtype | None, shape: tuple[int, ...] | None):
        """A buffer an optimizer updates in place: a float array, contiguous, of ``dtype``
        and ``shape`` (its own when None)."""
        self._array(name, a)
        dtype = a.dtype if dtype is None else dtype
        if a.dtype not in _FLOATS:
            raise ValueError(
                f"{name}.dtype={a.dtype} is not supported; expected float32 or float64"
            )
        return self._output(name, a, dtype, tuple(a.shape) if shape is None else shape)

    def sgd_step(
        self,
        param,
        grad,
        momentum_buf,
        *,
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        first_step,
    ):
        """torch.optim.SGD, one elementwise launch over the flat buffers."""
        param = self._updated_buffer("param", param, None, None)
        grad = self._float_operand("grad", grad, param.dtype)
        self._same_shape("grad", grad, tuple(param.shape))
        if param.size == 0:
            return
        if momentum != 0:
            if momentum_buf is None:
                raise ValueError(f"momentum_buf=None is not accepted with momentum={momentum}")
            self._updated_buffer("momentum_buf", momentum_buf, param.dtype, tuple(param.shape))
            self._elementwise(SGD_MOMENTUM, param.dtype)(
                grad,
                np.float64(lr),
                np.float64(momentum),
                np.float64(dampening),
                np.int32(bool(nesterov)),
                np.float64(weight_decay),
                np.int32(bool(first_step)),
                param,
                momentum_buf,
            )
        else:
            self._elementwise(SGD_PLAIN, param.dtype)(
                grad, np.float64(lr), np.float64(weight_decay), param
            )

    def adam_step(
        self,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        *,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        decoupled,
    ):
        """torch.optim.Adam / AdamW, one elementwise launch over the flat buffers."""
        if step < 1:
            raise ValueError(f"step={step} is not accepted; expected an integer >= 1")
        param = self._updated_buffer("param", param, None, None)
        shape = tuple(param.shape)
        grad = self._float_operand("grad", grad, param.dtype)
        self._same_shape("grad", grad, shape)
        self._updated_buffer("exp_avg", exp_avg, param.dtype, shape)
        self._updated_buffer("exp_avg_sq", exp_avg_sq, param.dtype, shape)
        if param.size == 0:
            return
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        self._elementwise(ADAM, param.dtype)(
            grad,
            np.float64(lr),
            np.float64(beta1),
            np.float64(beta2),
            np.float64(eps),
            np.float64(weight_decay),
            np.int32(bool(decoupled)),
            np.float64(bias_correction1),
            np.float64(bias_correction2_sqrt),
            param,
            exp_avg,
            exp_avg_sq,
        )

    def scale_(self, x, factor):
        x = self._updated_buffer("x", x, None, None)
        if x.size:
            self._elementwise(SCALE, x.dtype)(np.float64(factor), x)


def _check_gemm_tiles(kind: str, tiles: dict[str, int]) -> None:
    """The constraints gemm.cu's static_asserts and the launch impose, checked up front."""
    if "WT_BM" in tiles:
        _check_warptiled_tiles(kind, tiles)
        return
    t = tiles
    problems = []
    if t["TILE_K"] % 4 or t["MICRO_M"] % 4 or t["MICRO_N"] % 4:
        problems.append("TILE_K, MICRO_M and MICRO_N must be multiples of 4")
    if t["TILE_M"] % t["MICRO_M"] or t["TILE_N"] % t["MICRO_N"]:
        problems.append("MICRO_M must divide TILE_M and MICRO_N must divide TILE_N")
    elif not 32 <= _gemm_threads(t) <= 1024:
        problems.append(f"{_gemm_threads(t)} threads per block; expected 32 to 1024")
    problems += _shared_memory_problem(kind, t["TILE_K"], t["TILE_M"], t["TILE_N"])
    if problems:
        raise ValueError(f"gemm_tiles[{kind!r}]={tiles} is not accepted: " + "; ".join(problems))


def _check_warptiled_tiles(kind: str, tiles: dict[str, int]) -> None:
    """The warp-tiled version's constraints (gemm.cu's WT_ static_asserts and the launch)."""
    t = tiles
    problems = []
    if t["WT_BK"] % 4 or t["WT_TM"] % 4 or t["WT_TN"] % 4:
        problems.append("WT_BK, WT_TM and WT_TN must be multiples of 4")
    if t["WT_BM"] % t["WT_WM"] or t["WT_BN"] % t["WT_WN"]:
        problems.append("WT_WM must divide WT_BM and WT_WN must divide WT_BN")
    elif not _gemm_block(t)[2] <= 1024:
        problems.append(f"{_gemm_block(t)[2]} threads per block; expected at most 1024")
    per_warp_row = 32 * t["WT_TM"] * t["WT_TN"] * t["WT_WNITER"]
    if (t["WT_WM"] * t["WT_WN"]) % per_warp_row:
        problems.append(
            f"WT_WM·WT_WN={t['WT_WM'] * t['WT_WN']} must be a multiple of "
            f"32·WT_TM·WT_TN·WT_WNITER={per_warp_row}"
        )
    else:
        wmiter = t["WT_WM"] * t["WT_WN"] // per_warp_row
        if t["WT_WM"] % wmiter or t["WT_WN"] % t["WT_WNITER"]:
            problems.append(f"WT_WMITER={wmiter} and WT_WNITER must divide WT_WM and WT_WN")
        else:
            # Then the sub-tile holds exactly 32 thread tiles (one per lane) when they fit.
            sub_m, sub_n = t["WT_WM"] // wmiter, t["WT_WN"] // t["WT_WNITER"]
            if sub_m % t["WT_TM"] or sub_n % t["WT_TN"]:
                problems.append(
                    f"WT_TM and WT_TN must divide the warp sub-tile {sub_m}x{sub_n} "
                    f"(WT_WMITER={wmiter})"
                )
    problems += _shared_memory_problem(kind, t["WT_BK"], t["WT_BM"], t["WT_BN"])
    if problems:
        raise ValueError(f"gemm_tiles[{kind!r}]={tiles} is not accepted: " + "; ".join(problems))


def _shared_memory_problem(kind: str, depth: int, block_rows: int, block_cols: int) -> list[str]:
    """Both versions stage two depth × (rows + 4 padding) slices per operand (gemm.cu's
    gemm_smem_stride); static shared memory is limited to 48 KiB."""
    itemsize = 4 if kind == "float" else 8
    shared = 2 * depth * (block_rows + block_cols + 8) * itemsize
    return [f"{shared} bytes of static shared memory; at most 49152"] if shared > 48 * 1024 else []


def _gemm_threads(tiles: dict[str, int]) -> int:
    return (tiles["TILE_M"] // tiles["MICRO_M"]) * (tiles["TILE_N"] // tiles["MICRO_N"])


def _gemm_block(tiles: dict[str, int]) -> tuple[int, int, int]:
    """(output rows, output columns, threads) of one block of either tiled version."""
    if "WT_BM" in tiles:
        warps = (tiles["WT_BM"] // tiles["WT_WM"]) * (tiles["WT_BN"] // tiles["WT_WN"])
        return tiles["WT_BM"], tiles["WT_BN"], 32 * warps
    return tiles["TILE_M"], tiles["TILE_N"], _gemm_threads(tiles)


def _data_address(a) -> int:
    """Device (or host) address of a's first element."""
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is not None:
        return int(ptr)
    return int(a.__array_interface__["data"][0])
