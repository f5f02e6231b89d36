"""The rows.  A Case builds, on the same inputs, our implementation, its baselines (cuBLAS via
cupy.matmul, PyTorch eager, torch.compile) and a check against the NumPy float64 reference
that runs before anything is timed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ops import OPS
from .config import LEAKY_ALPHA, BenchConfig, Sizes
from .timing import CpuTimer, CupyEventTimer, Impl, ThreadTimeTimer, TorchCudaTimer


def max_rel_error(outputs: Sequence[Any], references: Sequence[np.ndarray]) -> float:
    """max over tensors of max|out − ref| / max|ref| (normwise, so that entries near zero do
    not dominate); NaN or Inf in an output gives inf."""
    worst = 0.0
    for out, ref in zip(outputs, references, strict=True):
        out = np.asarray(out, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if out.shape != ref.shape:
            return math.inf
        if out.size == 0:
            continue
        if not np.all(np.isfinite(out)):
            return math.inf
        scale = float(np.max(np.abs(ref)))
        diff = float(np.max(np.abs(out - ref)))
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


@dataclass
class Part:
    """A piece of work with its FLOP count and bytes moved (a training step has many)."""

    flops: float
    bytes: float


@dataclass
class Prepared:
    """What a case builds on one backend.

    run: one call of our op (rotating through its input copies).
    check: runs our op once on fresh inputs and returns (outputs, float64 references).
    baselines: name -> (callable, timer) for the same work in another implementation.
    skipped: name -> why a baseline is absent.
    copies: how many input copies ``run`` rotates through.
    launches: kernel launches one ``run`` makes (the host rows, which record them)."""

    run: Callable[[], Any]
    check: Callable[[], tuple[list[Any], list[np.ndarray]]]
    baselines: dict[str, Impl] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copies: int = 1
    launches: int | None = None


@dataclass
class Case:
    """One row: ``name`` (train steps contain "train_step"), its shape, the work (parts), its
    working set in bytes (to decide input rotation), and a builder."""

    name: str
    shape: dict[str, Any]
    parts: list[Part]
    working_set: float
    memory_bound: bool
    build: Callable[[Context, int], Prepared]  # (context, copies) -> Prepared

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)


class Context:
    """Everything a case builder needs for one backend: the backend, its dtype, the float64
    reference backend, and the baseline frameworks that are usable on its device."""

    def __init__(self, backend: Any, dtype: np.dtype, config: BenchConfig, device_class: str):
        from ..backends.numpy_backend import NumpyBackend

        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.config = config
        self.device_class = device_class  # "gpu" or "cpu" (emu runs on the CPU)
        self.reference = NumpyBackend()
        self.rng = np.random.default_rng(config.seed)
        self.timer = self._our_timer()
        self.torch, self.torch_device, self.torch_reason = self._torch()
        self.torch_timer = None
        if self.torch is not None:
            self.torch_timer = (
                TorchCudaTimer(self.torch) if self.torch_device == "cuda" else CpuTimer()
            )
        self.cupy = getattr(backend, "xp", None) if backend.name == "cupy" else None

    def _our_timer(self):
        if self.backend.name == "cupy":
            return CupyEventTimer(self.backend.xp)
        if self.backend.name == "host":
            return ThreadTimeTimer()
        return CpuTimer(self.backend.synchronize)

    def _torch(self) -> tuple[Any, str | None, str]:
        if not self.config.torch:
            return None, None, "torch baselines turned off (--no-torch)"
        try:
            import torch
        except Exception as error:
            return None, None, f"torch is not importable ({type(error).__name__})"
        if self.device_class == "gpu":
            if not torch.cuda.is_available():
                return None, None, "torch.cuda.is_available() is False"
            # Full float32 on both sides: no TF32 in cuBLAS through torch either.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            return torch, "cuda", ""
        return torch, "cpu", ""

    def torch_compile_enabled(self, what: str) -> bool:
        """torch.compile per row kind: 'auto' compiles training steps everywhere except the CPU
        in --quick (an inductor C++ build per shape costs tens of seconds on few cores), and
        elementwise ops only on a GPU without --quick."""
        mode = self.config.torch_compile
        if self.torch is None or mode == "off":
            return False
        if mode == "on":
            return True
        if what == "train":
            return not (self.device_class == "cpu" and self.config.quick)
        return self.device_class == "gpu" and not self.config.quick

    def torch_compile_skip_reason(self, what: str) -> str:
        """Why torch_compile_enabled(what) is False, for the row's ``skipped``."""
        if self.torch is None:
            return self.torch_reason
        if self.config.torch_compile == "off":
            return "--torch-compile off"
        if what == "train":
            return "--torch-compile auto: not on the CPU with --quick (an inductor build per shape)"
        return "--torch-compile auto: elementwise ops only on a GPU without --quick"

    def add_torch_compile(self, prepared: Prepared, what: str, build: Callable[[], Any]) -> None:
        """The torch.compile baseline ``build()`` (a zero-argument callable to time) when
        torch.compile is on for ``what``; otherwise, or when building fails, the reason."""
        if not self.torch_compile_enabled(what):
            prepared.skipped["torch_compile"] = self.torch_compile_skip_reason(what)
            return
        try:
            prepared.baselines["torch_compile"] = self.torch_impl(build())
        except Exception as error:
            prepared.skipped["torch_compile"] = f"{type(error).__name__}: {error}"[:300]

    # -- arrays ------------------------------------------------------------------------------
    def host(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """Random host data rounded to the benchmark dtype, returned in float64 (so that the
        reference sees exactly the values our op sees)."""
        values = self.rng.standard_normal(shape) * scale
        return values.astype(self.dtype).astype(np.float64)

    def ours(self, host: np.ndarray, dtype: Any = None) -> Any:
        return self.backend.asarray(host, dtype or self.dtype)

    def torch_tensor(self, host: np.ndarray, dtype: Any = None) -> Any:
        torch = self.torch
        np_dtype = np.dtype(dtype or self.dtype)
        tensor = torch.from_numpy(np.ascontiguousarray(host.astype(np_dtype)))
        return tensor.to(self.torch_device) if self.torch_device != "cpu" else tensor.clone()

    def torch_impl(self, fn: Callable[[], Any]) -> Impl:
        return Impl(fn, self.torch_timer)


def cycle(items: list[Any]) -> Callable[[], Any]:
    """A callable returning the next item of ``items`` each call (input rotation)."""
    return itertools.cycle(items).__next__


# The op table's variant of dense_backward each GEMM layout times (no bias, identity).
_GEMM_LAYOUTS = {
    "forward": ("dense_forward", {"activation": "identity", "bias": False}),
    "dW": ("dense_backward", {"activation": "identity", "bias": False, "need_dinp": False}),
    "dX+dW": ("dense_backward", {"activation": "identity", "bias": False, "need_dinp": True}),
}


def _gemm_parts(m: int, n: int, k: int, itemsize: int, layout: str) -> list[Part]:
    """The op table's cost of the layout, one Part per GEMM (dX+dW is two)."""
    op, variant = _GEMM_LAYOUTS[layout]
    gemms = 2 if variant.get("need_dinp") else 1
    flops, moved = OPS[op].cost((m, k, n), itemsize, variant)
    return [Part(flops / gemms, moved / gemms) for _ in range(gemms)]


def _table_check(backend: Any, op: str, variant: dict, inputs: dict[str, np.ndarray], ours: Any):
    """(our outputs, the op table's float64 references) of ``op`` on ``inputs`` (host float64
    arrays, rounded to the benchmark dtype), ``ours`` putting each on the backend."""
    entry = OPS[op]
    outputs = entry.run(backend, variant, **{k: ours(v) for k, v in inputs.items()})
    references = entry.reference(variant, inputs)
    names = list(references)
    return [backend.to_numpy(outputs[k]) for k in names], [references[k] for k in names]


def gemm_case(
    m: int, n: int, k: int, layout: str, itemsize: int, gemm_version: str | None = None
) -> Case:
    """One dense-layer GEMM layout at batch m, out_features n, in_features k."""
    parts = _gemm_parts(m, n, k, itemsize, layout)
    working = sum(p.bytes for p in parts)
    suffix = f"@{gemm_version}" if gemm_version else ""
    name = f"gemm.{layout}{suffix}"

    def build(ctx: Context, copies: int) -> Prepared:
        backend = ctx.backend
        if gemm_version is not None:
            backend = ctx.backend.with_gemm_version(gemm_version)
        x_h, w_h, dz_h = ctx.host((m, k)), ctx.host((n, k)), ctx.host((m, n))
        sets = []
        for _ in range(copies):
            x, w, dz = ctx.ours(x_h), ctx.ours(w_h), ctx.ours(dz_h)
            sets.append((x, w, dz, backend.empty((n, k), ctx.dtype)))
        take = cycle(sets)

        if layout == "forward":

            def run():
                x, w, _, _ = take()
                return backend.dense_forward(x, w, None, "identity")[0]
        else:
            need_dinp = layout == "dX+dW"

            def run():
                x, w, dz, dw = take()
                return backend.dense_backward(dz, x, w, None, "identity", 0.0, dw, None, need_dinp)

        def check():
            op, variant = _GEMM_LAYOUTS[layout]
            if op == "dense_forward":
                inputs = {"x": x_h, "weight": w_h}
            else:
                inputs = {"dout": dz_h, "x": x_h, "weight": w_h}
            return _table_check(backend, op, variant, inputs, ctx.ours)

        prepared = Prepared(run, check, copies=copies)
        if ctx.cupy is not None:
            cp = ctx.cupy
            cublas = {"forward": _cublas_forward, "dW": _cublas_dw, "dX+dW": _cublas_dx_dw}[layout]
            prepared.baselines["cublas"] = Impl(lambda: cublas(cp, take), ctx.timer)
        if ctx.torch is not None:
            torch = ctx.torch
            tsets = [
                (ctx.torch_tensor(x_h), ctx.torch_tensor(w_h), ctx.torch_tensor(dz_h))
                for _ in range(copies)
            ]
            ttake = cycle(tsets)
            linear = torch.nn.functional.linear
            if layout == "forward":

                def torch_run():
                    x, w, _ = ttake()
                    return linear(x, w)  # x Wᵀ, as nn.Linear without bias
            elif layout == "dW":

                def torch_run():
                    x, _, dz = ttake()
                    return torch.matmul(dz.t(), x)
            else:

                def torch_run():
                    x, w, dz = ttake()
                    return torch.matmul(dz.t(), x), torch.matmul(dz, w)

            prepared.baselines["torch"] = ctx.torch_impl(torch_run)
        else:
            prepared.skipped["torch"] = ctx.torch_reason
        return prepared

    return Case(name, {"M": m, "N": n, "K": k}, parts, working, False, build)


def mma_gemm_case(m: int, n: int, k: int, layout: str, precision: str) -> Case:
    """One dense-layer GEMM layout on the tensor cores (gemm_mma.cu) in ``precision`` ("bf16":
    bf16 operands, "tf32": fp32 operands rounded to tf32; fp32 accumulation), against cuBLAS at
    the same precision: cupy.matmul with the TF32 compute type for tf32 and PyTorch for both
    (bf16 tensors; allow_tf32 for tf32).  Checked against float64 products of the operands
    rounded as the precision rounds them, so only fp32 summation errors remain."""
    from ..precision import round_operand

    operand_bytes = 2 if precision == "bf16" else 4
    parts = _gemm_parts(m, n, k, operand_bytes, layout)
    name = f"gemm.{layout}.{precision}"

    def build(ctx: Context, copies: int) -> Prepared:
        backend = ctx.backend
        if precision not in backend.precisions() or not hasattr(backend, "to_bf16"):
            raise ValueError(f"{backend.name} does not run tensor-core GEMMs in {precision}")
        x_h, w_h, dz_h = ctx.host((m, k)), ctx.host((n, k)), ctx.host((m, n))
        rx, rw, rdz = (
            round_operand(a.astype(np.float32), precision).astype(np.float64)
            for a in (x_h, w_h, dz_h)
        )

        def bf16_copies(x, w) -> dict:
            """The bf16 operands a bf16 model keeps (x from the layer before, W from the
            optimizer), made once, not timed: the row times the GEMMs as a training step
            runs them.  ∂L/∂y stays fp32 (the dW kernel forms and rounds δ itself)."""
            if precision != "bf16":
                return {}
            return {"x_bf16": backend.to_bf16(x), "weight_bf16": backend.to_bf16(w)}

        sets = []
        for _ in range(copies):
            x, w, dz = ctx.ours(x_h), ctx.ours(w_h), ctx.ours(dz_h)
            sets.append((x, w, dz, backend.empty((n, k), np.float32), bf16_copies(x, w)))
        take = cycle(sets)
        need_dinp = layout == "dX+dW"

        def run():
            x, w, dz, dw, copies16 = take()
            if layout == "forward":
                return backend.dense_forward(
                    x, w, None, "identity", precision=precision, **copies16
                )[0]
            return backend.dense_backward(
                dz, x, w, None, "identity", 0.0, dw, None, need_dinp, precision, **copies16
            )

        def check():
            x, w, dz = ctx.ours(x_h), ctx.ours(w_h), ctx.ours(dz_h)
            copies16 = bf16_copies(x, w)
            if layout == "forward":
                out = backend.dense_forward(
                    x, w, None, "identity", precision=precision, **copies16
                )[0]
                return [backend.to_numpy(out)], [rx @ rw.T]
            dw = backend.empty((n, k), np.float32)
            dx = backend.dense_backward(
                dz, x, w, None, "identity", 0.0, dw, None, need_dinp, precision, **copies16
            )
            outs, refs = [backend.to_numpy(dw)], [rdz.T @ rx]
            if need_dinp:
                outs.append(backend.to_numpy(dx))
                refs.append(rdz @ rw)
            return outs, refs

        prepared = Prepared(run, check, copies=copies)
        if ctx.cupy is not None and precision == "tf32":
            cp = ctx.cupy
            cublas = {"forward": _cublas_forward, "dW": _cublas_dw, "dX+dW": _cublas_dx_dw}[layout]
            prepared.baselines["cublas"] = Impl(
                lambda: _with_cupy_tf32(cp, cublas, take), ctx.timer
            )
        else:
            prepared.skipped["cublas"] = (
                "CuPy has no bf16 matmul: cuBLAS bf16 is the torch row"
                if precision == "bf16"
                else "no CuPy device"
            )
        if ctx.torch is not None:
            torch = ctx.torch
            tdtype = torch.bfloat16 if precision == "bf16" else torch.float32
            tsets = [
                tuple(ctx.torch_tensor(a).to(tdtype) for a in (x_h, w_h, dz_h))
                for _ in range(copies)
            ]
            ttake = cycle(tsets)

            def torch_run():
                x, w, dz = ttake()
                previous = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                try:
                    if layout == "forward":
                        return torch.nn.functional.linear(x, w)
                    if layout == "dW":
                        return torch.matmul(dz.t(), x)
                    return torch.matmul(dz.t(), x), torch.matmul(dz, w)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = previous

            prepared.baselines["torch"] = ctx.torch_impl(torch_run)
        else:
            prepared.skipped["torch"] = ctx.torch_reason
        return prepared

    working = sum(p.bytes for p in parts)
    return Case(name, {"M": m, "N": n, "K": k}, parts, working, False, build)


def _with_cupy_tf32(cp: Any, cublas: Callable, take: Callable[[], Any]) -> Any:
    """cublas(cp, take) with cupy.matmul's float32 compute type set to TF32 for the call."""
    from cupy._core import _routines_linalg as linalg

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        return cublas(cp, take)
    finally:
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_DEFAULT)


