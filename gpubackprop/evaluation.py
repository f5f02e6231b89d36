"""Evaluation: the mean loss and accuracy of a model over data, batch by batch.

Shared by the training loop (training.py) and the data-parallel evaluation (distributed.py).
"""

from __future__ import annotations

import numpy as np

from .arrays import dtype_of, import_array, shape_of
from .checks import check_int
from .losses import (
    BCELoss,
    BCEWithLogitsLoss,
    Loss,
    SoftmaxCrossEntropyLoss,
    check_label_range,
)
from .threads import blas_threads_for

__all__ = [
    "ACCURACY_LOSSES",
    "EpochTotals",
    "correct_count",
    "evaluate",
    "per_row",
    "reading_syncs",
    "row_count",
    "targets_on",
]


def row_count(a) -> int:
    return shape_of(a)[0]


def targets_on(model, loss: Loss, y):
    """Targets on the model's backend: int64 labels for cross-entropy, else model dtype."""
    y = import_array(y, model.backend.xp, "y")
    kind = dtype_of(y).kind
    if isinstance(loss, SoftmaxCrossEntropyLoss) and kind in "iub":
        return model.backend.asarray(y, np.int64)
    return model.backend.asarray(y, model.dtype)


# Losses whose predictions can be scored as right or wrong.
ACCURACY_LOSSES = (SoftmaxCrossEntropyLoss, BCEWithLogitsLoss, BCELoss)


def correct_count(xp, loss: Loss, pred, target):
    """Correct predictions in a batch as a 0-d array on the backend (no sync), or None when
    accuracy has no meaning (regression)."""
    if isinstance(loss, SoftmaxCrossEntropyLoss):
        labels = target if target.ndim == 1 else xp.argmax(target, axis=1)
        return (xp.argmax(pred, axis=1) == labels).sum()
    if isinstance(loss, BCEWithLogitsLoss):
        return ((pred > 0) == (target > 0.5)).sum()
    if isinstance(loss, BCELoss):
        return ((pred > 0.5) == (target > 0.5)).sum()
    return None


def reading_syncs(backend) -> bool:
    """True when reading a value back to the host waits for the device (a GPU backend)."""
    return backend.xp is not np


class EpochTotals:
    """Σ loss·rows and Σ correct over an epoch.  On a GPU they stay device arrays between
    reads, so a training step needs no device-to-host sync; reading them syncs once."""

    def __init__(self, has_accuracy: bool):
        self.loss_sum = 0.0
        self.correct = 0 if has_accuracy else None
        self.seen = 0

    def add(self, loss_value, batch_correct, rows: int) -> None:
        self.loss_sum = self.loss_sum + loss_value * rows
        if self.correct is not None:
            self.correct = self.correct + batch_correct
        self.seen += rows

    def read(self) -> tuple[float, int | None]:
        correct = None if self.correct is None else int(self.correct)
        return float(self.loss_sum), correct


def evaluate(model, x, y, loss: Loss, batch_size: int = 1024) -> dict[str, float]:
    """Mean loss over all rows (batches weighted by size) and accuracy where defined."""
    batch_size = check_int("batch_size", batch_size)
    xd = model.prepare_input(x)
    if row_count(y) != xd.shape[0]:
        raise ValueError(f"y has {row_count(y)} rows but x has {xd.shape[0]}")
    yd = targets_on(model, loss, y)
    loss.backend = model.backend
    n = xd.shape[0]
    with blas_threads_for(model, min(batch_size, n)):
        return _evaluate_batches(model, xd, yd, loss, batch_size)


def _evaluate_batches(model, xd, yd, loss: Loss, batch_size: int) -> dict[str, float]:
    n = xd.shape[0]
    totals = EpochTotals(isinstance(loss, ACCURACY_LOSSES))
    for start in range(0, n, batch_size):
        h = model.run_steps(xd[start : start + batch_size])
        if start == 0 and isinstance(loss, SoftmaxCrossEntropyLoss) and yd.ndim == 1:
            check_label_range(model.backend, yd, h.shape[1])
        target = yd[start : start + batch_size]
        # MSE/BCE "mean" average over elements, cross-entropy over rows: both weight by rows.
        value = loss.forward(h, target)
        totals.add(value, correct_count(model.backend.xp, loss, h, target), h.shape[0])
    loss_sum, correct = totals.read()
    metrics = {"loss": loss_sum / n}
    if correct is not None:
        metrics["accuracy"] = correct / (n * per_row(loss, yd))
    return metrics


def per_row(loss: Loss, target) -> int:
    """Predictions per row that accuracy counts: 1 for cross-entropy, every output for BCE."""
    if isinstance(loss, SoftmaxCrossEntropyLoss) or target.ndim == 1:
        return 1
    return int(np.prod(target.shape[1:]))
