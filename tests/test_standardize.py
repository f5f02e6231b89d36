"""gb.Standardize: the input preprocessing carried by the model (y = (x − mean)/std)."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.checkpoint import read_metadata

KERNEL_BACKENDS = ["emu", pytest.param("cupy", marks=pytest.mark.gpu)]


def _require(backend):
    ok, reason = gb.available_backends()[backend]
    if not ok:
        pytest.skip(f"{backend} unavailable: {reason}")


def _stats(features, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, features), rng.uniform(0.1, 5.0, features)


def _model(mean, std, seed=0):
    gb.seed(seed)
    return gb.Sequential(gb.Standardize(mean, std), gb.Dense(len(mean), 4), gb.Tanh())


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_forward_and_input_gradient_match_the_formula(backend):
    _require(backend)
    mean, std = _stats(7)
    model = gb.Sequential(gb.Standardize(mean, std)).to(backend, "float64")
    rng = np.random.default_rng(1)
    x = rng.normal(0, 10, size=(13, 7))
    np.testing.assert_allclose(model.predict(x), (x - mean) / std, rtol=1e-15, atol=0)
    dout = rng.normal(size=(13, 7))
    model.forward(x)
    dinp = model.backend.to_numpy(model.backward(model.backend.asarray(dout, np.float64)))
    np.testing.assert_allclose(dinp, dout / std, rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_gradients_through_standardize_pass_gradcheck(backend):
    _require(backend)
    mean, std = _stats(5, seed=3)
    model = _model(mean, std)
    model = gb.Sequential(*model.layers, gb.Dense(4, 3))
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, size=(6, 5))
    result = gb.gradcheck(
        model, x, rng.integers(0, 3, 6), gb.SoftmaxCrossEntropyLoss(), backend=backend
    )
    assert result.passed, result


def test_buffers_are_saved_but_never_trained():
    mean, std = _stats(3)
    model = _model(mean, std).to("numpy", "float64")
    names = [p.name for p in model.parameters()]
    assert names == ["1.weight", "1.bias"]
    state = model.state_dict()
    assert set(state) == {"0.mean", "0.std", "1.weight", "1.bias"}
    np.testing.assert_array_equal(state["0.mean"], mean)
    optimizer = gb.SGD(model.parameters(), lr=0.5)
    x = np.random.default_rng(0).normal(size=(8, 3))
    model.fit(x, np.zeros((8, 4)), loss=gb.MSELoss(), optimizer=optimizer, verbose=0)
    np.testing.assert_array_equal(model.layers[0].mean, mean)
    np.testing.assert_array_equal(model.layers[0].std, std)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_checkpoint_keeps_mean_and_std(tmp_path, backend):
    _require(backend)
    mean, std = _stats(4, seed=5)
    model = _model(mean, std).to(backend, "float32")
    path = tmp_path / "model.safetensors"
    gb.save(path, model)
    header = read_metadata(path)
    assert header["tensors"]["model.0.mean"] == ("F32", (4,))
    assert header["config"]["layers"][0] == {"type": "Standardize", "features": 4}
    loaded = gb.load(path, backend=backend)
    np.testing.assert_array_equal(loaded.layers[0].mean, mean.astype(np.float32))
    np.testing.assert_array_equal(loaded.layers[0].std, std.astype(np.float32))
    x = np.random.default_rng(4).normal(0, 5, size=(9, 4))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_load_state_dict_updates_the_placed_plan():
    model = _model(np.zeros(2), np.ones(2)).to("numpy", "float64")
    x = np.array([[3.0, 5.0]])
    state = model.state_dict()
    state["0.mean"] = np.array([1.0, 1.0])
    state["0.std"] = np.array([2.0, 4.0])
    model.load_state_dict(state)
    reference = gb.Sequential(*model.layers[1:]).to("numpy", "float64")
    np.testing.assert_allclose(model.predict(x), reference.predict([[1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"0\.std.*std <= 0"):
        model.load_state_dict(dict(state, **{"0.std": np.array([1.0, 0.0])}))


@pytest.mark.parametrize(
    "mean,std,message",
    [
        ([0.0, 1.0], [1.0], "std has 1 values but mean has 2"),
        ([0.0], [0.0], r"std holds 0\.0; expected every std > 0"),
        ([0.0], [-1.0], "expected every std > 0"),
        ([np.nan], [1.0], "mean holds non-finite values"),
        ([[0.0]], [[1.0]], r"mean has shape \(1, 1\); expected one value per feature"),
        ([], [], r"mean has shape \(0,\)"),
        ("abc", [1.0], "mean='abc' is not accepted; expected numbers"),
    ],
)
def test_bad_statistics_are_refused_naming_the_argument(mean, std, message):
    with pytest.raises(ValueError, match=message):
        gb.Standardize(mean, std)


def test_wrong_width_is_refused_before_any_kernel():
    model = gb.Sequential(gb.Standardize([0.0, 0.0], [1.0, 1.0])).to("numpy")
    with pytest.raises(ValueError, match="3 features per row; the model's first layer expects 2"):
        model.forward(np.zeros((1, 3)))


def test_layer_copies_its_statistics():
    mean = np.array([1.0, 2.0])
    layer = gb.Standardize(mean, [1.0, 1.0])
    mean[0] = 99.0
    assert layer.mean[0] == 1.0 and layer.features == 2
    assert repr(layer) == "Standardize(features=2)"
