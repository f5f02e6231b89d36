"""Sequential.config() and Sequential.from_config(): a JSON model description and its inverse,
for every layer type; gb.mlp and the init choice it makes."""

import json

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.layers import MAX_CONFIG_DEPTH


def _every_layer_type():
    return gb.Sequential(
        gb.Standardize([1.0, -1.0, 0.5], [2.0, 3.0, 0.25]),
        gb.Dense(3, 5, init="xavier_normal"),
        gb.LeakyReLU(0.3),
        gb.Residual(gb.Dense(5, 5, bias=False, init="he_normal"), gb.GELU("tanh")),
        gb.Sequential(
            gb.Dense(5, 4, init="xavier_uniform"),
            gb.Sequential(gb.Identity(), gb.Residual(gb.Sequential(gb.Dense(4, 4)), gb.SiLU())),
            gb.Sigmoid(),
        ),
        gb.Dense(4, 4),
        gb.Tanh(),
        gb.ReLU(),
        gb.GELU(),
        gb.Dense(4, 2),
    )


def test_every_layer_type_round_trips_through_json():
    gb.seed(0)
    model = _every_layer_type()
    config = json.loads(json.dumps(model.config()))
    kinds = {layer["type"] for layer in config["layers"]}
    assert {"Standardize", "Dense", "LeakyReLU", "Residual", "Sequential"} <= kinds
    rebuilt = gb.Sequential.from_config(config)
    assert rebuilt.config() == model.config()
    assert type(rebuilt.layers[4]) is gb.Sequential
    assert type(rebuilt.layers[4].layers[1].layers[1].layers[0]) is gb.Sequential
    assert [p.name for p in rebuilt.parameters()] == [p.name for p in model.parameters()]
    # weights and buffers travel as tensors: with them the two compute the same function
    assert not np.array_equal(rebuilt.layers[0].mean, model.layers[0].mean)
    rebuilt.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).normal(size=(6, 3))
    np.testing.assert_array_equal(rebuilt.predict(x), model.predict(x))
    names = set(model.state_dict())
    assert {"0.mean", "0.std", "4.1.1.0.0.weight", "3.0.weight"} <= names
    assert "3.0.bias" not in names


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "Dense", "layers": []}, "type 'Sequential'"),
        ({"type": "Sequential", "layers": [{"type": "Conv2d"}]}, "layer type 'Conv2d' is unknown"),
        ({"type": "Sequential", "layers": [{"type": "Dense", "in_features": 2}]}, "invalid"),
        (
            {
                "type": "Sequential",
                "layers": [{"type": "Dense", "in_features": "2", "out_features": 1}],
            },
            "in_features='2' is not accepted",
        ),
        (
            {"type": "Sequential", "layers": [{"type": "Standardize", "features": 0}]},
            "features=0 is not accepted",
        ),
        (
            {"type": "Sequential", "layers": [{"type": "Standardize", "mean": [0.0]}]},
            "Standardize takes 'features' only",
        ),
        ({"type": "Sequential", "layers": {"type": "Dense"}}, "takes a list 'layers'"),
        ({"type": "Sequential", "layers": [], "extra": 1}, "takes a list 'layers' only"),
        ({"type": "Sequential", "layers": [[1]]}, "is not a dict with a 'type' key"),
        ({"type": "Sequential", "layers": [{"type": "Residual", "layers": []}]}, "at least one"),
    ],
)
def test_bad_configs_are_refused_naming_what_is_wrong(config, message):
    with pytest.raises(ValueError, match=message):
        gb.Sequential.from_config(config)


def test_deep_nesting_is_refused_without_recursion_error():
    config = {"type": "Dense", "in_features": 1, "out_features": 1}
    for _ in range(MAX_CONFIG_DEPTH + 5):
        config = {"type": "Sequential", "layers": [config]}
    with pytest.raises(ValueError, match=f"deeper than {MAX_CONFIG_DEPTH} levels"):
        gb.Sequential.from_config(config)
    fine = {"type": "Dense", "in_features": 1, "out_features": 1}
    for _ in range(MAX_CONFIG_DEPTH - 1):
        fine = {"type": "Sequential", "layers": [fine]}
    assert gb.Sequential.from_config(fine).num_parameters() == 2


@pytest.mark.parametrize(
    ("activation", "init"),
    [
        ("relu", "he_uniform"),
        ("leaky_relu", "he_uniform"),
        ("gelu", "he_uniform"),
        ("silu", "he_uniform"),
        ("tanh", "xavier_uniform"),
        ("sigmoid", "xavier_uniform"),
        ("identity", "xavier_uniform"),
    ],
)
def test_mlp_takes_the_init_that_suits_its_activation(activation, init):
    gb.seed(0)
    model = gb.mlp(6, [8, 7], 3, activation, standardize=(np.zeros(6), np.ones(6)))
    config = model.config()["layers"]
    assert config[0] == {"type": "Standardize", "features": 6}
    dense = [layer for layer in config if layer["type"] == "Dense"]
    assert [(d["in_features"], d["out_features"]) for d in dense] == [(6, 8), (8, 7), (7, 3)]
    assert [d["init"] for d in dense] == [init, init, "xavier_uniform"]
    assert gb.init_for_activation(activation) == init
    assert model.in_features == 6 and model.out_features == 3


def test_init_for_an_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation='softmax' is not supported"):
        gb.init_for_activation("softmax")
