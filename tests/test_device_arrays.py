"""The emulator's device arrays follow CuPy's rules, and the library keeps them.

DeviceArray (gpubackprop/emulator/device_arrays.py) refuses implicit conversion to NumPy and
mixing with NumPy arrays, as cupy.ndarray does.  The emu backend with device_arrays=True runs
the same launchers as the cupy backend on such arrays, so a whole training loop here (fit with
validation and callbacks, evaluate, predict, checkpoints, gradcheck, the benchmark's training
step) is the GPU code path with only the kernels' hardware swapped out.  Its results must equal
the plain emu backend's bit for bit: same kernels, same order.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends import available_backends
from gpubackprop.backends.emu_backend import EmuBackend
from gpubackprop.emulator.device_arrays import DeviceArray, device_xp

needs_emu = pytest.mark.skipif(
    not available_backends()["emu"][0], reason=f"emu unavailable: {available_backends()['emu'][1]}"
)


@pytest.fixture(scope="module")
def device_backend():
    return EmuBackend(device_arrays=True)


@pytest.fixture(scope="module")
def plain_backend():
    return EmuBackend()


# -- the rules ----------------------------------------------------------------------------------


def test_no_implicit_conversion_and_explicit_copies():
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    device = device_xp.asarray(host)
    assert isinstance(device, DeviceArray) and not isinstance(device, np.ndarray)
    for convert in (np.asarray, np.array, np.ascontiguousarray, lambda a: np.float32(1) * host + a):
        with pytest.raises(TypeError):
            convert(device)
    copy = device.get()
    assert isinstance(copy, np.ndarray)
    np.testing.assert_array_equal(copy, host)
    copy[0, 0] = 99.0  # a copy, not a view
    assert float(device[0, 0]) == 0.0
    assert device.data.ptr % 16 == 0 and device.device.id == 0


def test_numpy_functions_and_operators_stay_on_the_device():
    a = device_xp.asarray(np.array([[1.0, -2.0], [3.0, 4.0]]))
    b = a @ a.T + 1
    assert isinstance(b, DeviceArray)
    np.testing.assert_array_equal(b.get(), np.array([[6.0, -4.0], [-4.0, 26.0]]))
    total = np.sum(a)  # a reduction gives a 0-d device array, as in CuPy
    assert isinstance(total, DeviceArray) and total.shape == () and float(total) == 6.0
    assert isinstance(a.max(), DeviceArray) and int(device_xp.argmax(a, axis=1)[0]) == 0
    np.multiply(a, 2, out=a)  # in place through out=
    np.testing.assert_array_equal(a.get(), [[2.0, -4.0], [6.0, 8.0]])
    a[0] = np.array([5.0, 6.0])  # a host value may be assigned, as cupy allows
    assert a[0].get().tolist() == [5.0, 6.0]
    assert [row.shape for row in a] == [(2,), (2,)]


def test_ufunc_outputs_given_in_part_come_back_with_the_new_ones():
    a = device_xp.asarray(np.array([7.0, -3.0]))
    quotient = device_xp.zeros((2,))
    q, r = np.divmod(a, 2.0, out=(quotient, None))
    assert q is quotient and isinstance(r, DeviceArray)
    np.testing.assert_array_equal(q.get(), [3.0, -2.0])
    np.testing.assert_array_equal(r.get(), [1.0, 1.0])


def test_ascontiguousarray_takes_device_arrays_only_and_env_is_validated(monkeypatch):
    from gpubackprop.emulator import device_arrays_from_env

    with pytest.raises(TypeError, match=r"device_xp\.asarray"):
        device_xp.ascontiguousarray(np.ones(3))
    strided = device_xp.asarray(np.arange(12.0).reshape(3, 4))[:, ::2]
    assert device_xp.ascontiguousarray(strided).flags.c_contiguous
    monkeypatch.setenv("GPUBACKPROP_EMU_DEVICE_ARRAYS", "yes")
    with pytest.raises(ValueError, match="GPUBACKPROP_EMU_DEVICE_ARRAYS='yes'"):
        device_arrays_from_env()
    monkeypatch.setenv("GPUBACKPROP_EMU_DEVICE_ARRAYS", "1")
    assert device_arrays_from_env()


def test_mixing_with_numpy_arrays_is_refused():
    a = device_xp.zeros((3,), dtype=np.float32)
    host = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="beside device arrays"):
        a + host
    with pytest.raises(TypeError, match="beside device arrays"):
        np.concatenate([a, host])
    a + 2.0  # scalars are fine


@needs_emu
def test_a_kernel_launch_refuses_host_arrays(device_backend):
    x = np.ones((4, 3), dtype=np.float32)
    w = device_xp.asarray(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        device_backend.seam.launch(
            device_backend._module("reduce.cu", np.dtype(np.float32)),
            "sum_squares_partial",
            (1, 1, 1),
            (32, 1, 1),
            (x, np.int64(12), w),
        )
    y, _ = device_backend.dense_forward(device_backend.asarray(x), w, None, "relu")
    assert isinstance(y, DeviceArray)
    np.testing.assert_array_equal(device_backend.to_numpy(y), np.full((4, 2), 3.0, np.float32))


# -- the library keeps them -------------------------------------------------------------------


def _data(seed=3, n=48, features=6, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    return x, rng.integers(0, classes, n)


def _train(backend, tmp_path, tag):
    gb.seed(7)
    x, y = _data()
    model = gb.Sequential(gb.Dense(6, 16), gb.GELU(), gb.Dense(16, 3)).to(backend)
    optimizer = gb.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    path = tmp_path / f"{tag}-best.safetensors"
    history = model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=optimizer,
        epochs=3,
        batch_size=16,
        validation_data=(x[:16], y[:16]),
        verbose=0,
        callbacks=[
            gb.EarlyStopping(patience=5, restore_best_weights=True),
            gb.ModelCheckpoint(path, save_best_only=True),
        ],
    )
    return model, optimizer, history, path


@needs_emu
def test_training_loop_on_device_arrays_equals_plain_emu(device_backend, plain_backend, tmp_path):
    device_model, device_opt, device_history, device_path = _train(device_backend, tmp_path, "d")
    plain_model, _, plain_history, _ = _train(plain_backend, tmp_path, "p")
    for key, values in plain_history.history.items():
        if key != "samples_per_s":  # a timing
            assert device_history.history[key] == values, key
    for name, value in plain_model.state_dict().items():
        np.testing.assert_array_equal(device_model.state_dict()[name], value)

    x, y = _data(seed=4)
    assert device_model.evaluate(x, y, gb.SoftmaxCrossEntropyLoss()) == plain_model.evaluate(
        x, y, gb.SoftmaxCrossEntropyLoss()
    )
    predicted = device_model.predict(x)
    assert isinstance(predicted, np.ndarray)
    np.testing.assert_array_equal(predicted, plain_model.predict(x))
    # Inputs already on the device are taken as they are.
    on_device = device_model.predict(device_xp.asarray(x))
    np.testing.assert_array_equal(on_device, predicted)
    assert device_model.evaluate(
        device_xp.asarray(x), device_xp.asarray(y), gb.SoftmaxCrossEntropyLoss()
    ) == plain_model.evaluate(x, y, gb.SoftmaxCrossEntropyLoss())

    gb.save(tmp_path / "latest.safetensors", device_model, device_opt)
    loaded, loaded_opt = gb.load(
        tmp_path / "latest.safetensors", backend=device_backend, with_optimizer=True
    )
    for name, value in device_model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)
    assert loaded_opt.step_count == device_opt.step_count
    assert gb.load(device_path, backend=device_backend).num_parameters() == 163


@needs_emu
@pytest.mark.parametrize("loss", [gb.MSELoss(), gb.BCEWithLogitsLoss()], ids=["mse", "bce"])
def test_regression_and_binary_losses_on_device_arrays(device_backend, loss):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = (rng.random((32, 2)) > 0.5).astype(np.float32)
    model = gb.Sequential(gb.Dense(4, 8), gb.Tanh(), gb.Dense(8, 2)).to(device_backend)
    history = model.fit(
        x, y, loss=loss, optimizer=gb.SGD(model.parameters(), lr=0.1), epochs=2, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(model.evaluate(x, y, loss)["loss"])


@needs_emu
def test_gradcheck_and_benchmark_step_on_device_arrays(device_backend):
    from gpubackprop.benchmarks import BenchConfig, TimingSettings
    from gpubackprop.benchmarks.cases import Context, gemm_case, train_case
    from gpubackprop.benchmarks.run import measure_case

    model = gb.Sequential(gb.Dense(3, 5), gb.SiLU(), gb.Dense(5, 2))
    x, y = np.random.default_rng(6).standard_normal((4, 3)), np.array([0, 1, 1, 0])
    assert gb.gradcheck(model, x, y, gb.SoftmaxCrossEntropyLoss(), backend=device_backend).passed

    config = BenchConfig(backends=["emu"], preset="tiny", torch=False, verbose=False)
    ctx = Context(device_backend, np.dtype(np.float32), config, "cpu")
    settings = TimingSettings(
        warmup_calls=1, warmup_s=0.0, batch_s=0.0, min_rounds=2, max_rounds=2, budget_s=0.0
    )
    ceilings = {"copy_gbps": 1, "gemm_tflops": 1}
    row = measure_case(train_case((12, 16, 5), 8, 4), ctx, settings, ceilings)
    assert row["status"] == "ok", row
    # The benchmark's other GEMM versions run on a sibling backend that takes the same arrays.
    for version in ("warptiled", "naive"):
        row = measure_case(gemm_case(33, 17, 9, "dX+dW", 4, version), ctx, settings, ceilings)
        assert row["status"] == "ok" and row["name"].endswith(f"@{version}"), row


@needs_emu
def test_device_name_says_so(device_backend, plain_backend):
    assert "CuPy-like device arrays" in device_backend.device_name()
    assert "device arrays" not in plain_backend.device_name()


@needs_emu
def test_with_gemm_version_shares_the_seam(device_backend):
    sibling = device_backend.with_gemm_version("warptiled")
    assert sibling.seam is device_backend.seam and sibling.gemm_version == "warptiled"
    assert device_backend.gemm_version == "tiled" and sibling.available
    rng = np.random.default_rng(8)
    x = device_backend.asarray(rng.standard_normal((33, 9)), np.float32)
    w = device_backend.asarray(rng.standard_normal((17, 9)), np.float32)
    ours, _ = device_backend.dense_forward(x, w, None, "identity")
    theirs, _ = sibling.dense_forward(x, w, None, "identity")
    np.testing.assert_allclose(ours.get(), theirs.get(), rtol=1e-5, atol=1e-5)
    relu, _ = sibling.activation_forward(theirs, "relu")  # its elementwise kernels work too
    np.testing.assert_array_equal(relu.get(), np.maximum(theirs.get(), 0))
    with pytest.raises(ValueError, match="gemm_version='fast'"):
        device_backend.with_gemm_version("fast")
