"""The training loop behind Sequential.fit, and evaluation."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import distributed as dist
from .backends import get_backend
from .callbacks import Callback, History
from .checks import check_int, check_number
from .evaluation import (
    ACCURACY_LOSSES,
    EpochTotals,
    correct_count,
    evaluate,
    per_row,
    reading_syncs,
    row_count,
    targets_on,
)
from .losses import Loss, SoftmaxCrossEntropyLoss, check_label_range
from .random import generator
from .threads import blas_threads_for


def _check_finite(value: float, where: str, optimizer) -> None:
    if not math.isfinite(value):
        lr = getattr(optimizer, "lr", None)
        raise FloatingPointError(
            f"the loss is {value} {where}; the training diverged or the data holds NaN/Inf. "
            f"Lower the learning rate (lr={lr}), check the inputs, or clip gradients "
            "(gb.clip_grad_norm)"
        )


def _progress_bar(verbose: int, total: int, epoch: int, epochs: int):
    if verbose != 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"epoch {epoch}/{epochs}",
        unit="sample",
        leave=True,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def run_fit(
    model,
    x,
    y,
    *,
    loss: Loss,
    optimizer,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    validation_data,
    verbose: int,
    callbacks: list[Callback],
    graph: bool = False,
    distributed: bool = False,
    max_norm: float | None = None,
) -> History:
    epochs = check_int("epochs", epochs)
    if max_norm is not None:
        max_norm = check_number("max_norm", max_norm)
    batch_size = check_int("batch_size", batch_size)
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose={verbose!r} is not accepted; expected 0, 1 or 2")
    if not isinstance(loss, Loss):
        raise TypeError(f"loss={loss!r} is not a gpubackprop Loss")
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks[{i}]={callback!r:.80} is not a gpubackprop Callback")
    xd = model.prepare_input(x)
    n = xd.shape[0]
    if row_count(y) != n:
        raise ValueError(f"y has {row_count(y)} rows but x has {n}")
    yd = targets_on(model, loss, y)
    # Integer labels are range-checked once for the whole set, not per batch (a sync each):
    # on the host copy when they came from the host, else once on the device.
    labels_unchecked = isinstance(loss, SoftmaxCrossEntropyLoss) and yd.ndim == 1
    if labels_unchecked and isinstance(y, (np.ndarray, list, tuple)):
        check_label_range(get_backend("numpy"), np.asarray(y), _classes(model, xd))
        labels_unchecked = False
    if not callable(getattr(optimizer, "step", None)):
        raise TypeError(
            f"optimizer={optimizer!r:.80} is not an optimizer; expected a gpubackprop Optimizer "
            "such as gb.Adam(model.parameters())"
        )
    if validation_data is not None and len(validation_data) != 2:
        raise ValueError("validation_data must be a pair (x_val, y_val)")
    loss.backend = model.backend
    parallel = _data_parallel(model, loss, optimizer, n, batch_size, epochs, shuffle, distributed)
    if parallel is not None and not parallel.is_main:
        # Only rank 0 prints and writes files; every rank keeps the callbacks that steer
        # training (the same reduced metrics give the same decisions everywhere).
        verbose = 0
        callbacks = [c for c in callbacks if not getattr(c, "main_process_only", False)]
    # Settings that cannot work (a monitor no epoch will log, a folder that does not exist)
    # fail now, not after the first epoch has been paid for.
    metrics = {"loss", "samples_per_s"} | (
        {"accuracy"} if isinstance(loss, ACCURACY_LOSSES) else set()
    )
    if validation_data is not None:
        metrics |= {f"val_{m}" for m in metrics if m != "samples_per_s"}
    for callback in callbacks:
        callback.check_setup(metrics)
    history = History()
    callbacks = [history, *callbacks]
    model.stop_training = False
    for callback in callbacks:
        callback.on_train_begin(model, optimizer)
    saved_check = getattr(loss, "check_labels", None)
    if saved_check is not None and not labels_unchecked:
        loss.check_labels = False  # checked on the host above (or not labels at all)
    try:
        with blas_threads_for(model, min(batch_size, n)):
            logs = _epochs(
                _Run(
                    model,
                    xd,
                    yd,
                    loss,
                    optimizer,
                    epochs,
                    batch_size,
                    shuffle,
                    validation_data,
                    verbose,
                    callbacks,
                    graph,
                    parallel,
                    max_norm,
                ),
                labels_unchecked,
            )
    except BaseException as error:
        if parallel is not None:
            dist.guard(parallel.group, error)
        raise
    finally:
        if saved_check is not None:
            loss.check_labels = saved_check
    for callback in callbacks:
        callback.on_train_end(logs)
    return history


_BAR_REFRESH_S = 0.25


def _bar_postfix(
    bar, loss_sum: float, correct: int | None, seen: int, per_row: int, elapsed: float
) -> None:
    postfix = {"loss": f"{loss_sum / seen:.4f}"}
    if correct is not None:
        postfix["acc"] = f"{correct / (seen * per_row):.4f}"
    postfix["samples/s"] = f"{seen / max(elapsed, 1e-9):.0f}"
    bar.set_postfix(postfix, refresh=False)


@dataclass
class _Run:
    """What one call of fit trains on and with."""

    model: Any
    xd: Any
    yd: Any
    loss: Loss
    optimizer: Any
    epochs: int
    batch_size: int
    shuffle: bool
    validation_data: Any
    verbose: int
    callbacks: list[Callback]
    graph: bool = False
    parallel: Any = None  # distributed.DataParallel when fit(distributed=True)
    max_norm: float | None = None  # clip the gradients' norm to it before each update


def _update(optimizer, max_norm: float | None) -> None:
    """optimizer.step(), clipping first when ``max_norm`` is set (gb.clip_grad_norm's result,
    with the scale applied inside the update launch: Optimizer.step(max_norm=...))."""
    if max_norm is None:
        optimizer.step()
    else:
        optimizer.step(max_norm=max_norm)


def _data_parallel(model, loss, optimizer, n, batch_size, epochs, shuffle, distributed):
    """The DataParallel of a distributed fit, started (ranks checked, rank 0's state
    broadcast), or None."""
    if not distributed:
        return None
    group = dist.init()
    try:
        parallel = dist.DataParallel(group, model, loss, optimizer)
        setup = dist.training_setup(model, optimizer, loss, n, batch_size)
        parallel.start({**setup, "epochs": epochs, "shuffle": shuffle})
    except BaseException as error:  # e.g. NCCL failing on one rank: the others wait in start
        dist.guard(group, error)
        raise
    return parallel


def _classes(model, xd) -> int:
    """The model's output width (what labels index): the last top-level Dense's, since the
    activations and residual blocks after it keep the width; else one row's forward."""
    from .layers import Dense

    for layer in reversed(model.layers):
        if isinstance(layer, Dense):
            return layer.out_features
    return int(model.run_steps(xd[:1]).shape[1])


