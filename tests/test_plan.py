"""The execution plan (plan.py): nested containers on every backend, fusion across container
boundaries, and user layers left exactly as they were built."""

import copy
import os

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.parameters import Parameter
from gpubackprop.plan import ActivationStep, DenseStep, ResidualStep, StandardizeStep

BACKENDS = ["numpy", "emu", pytest.param("cupy", marks=pytest.mark.gpu)]


def _require(backend):
    ok, reason = gb.available_backends()[backend]
    if not ok and backend == "cupy" and os.environ.get("GPUBACKPROP_REQUIRE_GPU"):
        pytest.fail(f"GPUBACKPROP_REQUIRE_GPU is set but cupy is unavailable: {reason}")
    if not ok:
        pytest.skip(f"{backend} unavailable: {reason}")


def _nested_and_flat(seed):
    """The same network twice: once in nested containers (a Residual inside a Sequential
    inside a Sequential), once flat, with equal weights."""
    gb.seed(seed)
    nested = gb.Sequential(
        gb.Sequential(
            gb.Sequential(gb.Dense(3, 5), gb.Tanh()),
            gb.Residual(gb.Sequential(gb.Dense(5, 5), gb.ReLU())),
        ),
        gb.Dense(5, 2),
    )
    flat = gb.Sequential(
        gb.Dense(3, 5), gb.Tanh(), gb.Residual(gb.Dense(5, 5), gb.ReLU()), gb.Dense(5, 2)
    )
    values = [p.data.copy() for p in nested.parameters()]
    for p, value in zip(flat.parameters(), values):
        p.data[...] = value
    return nested, flat


def _data(rows=13, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 3)), rng.integers(0, 2, rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_example_places_every_parameter_in_the_one_store(backend):
    _require(backend)
    model = gb.Sequential(gb.Sequential(gb.Dense(2, 3), gb.ReLU()), gb.Dense(3, 1))
    model.to(backend, dtype="float64")
    params = model.parameters()
    assert [p.name for p in params] == ["0.0.weight", "0.0.bias", "1.weight", "1.bias"]
    for p in params:
        assert p.store is model.store, p.name
        assert p.data.dtype == np.float64 and p.grad.dtype == np.float64, p.name
        assert type(p.data) is type(model.store.data), p.name
    assert model.store.backend.name == backend
    # the Dense inside the inner Sequential is fused with the ReLU after it
    assert [type(s) for s in model.steps] == [DenseStep, DenseStep]
    assert model.steps[0].activation == "relu" and model.steps[1].activation == "identity"
    inner = model.layers[0]
    assert inner.plan is None and inner.backend is None  # the container itself is not placed


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_model_matches_the_flat_one(backend):
    _require(backend)
    nested, flat = _nested_and_flat(seed=3)
    nested.to(backend, "float64")
    flat.to(backend, "float64")
    assert [type(s) for s in nested.steps] == [DenseStep, ResidualStep, DenseStep]
    x, y = _data()
    loss = gb.SoftmaxCrossEntropyLoss()
    outputs, input_grads = [], []
    for model in (nested, flat):
        out = model.forward(x)
        loss.forward(out, y)
        input_grads.append(nested.backend.to_numpy(model.backward(loss.backward())))
        outputs.append(nested.backend.to_numpy(out))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(input_grads[0], input_grads[1], rtol=1e-12, atol=1e-14)
    for a, b in zip(nested.parameters(), flat.parameters()):
        np.testing.assert_allclose(
            nested.backend.to_numpy(a.grad), flat.backend.to_numpy(b.grad), rtol=1e-12, atol=1e-14
        )
    # fit with one flat optimizer update per step gives the same weights as the flat model
    histories = []
    for model in (nested, flat):
        gb.seed(11)
        optimizer = gb.Adam(model.parameters(), lr=1e-2)
        assert optimizer._segments()[0][0] is model.store.data  # one launch for all
        histories.append(
            model.fit(x, y, loss=loss, optimizer=optimizer, epochs=3, batch_size=4, verbose=0)
        )
    assert histories[0]["loss"] == pytest.approx(histories[1]["loss"], rel=1e-12)
    for (name, a), b in zip(nested.state_dict().items(), flat.state_dict().values()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)


def test_nested_model_on_emu_matches_numpy_reference():
    _require("emu")
    nested, _ = _nested_and_flat(seed=4)
    reference = gb.Sequential.from_config(nested.config())
    reference.load_state_dict(nested.state_dict())
    nested.to("emu", "float64")
    reference.to("numpy", "float64")
    x, _ = _data(rows=9, seed=2)
    np.testing.assert_allclose(nested.predict(x), reference.predict(x), rtol=1e-12, atol=1e-13)


def _snapshot(layers):
    """Every attribute of every layer at every depth; Parameters by identity and value."""
    state = []
    for layer in layers:
        entry = {}
        for key, value in vars(layer).items():
            if isinstance(value, Parameter):
                entry[key] = (value, np.array(gb.get_backend("numpy").to_numpy(value.data)))
            elif key == "layers":
                entry[key] = (list(value), _snapshot(value))
            else:
                entry[key] = copy.deepcopy(value)
        state.append((layer, entry))
    return state


def _assert_same(before, after):
    assert len(before) == len(after)
    for (layer_a, entry_a), (layer_b, entry_b) in zip(before, after):
        assert layer_a is layer_b
        assert entry_a.keys() == entry_b.keys(), type(layer_a).__name__
        for key, value in entry_a.items():
            other = entry_b[key]
            if key == "layers":
                assert all(a is b for a, b in zip(value[0], other[0]))
                _assert_same(value[1], other[1])
            elif isinstance(value, tuple) and isinstance(value[0], Parameter):
                assert value[0] is other[0]
                np.testing.assert_allclose(other[1], value[1], rtol=1e-7)
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, other)
            else:
                assert value == other, (type(layer_a).__name__, key)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_to_leaves_the_users_layers_as_they_were_built(backend):
    _require(backend)
    gb.seed(0)
    layers = [
        gb.Standardize([1.0, -2.0, 0.5], [2.0, 1.0, 4.0]),
        gb.Sequential(gb.Dense(3, 4), gb.LeakyReLU(0.2)),
        gb.Residual(gb.Dense(4, 4), gb.GELU("tanh")),
        gb.Dense(4, 2),
        gb.Sigmoid(),
    ]
    model = gb.Sequential(*layers)
    before = _snapshot(model.layers)
    model.to(backend, "float32")
    x, _ = _data(rows=5)
    model.forward(x)
    model.backward(model.backend.asarray(np.ones((5, 2)), model.dtype))
    model.to("numpy", "float64")
    _assert_same(before, _snapshot(model.layers))
    dense_in_container = layers[1].layers[0]
    for layer in (*layers, dense_in_container):
        plan_fields = {"backend", "activation", "steps", "_x", "_saved"} & set(vars(layer))
        assert not plan_fields, (layer, plan_fields)
    assert layers[1].layers[1].alpha == 0.2