def _cublas_forward(cp: Any, take: Callable[[], Any]) -> Any:
    x, w, _, _ = take()
    return cp.matmul(x, w.T)


def _cublas_dw(cp: Any, take: Callable[[], Any]) -> Any:
    x, _, dz, _ = take()
    return cp.matmul(dz.T, x)


def _cublas_dx_dw(cp: Any, take: Callable[[], Any]) -> Any:
    x, w, dz, _ = take()
    return cp.matmul(dz.T, x), cp.matmul(dz, w)


def _torch_activation(torch: Any, name: str, alpha: float):
    """(forward, backward) in PyTorch eager: the functional op and the aten backward kernel
    autograd would call, taking the same saved tensor as ours (y or z)."""
    F = torch.nn.functional
    aten = torch.ops.aten
    table = {
        "relu": (torch.relu, lambda d, s: aten.threshold_backward(d, s, 0)),
        "leaky_relu": (
            lambda x: F.leaky_relu(x, alpha),
            lambda d, s: aten.leaky_relu_backward(d, s, alpha, False),
        ),
        "sigmoid": (torch.sigmoid, aten.sigmoid_backward),
        "tanh": (torch.tanh, aten.tanh_backward),
        "gelu": (F.gelu, lambda d, s: aten.gelu_backward(d, s, approximate="none")),
        "gelu_tanh": (
            lambda x: F.gelu(x, approximate="tanh"),
            lambda d, s: aten.gelu_backward(d, s, approximate="tanh"),
        ),
        "silu": (F.silu, aten.silu_backward),
    }
    return table[name]


