"""Training callbacks: History (always on), EarlyStopping, CosineSchedule.  ModelCheckpoint,
which saves checkpoints, lives in checkpoint.py (above the model it saves)."""

from __future__ import annotations

import copy
import math

from .checks import check_int, check_number


class Callback:
    """Hooks called by Sequential.fit.  ``logs`` holds the epoch's metrics
    (loss, accuracy, val_loss, val_accuracy, samples_per_s, ...)."""

    # In a distributed fit, a callback that only writes files runs on rank 0 alone.
    main_process_only: bool = False

    def check_setup(self, metrics: set[str]) -> None:
        """Raise ValueError, before the first epoch, for a setting that cannot work in this fit;
        ``metrics`` are the names each epoch's logs will hold."""

    def on_train_begin(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, logs: dict[str, float]) -> None:
        pass


class History(Callback):
    """``history[metric]`` is the list of per-epoch values; ``epoch`` the epoch numbers."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, metrics={sorted(self.history)})"


def improved(mode: str, value: float, best: float, min_delta: float) -> bool:
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


def check_monitor(owner: str, monitor: str, metrics: set[str]) -> None:
    if monitor not in metrics:
        hint = ""
        if monitor.startswith("val_") and not any(m.startswith("val_") for m in metrics):
            hint = " (val_* metrics need validation_data)"
        raise ValueError(
            f"{owner} monitor={monitor!r} is not a metric of this fit; expected one of "
            f"{sorted(metrics)}{hint}"
        )


def mode_for(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode={mode!r} is not supported; expected 'auto', 'min' or 'max'")
    if mode != "auto":
        return mode
    return "max" if "accuracy" in monitor else "min"


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs;
    optionally restore the weights of the best epoch."""

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "auto",
        restore_best_weights: bool = False,
    ):
        if patience < 0:
            raise ValueError(f"patience={patience!r} is not accepted; expected an integer >= 0")
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.mode = mode_for(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.best_state = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def check_setup(self, metrics: set[str]) -> None:
        check_monitor("EarlyStopping", self.monitor, metrics)

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping monitor={self.monitor!r} is not among the metrics "
                f"{sorted(logs)} (val_* metrics need validation_data)"
            )
        value = logs[self.monitor]
        if improved(self.mode, value, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_state = copy.deepcopy(self.model.state_dict())
            return
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, float]) -> None:
        if self.restore_best_weights and self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class CosineSchedule(Callback):
    """Cosine learning-rate decay over ``epochs``: after epoch e the optimizer's lr becomes

        η_e = η_min + (η₀ − η_min) · ½(1 + cos(π e / E))

    so epoch 1 trains at η₀ and the rate falls to η_min after epoch E.  η₀ is ``base_lr``, or
    the optimizer's lr when fit starts.  When fit ends the optimizer is given η₀ back, so an
    optimizer saved after training (gb.save) carries the base rate, not the final η_E = η_min,
    and a later fit with a new schedule starts from it."""

    def __init__(self, epochs: int, base_lr: float | None = None, min_lr: float = 0.0):
        self.epochs = check_int("epochs", epochs)
        self.base_lr = None if base_lr is None else check_number("base_lr", base_lr)
        self.min_lr = check_number("min_lr", min_lr)
        self._start_lr: float | None = None

    def learning_rate(self, epoch: int, base_lr: float) -> float:
        """η after ``epoch`` (0 = before training) of a schedule starting at ``base_lr``."""
        progress = min(epoch, self.epochs) / self.epochs
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def on_train_begin(self, model, optimizer) -> None:
        super().on_train_begin(model, optimizer)
        self._start_lr = optimizer.lr if self.base_lr is None else self.base_lr
        optimizer.lr = self._start_lr

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.optimizer.lr = self.learning_rate(epoch, self._start_lr)

    def on_train_end(self, logs: dict[str, float]) -> None:
        self.optimizer.lr = self._start_lr
