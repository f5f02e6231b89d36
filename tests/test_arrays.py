"""Device arrays are never converted implicitly.

CuPy raises TypeError on ``np.asarray(cupy_array)``; code paths that receive a backend's arrays
(fit's batches, evaluate's targets, state dicts from a GPU) must read shape and dtype from the
array and copy to the host only through ``.get()``.  The emulator's DeviceArray refuses
conversion the way CuPy does, so these paths are checked without a GPU (test_device_arrays.py
runs whole training loops with it on the emu backend).
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.arrays import dtype_of, shape_of, to_host
from gpubackprop.backends.numpy_backend import NumpyBackend
from gpubackprop.emulator.device_arrays import DeviceArray
from gpubackprop.evaluation import targets_on


class DeviceBackend(NumpyBackend):
    """NumPy backend whose asarray accepts DeviceArray the way CuPy's accepts its own arrays."""

    def asarray(self, x, dtype=None):
        return super().asarray(x.get() if isinstance(x, DeviceArray) else x, dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_the_stand_in_refuses_implicit_conversion():
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(DeviceArray(np.array([1.0, 2.0])))


def test_helpers_read_without_converting(rng):
    values = rng.standard_normal((3, 5)).astype(np.float32)
    device = DeviceArray(values)
    assert shape_of(device) == (3, 5)
    assert dtype_of(device) == np.float32
    np.testing.assert_array_equal(to_host(device), values)
    assert shape_of([[1, 2, 3]]) == (1, 3) and dtype_of([1, 2]).kind == "i"
    assert shape_of(2.5) == () and isinstance(to_host([1.0]), np.ndarray)


def _model(backend):
    return gb.Sequential(gb.Dense(5, 8), gb.ReLU(), gb.Dense(8, 3)).to(backend)


def test_forward_and_loss_take_device_arrays(rng):
    backend = DeviceBackend()
    model = _model(backend)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 6)
    expected = model.forward(x)
    out = model.forward(DeviceArray(x))
    np.testing.assert_array_equal(out, expected)
    loss = gb.SoftmaxCrossEntropyLoss()
    loss.backend = backend
    assert float(loss.forward(out, DeviceArray(labels))) == pytest.approx(
        float(loss.forward(out, labels)), rel=1e-7
    )
    targets = targets_on(model, loss, DeviceArray(labels))
    assert targets.dtype == np.int64
    np.testing.assert_array_equal(targets, labels)


def test_state_dicts_from_a_device_load(rng):
    backend = DeviceBackend()
    source, target = _model(backend), _model(backend)
    target.load_state_dict({k: DeviceArray(v) for k, v in source.state_dict().items()})
    for name, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[name], value)

    x = rng.standard_normal((4, 5)).astype(np.float32)
    optimizer = gb.Adam(source.parameters(), lr=1e-2)
    loss = gb.SoftmaxCrossEntropyLoss()
    loss.backend = backend
    loss.forward(source.forward(x), rng.integers(0, 3, 4))
    source.backward(loss.backward())
    optimizer.step()
    state = optimizer.state_dict()
    device_state = dict(state)
    device_state["buffers"] = {k: DeviceArray(v) for k, v in state["buffers"].items()}
    restored = gb.Adam(target.parameters(), lr=1e-2)
    restored.load_state_dict(device_state)
    for key, value in restored.state_dict()["buffers"].items():
        np.testing.assert_array_equal(value, state["buffers"][key])


def test_gradcheck_takes_device_arrays(rng):
    model = _model("numpy")
    x = rng.standard_normal((4, 5))
    y = rng.integers(0, 3, 4)
    result = gb.gradcheck(model, DeviceArray(x), DeviceArray(y), gb.SoftmaxCrossEntropyLoss())
    assert result.passed


def test_to_host_copies_only_device_arrays():
    class Lookup:
        """Array-like with a .get that is a lookup (as a pandas Series has)."""

        def get(self, key, default=None):
            raise AssertionError("to_host must not call a lookup .get()")

        def __array__(self, dtype=None, copy=None):
            return np.array([1.0, 2.0])

    np.testing.assert_array_equal(to_host(Lookup()), [1.0, 2.0])
    host = np.arange(3.0)
    assert to_host(host) is host
    np.testing.assert_array_equal(to_host(DeviceArray(host)), host)