def activation_case(name: str, rows: int, cols: int, direction: str, itemsize: int) -> Case:
    """y = f(x) (reads x, writes y) or dinp = dout ⊙ f'(saved) (reads dout and saved)."""
    _, moved = OPS[f"activation_{direction}"].cost((rows, cols), itemsize, {"activation": name})
    alpha = LEAKY_ALPHA

    def build(ctx: Context, copies: int) -> Prepared:
        backend, ref = ctx.backend, ctx.reference
        x_h, d_h = ctx.host((rows, cols), 2.0), ctx.host((rows, cols))
        saved_h = ref.activation_forward(x_h, name, alpha)[1]
        sets = []
        for _ in range(copies):
            x, dout = ctx.ours(x_h), ctx.ours(d_h)
            sets.append((x, dout, backend.activation_forward(x, name, alpha)[1]))
        take = cycle(sets)
        if direction == "forward":

            def run():
                return backend.activation_forward(take()[0], name, alpha)[0]
        else:

            def run():
                _, dout, saved = take()
                return backend.activation_backward(dout, saved, name, alpha)

        def check():
            variant = {"activation": name, "alpha": alpha}
            if direction == "forward":
                return _table_check(backend, "activation_forward", variant, {"x": x_h}, ctx.ours)
            # saved as our forward computed it (the same values to the dtype's rounding)
            saved = backend.to_numpy(backend.activation_forward(ctx.ours(x_h), name, alpha)[1])
            inputs = {"dout": d_h, "saved": np.asarray(saved, np.float64)}
            return _table_check(backend, "activation_backward", variant, inputs, ctx.ours)

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch
        forward, backward = _torch_activation(torch, name, alpha)
        with torch.no_grad():
            tsets = []
            for _ in range(copies):
                x = ctx.torch_tensor(x_h)
                tsets.append((x, ctx.torch_tensor(d_h), ctx.torch_tensor(saved_h)))
        ttake = cycle(tsets)
        fn = forward if direction == "forward" else backward

        def call(f):
            def run_torch():
                x, dout, saved = ttake()
                return f(x) if direction == "forward" else f(dout, saved)

            return run_torch

        prepared.baselines["torch"] = ctx.torch_impl(call(fn))
        ctx.add_torch_compile(prepared, "elementwise", lambda: call(torch.compile(fn)))
        return prepared

    label = f"{name}.{direction}"
    return Case(label, {"rows": rows, "cols": cols}, [Part(0.0, moved)], moved, True, build)


