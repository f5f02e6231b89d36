"""Checkpoints: exact round trips, resumed training, atomic writes, and every load error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import gpubackprop as gb
from gpubackprop import checkpoint
from gpubackprop.random import generator


def _model(seed: int = 0, dtype: str = "float32") -> gb.Sequential:
    gb.seed(seed)
    model = gb.Sequential(
        gb.Dense(7, 33),
        gb.ReLU(),
        gb.Residual(gb.Dense(33, 33), gb.Tanh()),
        gb.Dense(33, 16, bias=False),
        gb.GELU(),
        gb.Dense(16, 3),
    )
    return model.to("numpy", dtype=dtype)


def _data(n: int = 37):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 7)), rng.integers(0, 3, n)


def _train(model, optimizer, epochs: int = 2, seed: int = 11):
    x, y = _data()
    gb.seed(seed)  # the shuffling order
    model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=optimizer,
        epochs=epochs,
        batch_size=8,
        verbose=0,
    )


def _read(path):
    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype
        assert np.array_equal(state_a[name], state_b[name]), name


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_model_only(tmp_path, dtype):
    model = _model(dtype=dtype)
    _train(model, gb.Adam(model.parameters(), lr=1e-2))
    path = tmp_path / "m.safetensors"
    gb.save(path, model, metadata={"epoch": 2, "note": "ok"})
    loaded = gb.load(path)
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.config() == model.config()
    _assert_same_weights(model, loaded)
    x, _ = _data()
    assert np.array_equal(model.predict(x), loaded.predict(x))
    header = checkpoint.read_metadata(path)
    assert header["metadata"] == {"epoch": 2, "note": "ok"}
    assert header["optimizer"] is None and header["dtype"] == dtype
    assert header["gpubackprop_version"] == gb.__version__
    assert gb.load(path, with_optimizer=True)[1] is None


def test_checkpoint_holds_format_config_and_one_tensor_per_parameter(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    gb.save(path, model)
    tensors, metadata = _read(path)
    assert metadata["format"] == "gpubackprop-checkpoint"
    assert metadata["format_version"] == "1"
    assert json.loads(metadata["config"]) == model.config()
    assert set(tensors) == {f"model.{name}" for name in model.state_dict()}
    assert tensors["model.0.weight"].shape == (33, 7)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_load_converts_dtype(tmp_path):
    model = _model(dtype="float64")
    path = tmp_path / "m.safetensors"
    gb.save(path, model)
    loaded = gb.load(path, backend="numpy", dtype="float32")
    assert loaded.dtype == np.float32
    for name, value in model.state_dict().items():
        assert np.array_equal(loaded.state_dict()[name], value.astype(np.float32))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: gb.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
        lambda p: gb.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: gb.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: gb.SGD(p, lr=0.05),
    ],
    ids=["adam", "adamw", "sgd-nesterov", "sgd-plain"],
)
def test_resumed_training_matches_uninterrupted(tmp_path, make_optimizer):
    model = _model()
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, epochs=2)
    path = tmp_path / "m.safetensors"
    gb.save(path, model, optimizer)

    loaded, loaded_optimizer = gb.load(path, with_optimizer=True)
    assert type(loaded_optimizer) is type(optimizer)
    assert loaded_optimizer.step_count == optimizer.step_count > 0
    assert loaded_optimizer.hyperparams == optimizer.hyperparams

    _train(model, optimizer, epochs=2, seed=12)
    _train(loaded, loaded_optimizer, epochs=2, seed=12)
    _assert_same_weights(model, loaded)


def test_resume_without_optimizer_state_differs(tmp_path):
    # The check above can fail: Adam restarted from zero moments takes different steps.
    model = _model()
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    path = tmp_path / "m.safetensors"
    gb.save(path, model, optimizer)
    loaded = gb.load(path)
    _train(model, optimizer, seed=12)
    _train(loaded, gb.Adam(loaded.parameters(), lr=1e-2), seed=12)
    assert not np.array_equal(model.state_dict()["0.weight"], loaded.state_dict()["0.weight"])


@pytest.mark.parametrize("backend", ["emu", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_moves_between_backends(tmp_path, backend):
    available, reason = gb.available_backends()[backend]
    if not available:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    model = _model()
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, epochs=1)
    path = tmp_path / "numpy.safetensors"
    gb.save(path, model, optimizer)
    moved, moved_optimizer = gb.load(path, backend=backend, with_optimizer=True)
    assert moved.backend.name == backend
    _assert_same_weights(model, moved)  # stored values cross backends bit for bit
    x, _ = _data()
    np.testing.assert_allclose(moved.predict(x), model.predict(x), rtol=1e-4, atol=1e-5)
    back_path = tmp_path / f"{backend}.safetensors"
    gb.save(back_path, moved, moved_optimizer)
    tensors, _ = _read(back_path)
    original, _ = _read(path)
    assert tensors.keys() == original.keys()
    assert all(np.array_equal(tensors[k], original[k]) for k in tensors)


def test_optimizer_over_a_subset(tmp_path):
    model = _model()
    subset = [p for p in model.parameters() if p.name.startswith("3.")]
    optimizer = gb.Adam(subset, lr=1e-2)
    _train(model, optimizer)
    path = tmp_path / "m.safetensors"
    gb.save(path, model, optimizer)
    loaded, loaded_optimizer = gb.load(path, with_optimizer=True)
    assert [p.name for p in loaded_optimizer.params] == ["3.weight"]
    _train(model, optimizer, seed=3)
    _train(loaded, loaded_optimizer, seed=3)
    _assert_same_weights(model, loaded)


def test_load_keeps_the_global_random_stream(tmp_path):
    path = tmp_path / "m.safetensors"
    gb.save(path, _model())
    gb.seed(5)
    expected = generator().random(3)
    gb.seed(5)
    gb.load(path)  # rebuilding the layers must not draw from gb.seed's generator
    assert np.array_equal(generator().random(3), expected)


def test_save_rejects_foreign_optimizer_and_bad_metadata(tmp_path):
    model, other = _model(), _model(seed=1)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="not one of this model's parameters"):
        gb.save(path, model, gb.Adam(other.parameters()))
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        gb.save(path, model, metadata={"x": object()})
    with pytest.raises(TypeError, match="metadata"):
        gb.save(path, model, metadata=["epoch", 1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gb.save(tmp_path / "no" / "such" / "dir.safetensors", model)
    assert list(tmp_path.iterdir()) == []


# -- atomic writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_failed_save_leaves_old_checkpoint_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "m.safetensors"
    gb.save(path, _model(seed=0))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    if failing == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            """Writes half of the payload, then the disk 'fills up'."""

            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, payload):
                self.handle.write(payload[: len(payload) // 2])
                self.handle.flush()
                raise OSError("No space left on device")

        monkeypatch.setattr(
            checkpoint.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
        )
    else:
        monkeypatch.setattr(checkpoint.os, failing, fail)

    with pytest.raises(OSError):
        gb.save(path, _model(seed=1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    _assert_same_weights(gb.load(path), _model(seed=0))


def test_interrupted_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    gb.save(path, _model(seed=0))
    before = path.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        gb.save(path, _model(seed=1))
    assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_save_replaces_existing(tmp_path):
    path = tmp_path / "m.safetensors"
    gb.save(path, _model(seed=0))
    gb.save(path, _model(seed=1))
    _assert_same_weights(gb.load(path), _model(seed=1))
    assert len(list(tmp_path.iterdir())) == 1


# -- load errors -----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = _model()
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, epochs=1)
    path = tmp_path / "good.safetensors"
    gb.save(path, model, optimizer)
    return path


def _craft(tmp_path, source, edit_tensors=None, edit_metadata=None):
    tensors, metadata = _read(source)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors.*does not exist"):
        gb.load(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file(tmp_path, saved, keep):
    data = saved.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated or not a safetensors file"):
        gb.load(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        gb.load(path)
    pickle_like = tmp_path / "model.pkl"
    pickle_like.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        gb.load(pickle_like)


def test_not_a_gpubackprop_checkpoint(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a gpubackprop checkpoint"):
        gb.load(path)
    save_file({"weight": np.zeros(2, np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format 'pt'; expected 'gpubackprop-checkpoint'"):
        gb.load(path)


@pytest.mark.parametrize("version", ["2", "0", "one"])
def test_unsupported_format_version(tmp_path, saved, version):
    path = _craft(tmp_path, saved, edit_metadata=lambda m: m.update(format_version=version))
    with pytest.raises(ValueError, match=rf"format_version '{version}'.*supported: \[1\]"):
        gb.load(path)


def test_invalid_config(tmp_path, saved):
    def unknown_layer(metadata):
        config = json.loads(metadata["config"])
        config["layers"][1] = {"type": "Conv2d"}
        metadata["config"] = json.dumps(config)

    path = _craft(tmp_path, saved, edit_metadata=unknown_layer)
    with pytest.raises(ValueError, match=r"invalid model config.*'Conv2d'"):
        gb.load(path)
    path = _craft(tmp_path, saved, edit_metadata=lambda m: m.update(config="{not json"))
    with pytest.raises(ValueError, match="invalid JSON in its 'config' entry"):
        gb.load(path)
    path = _craft(tmp_path, saved, edit_metadata=lambda m: m.pop("config"))
    with pytest.raises(ValueError, match="no 'config'"):
        gb.load(path)
    path = _craft(tmp_path, saved, edit_metadata=lambda m: m.update(dtype="int8"))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        gb.load(path)


def test_missing_tensor(tmp_path, saved):
    def rename(tensors):
        tensors["model.0.weights"] = tensors.pop("model.0.weight")

    path = _craft(tmp_path, saved, edit_tensors=rename)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.0\.weight'"):
        gb.load(path)
    path = _craft(tmp_path, saved, edit_tensors=lambda t: t.pop("optimizer.exp_avg_sq.5.bias"))
    with pytest.raises(ValueError, match=r"missing tensor 'optimizer\.exp_avg_sq\.5\.bias'"):
        gb.load(path)


def test_unexpected_tensor(tmp_path, saved):
    path = _craft(
        tmp_path, saved, edit_tensors=lambda t: t.update({"model.9.weight": np.zeros(3, "f4")})
    )
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.9\.weight'"):
        gb.load(path)


def test_wrong_shape(tmp_path, saved):
    def reshape(tensors):
        tensors["model.2.0.weight"] = tensors["model.2.0.weight"][:, :32].copy()

    path = _craft(tmp_path, saved, edit_tensors=reshape)
    expected = r"'model\.2\.0\.weight' has shape \(33, 32\); expected \(33, 33\)"
    with pytest.raises(ValueError, match=expected):
        gb.load(path)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_wrong_dtype(tmp_path, saved, dtype):
    def cast(tensors):
        tensors["model.3.weight"] = tensors["model.3.weight"].astype(dtype)

    path = _craft(tmp_path, saved, edit_tensors=cast)
    with pytest.raises(ValueError, match=rf"'model.3.weight' has dtype {dtype}; expected float32"):
        gb.load(path)


def test_failed_load_reports_before_building_anything(tmp_path, saved):
    # The error path must not leave half-loaded state that a caller could pick up: load returns
    # nothing, and the file is unchanged.
    before = saved.read_bytes()
    path = _craft(tmp_path, saved, edit_tensors=lambda t: t.pop("model.0.bias"))
    with pytest.raises(ValueError):
        gb.load(path)
    assert saved.read_bytes() == before


def test_invalid_optimizer_entry(tmp_path, saved):
    def bad_type(metadata):
        info = json.loads(metadata["optimizer"])
        info["type"] = "RMSprop"
        metadata["optimizer"] = json.dumps(info)

    path = _craft(tmp_path, saved, edit_metadata=bad_type)
    with pytest.raises(ValueError, match="optimizer type 'RMSprop'"):
        gb.load(path)
    path = _craft(tmp_path, saved, edit_metadata=lambda m: m.update(optimizer='{"type": "Adam"}'))
    with pytest.raises(ValueError, match="invalid 'optimizer' entry"):
        gb.load(path)


# -- configs the file's tensors do not back ---------------------------------------------------


def _tiny_file_claiming(tmp_path, layers, tensors):
    """A small checkpoint whose config claims ``layers`` but holds only ``tensors``."""
    metadata = {
        "format": checkpoint.FORMAT,
        "format_version": str(checkpoint.FORMAT_VERSION),
        "config": json.dumps({"type": "Sequential", "layers": layers}),
        "dtype": "float32",
    }
    path = tmp_path / "claims.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"model.0.weight": np.zeros((3, 2), np.float32), "model.0.bias": np.zeros(3, np.float32)},
        {"model.0.weight": np.zeros(30000, np.float32)},
    ],
    ids=["no-tensors", "small-tensors", "one-row"],
)
def test_oversized_config_fails_fast_with_bounded_memory(tmp_path, tensors):
    # Dense(30000, 30000) would need 30000² float64 init weights (7.2 GB) if built first.
    import tracemalloc

    layers = [{"type": "Dense", "in_features": 30000, "out_features": 30000, "bias": True}]
    path = _tiny_file_claiming(tmp_path, layers, tensors)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"model\.0\.weight.*\(30000, 30000\)"):
            gb.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"load allocated {peak / 2**20:.0f} MiB before failing"


def test_oversized_nested_dense_and_other_layer_sizes_are_refused(tmp_path):
    inner = {"type": "Dense", "in_features": 4, "out_features": 50000, "bias": False}
    path = _tiny_file_claiming(
        tmp_path,
        [{"type": "Residual", "layers": [inner]}],
        {"model.0.0.weight": np.zeros((4, 4), np.float32)},
    )
    with pytest.raises(ValueError, match=r"'model\.0\.0\.weight' has shape \(4, 4\); expected"):
        gb.load(path)
    # A layer other than Dense that names a size no tensor in the file comes near.
    path = _tiny_file_claiming(
        tmp_path,
        [
            {"type": "Dense", "in_features": 2, "out_features": 2, "bias": False},
            {"type": "ReLU", "width": 10**9},
        ],
        {"model.0.weight": np.zeros((2, 2), np.float32)},
    )
    with pytest.raises(ValueError, match=r"layer 1 \(ReLU\) has width=1000000000"):
        gb.load(path)


@pytest.mark.parametrize("value", [0, -3, "64", 2.5, True, None])
def test_dense_sizes_in_the_config_must_be_positive_integers(tmp_path, value):
    layers = [{"type": "Dense", "in_features": value, "out_features": 2}]
    path = _tiny_file_claiming(tmp_path, layers, {"model.0.weight": np.zeros((2, 2), np.float32)})
    expected = r"layer 0 \(Dense\): in_features=.*an integer >= 1"
    with pytest.raises(ValueError, match=expected):
        gb.load(path)


# -- temporaries of killed saves ------------------------------------------------------------------


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_save_removes_temporaries_of_killed_saves_only(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "m.safetensors"
    tag = checkpoint._host_tag()
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [
            tmp_path / f".m.safetensors.{tag}-{dead}.abc_1234.tmp",  # its writer was killed
            tmp_path / ".m.safetensors.k3j2_8x0.tmp",  # an older name without a pid, an hour old
            tmp_path / f".m.safetensors.0000beef-{os.getpid()}.zz.tmp",  # another host, old
        ]
        live = [
            tmp_path / f".m.safetensors.{tag}-{os.getpid()}.other.tmp",  # this process, writing
            tmp_path / f".m.safetensors.{tag}-{sleeper.pid}.qwe.tmp",  # a concurrent save
            tmp_path / f".m.safetensors.0000beef-{dead}.new.tmp",  # another host, fresh
            tmp_path / f".other.safetensors.{tag}-{dead}.abc.tmp",  # another target
            tmp_path / "m.safetensors.tmp",  # not a temporary of ours
        ]
        for planted in stale + live:
            planted.write_bytes(b"\0" * 1000)
        hour_ago = time.time() - 2 * checkpoint._UNCHECKABLE_STALE_AFTER_S
        for old in stale[1:]:
            os.utime(old, (hour_ago, hour_ago))
        gb.save(path, _model())
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([path.name, *(p.name for p in live)])
        _assert_same_weights(gb.load(path), _model())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporary_names_carry_the_writer(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(source, target):
        seen.append(os.path.basename(source))
        return real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    gb.save(tmp_path / "m.safetensors", _model())
    (name,) = seen
    assert name.startswith(f".m.safetensors.{checkpoint._host_tag()}-{os.getpid()}.")
    assert name.endswith(".tmp")
