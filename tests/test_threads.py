"""The BLAS thread policy of the numpy backend (gpubackprop/threads.py): one thread for the small
GEMMs of a small model while it trains, evaluates and predicts; a user's own setting and large
GEMMs are left alone; the previous setting comes back afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import gpubackprop as gb
from gpubackprop import threads


def _blas_threads() -> int:
    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert counts, "NumPy's BLAS is not visible to threadpoolctl"
    return max(counts)


class _Spy(gb.Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, logs):
        self.seen.append(_blas_threads())


def _fit(model, x, y, spy):
    model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=gb.SGD(model.parameters(), lr=0.01),
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[spy],
    )


@pytest.fixture
def two_threads(monkeypatch):
    """Start from 2 BLAS threads (OpenBLAS's default on a 2-core machine), whatever this one
    has, with no thread variable set."""
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with threadpool_limits(limits=2, user_api="blas"):
        if _blas_threads() != 2:
            pytest.skip("this BLAS cannot run 2 threads")
        yield


def _small():
    gb.seed(0)
    model = gb.Sequential(gb.Dense(8, 32), gb.ReLU(), gb.Dense(32, 3)).to("numpy")
    rng = np.random.default_rng(0)
    return model, rng.standard_normal((50, 8)), rng.integers(0, 3, 50)


def test_small_model_trains_evaluates_and_predicts_on_one_thread(two_threads, monkeypatch):
    model, x, y = _small()
    spy = _Spy()
    _fit(model, x, y, spy)
    assert spy.seen == [1, 1]
    assert _blas_threads() == 2  # restored
    seen = []
    original = model.run_steps
    monkeypatch.setattr(
        model, "run_steps", lambda h: (seen.append(_blas_threads()), original(h))[1]
    )
    model.predict(x)
    model.evaluate(x, y)
    assert seen and set(seen) == {1}
    assert _blas_threads() == 2


@pytest.mark.parametrize("variable", threads.THREAD_VARIABLES)
def test_a_thread_count_the_user_set_is_kept(two_threads, monkeypatch, variable):
    monkeypatch.setenv(variable, "2")
    model, x, y = _small()
    spy = _Spy()
    _fit(model, x, y, spy)
    assert spy.seen == [2, 2]


def test_an_empty_variable_is_not_a_choice(two_threads, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "")
    model, x, y = _small()
    spy = _Spy()
    _fit(model, x, y, spy)
    assert spy.seen == [1, 1]


def test_large_gemms_keep_the_default(two_threads):
    gb.seed(0)
    width = 2048  # 16 rows × 2048 × 2048 = 67 M multiply-adds: at the threshold
    assert 16 * width * width >= threads.SMALL_GEMM_MACS
    model = gb.Sequential(gb.Dense(4, width), gb.ReLU(), gb.Dense(width, width)).to("numpy")
    rng = np.random.default_rng(0)
    spy = _Spy()
    _fit(model, rng.standard_normal((32, 4)), rng.integers(0, 3, 32), spy)
    assert spy.seen == [2, 2]


def test_other_backends_are_left_alone(two_threads):
    ok, reason = gb.available_backends()["emu"]
    if not ok:
        pytest.skip(f"emu unavailable: {reason}")
    gb.seed(0)
    model = gb.Sequential(gb.Dense(3, 4), gb.ReLU(), gb.Dense(4, 2)).to("emu")
    rng = np.random.default_rng(0)
    spy = _Spy()
    _fit(model, rng.standard_normal((20, 3)), rng.integers(0, 2, 20), spy)
    assert spy.seen == [2, 2]