def standardize_case(rows: int, cols: int, direction: str, itemsize: int) -> Case:
    """gb.Standardize: y = (x − mean)/std (reads x, writes y) or dinp = dout/std (reads dout,
    writes dinp); the per-feature vectors are negligible beside the matrix."""
    moved = itemsize * rows * cols * 2

    def build(ctx: Context, copies: int) -> Prepared:
        backend, ref = ctx.backend, ctx.reference
        x_h, d_h = ctx.host((rows, cols), 3.0), ctx.host((rows, cols))
        mean_h = ctx.host((cols,))
        std_h = np.exp(ctx.host((cols,), 0.5))
        mean, std = ctx.ours(mean_h), ctx.ours(std_h)
        take = cycle([ctx.ours(x_h if direction == "forward" else d_h) for _ in range(copies)])
        if direction == "forward":

            def run():
                return backend.standardize_forward(take(), mean, std)

            def reference():
                return ref.standardize_forward(x_h, mean_h, std_h)
        else:

            def run():
                return backend.standardize_backward(take(), std)

            def reference():
                return ref.standardize_backward(d_h, std_h)

        def check():
            return [backend.to_numpy(run())], [reference()]

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        with ctx.torch.no_grad():
            tmean, tstd = ctx.torch_tensor(mean_h), ctx.torch_tensor(std_h)
            ttake = cycle(
                [ctx.torch_tensor(x_h if direction == "forward" else d_h) for _ in range(copies)]
            )

        def torch_forward(x):
            return (x - tmean) / tstd

        def torch_backward(dout):
            return dout / tstd

        fn = torch_forward if direction == "forward" else torch_backward

        def call(f):
            return lambda: f(ttake())

        prepared.baselines["torch"] = ctx.torch_impl(call(fn))
        ctx.add_torch_compile(prepared, "elementwise", lambda: call(ctx.torch.compile(fn)))
        return prepared

    label = f"standardize.{direction}"
    return Case(label, {"rows": rows, "cols": cols}, [Part(0.0, moved)], moved, True, build)


