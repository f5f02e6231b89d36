"""`gpubackprop train` builds its network in the library: the input standardisation is the
model's first layer (so a saved model takes raw features), the cosine schedule is
gb.CosineSchedule, and --model trains the network a JSON config describes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import cli

FAST = ["--epochs", "2", "--verbose", "0", "--backend", "numpy", "--batch-size", "32"]


def _train(tmp_path, capsys, *argv):
    checkpoint, metrics = tmp_path / "model.safetensors", tmp_path / "metrics.json"
    status = cli.main(["train", *FAST, *argv, "--save", str(checkpoint), "--metrics-json",
                       str(metrics)])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return checkpoint, json.loads(metrics.read_text())


def test_loaded_model_reproduces_the_trained_accuracy_on_raw_digits(tmp_path, capsys):
    checkpoint, metrics = _train(
        tmp_path, capsys, "--hidden", "32", "--no-augment", "--epochs", "4", "--lr", "0.01"
    )
    raw = gb.data.load_digits(standardize=False)
    assert raw.x_test.min() == 0.0 and raw.x_test.max() == 16.0  # the pixels as stored
    model, optimizer = gb.load(checkpoint, with_optimizer=True)
    result = model.evaluate(raw.x_test, raw.y_test)
    assert result["accuracy"] == metrics["test_accuracy"]
    assert result["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert metrics["test_accuracy"] > 0.85
    assert isinstance(model.layers[0], gb.Standardize)
    # the statistics of the training part the CLI trained on (10% held out for validation)
    trained_on = gb.data.load_digits(standardize=False, val_fraction=0.1)
    np.testing.assert_array_equal(trained_on.x_test, raw.x_test)
    np.testing.assert_allclose(model.layers[0].mean, trained_on.feature_mean, rtol=1e-6)
    # the cosine schedule ends at lr 0; the saved optimizer has the base rate
    assert optimizer.lr == pytest.approx(0.01)
    assert metrics["optimizer"]["schedule"] == "cosine"


def test_any_data_set_gets_its_standardisation_in_the_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 20.0, size=(300, 3)) * np.array([1.0, 100.0, 0.01])
    y = (x[:, 0] > 50).astype(np.int64) + (x[:, 1] > 5000)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    checkpoint, metrics = _train(tmp_path, capsys, "--dataset", f"npz:{path}", "--hidden", "8")
    raw = gb.data.load_npz(path, standardize_features=False)
    model = gb.load(checkpoint)
    assert model.evaluate(raw.x_test, raw.y_test)["accuracy"] == metrics["test_accuracy"]
    scaled = gb.data.load_npz(path, val_fraction=0.1)  # what the first layer gives
    np.testing.assert_allclose(
        gb.Sequential(model.layers[0]).predict(raw.x_test), scaled.x_test, rtol=1e-5, atol=1e-5
    )


def test_regression_data_is_not_standardised(tmp_path, capsys):
    checkpoint, _ = _train(tmp_path, capsys, "--dataset", "regression", "--hidden", "8")
    assert gb.load(checkpoint).config()["layers"][0]["type"] == "Dense"


def test_model_option_trains_the_network_a_config_describes(tmp_path, capsys):
    gb.seed(0)
    described = gb.Sequential(
        gb.Dense(2, 16, init="xavier_uniform"),
        gb.Tanh(),
        gb.Sequential(gb.Residual(gb.Dense(16, 16), gb.GELU("tanh")), gb.Dense(16, 3)),
    )
    net = tmp_path / "net.json"
    net.write_text(json.dumps(described.config()))
    checkpoint, metrics = _train(tmp_path, capsys, "--dataset", "spirals", "--model", str(net))
    saved = gb.load(checkpoint)
    assert saved.config()["layers"][0]["type"] == "Standardize"
    assert saved.config()["layers"][1:] == described.config()["layers"]
    assert metrics["model"] == saved.config()
    assert metrics["parameters"] == described.num_parameters()
    raw = gb.data.make_spirals(standardize=False)
    assert saved.evaluate(raw.x_test, raw.y_test)["accuracy"] == metrics["test_accuracy"]
    # a Standardize in the file is replaced by the data's statistics, not doubled
    with_standardize = gb.Sequential(gb.Standardize([0.0, 0.0], [1.0, 1.0]), *described.layers)
    net.write_text(json.dumps(with_standardize.config()))
    checkpoint, _ = _train(tmp_path, capsys, "--dataset", "spirals", "--model", str(net))
    layers = gb.load(checkpoint).layers
    assert [type(layer).__name__ for layer in layers].count("Standardize") == 1
    assert not np.array_equal(layers[0].std, [1.0, 1.0])


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (
            {
                "type": "Sequential",
                "layers": [{"type": "Dense", "in_features": 5, "out_features": 3}],
            },
            [],
            "takes 5 input features but data set 'spirals' has 2",
        ),
        (
            {
                "type": "Sequential",
                "layers": [{"type": "Dense", "in_features": 2, "out_features": 4}],
            },
            [],
            "gives 4 outputs but data set 'spirals' needs 3",
        ),
        ({"type": "Sequential", "layers": [{"type": "Pool"}]}, [], "layer type 'Pool' is unknown"),
        ("{broken", [], "is not valid JSON"),
        (b"\xff\xfe", [], "is not UTF-8 text"),
        ({"type": "Sequential", "layers": []}, ["--hidden", "8"], "--hidden cannot be given"),
        ({"type": "Sequential", "layers": []}, ["--activation", "tanh"], "--activation cannot"),
    ],
)
def test_bad_model_files_are_refused_before_training(tmp_path, capsys, content, extra, message):
    net = tmp_path / "net.json"
    if isinstance(content, bytes):
        net.write_bytes(content)
    else:
        net.write_text(content if isinstance(content, str) else json.dumps(content))
    status = cli.main(["train", *FAST, "--dataset", "spirals", "--model", str(net), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "--model" in err
    assert len(err.strip().splitlines()) == 1
    status = cli.main(["train", *FAST, "--model", str(tmp_path / "missing.json")])
    assert status == 2 and "does not exist" in capsys.readouterr().err


def test_raw_and_standardised_splits_agree():
    raw = gb.data.load_digits(standardize=False, val_fraction=0.1)
    scaled = gb.data.load_digits(val_fraction=0.1)
    np.testing.assert_array_equal(raw.y_train, scaled.y_train)
    np.testing.assert_array_equal(raw.y_test, scaled.y_test)
    assert not raw.standardized and scaled.standardized
    np.testing.assert_array_equal(raw.feature_mean, scaled.feature_mean)
    expected = (raw.x_test.astype(np.float64) - raw.feature_mean) / raw.feature_std
    np.testing.assert_allclose(scaled.x_test, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(raw.x_train, np.round(raw.x_train))
    with pytest.raises(ValueError, match="standardize='no' is not accepted"):
        gb.data.load_digits(standardize="no")


def test_mnist_format_gets_its_global_standardisation_in_the_model(tmp_path, capsys):
    """MNIST is standardised with one scalar mean and std of all training pixels: the model's
    first layer holds that pair for every feature and takes the loader's unstandardised
    pixels (÷ 255)."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "mnist"
    directory.mkdir()
    for stem, kind, rows in (("train", "images", 200), ("t10k", "images", 60)):
        labels = rng.integers(0, 10, rows).astype(np.uint8)
        images = rng.integers(0, 40, (rows, 4, 4)) + 20 * labels[:, None, None]
        gb.data.write_idx(directory / f"{stem}-{kind}-idx3-ubyte", images.astype(np.uint8))
        gb.data.write_idx(directory / f"{stem}-labels-idx1-ubyte", labels)
    checkpoint, metrics = _train(
        tmp_path, capsys, "--dataset", f"mnist:{directory}", "--hidden", "16", "--epochs", "3"
    )
    model = gb.load(checkpoint)
    first = model.layers[0]
    assert isinstance(first, gb.Standardize) and first.features == 16
    assert np.all(first.mean == first.mean[0]) and np.all(first.std == first.std[0])
    raw = gb.data.load_mnist_idx(directory, standardize_features=False)
    assert raw.x_test.max() <= 1.0  # pixels ÷ 255
    assert model.evaluate(raw.x_test, raw.y_test)["accuracy"] == metrics["test_accuracy"]
