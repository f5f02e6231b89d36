"""Arrays from other libraries in, the backend's arrays out (DLPack; issue 16, part 1).

forward, fit, predict, evaluate and the losses take any array with ``__dlpack__`` (PyTorch here;
JAX and CuPy where installed) or with the NumPy array protocol, through one function
(arrays.import_array).  Each test compares against the same call on a contiguous NumPy copy of
the same values, which a misread stride, a lost offset or a wrong dtype would not match."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.arrays import import_array
from gpubackprop.backends import available_backends
from gpubackprop.backends.emu_backend import EmuBackend
from gpubackprop.emulator.device_arrays import DeviceArray, device_xp

torch = pytest.importorskip("torch")

FEATURES, CLASSES = 6, 4


def _backend(name: str):
    if name in ("emu", "emu-device-arrays"):
        ok, reason = available_backends()["emu"]
        if not ok:
            pytest.skip(f"emu unavailable: {reason}")
        return EmuBackend(device_arrays=True) if name == "emu-device-arrays" else "emu"
    return name


BACKENDS = ["numpy", "emu", "emu-device-arrays"]


def _model(backend, dtype="float64", seed=3):
    gb.seed(seed)
    return gb.Sequential(
        gb.Dense(FEATURES, 9),
        gb.GELU(),
        gb.Residual(gb.Dense(9, 9), gb.Tanh()),
        gb.Dense(9, CLASSES),
    ).to(_backend(backend), dtype=dtype)


def _host(model, array) -> np.ndarray:
    return np.array(model.backend.to_numpy(array))


def _tensor_layouts(rows: int, dtype=torch.float32) -> dict:
    """Torch tensors with the same values laid out in different ways (values in [-2, 2))."""
    generator = torch.Generator().manual_seed(rows)
    base = torch.rand(3 * rows, 2 * FEATURES, generator=generator, dtype=dtype) * 4 - 2
    return {
        "contiguous": base[:rows, :FEATURES].contiguous(),
        "transposed": base[:FEATURES, :rows].contiguous().T,
        "strided": base[::3, ::2],
        "offset": base[rows : 2 * rows, 3 : 3 + FEATURES],
        "broadcast": base[:1, :FEATURES].expand(rows, FEATURES),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "offset", "broadcast"])
def test_torch_tensors_of_any_layout_are_read_right(backend, layout):
    model = _model(backend)
    tensor = _tensor_layouts(5)[layout]
    assert tensor.is_contiguous() == (layout == "contiguous")
    copy = np.ascontiguousarray(tensor.numpy())
    np.testing.assert_array_equal(_host(model, model.forward(tensor)), model.predict(copy))
    np.testing.assert_array_equal(model.predict(tensor, batch_size=2), model.predict(copy, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_views_of_any_layout_are_read_right(backend):
    model = _model(backend)
    base = np.random.default_rng(0).uniform(-2, 2, size=(14, 2 * FEATURES))
    views = {
        "transposed": np.ascontiguousarray(base[:FEATURES, :5]).T,
        "strided": base[::3, ::2],
        "reversed": base[::-3, ::-2],
        "fortran": np.asfortranarray(base[:5, :FEATURES]),
    }
    for name, view in views.items():
        expected = _host(model, model.forward(np.ascontiguousarray(view)))
        np.testing.assert_array_equal(_host(model, model.forward(view)), expected, err_msg=name)


def test_contiguous_cpu_tensor_is_not_copied_on_numpy():
    model = _model("numpy", dtype="float32")
    tensor = _tensor_layouts(5)["contiguous"]
    x = model.prepare_input(tensor)
    assert np.shares_memory(x, tensor.numpy())
    # A view with strides, or another dtype, is copied (once) into a contiguous array instead.
    assert not np.shares_memory(model.prepare_input(tensor.T.contiguous().T), tensor.numpy())
    as_float64 = _model("numpy", dtype="float64").prepare_input(tensor)
    assert as_float64.dtype == np.float64 and not np.shares_memory(as_float64, tensor.numpy())
    np.testing.assert_array_equal(as_float64, tensor.numpy().astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_stay_backend_arrays_and_export_through_dlpack(backend):
    model = _model(backend)
    out = model.forward(_tensor_layouts(5)["strided"])
    expected_type = DeviceArray if backend == "emu-device-arrays" else np.ndarray
    assert type(out) is expected_type
    exported = torch.from_dlpack(out)  # no copy: the same memory as the backend's array
    assert exported.dtype == torch.float64 and tuple(exported.shape) == (5, CLASSES)
    host = _host(model, out)
    np.testing.assert_array_equal(exported.numpy(), host)
    pointer = out.data.ptr if backend == "emu-device-arrays" else out.ctypes.data
    assert exported.data_ptr() == pointer


def _fit(model, x, y, xv, yv):
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    gb.seed(11)  # the same batch order for both runs
    history = model.fit(
        x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=optimizer, epochs=2, batch_size=8,
        validation_data=(xv, yv), verbose=0,
    )  # fmt: skip
    return history.history


@pytest.mark.parametrize("backend", ["numpy", "emu-device-arrays"])
def test_fit_and_evaluate_take_tensors(backend):
    layouts, valid = _tensor_layouts(21), _tensor_layouts(7)
    labels = torch.arange(21) % CLASSES
    valid_labels = (torch.arange(7) * 3) % CLASSES
    from_torch, from_numpy = _model(backend), _model(backend)
    history_torch = _fit(from_torch, layouts["strided"], labels, valid["transposed"], valid_labels)
    history_numpy = _fit(
        from_numpy,
        np.ascontiguousarray(layouts["strided"].numpy()),
        labels.numpy(),
        np.ascontiguousarray(valid["transposed"].numpy()),
        valid_labels.numpy(),
    )
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history_torch[key] == history_numpy[key], key
    for name, value in from_torch.state_dict().items():
        np.testing.assert_array_equal(value, from_numpy.state_dict()[name], err_msg=name)
    # Probabilities as targets, and a float tensor through evaluate.
    probabilities = torch.softmax(valid["offset"][:, :CLASSES].double(), dim=1)
    assert from_torch.evaluate(valid["offset"], probabilities) == from_numpy.evaluate(
        valid["offset"].numpy(), probabilities.numpy()
    )


@pytest.mark.parametrize(
    "loss, target",
    [
        (
            gb.MSELoss(),
            lambda rows: torch.rand(rows, CLASSES, dtype=torch.float64).T.contiguous().T,
        ),
        (gb.SoftmaxCrossEntropyLoss(), lambda rows: torch.arange(rows) % CLASSES),
        (
            gb.BCEWithLogitsLoss(),
            lambda rows: torch.rand(2 * rows, CLASSES, dtype=torch.float64)[::2],
        ),
        (gb.BCELoss(), lambda rows: torch.rand(rows, CLASSES, dtype=torch.float64)),
    ],
    ids=["mse", "cross_entropy", "bce_with_logits", "bce"],
)
def test_losses_take_tensors(loss, target):
    pred = torch.randn(
        CLASSES, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    ).T
    if isinstance(loss, gb.BCELoss):  # probabilities, still a transposed view
        pred = torch.sigmoid(pred.T).T
    assert not pred.is_contiguous()
    y = target(5)
    value = loss.forward(pred, y)
    grad = np.array(loss.backward())
    expected = loss.forward(np.ascontiguousarray(pred.numpy()), np.ascontiguousarray(y.numpy()))
    assert float(value) == float(expected)
    np.testing.assert_array_equal(grad, loss.backward())
    # PyTorch's own loss on the same tensors: the semantics are PyTorch's.
    torch_pred = pred.clone().requires_grad_(True)
    torch_loss = {
        "MSELoss": torch.nn.functional.mse_loss,
        "SoftmaxCrossEntropyLoss": torch.nn.functional.cross_entropy,
        "BCEWithLogitsLoss": torch.nn.functional.binary_cross_entropy_with_logits,
        "BCELoss": torch.nn.functional.binary_cross_entropy,
    }[type(loss).__name__](torch_pred, y)
    torch_loss.backward()
    np.testing.assert_allclose(float(value), torch_loss.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, torch_pred.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_device_array_of_another_backend_is_copied_to_the_host():
    model = _model("numpy")
    host = np.random.default_rng(1).normal(size=(4, FEATURES))
    device = device_xp.asarray(host)  # the emulator's stand-in for a cupy.ndarray
    np.testing.assert_array_equal(model.forward(device), model.forward(host))
    assert import_array(device, device_xp) is device  # its own backend takes it as it is


class _ForeignDeviceArray:
    """A producer on a CUDA device (DLPack device type 2) whose memory NumPy cannot read in
    place: it hands out a host copy when asked for one (DLPack 1.0's dl_device), as PyTorch and
    CuPy do for their GPU arrays, or refuses."""

    def __init__(self, values: np.ndarray, can_copy_to_host: bool):
        self.values, self.can_copy_to_host, self.requests = values, can_copy_to_host, []
        self.shape, self.dtype = values.shape, values.dtype

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.requests.append(dl_device)
        if dl_device is None or tuple(dl_device) != (1, 0) or not self.can_copy_to_host:
            raise BufferError("this producer cannot export to the CPU")
        return self.values.copy().__dlpack__(max_version=max_version)


def test_array_on_another_device_is_copied_once_to_the_host():
    values = np.random.default_rng(2).normal(size=(3, FEATURES))
    foreign = _ForeignDeviceArray(values, can_copy_to_host=True)
    model = _model("numpy")
    np.testing.assert_array_equal(model.forward(foreign), model.forward(values))
    assert [tuple(d) for d in foreign.requests] == [(1, 0)]  # one export, to the CPU


def test_refused_arrays_say_what_they_are_and_what_is_accepted():
    model = _model("numpy")
    refused = {
        "requires_grad": (torch.ones(3, FEATURES, requires_grad=True), "require gradient"),
        "bfloat16": (torch.ones(3, FEATURES, dtype=torch.bfloat16), "bfloat16"),
        "gpu": (_ForeignDeviceArray(np.ones((3, FEATURES)), can_copy_to_host=False), r"\.cpu\(\)"),
    }
    for name, (array, detail) in refused.items():
        with pytest.raises(TypeError, match=detail) as raised:
            model.forward(array)
        message = str(raised.value)
        assert message.startswith("x is a "), name
        assert "Accepted: NumPy arrays" in message and "__dlpack__" in message, name
    with pytest.raises(TypeError, match=r"^y is a torch\.Tensor .*require gradient"):
        model.evaluate(np.ones((3, FEATURES)), torch.ones(3, CLASSES, requires_grad=True))
    with pytest.raises(TypeError, match=r"^pred is a torch\.Tensor"):
        gb.MSELoss().forward(torch.ones(3, 2, requires_grad=True), np.ones((3, 2)))


def test_state_dict_loads_from_torch_tensors():
    model = _model("numpy")
    state = {k: torch.from_numpy(np.asfortranarray(v * 2)) for k, v in model.state_dict().items()}
    expected = {k: v.numpy().copy() for k, v in state.items()}
    model.load_state_dict(state)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


class _FakeCupyArray:
    """Stands in for a cupy.ndarray on GPU ``device_id`` (recognised as CuPy's by its module)."""

    def __init__(self, device_id: int, source=None):
        self.device, self.source = SimpleNamespace(id=device_id), source

    def copy(self):  # cupy.ndarray.copy copies onto the current device
        return _FakeCupyArray(_FAKE_CURRENT_GPU, source=self)


_FakeCupyArray.__module__ = "cupy._core.core"
_FAKE_CURRENT_GPU = 0
_fake_cupy = SimpleNamespace(
    __name__="cupy",
    ndarray=_FakeCupyArray,
    cuda=SimpleNamespace(Device=lambda: SimpleNamespace(id=_FAKE_CURRENT_GPU)),
    from_dlpack=lambda producer: _FakeCupyArray(producer.__dlpack_device__()[1], producer),
)


class _CudaProducer:
    """A DLPack producer on GPU ``device_id`` (a CUDA torch tensor, say)."""

    def __init__(self, device_id: int):
        self.device_id = device_id

    def __dlpack_device__(self):
        return (2, self.device_id)

    def __dlpack__(self, **kwargs):
        raise AssertionError("the cupy path imports with xp.from_dlpack, not NumPy")


def test_gpu_arrays_are_taken_in_place_on_the_current_gpu_and_copied_from_another():
    """The routing on the cupy backend, with a stand-in for CuPy (no GPU here): DLPack through
    cupy.from_dlpack (CuPy's current stream), one copy when the array is on another GPU."""
    here, there = _FakeCupyArray(0), _FakeCupyArray(1)
    assert import_array(here, _fake_cupy) is here
    moved = import_array(there, _fake_cupy)
    assert moved.device.id == 0 and moved.source is there
    producer_here, producer_there = _CudaProducer(0), _CudaProducer(1)
    imported = import_array(producer_here, _fake_cupy)
    assert imported.device.id == 0 and imported.source is producer_here  # no copy
    copied = import_array(producer_there, _fake_cupy)
    assert copied.device.id == 0 and copied.source.source is producer_there  # one copy


@pytest.mark.gpu
def test_cuda_tensor_is_used_in_place_on_cupy():
    ok, reason = available_backends()["cupy"]
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs the cupy backend and a CUDA build of torch: {reason}")
    model = _model("cupy", dtype="float32")
    tensor = torch.randn(5, FEATURES, device="cuda")
    x = model.prepare_input(tensor)
    assert x.data.ptr == tensor.data_ptr()  # DLPack: the same memory, no copy
    out = model.forward(tensor.T.contiguous().T)
    exported = torch.from_dlpack(out)
    assert exported.is_cuda
    np.testing.assert_allclose(exported.cpu().numpy(), model.predict(tensor.cpu()), rtol=1e-6)