def loss_case(rows: int, classes: int, itemsize: int) -> Case:
    """Softmax cross-entropy with integer labels: the loss and ∂L/∂logits in one call."""
    _, moved = OPS["softmax_cross_entropy"].cost((rows, classes), itemsize, {"target": "labels"})

    def build(ctx: Context, copies: int) -> Prepared:
        backend = ctx.backend
        z_h = ctx.host((rows, classes), 3.0)
        labels_h = ctx.rng.integers(0, classes, rows)
        sets = [(ctx.ours(z_h), backend.asarray(labels_h, np.int64)) for _ in range(copies)]
        take = cycle(sets)

        def run():
            z, labels = take()
            return backend.softmax_cross_entropy(z, labels)

        def check():
            def ours(a):
                return backend.asarray(a, np.int64) if a.dtype.kind in "iu" else ctx.ours(a)

            inputs = {"logits": z_h, "target": labels_h}
            variant = {"target": "labels"}
            return _table_check(backend, "softmax_cross_entropy", variant, inputs, ours)

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch
        F = torch.nn.functional
        tsets = [
            (ctx.torch_tensor(z_h), ctx.torch_tensor(labels_h.astype(np.int64), np.int64))
            for _ in range(copies)
        ]
        ttake = cycle(tsets)

        def torch_eager():
            z, labels = ttake()
            z = z.detach().requires_grad_(True)
            loss = F.cross_entropy(z, labels)
            (grad,) = torch.autograd.grad(loss, z)
            return loss, grad

        prepared.baselines["torch"] = ctx.torch_impl(torch_eager)

        def value_and_grad(z, labels):
            # L = mean(lse(z) − z_y);  ∂L/∂z = (softmax(z) − onehot(y)) / N
            lse = torch.logsumexp(z, dim=1)
            loss = (lse - z.gather(1, labels[:, None])[:, 0]).mean()
            onehot = F.one_hot(labels, z.shape[1]).to(z.dtype)
            return loss, (torch.softmax(z, dim=1) - onehot) / z.shape[0]

        def compiled_value_and_grad():
            compiled = torch.compile(value_and_grad)
            return lambda: compiled(*ttake())

        ctx.add_torch_compile(prepared, "elementwise", compiled_value_and_grad)
        return prepared

    return Case(
        "softmax_cross_entropy",
        {"rows": rows, "classes": classes},
        [Part(0.0, moved)],
        moved,
        True,
        build,
    )


