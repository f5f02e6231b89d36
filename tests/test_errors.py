"""Bad arguments that used to fail late or unclearly: each now fails at once, in one message that
names the argument, the value and what is accepted."""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import data


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


# -- loaders ---------------------------------------------------------------------------------------


def test_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch):
    import os

    from gpubackprop import checkpoint

    path = tmp_path / "m.safetensors"
    gb.save(path, _model())
    path.chmod(0)
    if os.geteuid() == 0:  # root reads mode 000 files; answer as the kernel does for a user
        real_open = os.open

        def denied(target, flags, *args):
            if os.fspath(target) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(target))
            return real_open(target, flags, *args)

        monkeypatch.setattr(checkpoint.os, "open", denied)
    with pytest.raises(
        PermissionError, match=r"m\.safetensors.*permission denied \(mode ----------\)"
    ):
        gb.load(path)


def test_deeply_nested_checkpoint_json_is_a_value_error(tmp_path):
    import json

    from safetensors.numpy import save_file

    from gpubackprop import checkpoint

    def write(config_text):
        path = tmp_path / "deep.safetensors"
        metadata = {
            "format": checkpoint.FORMAT,
            "format_version": str(checkpoint.FORMAT_VERSION),
            "config": config_text,
            "dtype": "float32",
        }
        save_file({"model.0.weight": np.zeros((2, 2), np.float32)}, str(path), metadata=metadata)
        return path

    with pytest.raises(ValueError, match=r"nested too deeply.*'config'"):
        gb.load(write("[" * 100_000 + "]" * 100_000))
    nested = {"type": "Residual", "layers": []}
    for _ in range(200):
        nested = {"type": "Residual", "layers": [nested]}
    with pytest.raises(ValueError, match="nest deeper than 64 levels"):
        gb.load(write(json.dumps({"type": "Sequential", "layers": [nested]})))


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_uint64_label_is_printed_as_it_is(tmp_path):
    y = np.zeros(10, np.uint64)
    y[3] = 2**63 + 5
    path = _npz(tmp_path, x=np.ones((10, 2)), y=y)
    with pytest.raises(ValueError, match=r"holds the label 9223372036854775813, larger than"):
        data.load_npz(path)


def test_damaged_npz_is_named(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path, x=rng.standard_normal((200, 8)), y=rng.integers(0, 3, 200))
    raw = bytearray(path.read_bytes())
    for offset in range(200, 1200):  # inside x's data: the CRC no longer matches
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"npz data set .*d\.npz.* is corrupt \(BadZipFile"):
        data.load_npz(path)
    path.write_bytes(b"PK\x03\x04" + bytes(50))
    with pytest.raises(ValueError, match=r"d\.npz.* is not a readable \.npz archive"):
        data.load_npz(path)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
def test_empty_npz_features_are_named(tmp_path, shape):
    path = _npz(tmp_path, x=np.zeros(shape), y=np.zeros(shape[0], int))
    with pytest.raises(ValueError, match=rf"x is empty \(shape \({shape[0]},"):
        data.load_npz(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_npz_features_are_refused_when_loading(tmp_path, bad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4))
    x[7, 2] = bad
    path = _npz(tmp_path, x=x, y=rng.integers(0, 2, 30))
    with pytest.raises(
        ValueError, match=rf"x holds 1 non-finite value\(s\) \({bad} at index \(7, 2\)"
    ):
        data.load_npz(path)
    y = rng.standard_normal(30)
    y[4] = bad
    path = _npz(tmp_path, x=rng.standard_normal((30, 4)), y=y)
    with pytest.raises(ValueError, match=r"y holds 1 non-finite value"):
        data.load_npz(path)


def _mnist(directory, train_images, test_images, train_labels, test_labels):
    for name, array in (
        ("train-images-idx3-ubyte", train_images),
        ("t10k-images-idx3-ubyte", test_images),
        ("train-labels-idx1-ubyte", train_labels),
        ("t10k-labels-idx1-ubyte", test_labels),
    ):
        data.write_idx(directory / name, array)


def test_mnist_parts_that_disagree_are_refused_when_loading(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 6, dtype=np.uint8)
    _mnist(tmp_path, images, images[:, :3, :3].copy(), labels, labels)
    with pytest.raises(ValueError, match=r"differ in size.*4x4 images but .*t10k.* holds 3x3"):
        data.load_mnist_idx(tmp_path)
    wrong = labels.copy()
    wrong[2] = 12
    _mnist(tmp_path, images, images, labels, wrong)
    with pytest.raises(ValueError, match=r"t10k-labels.* holds the label 12; .*0\.\.9"):
        data.load_mnist_idx(tmp_path)


def test_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    from gpubackprop import cli

    path = tmp_path / "opts.json"
    path.write_bytes(b'{"epochs": 2, "hidden": "\xff\xfe"}')
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "opts.json" in err and "not UTF-8" in err
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "opts.json" in err and "too deeply" in err
