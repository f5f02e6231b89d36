"""Bad arguments that used to fail late or unclearly: each now fails at once, in one message that
names the argument, the value and what is accepted."""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb


def _model():
    gb.seed(0)
    return gb.Sequential(gb.Dense(3, 5), gb.ReLU(), gb.Dense(5, 2)).to("numpy")


def _data(n=20):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)), rng.integers(0, 2, n)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, None])
def test_predict_batch_size(batch_size):
    x, _ = _data()
    with pytest.raises(ValueError, match=rf"batch_size={batch_size!r}.*integer >= 1"):
        _model().predict(x, batch_size=batch_size)


@pytest.mark.parametrize("optimizer", [None, "adam", 0.01])
def test_fit_without_an_optimizer_fails_before_any_forward(optimizer, monkeypatch):
    model = _model()
    calls = []
    monkeypatch.setattr(model, "forward", lambda x: calls.append(x))
    x, y = _data()
    with pytest.raises(TypeError, match=r"optimizer=.*is not an optimizer.*gb\.Adam"):
        model.fit(x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=optimizer, verbose=0)
    assert calls == []


def _fit(model, callbacks, validation=True):
    x, y = _data()
    model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=gb.SGD(model.parameters(), lr=0.1),
        epochs=3,
        verbose=0,
        validation_data=(x, y) if validation else None,
        callbacks=callbacks,
    )


def _counting_model():
    model = _model()
    steps = []
    original = model.backward

    def counted(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    model.backward = counted
    return model, steps


def test_early_stopping_with_an_unknown_metric_fails_before_the_first_epoch():
    model, steps = _counting_model()
    with pytest.raises(
        ValueError, match=r"EarlyStopping monitor='bogus' is not a metric.*val_loss"
    ):
        _fit(model, [gb.EarlyStopping("bogus")])
    assert steps == []
    with pytest.raises(ValueError, match=r"monitor='val_loss'.*need validation_data"):
        _fit(model, [gb.EarlyStopping("val_loss")], validation=False)
    assert steps == []


def test_model_checkpoint_into_a_missing_folder_fails_before_the_first_epoch(tmp_path):
    model, steps = _counting_model()
    target = tmp_path / "no" / "such" / "m-{epoch}.safetensors"
    with pytest.raises(FileNotFoundError, match=r"ModelCheckpoint path=.*does not exist"):
        _fit(model, [gb.ModelCheckpoint(target)])
    with pytest.raises(ValueError, match=r"ModelCheckpoint monitor='val_bogus'"):
        _fit(model, [gb.ModelCheckpoint(tmp_path / "m.safetensors", "val_bogus", True)])
    with pytest.raises(ValueError, match=r"is a directory"):
        _fit(model, [gb.ModelCheckpoint(tmp_path)])
    assert steps == []
    _fit(model, [gb.ModelCheckpoint(tmp_path / "m-{epoch}.safetensors")])  # a good one runs
    assert sorted(p.name for p in tmp_path.glob("m-*")) == [f"m-{e}.safetensors" for e in (1, 2, 3)]


def test_callbacks_must_be_callbacks():
    with pytest.raises(
        TypeError, match=r"callbacks\[0\]='stop early' is not a gpubackprop Callback"
    ):
        _fit(_model(), ["stop early"])


def test_layer_widths_that_do_not_chain_are_refused_when_built():
    with pytest.raises(
        ValueError,
        match=r"layer 2, Dense\(in_features=16.*takes 16 features but layer 0 .*"
        r"Dense\(in_features=64, out_features=32.*gives 32",
    ):
        gb.Sequential(gb.Dense(64, 32), gb.ReLU(), gb.Dense(16, 10))
    with pytest.raises(ValueError, match=r"Residual: f maps 32 features to 16"):
        gb.Residual(gb.Dense(32, 16), gb.ReLU())
    with pytest.raises(ValueError, match=r"layer 1, Sequential.*takes 4 features.*gives 3"):
        gb.Sequential(gb.Dense(2, 3), gb.Sequential(gb.Dense(4, 4)))
    # Widths that agree, through activations, residual blocks and nested containers, build.
    model = gb.Sequential(
        gb.Dense(2, 3),
        gb.Tanh(),
        gb.Residual(gb.Dense(3, 3), gb.ReLU()),
        gb.Sequential(gb.Dense(3, 4), gb.ReLU()),
        gb.Dense(4, 1),
    )
    assert model.widths == (2, 1)