SGD_HYPER = {"lr": 1e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}


ADAM_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}


ADAM_STEP = 10  # a step past the first, so that the bias corrections are not trivial

# The op table's entry and variant each optimizer row times.
_OPTIMIZER_VARIANTS = {
    "sgd_momentum": ("sgd_step", {"hyper": SGD_HYPER, "first_step": False}),
    "adam": ("adam_step", {"hyper": {**ADAM_HYPER, "step": ADAM_STEP}}),
}


def optimizer_case(kind: str, n: int, itemsize: int) -> Case:
    """One update of a flat buffer of n parameters: SGD with momentum reads θ, g, b and writes
    θ, b; Adam reads θ, g, m, v and writes θ, m, v."""
    buffers = 1 if kind == "sgd_momentum" else 2
    op, variant = _OPTIMIZER_VARIANTS[kind]
    _, moved = OPS[op].cost((n,), itemsize, variant)

    def build(ctx: Context, copies: int) -> Prepared:
        backend = ctx.backend
        p_h, g_h = ctx.host((n,)), ctx.host((n,), 0.1)
        m_h = ctx.host((n,), 0.1)
        v_h = np.abs(ctx.host((n,), 0.01)).astype(ctx.dtype).astype(np.float64)

        def state(put):
            return [put(p_h), put(g_h), put(m_h)] + ([put(v_h)] if buffers == 2 else [])

        def step(bk, arrays):
            if kind == "sgd_momentum":
                p, g, b = arrays
                bk.sgd_step(p, g, b, **SGD_HYPER, first_step=False)
            else:
                p, g, m, v = arrays
                bk.adam_step(p, g, m, v, **ADAM_HYPER, step=ADAM_STEP, decoupled=False)

        take = cycle([state(ctx.ours) for _ in range(copies)])

        def run():
            return step(backend, take())

        def check():
            inputs = {"param": p_h, "grad": g_h}
            if kind == "sgd_momentum":
                inputs["buf"] = m_h
            else:
                inputs.update(m=m_h, v=v_h)
            return _table_check(backend, op, variant, inputs, ctx.ours)

        prepared = Prepared(run, check, copies=copies)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch

        def torch_optimizers(**extra):
            opts = []
            for _ in range(copies):
                param = torch.nn.Parameter(ctx.torch_tensor(p_h))
                param.grad = ctx.torch_tensor(g_h)
                if kind == "sgd_momentum":
                    opt = torch.optim.SGD(
                        [param], lr=SGD_HYPER["lr"], momentum=SGD_HYPER["momentum"], **extra
                    )
                else:
                    opt = torch.optim.Adam(
                        [param],
                        lr=ADAM_HYPER["lr"],
                        betas=(ADAM_HYPER["beta1"], ADAM_HYPER["beta2"]),
                        eps=ADAM_HYPER["eps"],
                        **extra,
                    )
                opt.step()  # creates the state buffers outside the timed region
                opts.append(opt)
            return cycle(opts)

        next_opt = torch_optimizers()
        prepared.baselines["torch"] = ctx.torch_impl(lambda: next_opt().step())
        try:
            next_fused = torch_optimizers(fused=True)
            prepared.baselines["torch_fused"] = ctx.torch_impl(lambda: next_fused().step())
        except Exception as error:  # fused needs a recent torch (and, on old ones, CUDA)
            prepared.skipped["torch_fused"] = f"{type(error).__name__}: {error}"[:300]
        return prepared

    return Case(f"{kind}.step", {"n": n}, [Part(0.0, moved)], moved, True, build)


