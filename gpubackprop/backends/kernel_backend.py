"""Kernel launchers, written once against the device seam (seam.py).

Every op of base.Backend is a few launches of the kernels in kernels/ (the .cu files, and the
elementwise kernels of elementwise.cuh and optimizers.cuh, see elementwise.py): the cupy
backend runs them on a GPU, the emu backend on the CPU emulator, with the same grid, block and
arguments.  The formulas are those of numpy_backend.py; the comments give the kernel that
computes each one.

Launchers check what a kernel cannot (operands.py: dtypes, shapes, contiguity, device); the
GEMMs' version, tiles and launch per shape are gemm_config.py's.  Scalars are passed as NumPy
scalars of exactly the C parameter type.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..arrays import to_host
from ..dtypes import C_TYPES
from ..kernels import real_type
from . import operands
from .base import SAVES_OUTPUT, STEP_SCALARS, Backend, check_activation, check_reduction
from .elementwise import elementwise_spec
from .gemm_config import DEFAULT_MULTIPROCESSORS, GEMM_VERSIONS, GemmConfig
from .operands import check_int32, same_shape
from .seam import DeviceSeam

__all__ = ["GEMM_VERSIONS", "KERNEL_DEFINES", "KernelBackend"]

_REDUCE_THREADS = 256  # REDUCE_THREADS and LOSS_THREADS
_MAX_REDUCE_BLOCKS = 1024  # partial sums per reduction: fixed by n alone, so results are too
_COLUMN_SUM = (32, 8)  # COLUMN_SUM_COLS, COLUMN_SUM_ROWS
_COLUMN_SUM_MAX_CHUNKS = 256
_STANDARDIZE = (32, 8)  # STANDARDIZE_COLS, STANDARDIZE_ROWS
_STANDARDIZE_MAX_ROW_BLOCKS = 1024
# The launch geometry reduce.cu and loss.cu are compiled for (their __launch_bounds__ and
# shared arrays), passed as defines so that the numbers above are the only ones that count.
KERNEL_DEFINES: dict[str, dict[str, int]] = {
    "reduce.cu": {
        "REDUCE_THREADS": _REDUCE_THREADS,
        "COLUMN_SUM_COLS": _COLUMN_SUM[0],
        "COLUMN_SUM_ROWS": _COLUMN_SUM[1],
    },
    "loss.cu": {"LOSS_THREADS": _REDUCE_THREADS},
    "train_step.cu": {"REDUCE_THREADS": _REDUCE_THREADS},
    "standardize.cu": {"STANDARDIZE_COLS": _STANDARDIZE[0], "STANDARDIZE_ROWS": _STANDARDIZE[1]},
}


def module_defines(file: str, kind: str, gemm: GemmConfig, variant: str = "") -> dict[str, str]:
    """The #defines kernels/<file> is compiled with for scalar type ``kind`` ("float" or
    "double"): REAL_T, the launch geometry of KERNEL_DEFINES, for gemm.cu the GEMM config's
    tiles (``variant``: a SMALL_TILES key, "" the configured tiles).  One function for the
    launchers and the warm-up (warm.py), so both name the same compiled source."""
    if file == "gemm.cu":
        values = gemm.variant_defines(kind, variant)
    else:
        values = KERNEL_DEFINES.get(file, {})
    return {"REAL_T": kind, **{k: str(v) for k, v in values.items()}}


_INT32_ZERO = np.int32(0)
_GRID_STRIDE_THREADS = 256  # grid-stride kernels of train_step.cu: threads per block
_MAX_GRID_STRIDE_BLOCKS = 1024  # and blocks at most (then several elements per thread)
# The on/off int flags of the update launches (made once: a NumPy scalar costs ~0.2 us a call).
_FLAG_OFF, _FLAG_ON = np.int32(0), np.int32(1)
# The C types of the update launches' unchanging scalars (KernelBackend._c_scalars): the
# element count, then sgd_update's momentum, dampening, nesterov, weight_decay, use_momentum
# and adam_update's beta1, beta2, eps, weight_decay, decoupled.
_SGD_SCALARS = (np.int64, np.float64, np.float64, np.int32, np.float64, np.int32)
_ADAM_SCALARS = (np.int64, np.float64, np.float64, np.float64, np.float64, np.int32)


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


# dtype -> C type, looked up per launch (kernels.real_type validates, and costs microseconds).
_C_TYPE = {np.dtype(name): c_type for name, c_type in C_TYPES.items()}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _reduce_blocks(n: int) -> int:
    """Blocks of a pass-1 reduction over n elements: from n alone, so the bits repeat."""
    return max(1, min(_MAX_REDUCE_BLOCKS, _ceil_div(n, _REDUCE_THREADS * 4)))


class KernelBackend(Backend):
    """Backend whose ops launch the kernels of kernels/ through a DeviceSeam.

    ``gemm_version`` and ``gemm_tiles`` choose the GEMM kernels (gemm_config.GemmConfig)."""

    name = ""  # a subclass names its backend; a plain KernelBackend takes its seam's name

    def __init__(
        self,
        seam: DeviceSeam,
        gemm_version: str = "tiled",
        gemm_tiles: dict | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.gemm = GemmConfig(gemm_version, gemm_tiles)
        self.seam = seam
        self.xp = seam.xp
        self.name = name or self.name or seam.name
        self.available = True  # subclasses that probe their device set it again
        self.reason = ""
        # (kernels/ file or elementwise kernel name, dtype.str) -> what the seam compiled: a
        # launch looks its kernel up by these two alone, without rebuilding defines or source
        # keys (that cost microseconds per launch).  The seam caches compiles per source text.
        self._kernels: dict[tuple[str, str], Any] = {}
        self._dims_made: dict[tuple, tuple] = {}
        self._fused_plans: dict[tuple, tuple | None] = {}
        self._constants: dict[tuple, tuple] = {}  # _c_scalars

    @property
    def gemm_version(self) -> str:
        return self.gemm.version

    @property
    def gemm_tiles(self) -> dict[str, dict[str, int]]:
        return self.gemm.tiles

    def with_gemm_version(self, gemm_version: str, gemm_tiles: dict | None = None) -> KernelBackend:
        """A backend over the same seam (device, kind of array, compiled sources) launching
        another GEMM version, so it takes this backend's arrays.  For benchmarks and sweeps."""
        if not self.available:
            raise RuntimeError(f"backend {self.name!r} is not available: {self.reason}")
        return KernelBackend(self.seam, gemm_version, gemm_tiles, name=self.name)

    def synchronize(self) -> None:
        self.seam.synchronize()

    def device_name(self) -> str:
        if not self.available:
            return f"unavailable ({self.reason})"
        return self.seam.device_name()

    # -- arrays -------------------------------------------------------------------------
    def asarray(self, x, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_numpy(self, a):
        return to_host(a)

    def empty(self, shape, dtype):
        return self.seam.empty(tuple(shape), np.dtype(dtype))

    def zeros(self, shape, dtype):
        return self.xp.zeros(tuple(shape), dtype=np.dtype(dtype))

    # -- compiled code --------------------------------------------------------------------------
    def _module(self, file: str, dtype: np.dtype):
        """kernels/<file> compiled for ``dtype`` with its launch defines (gemm.cu: this
        backend's GEMM tiles)."""
        key = (file, dtype.str)
        module = self._kernels.get(key)
        if module is None:
            defines = module_defines(file, real_type(dtype), self.gemm)
            module = self._kernels[key] = self.seam.compile(file, defines)
        return module

    def _elementwise(self, name: str, dtype: np.dtype):
        """The elementwise kernel ``name`` (elementwise.py) for ``dtype``."""
        key = (name, dtype.str)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = self.seam.elementwise(elementwise_spec(name), dtype)
        return kernel

    def _launch(self, module, kernel, grid, block, args, shared_mem=0):
        # grid and block are tuples of Python ints here (shapes and their ceil-divisions):
        # no conversion per launch, which cost a microsecond of the few a launch may take.
        self.seam.launch(module, kernel, grid, block, args, shared_mem)

    # -- argument checks (operands.py) ------------------------------------------------------------
    def _float_operand(self, name: str, a, dtype: np.dtype | None = None, ndim: int | None = None):
        return operands.float_operand(self.seam, name, a, dtype, ndim)

    def _output(self, name: str, a, dtype: np.dtype, shape: tuple[int, ...]):
        return operands.output(self.seam, name, a, dtype, shape)

    def _updated_buffer(self, name: str, a, dtype=None, shape=None):
        return operands.updated_buffer(self.seam, name, a, dtype, shape)

    # -- dense layer ----------------------------------------------------------------------
    def dense_forward(
        self,
        x,
        weight,
        bias,
        activation,
        alpha=0.01,
        precision="fp32",
        weight_bf16=None,
        x_bf16=None,
        y_bf16=None,
        *,
        params_checked: bool = False,
    ):
        """z = x Wᵀ + b, y = f(z) in one GEMM launch (gemm.cu: dense_forward; gemm_mma.cu:
        dense_forward_<precision> for "bf16" and "tf32").  In "bf16": ``weight_bf16`` is bf16(W)
        kept by the optimizer and ``x_bf16`` bf16(x) (the previous layer's ``y_bf16``), read
        instead of converting W and x; ``y_bf16``, a uint16 (M, N) array, receives bf16(y)
        from the same launch's epilogue, the next layer's operand.  ``params_checked``: W, b
        and bf16(W) are a placed model's own views of its flat buffers, checked when the model
        was placed (plan.py), so only x is checked here."""
        code = check_activation(activation)
        x = self._float_operand("x", x, ndim=2)
        dtype = x.dtype
        self._check_gemm_precision(precision, dtype)
        m, k = x.shape
        check_int32("x.shape", x.shape)
        if params_checked:
            n = weight.shape[0]
            if weight.dtype != dtype or weight.shape[1] != k:
                raise ValueError(
                    f"x (shape {tuple(x.shape)}, {dtype}) does not fit the layer's weight "
                    f"(shape {tuple(weight.shape)}, {weight.dtype})"
                )
        else:
            weight = self._float_operand("weight", weight, dtype, ndim=2)
            n = weight.shape[0]
            same_shape("weight", weight, (n, k))
            check_int32("weight.shape", weight.shape)
            if bias is not None:
                bias = self._float_operand("bias", bias, dtype)
                same_shape("bias", bias, (n,))
            if weight_bf16 is not None:
                self._check_bf16("weight_bf16", weight_bf16, (n, k), precision)
        if x_bf16 is not None:
            self._check_bf16("x_bf16", x_bf16, (m, k), precision)
        if y_bf16 is not None:
            self._check_bf16("y_bf16", y_bf16, (m, n), precision)
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
                (weight_bf16, x_bf16, y_bf16),
            )
        elif m and n:
            epilogue = (
                bias if bias is not None else x,
                z if needs_z else y,
                *self._c_scalars(
                    (np.int32, np.int32, np.int32, dtype.type),
                    (bias is not None, needs_z, code, alpha),
                ),
            )
            flags = (operands.vec4_flag(x, k), operands.vec4_flag(weight, k))
            self._gemm("dense_forward", (m, n, k), x, weight, y, flags, epilogue)
        if activation == "identity":
            return y, None
        return y, (y if activation in SAVES_OUTPUT else z)

    def dense_backward(
        self,
        dout,
        x,
        weight,
        saved,
        activation,
        alpha,
        dweight,
        dbias,
        need_dinp,
        precision="fp32",
        weight_bf16=None,
        x_bf16=None,
        *,
        params_checked: bool = False,
    ):
        """δ = dout ⊙ f'(saved), dW = δᵀx, db = Σ_rows δ and dX = δW in 2 launches: the dW GEMM
        forms δ as it loads dout and saved and sums db from it in a fixed order, the dX GEMM
        forms δ again (gemm.cu's *_act kernels, tiled or warp-tiled; gemm_mma.cu's
        *_act_<precision> for "bf16" / "tf32", δ rounded to the precision as formed, db from
        the fp32 δ).  3 launches when the GEMM plan splits the inner dimension (split-K: the
        slices' partial dW, db and dX added by one reduction launch).  The naive GEMM version
        and K = 0 take the unfused path: δ elementwise, the GEMMs, reduce.cu's column_sum.
        ``weight_bf16`` and ``x_bf16`` (precision "bf16"): bf16(W) kept by the optimizer and
        bf16(x) kept by the layer since its forward, read instead of converting W and x.
        ``params_checked``: W, dW, db and bf16(W) are a placed model's own views of its flat
        buffers, checked when the model was placed (plan.py); dout, x and saved are checked."""
        check_activation(activation)
        dout = self._float_operand("dout", dout, ndim=2)
        dtype = dout.dtype
        self._check_gemm_precision(precision, dtype)
        x = self._float_operand("x", x, dtype, ndim=2)
        m, n = dout.shape
        k = x.shape[1]
        same_shape("x", x, (m, k))
        check_int32("dout.shape", dout.shape)
        check_int32("x.shape", x.shape)
        if params_checked:
            same_shape("weight", weight, (n, k))
        else:
            weight = self._float_operand("weight", weight, dtype, ndim=2)
            same_shape("weight", weight, (n, k))
            if weight_bf16 is not None:
                self._check_bf16("weight_bf16", weight_bf16, (n, k), precision)
            self._output("dweight", dweight, dtype, (n, k))
            if dbias is not None:
                self._output("dbias", dbias, dtype, (n,))
        if x_bf16 is not None:
            self._check_bf16("x_bf16", x_bf16, (m, k), precision)
        if activation != "identity":
            if saved is None:
                raise ValueError(
                    f"saved=None is not accepted for activation={activation!r}; "
                    "pass what dense_forward returned"
                )
            saved = self._float_operand("saved", saved, dtype)
            same_shape("saved", saved, (m, n))
        if precision != "fp32":
            return self._mma_backward_act(
                dout,
                x,
                weight,
                saved,
                activation,
                alpha,
                dweight,
                dbias,
                need_dinp,
                precision,
                (weight_bf16, x_bf16),
            )
        plans = self._fused_backward(m, n, k, dtype)
        if plans:
            return self._dense_backward_act(
                plans, dout, x, weight, saved, activation, alpha, dweight, dbias, need_dinp
            )
        if activation == "identity":
            delta = dout
        else:
            delta = self.activation_backward(dout, saved, activation, alpha)
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

    def to_bf16(self, a, out=None):
        """A bf16 copy of the float32 array ``a`` (uint16 bits, round to nearest even;
        gemm_mma.cu: to_bf16); written into ``out`` when given."""
        if out is None:
            out = self.empty(tuple(a.shape), np.uint16)
        else:
            self._output("out", out, np.dtype(np.uint16), tuple(a.shape))
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
            mma_shared_bytes(kernel.replace("_act", ""), precision),
        )

    def _check_bf16(self, name: str, a, shape: tuple[int, ...], precision: str) -> None:
        """``a`` (weight_bf16, x_bf16, y_bf16) is a uint16 array of bf16 bits of ``shape`` on
        this device, given with precision="bf16" only."""
        if precision != "bf16":
            raise ValueError(
                f"{name} is accepted with precision='bf16' only; got precision={precision!r}"
            )
        self._output(name, a, np.dtype(np.uint16), shape)

    def _mma_forward(
        self, x, weight, bias, y, z, dims, has_bias, write_z, code, alpha, precision, bf16=None
    ):
        """``bf16``: (bf16(W), bf16(x), bf16(y) output), each None where not given."""
        m, n, k = dims
        w16, x16, y16 = bf16 or (None, None, None)
        xa = self._mma_operand(x, precision) if x16 is None else x16
        wa = self._mma_operand(weight, precision) if w16 is None else w16
        dims = (np.int32(m), np.int32(n), np.int32(k))
        flags = (np.int32(has_bias), np.int32(write_z))
        epilogue = (np.int32(code), np.float32(alpha))
        if precision == "bf16":  # y16 (any valid pointer when not written) and write_y16
            out16, write16 = (xa, 0) if y16 is None else (y16, 1)
            args = (xa, wa, bias, y, z, out16, *dims, *flags, np.int32(write16), *epilogue)
        else:
            args = (xa, wa, bias, y, z, *dims, *flags, *epilogue)
        self._mma("dense_forward", m, n, args, precision)

    def _mma_backward_act(
        self,
        dout,
        x,
        weight,
        saved,
        activation,
        alpha,
        dweight,
        dbias,
        need_dinp,
        precision,
        bf16=None,
    ):
        """dW = δᵀx with db = Σ_rows δ, then dX = δW, on the tensor cores: the dW GEMM forms
        δ = dout ⊙ f'(saved) in fp32 as it loads it, rounds it to the precision for the
        products, sums db from the fp32 δ and, when dX is wanted, stores the rounded δ (bf16
        bits, or fp32 for tf32) that the dX GEMM then reads as is (gemm_mma.cu:
        dense_backward_weight_act_<p>, dense_backward_data_<p>): 2 launches, plus the bf16
        copies of x and W that the caller did not pass (``bf16``: (bf16(W), bf16(x)), each None
        where not given)."""
        w16, x16 = bf16 or (None, None)
        m, n = dout.shape
        k = x.shape[1]
        code = np.int32(check_activation(activation))
        saved = dout if saved is None else saved  # identity: f' = 1
        dims = (np.int32(m), np.int32(n), np.int32(k))
        dinp = self.empty((m, k), np.float32) if need_dinp else None
        if not (n and k):  # no product to form δ in: db (if any) from the elementwise δ
            if dbias is not None and n:
                self._column_sum(self.activation_backward(dout, saved, activation, alpha), dbias)
            if dinp is not None and m and k:  # N = 0: dX = 0
                dinp.fill(0)
            return dinp
        write_delta = bool(need_dinp and m)
        delta = None
        if write_delta:
            delta = self.empty((m, n), np.uint16 if precision == "bf16" else np.float32)
        xa = self._mma_operand(x, precision) if x16 is None else x16
        args = (dout, saved, xa, dweight, dbias if dbias is not None else dweight)
        if delta is None:  # not written: any array of the element type (xa is)
            delta = xa
        args += (delta, *dims, code, np.float32(alpha))
        args += (np.int32(dbias is not None), np.int32(write_delta))
        self._mma("dense_backward_weight_act", n, k, args, precision)
        if write_delta:
            wa = self._mma_operand(weight, precision) if w16 is None else w16
            self._mma("dense_backward_data", m, k, (delta, wa, dinp, *dims), precision)
        return dinp

    def _gemm(
        self,
        kernel: str,
        shape: tuple[int, int, int],
        a,
        b,
        out,
        vec_flags: tuple,
        epilogue: tuple | None = None,
    ) -> None:
        """Launch gemm.cu's ``kernel`` for ``out`` (rows, cols) = a·b over ``inner`` products,
        ``shape`` = (rows, cols, inner), with the plan gemm_config.GemmConfig.plan gives it:
        this backend's GEMM version, a smaller tile for an output with few blocks, and a
        deterministic split-K (``<kernel>_splitk`` into a partial buffer, then
        gemm_splitk_reduce with the epilogue) when the inner dimension is long.
        ``epilogue``: dense_forward's (bias, z, has_bias, write_z, act_code, alpha)."""
        dtype = a.dtype
        rows, cols, inner = shape
        dims = self._dims(kernel, shape)
        plan = self.gemm.plan(kernel, _C_TYPE[dtype], rows, cols, inner, self._multiprocessors())
        launch = plan.launch
        module = self._gemm_module(dtype, plan.variant)
        if plan.splits > 1:
            partial = self.empty((plan.splits, rows, cols), dtype)
            args = (a, b, partial, *dims, np.int32(plan.chunk), *vec_flags)
            self._launch(module, launch.kernel, launch.grid, launch.block, args)
            bias, z, has_bias, write_z, code, alpha = epilogue or (
                partial,
                out,
                _INT32_ZERO,
                _INT32_ZERO,
                _INT32_ZERO,
                dtype.type(0),
            )
            grid, block = self._grid_stride(rows * cols)
            args = (partial, np.int32(plan.splits), np.int32(rows), np.int32(cols), bias, out, z)
            args += (has_bias, write_z, code, alpha)
            self._launch(module, "gemm_splitk_reduce", grid, block, args)
            return
        if epilogue is None:
            args = (a, b, out, *dims)
        else:
            bias, z, has_bias, write_z, code, alpha = epilogue
            args = (a, b, bias, out, z, *dims, has_bias, write_z, code, alpha)
        if launch.takes_vector_flags:
            args = (*args, *vec_flags)
        self._launch(module, launch.kernel, launch.grid, launch.block, args)

    def _fused_backward(self, m: int, n: int, k: int, dtype: np.dtype) -> tuple | None:
        """The ((dW plan, kernel), (dX plan, kernel)) of gemm.cu's *_act kernels (δ formed on
        load, db from the dW GEMM) for the tiled version (each GEMM split or not, on its
        GemmConfig.plan) and the warp-tiled one; None for the naive version (kept to validate
        the others, it runs the unfused four launches)."""
        key = (m, n, k, dtype)
        if key in self._fused_plans:  # decided once per layer and batch shape
            return self._fused_plans[key]
        plans = None
        if self.gemm.version != "naive" and n and k:
            kind, sms = _C_TYPE[dtype], self._multiprocessors()
            plans = []
            for base, shape in (
                ("dense_backward_weight", (n, k, m)),
                ("dense_backward_data", (m, k, n)),
            ):
                plan = self.gemm.plan(base, kind, *shape, sms)
                # dense_backward_weight[_warptiled|_splitk] -> dense_backward_weight_act[...]
                plans.append((plan, f"{base}_act{plan.launch.kernel[len(base) :]}"))
            plans = tuple(plans)
        self._fused_plans[key] = plans
        return plans

    def _dense_backward_act(
        self, plans, dout, x, weight, saved, activation, alpha, dweight, dbias, need_dinp
    ):
        """dW = δᵀx with db = Σ_rows δ in one launch, dX = δW in another, δ = dout ⊙ f'(saved)
        formed as the GEMMs load it (gemm.cu: dense_backward_weight_act, _data_act, or their
        _warptiled forms): 2 launches.  A GEMM the plan splits (split-K) writes its slices'
        partial products (dW's with its partial db) instead, and one
        gemm_splitk_reduce_backward after both GEMMs adds the slices in order: 3 launches,
        the price of filling the GPU with a short output and a long inner dimension."""
        m, n = dout.shape
        k = x.shape[1]
        dtype = dout.dtype
        code, real_alpha, has_bias = self._c_scalars(
            (np.int32, dtype.type, np.int32),
            (check_activation(activation), alpha, dbias is not None),
        )
        saved = dout if saved is None else saved  # identity: f' = 1, saved unread in effect
        vec_delta = operands.vec4_flag(dout, n) & operands.vec4_flag(saved, n)
        dims = self._dims("dense_forward", (m, n, k))
        segments: list[tuple] = []  # (partial, splits, count, out) for the reduction
        (plan, kernel), data = plans
        launch = plan.launch
        if plan.splits > 1:
            partial = self.empty((plan.splits, n, k), dtype)
            partial_db = self.empty((plan.splits, n), dtype) if dbias is not None else partial
            args = (dout, saved, x, partial, partial_db, *dims, code, real_alpha, has_bias)
            args += (np.int32(plan.chunk), vec_delta, operands.vec4_flag(x, k))
            segments.append((partial, plan.splits, n * k, dweight))
            reduce_module = self._gemm_module(dtype, plan.variant)
            if dbias is not None:
                segments.append((partial_db, plan.splits, n, dbias))
        else:
            args = (dout, saved, x, dweight, dbias if dbias is not None else dweight)
            args += (*dims, code, real_alpha, has_bias, vec_delta, operands.vec4_flag(x, k))
        module = self._gemm_module(dtype, plan.variant)
        self._launch(module, kernel, launch.grid, launch.block, args)
        dinp = None
        if need_dinp:
            dinp = self.empty((m, k), dtype)
            (plan, kernel), launch = data, data[0].launch
            if m and plan.splits > 1:
                partial = self.empty((plan.splits, m, k), dtype)
                args = (dout, saved, weight, partial, *dims, code, real_alpha)
                args += (np.int32(plan.chunk), vec_delta, operands.vec4_flag(weight, k))
                segments.append((partial, plan.splits, m * k, dinp))
                reduce_module = self._gemm_module(dtype, plan.variant)
            elif m:
                args = (dout, saved, weight, dinp, *dims, code)
                args += (real_alpha, vec_delta, operands.vec4_flag(weight, k))
            if m:
                module = self._gemm_module(dtype, plan.variant)
                self._launch(module, kernel, launch.grid, launch.block, args)
        if segments:
            self._splitk_reduce_backward(segments, reduce_module)
        return dinp

    def _splitk_reduce_backward(self, segments: list[tuple], module) -> None:
        """out = Σ_s partial[s] for up to three (partial, splits, count, out) segments, one
        launch (gemm.cu: gemm_splitk_reduce_backward, slices added in order)."""
        total = sum(segment[2] for segment in segments)
        args: tuple = ()
        for partial, splits, count, out in segments:
            args += (partial, np.int32(splits), np.int64(count), out)
        first = segments[0][0]
        args += (first, _INT32_ZERO, np.int64(0), first) * (3 - len(segments))
        grid, block = self._grid_stride(total)
        self._launch(module, "gemm_splitk_reduce_backward", grid, block, args)

    def _dims(self, kernel: str, shape: tuple[int, int, int]) -> tuple:
        """(M, N, K) as the kernel takes them, from the output (rows, cols) and inner size;
        made once per shape (a NumPy scalar costs a few hundred nanoseconds to build)."""
        key = (kernel, shape)
        dims = self._dims_made.get(key)
        if dims is None:
            dims = self._dims_made[key] = self._make_dims(kernel, shape)
        return dims

    def _make_dims(self, kernel: str, shape: tuple[int, int, int]) -> tuple:
        rows, cols, inner = shape
        if kernel == "dense_forward":
            m, n, k = rows, cols, inner
        elif kernel == "dense_backward_data":
            m, n, k = rows, inner, cols
        else:  # dense_backward_weight: dW (n, k) over the batch m
            m, n, k = inner, rows, cols
        return np.int32(m), np.int32(n), np.int32(k)

    def _multiprocessors(self) -> int:
        count = self.__dict__.get("_sm_count")
        if count is None:
            probe = getattr(self.seam, "multiprocessors", None)
            count = self._sm_count = int(probe()) if probe else DEFAULT_MULTIPROCESSORS
        return count

    def _gemm_module(self, dtype: np.dtype, variant: str):
        """gemm.cu compiled for ``dtype`` with a GemmPlan's tiles ("" the configured ones)."""
        if not variant:
            return self._module("gemm.cu", dtype)
        key = (f"gemm.cu:{variant}", dtype.str)
        module = self._kernels.get(key)
        if module is None:
            defines = module_defines("gemm.cu", real_type(dtype), self.gemm, variant)
            module = self._kernels[key] = self.seam.compile("gemm.cu", defines)
        return module

    def _gemm_backward_weight(self, delta, x, dweight, m, n, k) -> None:
        """dW (n, k) = δᵀ x."""
        if n and k:
            flags = (operands.vec4_flag(delta, n), operands.vec4_flag(x, k))
            self._gemm("dense_backward_weight", (n, k, m), delta, x, dweight, flags)

    def _gemm_backward_data(self, delta, weight, dinp, m, n, k) -> None:
        """dX (m, k) = δ W."""
        if m and k:
            flags = (operands.vec4_flag(delta, n), operands.vec4_flag(weight, k))
            self._gemm("dense_backward_data", (m, k, n), delta, weight, dinp, flags)

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
            self._elementwise("gb_activation_forward", x.dtype)(
                x, np.int32(code), np.float64(alpha), y
            )
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
        same_shape("saved", saved, tuple(dout.shape))
        dinp = self.empty(dout.shape, dout.dtype)
        if dout.size:
            self._elementwise("gb_activation_backward", dout.dtype)(
                dout, saved, np.int32(code), np.float64(alpha), dinp
            )
        return dinp

    def add(self, a, b, out_bf16=None):
        """a + b (elementwise.cuh: gb_add); with ``out_bf16`` (precision "bf16") also bf16(a + b)
        there, from the same launch (gemm_mma.cu: add_bf16)."""
        a = self._float_operand("a", a)
        b = self._float_operand("b", b, a.dtype)
        same_shape("b", b, tuple(a.shape))
        out = self.empty(a.shape, a.dtype)
        if out_bf16 is not None:
            self._check_gemm_precision("bf16", a.dtype)
            self._check_bf16("out_bf16", out_bf16, tuple(a.shape), "bf16")
            if a.size:
                grid = min(_ceil_div(a.size, 256), 4096)
                args = (a, b, out, out_bf16, np.int64(a.size))
                module = self._module(MMA_FILE, np.dtype(np.float32))
                self._launch(module, "add_bf16", (grid, 1, 1), (256, 1, 1), args)
        elif a.size:
            self._elementwise("gb_add", a.dtype)(a, b, out)
        return out

    # -- input standardisation -----------------------------------------------------------------
    def _per_feature(self, name: str, a, dtype: np.dtype, cols: int):
        a = self._float_operand(name, a, dtype, ndim=1)
        same_shape(name, a, (cols,))
        return a

    def _standardize_launch(self, kernel: str, matrix, vectors: tuple, out) -> None:
        rows, cols = matrix.shape
        if matrix.size == 0:
            return
        check_int32(kernel, tuple(matrix.shape))
        row_blocks = min(_STANDARDIZE_MAX_ROW_BLOCKS, _ceil_div(rows, _STANDARDIZE[1]))
        self._launch(
            self._module("standardize.cu", matrix.dtype),
            kernel,
            (_ceil_div(cols, _STANDARDIZE[0]), row_blocks, 1),
            (_STANDARDIZE[0], _STANDARDIZE[1], 1),
            (matrix, *vectors, np.int32(rows), np.int32(cols), out),
        )

    def standardize_forward(self, x, mean, std):
        """y = (x − mean) / std per column (standardize.cu: standardize_forward)."""
        x = self._float_operand("x", x, ndim=2)
        mean = self._per_feature("mean", mean, x.dtype, x.shape[1])
        std = self._per_feature("std", std, x.dtype, x.shape[1])
        y = self.empty(x.shape, x.dtype)
        self._standardize_launch("standardize_forward", x, (mean, std), y)
        return y

    def standardize_backward(self, dout, std):
        """∂L/∂x = ∂L/∂y / std per column (standardize.cu: standardize_backward)."""
        dout = self._float_operand("dout", dout, ndim=2)
        std = self._per_feature("std", std, dout.dtype, dout.shape[1])
        dinp = self.empty(dout.shape, dout.dtype)
        self._standardize_launch("standardize_backward", dout, (std,), dinp)
        return dinp

    # -- reductions -----------------------------------------------------------------------------
    def _sum(
        self,
        *,
        file: str,
        kernel: str,
        inputs: tuple,
        n: int,
        dtype: np.dtype,
        scalars: tuple = (),
        grad: Any = None,
        scale: float = 1.0,
    ):
        """out = scale · Σ partials: ``kernel`` of kernels/<file>, called with
        (*inputs, n, *scalars[, grad], partials), writes one partial per block (and the
        gradient, for a loss); reduce.cu's sum_finalize adds them.  Returns the 0-d result."""
        blocks = max(1, min(_MAX_REDUCE_BLOCKS, _ceil_div(n, _REDUCE_THREADS * 4)))
        partials = self.empty((blocks,), dtype)
        out = self.empty((1,), dtype)
        args = inputs + (np.int64(n),) + scalars + ((grad,) if grad is not None else ())
        self._launch(
            self._module(file, dtype),
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
            file="reduce.cu",
            kernel="sum_squares_partial",
            inputs=(x.reshape(-1),),
            n=x.size,
            dtype=x.dtype,
        )

    # -- losses -----------------------------------------------------------------------------------
    def _float_pair(self, first: str, a, second: str, b):
        a = self._float_operand(first, a)
        b = self._float_operand(second, b, a.dtype)
        same_shape(second, b, tuple(a.shape))
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
        loss = self._sum(
            file="loss.cu",
            kernel=kernel,
            inputs=(a, b),
            n=a.size,
            dtype=a.dtype,
            scalars=scalars,
            grad=grad,
            scale=scale,
        )
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
        check_int32("logits.shape", logits.shape)
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
            same_shape("target", target, (n,))
            target = self.xp.ascontiguousarray(target, dtype=np.int64)
            kernel = "softmax_xent_labels_forward_backward"
        else:
            target = self._float_operand("target", target, dtype, ndim=2)
            same_shape("target", target, (n, c))
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
            file="reduce.cu",
            kernel="sum_partial",
            inputs=(row_loss,),
            n=n,
            dtype=dtype,
            scale=1.0 / n if n else 1.0,
        )
        return loss, grad

    # -- optimizers -------------------------------------------------------------------------------
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
        param = self._updated_buffer("param", param)
        grad = self._float_operand("grad", grad, param.dtype)
        same_shape("grad", grad, tuple(param.shape))
        if param.size == 0:
            return
        if momentum != 0:
            if momentum_buf is None:
                raise ValueError(f"momentum_buf=None is not accepted with momentum={momentum}")
            self._updated_buffer("momentum_buf", momentum_buf, param.dtype, tuple(param.shape))
            self._elementwise("gb_sgd_momentum", param.dtype)(
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
            self._elementwise("gb_sgd_plain", param.dtype)(
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
        param = self._updated_buffer("param", param)
        shape = tuple(param.shape)
        grad = self._float_operand("grad", grad, param.dtype)
        same_shape("grad", grad, shape)
        self._updated_buffer("exp_avg", exp_avg, param.dtype, shape)
        self._updated_buffer("exp_avg_sq", exp_avg_sq, param.dtype, shape)
        if param.size == 0:
            return
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        self._elementwise("gb_adam", param.dtype)(
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
        x = self._updated_buffer("x", x)
        if x.size:
            self._elementwise("gb_scale", x.dtype)(np.float64(factor), x)

    # -- graph-safe step: step scalars and clipping on the device (kernels/train_step.cu) ------
    def _step_scalars(self, scalars) -> None:
        self._output("scalars", scalars, np.dtype(np.float64), (len(STEP_SCALARS),))

    def _grid_stride(self, n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Grid and block of a grid-stride loop over n elements (the grid capped, so that
        large buffers take several elements per thread)."""
        blocks = max(1, min(_MAX_GRID_STRIDE_BLOCKS, _ceil_div(n, _GRID_STRIDE_THREADS)))
        return (blocks, 1, 1), (_GRID_STRIDE_THREADS, 1, 1)

    def _c_scalars(self, types: tuple, values: tuple) -> tuple:
        """``values`` as the C scalars ``types`` (np.int32, np.float64, a dtype's type, ...),
        made once per distinct (types, values): the arguments a layer or an update passes
        unchanged step after step (a NumPy scalar costs about 0.2 µs to build)."""
        key = (types, values)
        made = self._constants.get(key)
        if made is None:
            if len(self._constants) >= 256:  # a sweep over shapes or hyper-parameters
                self._constants.clear()
            made = self._constants[key] = tuple(t(v) for t, v in zip(types, values))
        return made

    def _update_grad(self, param, grad, clip):
        """The gradient an update reads: written back when clipped, so never a copy then."""
        if clip is not None:
            return self._updated_buffer("grad", grad, param.dtype, tuple(param.shape))
        grad = self._float_operand("grad", grad, param.dtype)
        same_shape("grad", grad, tuple(param.shape))
        return grad

    def _update_extras(self, param, scalars, clip, param_bf16) -> tuple:
        """The clip and bf16-copy arguments of sgd_update / adam_update: (param_bf16 or param
        standing in for it, clip or scalars standing in for it), checked, and their flags."""
        if clip is None and param_bf16 is None:  # the plain update: nothing to check
            return param, scalars, _FLAG_OFF, _FLAG_OFF
        if clip is not None:
            self._float_operand("clip", clip, np.dtype(np.float64))
            same_shape("clip", clip, (1,))
        if param_bf16 is not None:
            if param.dtype != np.float32:
                raise ValueError(
                    f"param_bf16 is accepted with float32 parameters only; param is {param.dtype}"
                )
            self._output("param_bf16", param_bf16, np.dtype(np.uint16), tuple(param.shape))
            self.check_precision("bf16")  # the conversion is sm_80's cvt.rn.bf16x2 (a trap below)
        return (
            param if param_bf16 is None else param_bf16,
            scalars if clip is None else clip,
            _FLAG_ON if clip is not None else _FLAG_OFF,
            _FLAG_ON if param_bf16 is not None else _FLAG_OFF,
        )

    def sgd_update(
        self,
        param,
        grad,
        momentum_buf,
        scalars,
        *,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        clip=None,
        param_bf16=None,
        advance=True,
    ):
        """torch.optim.SGD, one launch over the flat buffers: step t = scalars[STEP_T] + 1 and
        lr read from ``scalars``, the step counted there by the launch's last block when
        ``advance``; with ``clip`` (clip_coefficient's c) g ← g·c first where c < 1, written
        back; with ``param_bf16`` also bf16(θ) there (train_step.cu: sgd_update)."""
        param = self._updated_buffer("param", param, None, None)
        grad = self._update_grad(param, grad, clip)
        self._step_scalars(scalars)
        if momentum != 0:
            if momentum_buf is None:
                raise ValueError(f"momentum_buf=None is not accepted with momentum={momentum}")
            self._updated_buffer("momentum_buf", momentum_buf, param.dtype, tuple(param.shape))
        bf16_out, clip_in, use_clip, write_bf16 = self._update_extras(
            param, scalars, clip, param_bf16
        )
        if param.size == 0 and not advance:
            return  # nothing to update and no step to count (an empty buffer still counts)
        grid, block = self._grid_stride(param.size)
        size, *hyper = self._c_scalars(
            _SGD_SCALARS,
            (param.size, momentum, dampening, bool(nesterov), weight_decay, momentum != 0),
        )
        args = (
            param,
            grad,
            momentum_buf if momentum != 0 else param,
            bf16_out,
            size,
            scalars,
            clip_in,
            *hyper,
            use_clip,
            write_bf16,
            _FLAG_ON if advance else _FLAG_OFF,
        )
        self._launch(self._module("train_step.cu", param.dtype), "sgd_update", grid, block, args)

    def adam_update(
        self,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        scalars,
        *,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        clip=None,
        param_bf16=None,
        advance=True,
    ):
        """torch.optim.Adam / AdamW, one launch over the flat buffers: step t and lr read from
        ``scalars``, the bias corrections of step t computed in the launch; ``clip``,
        ``param_bf16`` and ``advance`` as in sgd_update (train_step.cu: adam_update)."""
        param = self._updated_buffer("param", param, None, None)
        shape = tuple(param.shape)
        grad = self._update_grad(param, grad, clip)
        self._updated_buffer("exp_avg", exp_avg, param.dtype, shape)
        self._updated_buffer("exp_avg_sq", exp_avg_sq, param.dtype, shape)
        self._step_scalars(scalars)
        bf16_out, clip_in, use_clip, write_bf16 = self._update_extras(
            param, scalars, clip, param_bf16
        )
        if param.size == 0 and not advance:
            return  # nothing to update and no step to count (an empty buffer still counts)
        grid, block = self._grid_stride(param.size)
        size, *hyper = self._c_scalars(
            _ADAM_SCALARS, (param.size, beta1, beta2, eps, weight_decay, bool(decoupled))
        )
        args = (
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            bf16_out,
            size,
            scalars,
            clip_in,
            *hyper,
            use_clip,
            write_bf16,
            _FLAG_ON if advance else _FLAG_OFF,
        )
        self._launch(self._module("train_step.cu", param.dtype), "adam_update", grid, block, args)

    def clip_coefficient(self, grads, max_norm):
        """Σ g² per block of every gradient (reduce.cu: sum_squares_partial, into one partials
        buffer), then ‖g‖ and c = max_norm / (‖g‖ + 1e−6) in one block (train_step.cu:
        clip_coefficient).  Returns (‖g‖ as a 0-d array of the gradients' dtype, c as a
        float64 array of shape (1,)), both on the device: no host synchronisation."""
        if not grads:
            raise ValueError("grads=[] is not accepted; expected at least one gradient array")
        dtype = None
        checked = []
        for i, g in enumerate(grads):
            g = self._updated_buffer(f"grads[{i}]", g, dtype, None)
            dtype = g.dtype
            checked.append(g)
        counts = [_reduce_blocks(g.size) for g in checked]
        partials = self.empty((sum(counts),), dtype)
        norm = self.empty((1,), dtype)
        coefficient = self.empty((1,), np.dtype(np.float64))
        reduce = self._module("reduce.cu", dtype)
        threads = (_REDUCE_THREADS, 1, 1)
        offset = 0
        for g, count in zip(checked, counts):
            part = partials[offset : offset + count]
            args = (g.reshape(-1), np.int64(g.size), part)
            self._launch(reduce, "sum_squares_partial", (count, 1, 1), threads, args)
            offset += count
        args = (partials, np.int32(offset), np.float64(max_norm), norm, coefficient)
        step = self._module("train_step.cu", dtype)
        self._launch(step, "clip_coefficient", (1, 1, 1), threads, args)
        return norm.reshape(()), coefficient

    def clip_grad_norm_(self, grads, max_norm):
        """clip_coefficient, then g ← c·g where c < 1 (train_step.cu: clip_scale), c read from
        device memory: no host synchronisation.  Returns ‖g‖ (0-d)."""
        norm, coefficient = self.clip_coefficient(grads, max_norm)
        step = self._module("train_step.cu", norm.dtype)
        for g in grads:
            if g.size:
                grid, block = self._grid_stride(g.size)
                args = (g.reshape(-1), np.int64(g.size), coefficient)
                self._launch(step, "clip_scale", grid, block, args)
        return norm
