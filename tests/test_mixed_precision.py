"""Mixed-precision training: ``model.to(..., precision="tf32" | "bf16")`` (docs/derivation.md,
Mixed precision).  The GEMM operands are rounded to the precision, products accumulate in fp32,
master weights, gradients, optimizer state and checkpoints stay fp32.  The emulator's
tensor-core kernels train like the NumPy reference of each precision; bf16 reaches the fp32
accuracy on the digits job; a GPU without bf16/tf32 mma.sync is refused with its name and
compute capability.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import cli
from gpubackprop.backends.cupy_backend import CupyBackend, CupySeam, tensor_core_precisions
from gpubackprop.emulator import find_compiler
from gpubackprop.precision import PRECISIONS, bf16_bits, bf16_from_bits

needs_emulator = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler")


def _model(backend: str, precision: str, seed: int = 1) -> gb.Sequential:
    gb.seed(seed)
    model = gb.Sequential(
        gb.Dense(13, 40),
        gb.GELU(),
        gb.Residual(gb.Dense(40, 40), gb.Tanh()),
        gb.Dense(40, 5),
    )
    return model.to(backend, precision=precision)


def _train(model: gb.Sequential, steps: int = 3) -> list[float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 13)).astype(np.float32)
    y = rng.integers(0, 5, 37)
    loss = gb.SoftmaxCrossEntropyLoss()
    opt = gb.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(steps):
        value = loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step()
        values.append(float(value))
    return values


KERNEL_BACKENDS = [
    pytest.param("emu", id="emu"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


def _kernel_backend(name: str, precision: str):
    """The backend, or a skip saying why it cannot run ``precision`` here."""
    backend = gb.get_backend(name) if gb.available_backends()[name][0] else None
    if backend is None:
        pytest.skip(f"backend {name!r} is unavailable: {gb.available_backends()[name][1]}")
    if precision not in backend.precisions():
        with pytest.raises(ValueError, match=r"compute capability"):
            backend.check_precision(precision)
        pytest.skip(f"{backend.device_name()} has no {precision} mma.sync (refused, as tested)")
    return backend


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_dense_ops_match_the_reference_of_their_precision(backend_name, precision):
    """dense_forward (bias + GELU epilogue) and dense_backward (dW, db, dX) of gemm_mma.cu
    through the backend API, on odd shapes, against the NumPy model of the precision, within
    gemm_error_bound (fp32 summation order) and the epilogue's fp32 rounding."""
    from gpubackprop.precision import gemm_error_bound

    backend = _kernel_backend(backend_name, precision)
    reference = gb.get_backend("numpy")
    rng = np.random.default_rng(5)
    for m, n, k in ((33, 17, 45), (70, 130, 24), (1, 9, 7)):
        x, w = rng.standard_normal((m, k)), rng.standard_normal((n, k)) / np.sqrt(k)
        b, dout = rng.standard_normal(n), rng.standard_normal((m, n))
        x, w, b, dout = (a.astype(np.float32) for a in (x, w, b, dout))
        args = ("gelu", 0.0)
        y, _ = backend.dense_forward(*map(backend.asarray, (x, w, b)), *args, precision)
        y_ref, saved_ref = reference.dense_forward(x, w, b, *args, precision)
        bound = gemm_error_bound(x, w.T, precision, exact=False) + 2**-22 * (np.abs(y_ref) + 1)
        np.testing.assert_array_less(np.abs(backend.to_numpy(y) - y_ref), 1.13 * bound + 1e-30)
        dw, db = backend.empty((n, k), np.float32), backend.empty((n,), np.float32)
        dx = backend.dense_backward(
            backend.asarray(dout),
            backend.asarray(x),
            backend.asarray(w),
            backend.asarray(saved_ref),
            *args,
            dw,
            db,
            True,
            precision,
        )
        dw_ref, db_ref = np.empty((n, k), np.float32), np.empty(n, np.float32)
        dx_ref = reference.dense_backward(
            dout, x, w, saved_ref, *args, dw_ref, db_ref, True, precision
        )
        delta = dout * 1.2  # |GELU'| <= 1.13: a bound on |δ| for the error bounds
        for out, ref, (a, c) in (
            (dw, dw_ref, (delta.T, x)),
            (dx, dx_ref, (delta, w)),
        ):
            tol = gemm_error_bound(np.abs(a), c, precision, exact=False) + 2**-22 * np.abs(ref)
            np.testing.assert_array_less(np.abs(backend.to_numpy(out) - ref), tol + 1e-30)
        np.testing.assert_allclose(backend.to_numpy(db), db_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_tensor_core_training_matches_the_reference(backend_name, precision):
    """Three Adam steps of a model with a residual block: gemm_mma.cu (emulated, or on a GPU)
    against the NumPy model of the same precision.  Rounded operands agree bit for bit, so
    the differences are fp32 summation orders: far below the precision's own rounding."""
    _kernel_backend(backend_name, precision)
    reference, emulated = _model("numpy", precision), _model(backend_name, precision)
    losses = _train(reference), _train(emulated)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for name, value in reference.state_dict().items():
        other = emulated.state_dict()[name]
        np.testing.assert_allclose(other, value, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_the_precision_changes_the_products_but_not_the_master_weights(precision):
    fp32, low = _model("numpy", "fp32"), _model("numpy", precision)
    fp32_loss, low_loss = _train(fp32, 1), _train(low, 1)
    # The first loss is the same model's forward: it differs by the operands' rounding only.
    assert fp32_loss[0] != low_loss[0]
    assert abs(fp32_loss[0] - low_loss[0]) < 100 * {"bf16": 2**-8, "tf32": 2**-11}[precision]
    for p in low.parameters():
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
    # Master weights keep all fp32 bits: an Adam step moves them by amounts no bf16 holds.
    weight = low.parameters()[0].data
    assert not np.array_equal(weight, bf16_from_bits(bf16_bits(weight)).reshape(weight.shape))


def test_checkpoints_stay_fp32(tmp_path):
    model = _model("numpy", "bf16")
    _train(model, 2)
    path = tmp_path / "bf16.safetensors"
    gb.save(path, model)
    loaded = gb.load(path)
    for name, value in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.state_dict()[name], value)


def test_precision_arguments_are_checked():
    model = gb.Sequential(gb.Dense(3, 2))
    with pytest.raises(ValueError, match=r"precision='fp16'; expected one of fp32, tf32, bf16"):
        model.to("numpy", precision="fp16")
    with pytest.raises(ValueError, match=r"precision='bf16' needs dtype='float32'.*float64"):
        model.to("numpy", dtype="float64", precision="bf16")
    assert model.to("numpy").precision == "fp32"  # the default is today's behaviour


def test_a_gpu_below_compute_capability_8_is_refused_by_name():
    assert tensor_core_precisions((7, 5)) == ("fp32",)
    assert tensor_core_precisions((8, 0)) == PRECISIONS == tensor_core_precisions((9, 0))
    turing = CupyBackend.__new__(CupyBackend)  # a stand-in for a T4: no device needed
    turing.available, turing.reason = True, ""
    turing.seam, turing.compute_capability = CupySeam(None, "Tesla T4"), (7, 5)
    assert turing.check_precision("fp32") == "fp32"
    with pytest.raises(
        ValueError,
        match=r"precision='bf16' is not available on Tesla T4 \(compute capability 7\.5\).*"
        r"8\.0 or later; this GPU can use 'fp32'",
    ):
        turing.check_precision("bf16")


def test_train_command_takes_the_precision(tmp_path, capsys):
    path = tmp_path / "m.json"
    argv = ["train", "--dataset", "spirals", "--epochs", "2", "--hidden", "16", "--verbose", "0"]
    argv += ["--backend", "numpy", "--precision", "bf16", "--metrics-json", str(path)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert json.loads(path.read_text())["precision"] == "bf16"
    with pytest.raises(SystemExit):
        cli.main(["train", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


DIGITS_BACKENDS = [
    pytest.param("numpy", id="numpy", marks=pytest.mark.slow),
    # The emulator runs the CUDA kernels themselves: about 4 minutes of a CPU core per
    # 15-epoch bf16 run, so the six runs are a "long" case (tests/conftest.py: --long).
    pytest.param("emu", id="emu", marks=[pytest.mark.long, needs_emulator]),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend_name", DIGITS_BACKENDS)
def test_bf16_reaches_the_fp32_accuracy_on_digits(backend_name, tmp_path, capsys, monkeypatch):
    """The default digits job, seeds 0-2 (one seed alone varies by more than a point): the mean
    bf16 test accuracy within 1 percentage point of the fp32 one, on the NumPy model of bf16
    (every run), on the emulated tensor-core kernels (long) and on a GPU."""
    if backend_name != "numpy":
        _kernel_backend(backend_name, "bf16")
    # A question of accuracy, not of bounds: each emulated launch once (the parity suite runs
    # the same kernels with the guard check).
    monkeypatch.delenv("GPUBACKPROP_EMU_GUARD_CHECK", raising=False)
    accuracy = {}
    for precision in ("fp32", "bf16"):
        runs = []
        for seed in (0, 1, 2):
            path = tmp_path / f"{precision}{seed}.json"
            argv = ["train", "--backend", backend_name, "--precision", precision]
            argv += ["--seed", str(seed), "--verbose", "0", "--metrics-json", str(path)]
            assert cli.main(argv) == 0
            runs.append(json.loads(path.read_text())["test_accuracy"])
        accuracy[precision] = float(np.mean(runs))
    capsys.readouterr()
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.01, accuracy


# -- the bf16 copy of the parameters, written by the optimizer launch ------------------------


def _assert_copy_current(model: gb.Sequential) -> None:
    """The flat bf16 copy is bf16(θ) bit for bit, and every Dense's weight_bf16 its view."""
    store, backend = model.store, model.backend
    data = np.array(backend.to_numpy(store.data))
    copy = np.array(backend.to_numpy(store.bf16))
    assert copy.dtype == np.uint16 and copy.shape == data.shape
    np.testing.assert_array_equal(copy, bf16_bits(data))
    for layer in _dense_layers(model.layers):
        view = np.array(backend.to_numpy(layer.weight_bf16))
        assert view.shape == layer.weight.shape and view.dtype == np.uint16
        np.testing.assert_array_equal(view, bf16_bits(backend.to_numpy(layer.weight.data)))


def _dense_layers(layers):
    for layer in layers:
        if isinstance(layer, gb.Dense):
            yield layer
        elif hasattr(layer, "layers"):
            yield from _dense_layers(layer.layers)


def _batch(rows: int = 37):
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, 13)).astype(np.float32), rng.integers(0, 5, rows)


def _steps(model, optimizer, steps: int, max_norm=None) -> None:
    x, y = _batch()
    loss = gb.SoftmaxCrossEntropyLoss()
    for _ in range(steps):
        loss.forward(model.forward(x), y)
        model.backward(loss.backward(), need_input_grad=False)
        optimizer.step(max_norm=max_norm)


OPTIMIZERS = {
    "sgd-momentum": lambda p: gb.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: gb.Adam(p, lr=1e-2),
    "adamw+clip": lambda p: gb.AdamW(p, lr=1e-2),
}


COPY_BACKENDS = [
    "numpy",
    pytest.param("emu", marks=needs_emulator),
    pytest.param("cupy", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend_name", COPY_BACKENDS)
def test_the_optimizer_launch_keeps_the_bf16_copy_current(backend_name, optimizer):
    if backend_name != "numpy":
        _kernel_backend(backend_name, "bf16")
    model = _model(backend_name, "bf16")
    _assert_copy_current(model)  # written at placement
    opt = OPTIMIZERS[optimizer](model.parameters())
    _steps(model, opt, 4, max_norm=0.5 if "clip" in optimizer else None)
    _assert_copy_current(model)  # and by each update launch
    # A subset of the parameters (one update per parameter) writes their views.
    first = model.parameters()[:2]
    OPTIMIZERS[optimizer](first).step()
    _assert_copy_current(model)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_only_bf16_keeps_a_copy(precision):
    model = _model("numpy", precision)
    assert model.store.bf16 is None
    assert all(layer.weight_bf16 is None for layer in _dense_layers(model.layers))
    assert next(_dense_layers(model.layers)).weight_bf16 is None  # also before placement
    model.to("numpy", precision="bf16")
    assert model.store.bf16 is not None  # a new placement, a new copy
    model.to("numpy")
    assert model.store.bf16 is None and model.parameters()[0].bf16 is None


def _without_copy(model: gb.Sequential) -> gb.Sequential:
    """The same bf16 model with its copy dropped: the GEMMs round the fp32 weights per call,
    as they did before the optimizer kept a copy."""
    model.store.bf16 = None
    for p in model.parameters():
        p.bf16 = None
    return model


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_training_with_the_copy_is_bitwise_training_without(backend_name, optimizer):
    """The copy holds what rounding the weight per call gave: 5 steps on emu (or a GPU)
    agree bit for bit with the per-call path."""
    _kernel_backend(backend_name, "bf16")
    max_norm = 0.5 if "clip" in optimizer else None
    results = []
    for keep_copy in (True, False):
        model = _model(backend_name, "bf16")
        if not keep_copy:
            _without_copy(model)
        opt = OPTIMIZERS[optimizer](model.parameters())
        _steps(model, opt, 5, max_norm)
        results.append(model.state_dict())
    for name, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][name], err_msg=name)


def test_a_bf16_step_launches_no_weight_conversion():
    """On the recording seam: to_bf16 per step only for the activations and δ; the weights'
    bf16 operands come from the copy (3 forward GEMMs + 2 dX GEMMs = 5 launches fewer), and
    the update launch writes the copy (sgd_update's write_bf16 flag)."""
    from gpubackprop.backends.recording import HostBackend

    counts = {}
    for keep_copy in (True, False):
        backend = HostBackend()
        model = _model(backend, "bf16")
        if not keep_copy:
            _without_copy(model)
        opt = gb.SGD(model.parameters(), lr=0.1)
        _steps(model, opt, 1)  # the first step builds what later steps reuse
        backend.seam.clear()
        _steps(model, opt, 1)
        launches = backend.seam.launches
        counts[keep_copy] = [launch.kernel for launch in launches]
        (update,) = [launch for launch in launches if launch.kernel == "sgd_update"]
        assert int(update.args[-2]) == int(keep_copy)  # write_bf16 (then advance)
    assert len(counts[True]) == len(counts[False]) - 5
    assert counts[False].count("to_bf16") - counts[True].count("to_bf16") == 5


@needs_emulator
def test_save_load_and_continue_in_bf16_refreshes_the_copy(tmp_path):
    """Checkpoints hold fp32; loading into a bf16 placement rebuilds the copy, and training
    on from the loaded model and optimizer is bitwise training on from the original."""
    model = _model("emu", "bf16")
    opt = gb.Adam(model.parameters(), lr=1e-2)
    _steps(model, opt, 2)
    path = tmp_path / "bf16.safetensors"
    gb.save(path, model, opt)
    loaded, loaded_opt = gb.load(path, backend="emu", precision="bf16", with_optimizer=True)
    assert loaded.precision == "bf16"
    _assert_copy_current(loaded)
    _steps(model, opt, 2)
    _steps(loaded, loaded_opt, 2)
    _assert_copy_current(loaded)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    # load_state_dict into a placed bf16 model rewrites the copy with the new values.
    fresh = _model("emu", "bf16", seed=7)
    fresh.load_state_dict(model.state_dict())
    _assert_copy_current(fresh)


@pytest.mark.parametrize("backend_name", ["numpy", pytest.param("emu", marks=needs_emulator)])
def test_weight_bf16_arguments_are_checked(backend_name):
    backend = gb.get_backend(backend_name)
    x = backend.asarray(np.ones((2, 3), np.float32))
    w = backend.asarray(np.ones((4, 3), np.float32))
    bits = backend.asarray(bf16_bits(np.ones((4, 3), np.float32)), np.uint16)
    with pytest.raises(ValueError, match="weight_bf16 is accepted with precision='bf16' only"):
        backend.dense_forward(x, w, None, "relu", precision="tf32", weight_bf16=bits)
    with pytest.raises(ValueError, match="weight_bf16"):
        backend.dense_forward(x, w, None, "relu", precision="bf16", weight_bf16=bits[:2])
    with pytest.raises(ValueError, match="weight_bf16"):
        backend.dense_forward(x, w, None, "relu", precision="bf16", weight_bf16=w)
    y, _ = backend.dense_forward(x, w, None, "relu", precision="bf16", weight_bf16=bits)
    y_ref, _ = backend.dense_forward(x, w, None, "relu", precision="bf16")
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y_ref))


def _bf16_model(backend, seed: int = 2) -> gb.Sequential:
    """Dense → Dense → Residual(Dense) → Dense, linked: each Dense reads the bf16 output of the
    step before it (the Residual's add writes one for the last Dense)."""
    gb.seed(seed)
    model = gb.Sequential(
        gb.Dense(13, 40),
        gb.GELU(),
        gb.Dense(40, 24),
        gb.Sigmoid(),
        gb.Residual(gb.Dense(24, 24), gb.Tanh()),
        gb.Dense(24, 5, bias=False),
    )
    return model.to(backend, precision="bf16")


def _round_per_call(steps) -> None:
    """Switch a plan's bf16 activations off: every GEMM call rounds its x itself (the path
    before activations were stored in bf16), the reference of the bitwise test."""
    from gpubackprop.plan import DenseStep, ResidualStep

    for step in steps:
        if isinstance(step, DenseStep):
            step.bf16_activations, step.write_bf16, step.source = False, False, None
        elif isinstance(step, ResidualStep):
            step.write_bf16 = False
            _round_per_call(step.steps)


def _train_steps(model, steps: int) -> list[float]:
    rng = np.random.default_rng(4)
    x = model.backend.asarray(rng.standard_normal((29, 13)).astype(np.float32))
    y = model.backend.asarray(rng.integers(0, 5, 29))
    loss = gb.SoftmaxCrossEntropyLoss()
    opt = gb.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(steps):
        values.append(loss.forward(model.forward(x), y))
        model.backward(loss.backward())
        opt.step()
    return [float(v) for v in values]


@needs_emulator
def test_bf16_activations_between_layers_are_bitwise_the_per_call_rounding():
    """Five Adam steps of a bf16 model on emu: the layers that store bf16(y) in the forward
    epilogue for the next layer (and keep bf16(x) for the dW GEMM) give exactly the bits of
    rounding x in every GEMM call (the same round to nearest even of the same fp32 values);
    and both follow the NumPy model of bf16 (ml_dtypes rounding) within fp32 summation order."""
    from gpubackprop.plan import DenseStep

    stored, per_call = _bf16_model("emu"), _bf16_model("emu")
    _round_per_call(per_call.plan.steps)
    steps = stored.plan.steps
    dense = [steps[0], steps[1], steps[2].steps[0], steps[3]]  # the third inside the Residual
    assert all(isinstance(s, DenseStep) for s in dense)
    assert [s.write_bf16 for s in dense] == [True, True, False, False]
    assert [s.source for s in dense] == [None, dense[0], dense[1], steps[2]]
    assert steps[2].write_bf16
    losses = _train_steps(stored, 5), _train_steps(per_call, 5)
    assert losses[0] == losses[1]
    for name, value in per_call.state_dict().items():
        np.testing.assert_array_equal(stored.state_dict()[name], value, err_msg=name)
    # The copies the layers read are bf16 of the fp32 outputs (a Dense's, the Residual's sum).
    for source in (dense[0], steps[2]):
        as_host = stored.backend.to_numpy
        np.testing.assert_array_equal(as_host(source.y_bf16), bf16_bits(as_host(source._y)))
    reference = _bf16_model("numpy")
    np.testing.assert_allclose(_train_steps(reference, 5), losses[0], rtol=1e-5)


def test_a_bf16_training_step_converts_only_inputs_no_layer_before_wrote_in_bf16():
    """Launches of one bf16 training step (recorded, not run): bf16(x) is made once per batch
    for the model's input, nowhere else (the layers read the epilogue output of the Dense
    before them or the Residual's add_bf16, the backward GEMMs the copies the forward kept,
    the weights the optimizer's copy); each dense backward is its two GEMMs."""
    from gpubackprop.backends.recording import HostBackend

    counts = {}
    for stored in (True, False):
        model = _bf16_model(HostBackend())
        if not stored:
            _round_per_call(model.plan.steps)
        x, y = np.zeros((29, 13), np.float32), np.zeros(29, np.int64)
        loss = gb.SoftmaxCrossEntropyLoss()
        opt = gb.SGD(model.parameters(), lr=0.1)
        loss.forward(model.forward(x), y)  # the first step builds the optimizer's state
        model.backward(loss.backward())
        opt.step()
        model.backend.seam.clear()
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step()
        kernels = [launch.kernel for launch in model.backend.seam.launches]
        counts[stored] = kernels
        backward = [k for k in kernels if k.startswith("dense_backward")]
        assert backward == ["dense_backward_weight_act_bf16", "dense_backward_data_bf16"] * 4
    # Stored: the model's input.  Per call: x in every forward and every dW GEMM (dX reads the
    # optimizer's bf16 weights in both).  The Residual's sum is one launch either way.
    assert counts[True].count("to_bf16") == 1
    assert counts[False].count("to_bf16") == 2 * 4
    assert counts[True].count("add_bf16") == 1  # the forward's sum; the backward's is fp32
    assert counts[True].count("gb_add") == 1 and counts[False].count("gb_add") == 2
    assert len(counts[False]) - len(counts[True]) == 7


def test_bf16_operand_arguments_are_checked():
    backend = gb.get_backend("numpy")
    x, w = np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"x_bf16 is accepted with precision='bf16' only"):
        backend.dense_forward(x, w, None, "relu", x_bf16=bf16_bits(x))
    with pytest.raises(
        ValueError, match=r"y_bf16.shape=\(3, 3\) is not accepted; expected \(3, 2\)"
    ):
        backend.dense_forward(x, w, None, "relu", 0.0, "bf16", y_bf16=np.zeros((3, 3), np.uint16))
    y16 = np.zeros((3, 2), np.uint16)
    y, _ = backend.dense_forward(x, w, None, "relu", 0.0, "bf16", y_bf16=y16)
    np.testing.assert_array_equal(y16, bf16_bits(y))
    with pytest.raises(ValueError, match=r"out_bf16 is ndarray float32; expected a uint16 array"):
        backend.add(x, x, out_bf16=x)


@needs_emulator
def test_add_bf16_is_the_sum_and_its_bf16_copy():
    """gemm_mma.cu's add_bf16 (a Residual's sum in a bf16 model): the sum bitwise the plain
    add's, the copy bf16 of it (round to nearest even), at a size no block divides."""
    emu = gb.get_backend("emu")
    rng = np.random.default_rng(6)
    a, b = (rng.standard_normal((37, 53)).astype(np.float32) * 300 for _ in range(2))
    out16 = emu.empty((37, 53), np.uint16)
    total = emu.add(emu.asarray(a), emu.asarray(b), out_bf16=out16)
    np.testing.assert_array_equal(emu.to_numpy(total), emu.to_numpy(emu.add(a, b)))
    np.testing.assert_array_equal(emu.to_numpy(out16), bf16_bits(a + b))
    with pytest.raises(ValueError, match=r"out_bf16"):
        emu.add(emu.asarray(a), emu.asarray(b), out_bf16=emu.empty((37, 52), np.uint16))
