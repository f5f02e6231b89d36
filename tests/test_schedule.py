"""gb.CosineSchedule: η_e = η_min + (η₀ − η_min)·½(1 + cos(π e/E)), base rate given back."""

import math

import numpy as np
import pytest

import gpubackprop as gb


class _RecordLR(gb.Callback):
    def __init__(self):
        self.rates = []

    def on_train_begin(self, model, optimizer):
        super().on_train_begin(model, optimizer)
        self.rates.append(optimizer.lr)

    def on_epoch_end(self, epoch, logs):
        self.rates.append(self.optimizer.lr)


def _fit(schedule, epochs, lr=0.1):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(2, 1)).to("numpy", "float64")
    optimizer = gb.SGD(model.parameters(), lr=lr)
    record = _RecordLR()
    x = np.random.default_rng(0).normal(size=(8, 2))
    model.fit(
        x, x[:, :1], loss=gb.MSELoss(), optimizer=optimizer, epochs=epochs, batch_size=8,
        verbose=0, callbacks=[schedule, record],
    )  # fmt: skip
    return optimizer, record.rates


@pytest.mark.parametrize(("epochs", "min_lr"), [(1, 0.0), (5, 0.0), (7, 0.01)])
def test_each_epoch_trains_at_the_cosine_rate_and_the_base_rate_comes_back(epochs, min_lr):
    optimizer, rates = _fit(gb.CosineSchedule(epochs, min_lr=min_lr), epochs)
    expected = [
        min_lr + (0.1 - min_lr) * 0.5 * (1 + math.cos(math.pi * e / epochs))
        for e in range(epochs + 1)
    ]
    assert rates == pytest.approx(expected, rel=1e-15, abs=1e-18)
    assert rates[-1] == pytest.approx(min_lr, abs=1e-18)  # after the last epoch: η_min
    assert optimizer.lr == 0.1  # fit is over: the optimizer has its base rate back


def test_base_lr_overrides_the_optimizers_rate():
    optimizer, rates = _fit(gb.CosineSchedule(4, base_lr=0.5), 4, lr=0.1)
    assert rates[0] == 0.5 and rates[2] == pytest.approx(0.25)
    assert optimizer.lr == 0.5


def test_saved_optimizer_keeps_the_base_rate(tmp_path):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(2, 2)).to("numpy", "float32")
    optimizer = gb.Adam(model.parameters(), lr=3e-3)
    x = np.random.default_rng(1).normal(size=(10, 2)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(int)
    loss = gb.SoftmaxCrossEntropyLoss()
    schedule = gb.CosineSchedule(3)
    model.fit(x, labels, loss=loss, optimizer=optimizer, epochs=3, verbose=0, callbacks=[schedule])
    gb.save(tmp_path / "m.safetensors", model, optimizer)
    _, loaded = gb.load(tmp_path / "m.safetensors", with_optimizer=True)
    assert loaded.lr == pytest.approx(3e-3) and loaded.step_count == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs=0 is not accepted"),
        ({"epochs": 2.0}, "epochs=2.0 is not accepted"),
        ({"epochs": 3, "base_lr": -1.0}, "base_lr=-1.0 is not accepted"),
        ({"epochs": 3, "min_lr": math.nan}, "min_lr=nan is not accepted"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gb.CosineSchedule(**kwargs)
