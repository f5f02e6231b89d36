"""One training step as one call, captured as a CUDA graph where the backend can capture.

``step = gb.compile_step(model, loss_fn, optimizer, max_norm=None)``, then ``loss = step(x, y)``
runs forward, loss, backward, the optional gradient clipping and the optimizer update: the same
public calls as written out by hand (``model.forward``, ``loss_fn.forward``, ``model.backward``,
``optimizer.step(max_norm=...)``, which is ``gb.clip_grad_norm`` + ``optimizer.step`` with the
scale applied inside the update launch), so the results are bitwise those of that loop on the
same backend.  Nothing in it reads the device: the loss comes back as a 0-d device array.

On a backend whose device seam can capture (cupy: a CUDA graph through CuPy's stream capture;
emu: a recorded launch list with the rules of a real capture enforced, emulator/capture.py), the
first call for a batch shape runs the step once as a warm-up (building every kernel, with its
memory drawn from a pool the graph then owns), then captures the same step; every later call
copies x and y into the graph's static input buffers and launches the graph: one copy per input
and one launch of host work.  A new batch shape (the last, partial batch of an epoch) gets its
own graph; so does a change of the optimizer's hyper-parameters other than the learning rate
(which the step reads from device memory).  On numpy the step runs eagerly.

The loss (and ``step.prediction``) of a captured step live in the graph's memory: the next call
for the same shape overwrites them, as a replayed graph does on a GPU.  Read or copy them before
the next call (fit adds the loss into its running total at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import dtype_of, is_device_array, shape_of
from .checks import check_number
from .losses import Loss, SoftmaxCrossEntropyLoss
from .optim import Optimizer

__all__ = ["CompiledStep", "compile_step"]


@dataclass
class _Graph:
    """One captured step: its static inputs, the graph, and where it leaves loss and output."""

    x: Any
    y: Any
    graph: Any
    loss: Any
    prediction: Any
    pool: Any

    @property
    def kernels(self) -> int | None:
        return getattr(self.graph, "kernels", None)


def compile_step(model, loss_fn: Loss, optimizer: Optimizer, max_norm: float | None = None):
    """The training step of ``model`` with ``loss_fn`` and ``optimizer`` (and gradient clipping
    to ``max_norm`` when given) as one callable ``step(x, y) -> loss``; see the module
    docstring."""
    return CompiledStep(model, loss_fn, optimizer, max_norm)


class CompiledStep:
    """``step(x, y)``: forward, loss, backward, clipping, update; captured per batch shape where
    the backend can capture (``captures``), eager otherwise."""

    def __init__(self, model, loss_fn: Loss, optimizer: Optimizer, max_norm: float | None = None):
        # Checked by what it offers, not by importing model.py (which imports this module).
        if not all(hasattr(model, name) for name in ("run_steps", "backward", "parameters")):
            raise TypeError(f"model={model!r:.80} is not a gpubackprop Sequential")
        if not isinstance(loss_fn, Loss):
            raise TypeError(f"loss_fn={loss_fn!r} is not a gpubackprop Loss")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer={optimizer!r} is not a gpubackprop Optimizer")
        model.parameters()  # places the model when it was not yet
        if not model.store.covers(optimizer.params):
            raise ValueError(
                "optimizer does not update exactly this model's parameters; build it with "
                "optimizer_type(model.parameters(), ...) after model.to()"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.max_norm = None if max_norm is None else check_number("max_norm", max_norm)
        self.backend = model.backend
        seam = getattr(self.backend, "seam", None)
        self._seam = seam if seam is not None and hasattr(seam, "capture") else None
        self.graphs: dict[tuple, _Graph] = {}
        self._checked: dict[tuple, tuple] = {}
        self.prediction: Any = None  # the model output of the last call
        self.last_norm: Any = None  # the gradient norm of the last call (with max_norm)

    @property
    def captures(self) -> bool:
        """True when steps are captured as graphs (cupy, emu), False when they run eagerly."""
        return self._seam is not None

    # -- the step, as the public calls ----------------------------------------------------------
    def run_eager(self, x, y):
        """The step through the public calls, on ``x`` and ``y`` already on the backend."""
        model, loss_fn = self.model, self.loss_fn
        checks = _host_checks_off(loss_fn)
        try:
            pred = model.run_steps(x)
            loss = loss_fn.forward(pred, y)
        finally:
            _restore(loss_fn, checks)
        model.backward(loss_fn.backward(), need_input_grad=False)
        # With max_norm: clip_grad_norm's norm and coefficient, the scale applied inside the
        # update launch (Optimizer.step(max_norm=...): the same bits, one launch fewer).
        norm = self.optimizer.step(max_norm=self.max_norm)
        if self.max_norm is not None:
            self.last_norm = norm
        self.prediction = pred
        return loss

    def __call__(self, x, y):
        """One step on the batch (x, y); returns the loss as a 0-d array on the backend."""
        # The batch is validated once per kind of input (type, shape, dtype), not every call.
        signature = (type(x), shape_of(x), dtype_of(x), type(y), shape_of(y), dtype_of(y))
        checked = self._checked.get(signature)
        if checked is None:
            checked = self._checked[signature] = self._check_batch(x, y)
        x_shape, y_shape, y_dtype, host_labels = checked
        if host_labels:
            self._check_host_labels(y)
        if self._seam is None:
            xd = self.model.prepare_input(x)
            yd = self.backend.asarray(y, y_dtype)
            return self.run_eager(xd, yd)
        optimizer = self.optimizer
        if optimizer.buffer_names and not optimizer._state:
            optimizer._buffers(optimizer._segments())  # its state exists before any capture
        key = (x_shape, y_shape, y_dtype.str, self._state_key())
        entry = self.graphs.get(key)
        if entry is None:
            loss, entry = self._capture(x, y, x_shape, y_shape, y_dtype)
            self.graphs[key] = entry
            return loss
        seam = self._seam
        seam.copy_in(entry.x, self._source(x, self.model.dtype))
        seam.copy_in(entry.y, self._source(y, y_dtype))
        seam.launch_graph(entry.graph)
        optimizer.step_count += 1  # the host's count; the graph advanced the device's
        self.prediction = entry.prediction
        return entry.loss

    # -- capture ----------------------------------------------------------------------------------
    def _capture(self, x, y, x_shape, y_shape, y_dtype) -> tuple[Any, _Graph]:
        """Warm up (this call's step, run for real), then capture the same step."""
        seam, backend = self._seam, self.backend
        self.loss_fn.backend = backend
        x_static = backend.empty(x_shape, self.model.dtype)
        y_static = backend.empty(y_shape, y_dtype)
        seam.copy_in(x_static, self._source(x, self.model.dtype))
        seam.copy_in(y_static, self._source(y, y_dtype))
        pool = seam.new_pool()
        with seam.allocating_from(pool):
            loss = self.run_eager(x_static, y_static)
        warm_prediction, warm_norm = self.prediction, self.last_norm
        backend.synchronize()
        count = self.optimizer.step_count
        with seam.capture([x_static, y_static], pool) as holder:
            graph_loss = self.run_eager(x_static, y_static)
        self.optimizer.step_count = count  # the capture ran nothing
        entry = _Graph(x_static, y_static, holder["graph"], graph_loss, self.prediction, pool)
        self.prediction, self.last_norm = warm_prediction, warm_norm
        return loss, entry

    def _state_key(self) -> tuple:
        """What a captured graph has frozen besides the batch shape: the buffers it reads and
        writes, and the hyper-parameters passed as kernel arguments (all but lr)."""
        optimizer, store = self.optimizer, self.model.store
        buffers = tuple([id(a) for arrays in optimizer._state.values() for a in arrays])
        hyper = tuple([v for k, v in optimizer.hyperparams.items() if k != "lr"])
        return (
            id(store.data),
            id(store.grad),
            id(optimizer.step_scalars),
            buffers,
            hyper,
            self.max_norm,
            self.loss_fn.reduction,
        )

    # -- inputs ----------------------------------------------------------------------------------
    def _check_batch(self, x, y) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype, bool]:
        """(x shape, y shape, the dtype y is uploaded as, whether y holds host labels to
        range-check each call), or ValueError naming what is wrong."""
        x_shape, y_shape = shape_of(x), shape_of(y)
        if len(x_shape) != 2:
            raise ValueError(f"x has shape {x_shape}; expected (batch, features)")
        expected = self.model.in_features
        if expected is not None and x_shape[1] != expected:
            raise ValueError(
                f"x has {x_shape[1]} features per row; the first Dense layer expects {expected}"
            )
        if x_shape[0] == 0:
            raise ValueError("x has no rows")
        if dtype_of(x).kind not in "fiub":
            raise ValueError(f"x has dtype {dtype_of(x)}; expected numbers")
        if not y_shape or y_shape[0] != x_shape[0]:
            raise ValueError(f"y has shape {y_shape} but x has {x_shape[0]} rows")
        labels = isinstance(self.loss_fn, SoftmaxCrossEntropyLoss) and len(y_shape) == 1
        if labels:
            if dtype_of(y).kind not in "iub":
                raise ValueError(
                    f"y has dtype {dtype_of(y)}; SoftmaxCrossEntropyLoss expects integer labels "
                    "(batch,) or probabilities (batch, classes)"
                )
            self._classes_count = self._classes()
            # Host labels are checked on the host, before the upload (a device check would
            # be a sync); device labels are the caller's (fit checks its data once).
            host = not (is_device_array(y) or isinstance(y, self.backend.xp.ndarray))
            return x_shape, y_shape, np.dtype(np.int64), host
        return x_shape, y_shape, self.model.dtype, False

    def _check_host_labels(self, y) -> None:
        labels = np.asarray(y)
        low, high = labels.min(), labels.max()
        if low < 0 or high >= self._classes_count:
            bad = low if low < 0 else high
            raise ValueError(
                f"y holds label {int(bad)}; expected labels in [0, {self._classes_count - 1}] "
                f"for a model with {self._classes_count} outputs"
            )

    def _classes(self) -> int:
        from .layers import Dense

        for layer in reversed(self.model.layers):
            if isinstance(layer, Dense):
                return layer.out_features
        raise ValueError("SoftmaxCrossEntropyLoss needs a model ending in a Dense layer")

    def _source(self, a, dtype: np.dtype):
        """``a`` as what copy_in takes: host data as a contiguous NumPy array of ``dtype``, a
        backend array cast to ``dtype`` when it differs."""
        if type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous:
            return a
        if is_device_array(a) or isinstance(a, self.backend.xp.ndarray):
            return a if a.dtype == dtype else self.backend.asarray(a, dtype)
        return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def _host_checks_off(loss_fn: Loss) -> dict[str, Any]:
    """Turn off the loss's per-call checks that read the device (a sync each); the step checks
    labels on the host before they are uploaded instead."""
    saved = {}
    for name in ("check_labels", "check_range"):
        if hasattr(loss_fn, name):
            saved[name] = getattr(loss_fn, name)
            setattr(loss_fn, name, False)
    return saved


def _restore(loss_fn: Loss, saved: dict[str, Any]) -> None:
    for name, value in saved.items():
        setattr(loss_fn, name, value)
