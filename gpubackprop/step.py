"""One training step as one call, captured as a CUDA graph where the backend can capture.

``step = gb.compile_step(model, loss_fn, optimizer, max_norm=None)``, then ``loss = step(x, y)``
runs forward, loss, backward, the optional gradient clipping and the optimizer update: the same
public calls as written out by hand (``model.forward``, ``loss_fn.forward``, ``model.backward``,
``gb.clip_grad_norm``, ``optimizer.step``), so the results are bitwise those of that loop on the
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

Data-parallel (``data_parallel=``, a started ``distributed.DataParallel``): between backward and
clipping the step weights this rank's flat gradient by n_r / B and all-reduces it, exactly as
``DataParallel.average_gradients`` does in the eager loop, so the results are bitwise those of
that loop.  Where the transport is ``capturable`` (NCCL on cupy) the all-reduce is inside the
one graph; where it is not (MPI on the host memory of numpy and emu arrays) the step is
captured as two graphs, forward+loss+backward+weighting and clipping+update, and the
all-reduce runs between their launches (docs/graphs.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import dtype_of, is_device_array, shape_of
from .checks import check_int, check_number
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
    # A data-parallel step over a transport that cannot be captured: the second graph
    # (clipping and the update), launched after the all-reduce; None when one graph holds all.
    update: Any = None

    @property
    def kernels(self) -> int | None:
        counts = [getattr(g, "kernels", None) for g in (self.graph, self.update) if g is not None]
        return None if None in counts else sum(counts)


def compile_step(
    model,
    loss_fn: Loss,
    optimizer: Optimizer,
    max_norm: float | None = None,
    data_parallel: Any = None,
):
    """The training step of ``model`` with ``loss_fn`` and ``optimizer`` (and gradient clipping
    to ``max_norm`` when given) as one callable ``step(x, y) -> loss``; with ``data_parallel``
    (a started ``gb.distributed.DataParallel`` of the same model, loss and optimizer) the step
    averages the gradient over the ranks before clipping.  See the module docstring."""
    return CompiledStep(model, loss_fn, optimizer, max_norm, data_parallel)


class CompiledStep:
    """``step(x, y)``: forward, loss, backward, (data-parallel: weighting and all-reduce),
    clipping, update; captured per batch shape where the backend can capture (``captures``),
    eager otherwise."""

    def __init__(
        self,
        model,
        loss_fn: Loss,
        optimizer: Optimizer,
        max_norm: float | None = None,
        data_parallel: Any = None,
    ):
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
        if data_parallel is not None:
            _check_data_parallel(data_parallel, model, loss_fn, optimizer)
        self.parallel = data_parallel
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

    @property
    def graphs_per_step(self) -> int:
        """Graph launches per captured step: 1, or 2 for a data-parallel step whose transport
        cannot be captured (the all-reduce runs between them); 0 when steps run eagerly."""
        if self._seam is None:
            return 0
        return 2 if self._split else 1

    @property
    def _split(self) -> bool:
        return self.parallel is not None and not self.parallel.transport.capturable

    # -- the step, as the public calls ----------------------------------------------------------
    def run_eager(self, x, y, global_rows: int | None = None):
        """The step through the public calls, on ``x`` and ``y`` already on the backend
        (``global_rows``: the global batch of a data-parallel step, see __call__)."""
        loss = self._forward_backward(x, y, global_rows)
        if self.parallel is not None:
            self.parallel.allreduce_gradients()
        self._update()
        return loss

    def _forward_backward(self, x, y, global_rows: int | None):
        """Forward, loss, backward; data-parallel: this rank's gradient weighted by n_r / B."""
        model, loss_fn = self.model, self.loss_fn
        checks = _host_checks_off(loss_fn)
        try:
            pred = model.run_steps(x)
            loss = loss_fn.forward(pred, y)
        finally:
            _restore(loss_fn, checks)
        model.backward(loss_fn.backward(), need_input_grad=False)
        if self.parallel is not None:
            rows = int(shape_of(x)[0])
            self.parallel.weight_gradients(rows, rows if global_rows is None else global_rows)
        self.prediction = pred
        return loss

    def _update(self) -> None:
        """Clipping (with max_norm), then the optimizer update: Optimizer.step(max_norm=...),
        clip_grad_norm's norm and coefficient with the scale applied inside the update launch
        (the same bits as clip_grad_norm + step, one launch fewer)."""
        norm = self.optimizer.step(max_norm=self.max_norm)
        if self.max_norm is not None:
            self.last_norm = norm

    def skip_batch(self, global_rows: int) -> None:
        """A data-parallel step in which this rank has no rows of the global batch (fewer rows
        than ranks, at the end of an epoch): it adds a zero gradient to the all-reduce and
        applies the same update as the other ranks.  Runs eagerly (the same kernels as the
        graphs, so the ranks' parameters stay bitwise equal)."""
        if self.parallel is None:
            raise ValueError(
                "skip_batch is for a data-parallel step (compile_step(data_parallel=))"
            )
        self.parallel.average_gradients(0, check_int("global_rows", global_rows))
        self._update()

    def __call__(self, x, y, global_rows: int | None = None):
        """One step on the batch (x, y); returns the loss as a 0-d array on the backend.

        Data-parallel: (x, y) is this rank's shard of a global batch of ``global_rows`` rows
        (default: this shard's rows times the number of ranks, right when every rank has as
        many rows); the gradient is weighted by rows / global_rows before the all-reduce."""
        # The batch is validated once per kind of input (type, shape, dtype), not every call.
        signature = (type(x), shape_of(x), dtype_of(x), type(y), shape_of(y), dtype_of(y))
        checked = self._checked.get(signature)
        if checked is None:
            checked = self._checked[signature] = self._check_batch(x, y)
        x_shape, y_shape, y_dtype, host_labels = checked
        if host_labels:
            self._check_host_labels(y)
        global_rows = self._global_rows(x_shape[0], global_rows)
        if self._seam is None:
            xd = self.model.prepare_input(x)
            yd = self.backend.asarray(y, y_dtype)
            return self.run_eager(xd, yd, global_rows)
        optimizer = self.optimizer
        if optimizer.buffer_names and not optimizer._state:
            optimizer._buffers(optimizer._segments())  # its state exists before any capture
        # The weight n_r / B is a kernel argument the graph freezes: B is part of the key.
        key = (x_shape, y_shape, y_dtype.str, global_rows, self._state_key())
        entry = self.graphs.get(key)
        if entry is None:
            loss, entry = self._capture(x, y, x_shape, y_shape, y_dtype, global_rows)
            self.graphs[key] = entry
            return loss
        seam = self._seam
        seam.copy_in(entry.x, self._source(x, self.model.dtype))
        seam.copy_in(entry.y, self._source(y, y_dtype))
        seam.launch_graph(entry.graph)
        if entry.update is not None:
            # The host all-reduce reads what the first graph wrote: wait for it (a no-op on
            # the emulator and on numpy, whose work is done when the launch returns).
            self.backend.synchronize()
            self.parallel.allreduce_gradients()
            seam.launch_graph(entry.update)
        optimizer.step_count += 1  # the host's count; the graph advanced the device's
        self.prediction = entry.prediction
        return entry.loss

    def _global_rows(self, rows: int, global_rows: int | None) -> int | None:
        if self.parallel is None:
            if global_rows is not None:
                raise ValueError(
                    f"global_rows={global_rows!r} is for a data-parallel step; this step was "
                    "compiled without data_parallel"
                )
            return None
        if global_rows is None:
            return rows * self.parallel.group.size
        global_rows = check_int("global_rows", global_rows)
        if global_rows < rows:
            raise ValueError(
                f"global_rows={global_rows} is less than this rank's {rows} rows; expected "
                "the global batch's rows (every rank's shard together)"
            )
        return global_rows

    # -- capture ----------------------------------------------------------------------------------
    def _capture(self, x, y, x_shape, y_shape, y_dtype, global_rows=None) -> tuple[Any, _Graph]:
        """Warm up (this call's step, run for real), then capture the same step: one graph, or
        for a transport that cannot be captured two graphs around the all-reduce."""
        seam, backend = self._seam, self.backend
        self.loss_fn.backend = backend
        x_static = backend.empty(x_shape, self.model.dtype)
        y_static = backend.empty(y_shape, y_dtype)
        seam.copy_in(x_static, self._source(x, self.model.dtype))
        seam.copy_in(y_static, self._source(y, y_dtype))
        static = [x_static, y_static]
        if not self._split:
            pool = seam.new_pool()
            with seam.allocating_from(pool):
                loss = self.run_eager(x_static, y_static, global_rows)
            warm_prediction, warm_norm = self.prediction, self.last_norm
            backend.synchronize()
            count = self.optimizer.step_count
            with seam.capture(static, pool) as holder:
                graph_loss = self.run_eager(x_static, y_static, global_rows)
            self.optimizer.step_count = count  # the capture ran nothing
            entry = _Graph(x_static, y_static, holder["graph"], graph_loss, self.prediction, pool)
        else:
            # Each graph owns the warm-up allocations of its half (a pool each).
            pools = (seam.new_pool(), seam.new_pool())
            with seam.allocating_from(pools[0]):
                loss = self._forward_backward(x_static, y_static, global_rows)
            warm_prediction = self.prediction
            backend.synchronize()
            self.parallel.allreduce_gradients()
            with seam.allocating_from(pools[1]):
                self._update()
            warm_norm = self.last_norm
            backend.synchronize()
            count = self.optimizer.step_count
            with seam.capture(static, pools[0]) as first:
                graph_loss = self._forward_backward(x_static, y_static, global_rows)
            with seam.capture([], pools[1]) as second:
                self._update()
            self.optimizer.step_count = count  # the captures ran nothing
            entry = _Graph(
                x_static,
                y_static,
                first["graph"],
                graph_loss,
                self.prediction,
                pools,
                update=second["graph"],
            )
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


def _check_data_parallel(parallel: Any, model, loss_fn: Loss, optimizer: Optimizer) -> None:
    """The DataParallel must be of this very model, loss and optimizer: its weighting rule
    follows its loss's reduction, and its all-reduce works on its model's gradient buffer."""
    for what, expected in (("model", model), ("loss", loss_fn), ("optimizer", optimizer)):
        got = getattr(parallel, what, None)
        if got is not expected:
            raise ValueError(
                f"data_parallel={parallel!r:.80} was built for another {what} ({got!r:.60}); "
                f"build it as distributed.DataParallel(group, model, loss_fn, optimizer) with "
                "the objects given to compile_step"
            )
    if not hasattr(getattr(parallel, "transport", None), "capturable"):
        raise TypeError(
            f"data_parallel={parallel!r:.80} has no transport with a 'capturable' property; "
            "expected a gpubackprop.distributed.DataParallel"
        )


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