def _epochs(run: _Run, labels_unchecked: bool) -> dict[str, float]:
    model, xd, yd, loss, optimizer = run.model, run.xd, run.yd, run.loss, run.optimizer
    epochs, batch_size, shuffle, verbose = run.epochs, run.batch_size, run.shuffle, run.verbose
    validation_data, callbacks, n = run.validation_data, run.callbacks, run.xd.shape[0]
    parallel, max_norm = run.parallel, run.max_norm
    xp = model.backend.xp
    read_every_batch = not reading_syncs(model.backend)
    step = None
    if run.graph:
        from .step import compile_step

        # data-parallel: the all-reduce inside the graph (NCCL) or between two graphs (MPI)
        step = compile_step(model, loss, optimizer, max_norm=max_norm, data_parallel=parallel)
    logs: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        order = generator().permutation(n) if shuffle else None
        order_d = model.backend.asarray(order, np.int64) if shuffle else None
        bar = _progress_bar(verbose, n, epoch, epochs)
        totals = EpochTotals(isinstance(loss, ACCURACY_LOSSES))
        start_time = last_read = time.perf_counter()
        for batch_index, start in enumerate(range(0, n, batch_size)):
            stop = min(start + batch_size, n)
            # Data-parallel: this rank's share [lo, hi) of the global batch [start, stop).
            lo, hi = (start, stop) if parallel is None else parallel.shard(start, stop)
            if hi == lo:  # fewer rows than ranks: this rank adds a zero gradient
                if step is not None:
                    step.skip_batch(stop - start)
                else:
                    parallel.average_gradients(0, stop - start)
                    _update(optimizer, max_norm)
                if bar is not None:
                    bar.update(stop - start)
                continue
            if shuffle:
                rows = order_d[lo:hi]
                xb, yb = xd[rows], yd[rows]
            else:
                xb, yb = xd[lo:hi], yd[lo:hi]
            if labels_unchecked:
                check_label_range(model.backend, yd, _classes(model, xd))
                loss.check_labels = labels_unchecked = False
            if step is not None:
                # forward, loss, backward and update in one call (one graph launch on a GPU)
                value = step(xb, yb, None if parallel is None else stop - start)
                pred = step.prediction
            else:
                pred = model.forward(xb)
                value = loss.forward(pred, yb)
            totals.add(value, correct_count(xp, loss, pred, yb), hi - lo)
            now = time.perf_counter()
            # Reading the totals syncs: every batch on the CPU (free), else for the bar.
            if read_every_batch or (bar is not None and now - last_read > _BAR_REFRESH_S):
                last_read = now
                loss_sum, correct = totals.read()
                _check_finite(loss_sum, f"at epoch {epoch}, batch {batch_index}", optimizer)
                if bar is not None:
                    _bar_postfix(
                        bar, loss_sum, correct, totals.seen, per_row(loss, yb), now - start_time
                    )
            if step is None:
                model.backward(loss.backward(), need_input_grad=False)
                if parallel is not None:
                    parallel.average_gradients(hi - lo, stop - start)
                _update(optimizer, max_norm)
            if bar is not None:
                bar.update(stop - start)
        loss_sum, correct = totals.read()
        model.backend.synchronize()
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        if parallel is not None:
            loss_sum, correct, _, elapsed = parallel.reduce_epoch(
                loss_sum, correct, totals.seen, elapsed
            )
        _check_finite(loss_sum, f"in epoch {epoch}", optimizer)
        logs = {"loss": loss_sum / n}
        if correct is not None:
            logs["accuracy"] = correct / (n * per_row(loss, yd))
        logs["samples_per_s"] = n / elapsed
        if validation_data is not None:
            if parallel is None:
                val = evaluate(model, validation_data[0], validation_data[1], loss)
            else:
                val = parallel.evaluate(validation_data[0], validation_data[1], loss)
            logs.update({f"val_{k}": v for k, v in val.items()})
            _check_finite(val["loss"], f"on the validation data after epoch {epoch}", optimizer)
        if bar is not None:
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
            bar.close()
        if verbose == 2:
            parts = " - ".join(f"{k}: {v:.4g}" for k, v in logs.items())
            print(f"epoch {epoch}/{epochs} - {parts}", file=sys.stderr)
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    return logs