def train_parts(sizes: Sequence[int], batch: int, itemsize: int) -> list[Part]:
    """Work of one step, layer by layer: forward GEMM with its epilogue (read x, W; write y),
    backward dW (read δ, x; write dW) and dX (read δ, W; write dX; the first layer has none),
    the activation derivative (read dout, y; write δ), the loss (read logits; write the
    gradient), and the SGD-with-momentum update (read θ, g, b; write θ, b)."""
    parts: list[Part] = []
    params = 0
    layers = list(itertools.pairwise(sizes))
    for i, (fan_in, fan_out) in enumerate(layers):
        gemm = 2.0 * batch * fan_in * fan_out
        weights = fan_in * fan_out + fan_out
        params += weights
        parts.append(Part(gemm, itemsize * (batch * fan_in + weights + batch * fan_out)))
        parts.append(Part(gemm, itemsize * (batch * fan_out + batch * fan_in + weights)))
        if i > 0:
            parts.append(Part(gemm, itemsize * (batch * fan_out + weights + batch * fan_in)))
        if i < len(layers) - 1:
            parts.append(Part(0.0, itemsize * 3 * batch * fan_out))
    parts.append(Part(0.0, itemsize * 2 * batch * sizes[-1] + 8 * batch))
    parts.append(Part(0.0, itemsize * 5 * params))
    return parts


