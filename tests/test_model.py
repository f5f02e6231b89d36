"""Model-level behaviour: placement, determinism, state, training loop, bad input."""

import logging

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends import get_backend


def _mlp(seed=0, activation=gb.ReLU):
    gb.seed(seed)
    return gb.Sequential(
        gb.Dense(4, 16), activation(), gb.Residual(gb.Dense(16, 16), gb.Tanh()), gb.Dense(16, 3)
    )


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    return x, y


def _train(seed, backend="numpy"):
    model = _mlp(seed).to(backend, "float32")
    x, y = _data()
    opt = gb.Adam(model.parameters(), lr=1e-2)
    history = model.fit(
        x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=opt, epochs=3, batch_size=16, verbose=0
    )
    return model, history


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_same_seed_gives_a_bitwise_identical_run(backend):
    ok, reason = gb.available_backends()[backend]
    if not ok:
        pytest.skip(f"{backend} unavailable: {reason}")
    a, history_a = _train(5, backend)
    b, history_b = _train(5, backend)
    for name, value in a.state_dict().items():
        assert np.array_equal(value, b.state_dict()[name]), name
    assert history_a["loss"] == history_b["loss"]
    assert history_a["accuracy"] == history_b["accuracy"]
    c, _ = _train(6, backend)
    assert not np.array_equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


def test_plan_fuses_dense_and_activation():
    model = _mlp().to("numpy")
    kinds = [type(step).__name__ for step in model.steps]
    assert kinds == ["DenseStep", "ResidualStep", "DenseStep"]
    assert model.steps[0].activation == "relu"
    assert model.steps[0].weight is model.layers[0].weight
    assert model.steps[1].steps[0].activation == "tanh"
    assert model.steps[2].activation == "identity"


def test_parameters_are_views_into_flat_buffers():
    model = _mlp().to("numpy", "float64")
    params = model.parameters()
    assert [p.name for p in params] == [
        "0.weight",
        "0.bias",
        "2.0.weight",
        "2.0.bias",
        "3.weight",
        "3.bias",
    ]
    store = model.store
    for p in params:
        assert np.shares_memory(p.data, store.data) and np.shares_memory(p.grad, store.grad)
        # each view starts 256 bytes past an aligned point, like a fresh allocation
        assert (p.data.ctypes.data - store.data.ctypes.data) % 256 == 0
    store.data[:] = 0.0
    assert all(np.all(p.data == 0) for p in params)


def test_backward_overwrites_gradients():
    model = _mlp().to("numpy", "float64")
    x, y = _data(8)
    loss = gb.SoftmaxCrossEntropyLoss()
    loss.forward(model.forward(x), y)
    model.backward(loss.backward())
    first = {p.name: p.grad.copy() for p in model.parameters()}
    loss.forward(model.forward(x), y)
    model.backward(loss.backward())
    for p in model.parameters():
        np.testing.assert_array_equal(p.grad, first[p.name])


def test_to_keeps_values_and_parameter_identity():
    model = _mlp().to("numpy", "float64")
    before = model.state_dict()
    params = model.parameters()
    model.to("numpy", "float32")
    assert model.parameters()[0] is params[0]
    assert model.parameters()[0].data.dtype == np.float32
    np.testing.assert_allclose(model.state_dict()["0.weight"], before["0.weight"], rtol=1e-7)


def test_failed_load_state_dict_changes_nothing():
    model = _mlp().to("numpy")
    before = model.state_dict()
    bad_shape = dict(before, **{"3.bias": np.zeros(4)})
    with pytest.raises(ValueError, match=r"3\.bias.*shape \(4,\).*expected \(3,\)"):
        model.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match=r"missing.*3\.weight"):
        model.load_state_dict({k: v for k, v in before.items() if k != "3.weight"})
    with pytest.raises(ValueError, match=r"unexpected.*9\.weight"):
        model.load_state_dict(dict(before, **{"9.weight": np.zeros(1)}))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_config_round_trip_rebuilds_the_same_architecture():
    model = gb.Sequential(
        gb.Dense(3, 5, init="xavier_normal"),
        gb.LeakyReLU(0.3),
        gb.Residual(gb.Dense(5, 5, bias=False), gb.GELU("tanh")),
        gb.Dense(5, 2),
        gb.Sigmoid(),
    )
    rebuilt = gb.Sequential.from_config(model.config())
    assert rebuilt.config() == model.config()
    rebuilt.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).normal(size=(4, 3))
    np.testing.assert_array_equal(rebuilt.predict(x), model.predict(x))


@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal", "he_uniform", "he_normal"])
def test_init_variance(init):
    gb.seed(0)
    w = gb.Dense(400, 300, init=init).weight.data
    expected = 2.0 / 700 if init.startswith("xavier") else 2.0 / 400
    assert w.var() == pytest.approx(expected, rel=0.05)
    assert np.all(gb.Dense(4, 3).bias.data == 0)