def test_getters_place_nothing():
    gb.seed(0)
    inner = gb.Sequential(gb.Dense(2, 3), gb.ReLU())
    model = gb.Sequential(inner, gb.Dense(3, 1))
    before = {p.name: p.data for p in model.parameters()}
    for getter in (
        model.parameters,
        model.named_parameters,
        model.state_dict,
        model.num_parameters,
        model.config,
        inner.parameters,
        inner.state_dict,
        lambda: repr(model),
    ):
        getter()
    assert model.plan is None and inner.plan is None
    for p in model.parameters():
        assert p.store is None and p.data is before[p.name], p.name
        assert isinstance(p.data, np.ndarray) and p.data.dtype == np.float64
    # an unplaced model still loads and reports its state, on the host
    state = model.state_dict()
    state["1.bias"] = np.array([0.25])
    model.load_state_dict(state)
    assert model.plan is None and model.parameters()[-1].data[0] == 0.25


def test_plan_steps_for_every_layer_kind():
    gb.seed(0)
    model = gb.Sequential(
        gb.Standardize([0.0, 1.0], [1.0, 2.0]),
        gb.Tanh(),
        gb.Dense(2, 3),
        gb.ReLU(),
        gb.SiLU(),
        gb.Residual(gb.Sequential(gb.Dense(3, 3)), gb.Sequential(gb.Sigmoid())),
    ).to("numpy", "float64")
    kinds = [type(s) for s in model.steps]
    assert kinds == [StandardizeStep, ActivationStep, DenseStep, ActivationStep, ResidualStep]
    assert model.steps[2].activation == "relu" and model.steps[3].kind == "silu"
    # the Sigmoid in its own Sequential still fuses into the Dense before it
    (inner,) = model.steps[4].steps
    assert isinstance(inner, DenseStep) and inner.activation == "sigmoid"


def test_a_foreign_layer_is_refused_when_the_model_runs():
    class Custom(gb.Dense.__mro__[1]):  # a Layer the plan cannot run
        pass

    model = gb.Sequential(gb.Dense(2, 2), Custom()).to("numpy")
    with pytest.raises(TypeError, match=r"layer Custom\(\) has no execution step"):
        model.forward(np.zeros((1, 2)))


def test_state_dict_names_come_from_the_models_own_structure():
    """A second Sequential built around the same layers renames their Parameters; the first
    model's state dict still names each tensor by its own position and loads back intact."""
    gb.seed(0)
    model = gb.Sequential(gb.Dense(2, 3), gb.ReLU(), gb.Dense(3, 1)).to("numpy", "float64")
    before = model.state_dict()
    gb.Sequential(gb.Dense(5, 2), *model.layers)  # names the shared Parameters "1.weight", ...
    after = model.state_dict()
    assert after.keys() == before.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    changed = {name: value + 1.0 for name, value in before.items()}
    model.load_state_dict(changed)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, changed[name])


def test_checkpoint_names_survive_a_second_model_around_the_same_layers(tmp_path):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(2, 3), gb.Tanh(), gb.Dense(3, 2)).to("numpy", "float64")
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    x = np.random.default_rng(0).normal(size=(6, 2))
    model.fit(x, np.arange(6) % 2, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=optimizer,
              epochs=2, batch_size=3, verbose=0)  # fmt: skip
    gb.Sequential(gb.Dense(4, 2), gb.ReLU(), *model.layers)  # renames the shared Parameters
    gb.save(tmp_path / "m.safetensors", model, optimizer)
    loaded, loaded_optimizer = gb.load(tmp_path / "m.safetensors", with_optimizer=True)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)
    saved = optimizer.state_dict()["buffers"]
    restored = loaded_optimizer.state_dict()["buffers"]
    assert sorted(restored) == sorted(f"exp_avg.{n}" for n in model.state_dict()) + sorted(
        f"exp_avg_sq.{n}" for n in model.state_dict()
    )
    for p, q in zip(optimizer.params, loaded_optimizer.params):
        np.testing.assert_array_equal(restored[f"exp_avg.{q.name}"], saved[f"exp_avg.{p.name}"])