def build_mlp(sizes: Sequence[int]):
    """Dense + ReLU for every hidden layer, a Dense to the logits."""
    from .. import Dense, ReLU, Sequential

    layers: list[Any] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(Dense(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    return Sequential(*layers)


def train_case(
    sizes: Sequence[int],
    batch: int,
    itemsize: int,
    precision: str = "fp32",
    graph: bool = False,
) -> Case:
    """One training step through the public API: forward, softmax cross-entropy, backward
    (no input gradient), SGD with momentum 0.9.  With ``precision`` "bf16" or "tf32" the model's
    GEMMs run on the tensor cores (fp32 master weights), checked against the NumPy model of that
    precision in float32, and PyTorch runs the same step under bf16 autocast (or with TF32
    matmuls allowed).  With ``graph``, the same step through gb.compile_step (one CUDA graph
    launch per step on a GPU)."""
    parts = train_parts(sizes, batch, itemsize)
    label = "-".join(str(s) for s in sizes)
    suffix = ("" if precision == "fp32" else f".{precision}") + (".graph" if graph else "")

    def build(ctx: Context, copies: int) -> Prepared:
        from .. import SGD, SoftmaxCrossEntropyLoss
        from ..random import seed

        seed(ctx.config.seed)
        x_h = ctx.host((batch, sizes[0]))
        labels_h = ctx.rng.integers(0, sizes[-1], batch)

        def make(backend, dtype):
            seed(ctx.config.seed)
            model = build_mlp(sizes).to(backend, dtype=dtype, precision=precision)
            loss = SoftmaxCrossEntropyLoss().to(backend)
            opt = SGD(model.parameters(), lr=1e-3, momentum=0.9)
            return model, loss, opt

        model, loss, opt = make(ctx.backend, ctx.dtype)
        x = ctx.ours(x_h)
        labels = ctx.backend.asarray(labels_h, np.int64)
        steps: dict[int, Any] = {}

        def one_step(model, loss, opt, x, labels):
            if graph:
                from .. import compile_step

                if id(model) not in steps:
                    steps[id(model)] = compile_step(model, loss, opt)
                return steps[id(model)](x, labels)
            pred = model.forward(x)
            value = loss.forward(pred, labels)
            model.backward(loss.backward(), need_input_grad=False)
            opt.step()
            return value

        def run():
            return one_step(model, loss, opt, x, labels)

        def check():
            fresh = make(ctx.backend, ctx.dtype)
            # fp32: float64 reference; bf16/tf32: the NumPy model of the precision (float32)
            reference = make(ctx.reference, np.float64 if precision == "fp32" else np.float32)
            reference[0].load_state_dict(fresh[0].state_dict())
            value = one_step(*fresh, x, labels)
            ref_value = one_step(*reference, x_h, labels_h)
            outs = [
                ctx.backend.to_numpy(value),
                ctx.backend.to_numpy(fresh[0].store.grad),
                ctx.backend.to_numpy(fresh[0].store.data),
            ]
            refs = [np.asarray(ref_value), reference[0].store.grad, reference[0].store.data]
            return outs, refs

        prepared = Prepared(run, check, copies=1)
        if ctx.torch is None:
            prepared.skipped["torch"] = ctx.torch_reason
            return prepared
        torch = ctx.torch
        state = {
            k: torch.from_numpy(np.array(v, dtype=ctx.dtype)) for k, v in model.state_dict().items()
        }
        tx = ctx.torch_tensor(x_h)
        tlabels = ctx.torch_tensor(labels_h.astype(np.int64), np.int64)

        def torch_model():
            layers: list[Any] = []
            for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
                layers.append(torch.nn.Linear(fan_in, fan_out))
                if i < len(sizes) - 2:
                    layers.append(torch.nn.ReLU())
            net = torch.nn.Sequential(*layers).to(dtype=getattr(torch, ctx.dtype.name))
            net.load_state_dict(state)  # the same indices: "0.weight", "2.weight", ...
            net = net.to(ctx.torch_device)
            return net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def torch_step(net, opt):
            def step():
                opt.zero_grad(set_to_none=True)
                value = torch.nn.functional.cross_entropy(net(tx), tlabels)
                value.backward()
                opt.step()
                return value

            if precision == "fp32":
                return step
            device = "cuda" if ctx.torch_device == "cuda" else "cpu"

            def mixed_step():  # what a PyTorch user writes for the same precision
                previous = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                try:
                    if precision == "bf16":
                        with torch.autocast(device_type=device, dtype=torch.bfloat16):
                            return step()
                    return step()
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = previous

            return mixed_step

        prepared.baselines["torch"] = ctx.torch_impl(torch_step(*torch_model()))

        def compiled_step():
            net, topt = torch_model()
            return torch_step(torch.compile(net), topt)

        ctx.add_torch_compile(prepared, "train", compiled_step)
        return prepared

    shape = {"layers": list(sizes), "batch": batch}
    return Case(f"train_step.mlp_{label}{suffix}", shape, parts, 0.0, False, build)


def table_case(op: str, variant: dict, shape: tuple[int, ...], itemsize: int) -> Case:
    """A row built from the op table alone: ``op`` run on random inputs of ``shape`` (rotated
    through copies), checked against its reference, its floor from its cost model.  What a new
    op gets in the benchmark with no code here."""
    entry = OPS[op]
    flops, moved = entry.cost(shape, itemsize, variant)
    name = f"{entry.case_name(variant)}." + "x".join(map(str, shape))

    def build(ctx: Context, copies: int) -> Prepared:
        backend = ctx.backend
        inputs = {
            k: v if v.dtype.kind in "iu" else v.astype(ctx.dtype).astype(np.float64)
            for k, v in entry.inputs(ctx.rng, shape, variant).items()
        }

        def ours(a: np.ndarray) -> Any:
            return backend.asarray(a, np.int64) if a.dtype.kind in "iu" else ctx.ours(a)

        take = cycle([{k: ours(v) for k, v in inputs.items()} for _ in range(copies)])

        def run():
            return entry.run(backend, variant, **take())

        prepared = Prepared(
            run, lambda: _table_check(backend, op, variant, inputs, ours), copies=copies
        )
        prepared.skipped["torch"] = "no baseline for a generic op-table row"
        return prepared

    return Case(name, {"shape": list(shape)}, [Part(flops, moved)], moved, flops == 0.0, build)


def cases_for(
    sizes: Sizes,
    itemsize: int,
    only: Sequence[str] = (),
    gemm_versions: Sequence[str] = (),
    precisions: Sequence[str] = (),
    preset: str = "cpu",
    graph_rows: bool = False,
) -> list[Case]:
    """The rows of one backend over ``sizes``; ``precisions`` adds the tensor-core GEMM rows
    ("bf16", "tf32") for a backend that runs them (gemm_mma.cu on sm_80+ or the emulator); then
    a generic row for each (variant, shape) an op-table entry lists for ``preset``
    (ops.Op.bench); ``graph_rows`` also each training step through gb.compile_step (backends
    that capture it)."""
    # Whole training steps first, then the GEMMs: the headline rows, kept by a run that is
    # stopped by a time limit (the JSON record is rewritten after every row).
    cases: list[Case] = [train_case(layers, batch, itemsize) for layers, batch in sizes.train]
    cases += [
        train_case(layers, batch, itemsize, precision)
        for precision in precisions
        for layers, batch in sizes.train
    ]
    if graph_rows:
        cases += [train_case(layers, batch, itemsize, graph=True) for layers, batch in sizes.train]
    for m, n, k in sizes.gemm:
        for layout in ("forward", "dW", "dX+dW"):
            cases.append(gemm_case(m, n, k, layout, itemsize))
            for version in gemm_versions:
                cases.append(gemm_case(m, n, k, layout, itemsize, version))
            for precision in precisions:
                cases.append(mma_gemm_case(m, n, k, layout, precision))
    for name in sizes.activation_names:
        for rows, cols in sizes.activation:
            for direction in ("forward", "backward"):
                cases.append(activation_case(name, rows, cols, direction, itemsize))
    for rows, cols in sizes.activation[:1]:
        for direction in ("forward", "backward"):
            cases.append(standardize_case(rows, cols, direction, itemsize))
    for rows, classes in sizes.loss:
        cases.append(loss_case(rows, classes, itemsize))
    for n in sizes.optimizer:
        cases.append(optimizer_case("sgd_momentum", n, itemsize))
        cases.append(optimizer_case("adam", n, itemsize))
    for op in OPS.values():
        if op.bench is not None:
            cases += [table_case(op.name, v, shape, itemsize) for v, shape in op.bench(preset)]
    if only:
        cases = [c for c in cases if any(word in c.name for word in only)]
    return cases