def test_fit_learns_and_reports_metrics_with_validation():
    model = _mlp(1).to("numpy")
    x, y = _data(300)
    xv, yv = _data(100, seed=1)
    opt = gb.Adam(model.parameters(), lr=1e-2)
    history = model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=opt,
        epochs=15,
        batch_size=32,
        validation_data=(xv, yv),
        verbose=0,
    )
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s"}
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] > 0.85
    metrics = model.evaluate(xv, yv, gb.SoftmaxCrossEntropyLoss())
    assert metrics["accuracy"] == pytest.approx(history["val_accuracy"][-1])
    predictions = model.predict(xv)
    assert predictions.shape == (100, 3) and predictions.dtype == np.float32


def test_early_stopping_stops_and_restores_best_weights():
    model = _mlp(2).to("numpy")
    x, y = _data(64)
    stopper = gb.EarlyStopping(monitor="loss", patience=1, min_delta=1e9, restore_best_weights=True)
    opt = gb.SGD(model.parameters(), lr=0.1)
    history = model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=opt,
        epochs=20,
        batch_size=16,
        verbose=0,
        callbacks=[stopper],
    )
    assert len(history.epoch) == 3 and stopper.stopped_epoch == 3 and stopper.best_epoch == 1
    np.testing.assert_array_equal(model.state_dict()["0.weight"], stopper.best_state["0.weight"])


def test_verbose_modes_print_progress(capsys):
    model = _mlp().to("numpy")
    x, y = _data(40)
    opt = gb.SGD(model.parameters(), lr=0.1)
    model.fit(
        x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=opt, epochs=2, batch_size=8, verbose=2
    )
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "samples_per_s" in err and "accuracy" in err
    model.fit(
        x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=opt, epochs=1, batch_size=8, verbose=1
    )
    err = capsys.readouterr().err
    assert "loss=" in err and "accuracy=" in err and "samples_per_s=" in err


def test_diverging_training_raises_a_clear_error():
    model = _mlp().to("numpy")
    x, y = _data(32)
    x[3, 2] = np.nan
    opt = gb.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, batch 0.*lr=0.1"):
        model.fit(
            x,
            y,
            loss=gb.SoftmaxCrossEntropyLoss(),
            optimizer=opt,
            epochs=1,
            batch_size=32,
            shuffle=False,
            verbose=0,
        )


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda m: m.forward(np.zeros((3, 5))),
            "5 features per row; the model.s first layer expects 4",
        ),
        (lambda m: m.forward(np.zeros(4)), r"shape \(4,\); expected \(batch, features\)"),
        (lambda m: m.forward(np.array([["a"] * 4])), "expected numbers"),
        (
            lambda m: m.fit(np.zeros((3, 4)), np.zeros(2, int), loss=gb.MSELoss(), optimizer=None),
            "y has 2 rows but x has 3",
        ),
        (
            lambda m: m.fit(
                np.zeros((3, 4)),
                np.zeros(3, int),
                loss=gb.SoftmaxCrossEntropyLoss(),
                optimizer=None,
                epochs=0,
            ),
            "epochs=0",
        ),
        (
            lambda m: m.fit(
                np.zeros((3, 4)),
                np.zeros(3, int),
                loss=gb.SoftmaxCrossEntropyLoss(),
                optimizer=None,
                batch_size=-2,
            ),
            "batch_size=-2",
        ),
        (lambda m: m.to("numpy", "int8"), "dtype='int8' is not supported"),
        (lambda m: m.to("tpu"), r"backend='tpu' is not a backend; expected one of \('auto'"),
    ],
)
def test_bad_input_is_named_in_the_error(call, message):
    model = _mlp().to("numpy")
    with pytest.raises(ValueError, match=message):
        call(model)


@pytest.mark.parametrize(
    "target,message",
    [
        (np.array([0, 1, 3]), r"label 3; expected labels in \[0, 2\]"),
        (np.array([0, -1, 2]), r"label -1"),
        (np.zeros((3, 2)), r"expected integer labels of shape \(3,\) or float probabilities"),
        (np.array([0, 1]), "2 labels but pred has 3 rows"),
    ],
)
def test_cross_entropy_rejects_bad_targets(target, message):
    pred = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        gb.SoftmaxCrossEntropyLoss().to("numpy").forward(pred, target)


def test_other_losses_reject_bad_input():
    with pytest.raises(ValueError, match=r"target has shape \(3, 1\) but pred has \(3, 2\)"):
        gb.MSELoss().to("numpy").forward(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"pred values in \[-0.5, 0.5\]; expected probabilities"):
        gb.BCELoss().to("numpy").forward(np.array([[-0.5, 0.5]]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="reduction='avg'"):
        gb.MSELoss(reduction="avg")


def test_optimizer_hyperparameters_are_validated():
    params = _mlp().to("numpy").parameters()
    with pytest.raises(ValueError, match="lr=-1"):
        gb.SGD(params, lr=-1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        gb.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        gb.Adam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty parameter list"):
        gb.Adam([])


def test_optimizer_state_dict_round_trip_continues_identically():
    x, y = _data(48)
    loss = gb.SoftmaxCrossEntropyLoss()

    def steps(model, opt, n):
        for _ in range(n):
            loss.forward(model.forward(x), y)
            model.backward(loss.backward())
            opt.step()

    a = _mlp(3).to("numpy")
    opt_a = gb.Adam(a.parameters(), lr=1e-2)
    steps(a, opt_a, 3)
    saved_model, saved_opt = a.state_dict(), opt_a.state_dict()
    steps(a, opt_a, 2)

    b = _mlp(4).to("numpy")
    b.load_state_dict(saved_model)
    opt_b = gb.optim.optimizer_from_state_dict(b.parameters(), saved_opt)
    steps(b, opt_b, 2)
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[name])


def test_backend_selection_and_environment_variable(monkeypatch, caplog):
    assert get_backend("numpy").name == "numpy"
    assert get_backend("NumPy").name == "numpy"
    monkeypatch.setenv("GPUBACKPROP_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("GPUBACKPROP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GPUBACKPROP_BACKEND='nonsense' is not a backend"):
        get_backend()
    monkeypatch.delenv("GPUBACKPROP_BACKEND")
    import gpubackprop.backends as backends

    monkeypatch.setattr(backends, "_auto_choice_logged", False)
    with caplog.at_level(logging.INFO, logger="gpubackprop"):
        chosen = get_backend("auto")
    cupy_ok, reason = gb.available_backends()["cupy"]
    assert chosen.name == ("cupy" if cupy_ok else "numpy")
    assert "backend 'auto' chose" in caplog.text
    if not cupy_ok:
        assert reason and reason in caplog.text
        with pytest.raises(RuntimeError, match="backend 'cupy' is not available"):
            get_backend("cupy")


def test_import_does_not_import_cupy():
    import subprocess
    import sys

    code = "import sys, gpubackprop; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_checks_every_label_once_including_validation_labels():
    model = _mlp().to("numpy")
    x, y = _data(64)
    y[50] = 7  # in a late batch: checked up front, not when that batch comes
    loss = gb.SoftmaxCrossEntropyLoss()
    opt = gb.SGD(model.parameters(), lr=0.1)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"label 7; expected labels in \[0, 2\]"):
        model.fit(x, y, loss=loss, optimizer=opt, epochs=1, batch_size=8, shuffle=False, verbose=0)
    np.testing.assert_array_equal(model.state_dict()["0.weight"], before["0.weight"])
    assert loss.check_labels  # restored after fit
    y[50] = 0
    with pytest.raises(ValueError, match="label -1"):
        model.fit(
            x,
            y,
            loss=loss,
            optimizer=opt,
            epochs=1,
            batch_size=8,
            verbose=0,
            validation_data=(x, y - 1),
        )


def test_fit_on_a_device_backend_reads_totals_without_per_batch_syncs(monkeypatch):
    """With reads that sync (a GPU), fit keeps the epoch's sums on the device: same metrics,
    and a NaN loss is still reported, at the end of the epoch."""
    import gpubackprop.training as training

    _, reference = _train(8)
    monkeypatch.setattr(training, "reading_syncs", lambda backend: True)
    _, deferred = _train(8)
    assert deferred["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert deferred["accuracy"] == reference["accuracy"]
    model = _mlp().to("numpy")
    x, y = _data(32)
    x[3, 2] = np.nan
    with pytest.raises(FloatingPointError, match="loss is nan in epoch 1"):
        model.fit(
            x,
            y,
            loss=gb.SoftmaxCrossEntropyLoss(),
            optimizer=gb.SGD(model.parameters()),
            epochs=1,
            batch_size=8,
            verbose=0,
        )


def test_model_checkpoint_saves_each_improvement_atomically(tmp_path):
    model = _mlp(9).to("numpy")
    x, y = _data(120)
    xv, yv = _data(60, seed=3)
    every = gb.ModelCheckpoint(tmp_path / "every-{epoch}.safetensors", save_best_only=False)
    best = gb.ModelCheckpoint(
        tmp_path / "best.safetensors", monitor="val_accuracy", save_best_only=True
    )
    opt = gb.Adam(model.parameters(), lr=1e-2)
    history = model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=opt,
        epochs=4,
        batch_size=16,
        validation_data=(xv, yv),
        verbose=0,
        callbacks=[every, best],
    )
    assert [p.rsplit("/", 1)[-1] for p in every.saved] == [
        f"every-{e}.safetensors" for e in range(1, 5)
    ]
    assert 1 <= len(best.saved) <= 4
    assert best.best == max(history["val_accuracy"])
    last, last_opt = gb.load(tmp_path / "every-4.safetensors", backend="numpy", with_optimizer=True)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(last.state_dict()[name], value)
    assert last_opt.step_count == opt.step_count
    assert not list(tmp_path.glob("*.tmp*"))  # no temporary files left behind


def test_activation_layer_builds_every_activation_by_name():
    from gpubackprop.backends.base import ACTIVATIONS
    from gpubackprop.layers import activation_layer

    for kind in ACTIVATIONS:
        layer = activation_layer(kind, alpha=0.2)
        assert layer.kind == kind
    assert activation_layer("leaky_relu", alpha=0.2).alpha == 0.2
    assert activation_layer("gelu_tanh").config() == gb.GELU("tanh").config()
    with pytest.raises(ValueError, match="swish"):
        activation_layer("swish")
