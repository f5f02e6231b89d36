"""gb.compile_step: captured steps equal the public calls bit for bit, and the emulator's capture
refuses what a CUDA graph capture breaks on.

The emu backend here hands out CuPy-like device arrays (no implicit host reads), so that a read
of device memory inside a step is caught as it would be on a GPU.  On a GPU the same tests run
on the cupy backend (marked gpu).
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends import get_backend
from gpubackprop.emulator.capture import GraphCaptureError

STEPS = 20


@pytest.fixture(scope="module")
def emu():
    from gpubackprop.backends.emu_backend import EmuBackend

    backend = EmuBackend(device_arrays=True)
    if not backend.available:
        pytest.skip(backend.reason)
    return backend


def _cupy():
    backend = get_backend("auto")
    if backend.name != "cupy":
        pytest.skip("no CUDA GPU")
    return backend


# (hidden activations, final layers, loss, optimizer, max_norm, schedule): together every
# activation, every loss and every optimizer at least once, with and without clipping and an
# lr schedule.
CONFIGS = {
    "relu-tanh-gelu/xent/sgd-momentum/clip": (
        [gb.ReLU, gb.Tanh, gb.GELU],
        [],
        gb.SoftmaxCrossEntropyLoss,
        lambda p: gb.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        0.5,
        False,
    ),
    "leaky-sigmoid-silu/mse/adam/schedule": (
        [lambda: gb.LeakyReLU(0.1), gb.Sigmoid, gb.SiLU],
        [],
        gb.MSELoss,
        lambda p: gb.Adam(p, lr=1e-2, weight_decay=1e-3),
        None,
        True,
    ),
    "gelu_tanh-identity/bce-logits/adamw/clip+schedule": (
        [lambda: gb.GELU("tanh"), gb.Identity],
        [],
        gb.BCEWithLogitsLoss,
        lambda p: gb.AdamW(p, lr=1e-2),
        0.3,
        True,
    ),
    "relu/bce/sgd": (
        [gb.ReLU],
        [gb.Sigmoid],
        gb.BCELoss,
        lambda p: gb.SGD(p, lr=0.1, weight_decay=1e-3),
        None,
        False,
    ),
}


def _build(backend, config, features=5, hidden=6, outputs=3):
    activations, final, loss_type, make_optimizer, _, _ = config
    gb.seed(3)
    layers = []
    width = features
    for make in activations:
        layers += [gb.Dense(width, hidden), make()]
        width = hidden
    layers += [gb.Dense(width, outputs), *(f() for f in final)]
    model = gb.Sequential(*layers).to(backend, dtype="float32")
    return model, loss_type(), make_optimizer(model.parameters())


def _batches(loss_type, rows=(7, 7, 4), outputs=3, seed=0):
    """Batches of two shapes (the last one partial), as an epoch gives them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(STEPS):
        n = rows[i % len(rows)]
        x = rng.standard_normal((n, 5)).astype(np.float32)
        if loss_type is gb.SoftmaxCrossEntropyLoss:
            y = rng.integers(0, outputs, n)
        elif loss_type is gb.MSELoss:
            y = rng.standard_normal((n, outputs)).astype(np.float32)
        else:
            y = rng.uniform(0, 1, (n, outputs)).astype(np.float32)
        out.append((x, y))
    return out


def _lr_at(step: int, base: float) -> float:
    return base * (0.5 ** (step // 5))


def _eager_steps(backend, config, batches):
    """The step written with the public calls."""
    model, loss_fn, optimizer = _build(backend, config)
    max_norm, schedule = config[4], config[5]
    base = optimizer.lr
    losses = []
    loss_fn.to(backend)
    for i, (x, y) in enumerate(batches):
        if schedule:
            optimizer.lr = _lr_at(i, base)
        pred = model.forward(x)
        dtype = np.int64 if y.dtype.kind == "i" else np.float32
        value = loss_fn.forward(pred, backend.asarray(y, dtype))
        model.backward(loss_fn.backward(), need_input_grad=False)
        if max_norm is not None:
            gb.clip_grad_norm(model.parameters(), max_norm)
        optimizer.step()
        losses.append(np.array(backend.to_numpy(value)))
    return model, optimizer, losses


def _compiled_steps(backend, config, batches):
    model, loss_fn, optimizer = _build(backend, config)
    max_norm, schedule = config[4], config[5]
    step = gb.compile_step(model, loss_fn, optimizer, max_norm=max_norm)
    base = optimizer.lr
    losses = []
    for i, (x, y) in enumerate(batches):
        if schedule:
            optimizer.lr = _lr_at(i, base)
        losses.append(np.array(backend.to_numpy(step(x, y))))
    return model, optimizer, losses, step


def _assert_same_training(backend, config):
    batches = _batches(config[2])
    eager_model, eager_opt, eager_losses = _eager_steps(backend, config, batches)
    model, optimizer, losses, step = _compiled_steps(backend, config, batches)
    assert step.captures
    assert len(step.graphs) == 2  # one per batch shape
    np.testing.assert_array_equal(np.array(losses), np.array(eager_losses))
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), eager_model.state_dict().items(), strict=True
    ):
        assert np.array_equal(ours, theirs), name
    # The gradients after the last step: the clipped ones in both (the captured step scales
    # them inside the update launch and writes them back, as clip_grad_norm scales them).
    assert np.array_equal(
        np.array(backend.to_numpy(model.store.grad)),
        np.array(backend.to_numpy(eager_model.store.grad)),
    )
    ours_state, eager_state = optimizer.state_dict(), eager_opt.state_dict()
    assert ours_state["step"] == eager_state["step"] == STEPS
    for key, value in ours_state["buffers"].items():
        assert np.array_equal(value, eager_state["buffers"][key]), key
    assert np.all(np.isfinite(losses)) and losses[-1] != losses[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_captured_steps_equal_eager_steps_on_emu(emu, name):
    _assert_same_training(emu, CONFIGS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_captured_steps_equal_eager_steps_on_cupy(name):
    _assert_same_training(_cupy(), CONFIGS[name])


def test_numpy_runs_the_same_step_eagerly():
    config = CONFIGS["relu-tanh-gelu/xent/sgd-momentum/clip"]
    batches = _batches(config[2])[:6]
    eager_model, _, eager_losses = _eager_steps(get_backend("numpy"), config, batches)
    model, _, losses, step = _compiled_steps(get_backend("numpy"), config, batches)
    assert not step.captures and not step.graphs
    np.testing.assert_array_equal(np.array(losses), np.array(eager_losses))
    np.testing.assert_array_equal(model.store.data, eager_model.store.data)


def test_replay_is_one_graph_launch_on_the_recording_seam():
    """After the capture, a call launches no kernel of its own: the graph holds the step."""
    from gpubackprop.backends.recording import HostBackend

    backend = HostBackend()
    config = CONFIGS["relu-tanh-gelu/xent/sgd-momentum/clip"]
    model, loss_fn, optimizer = _build(backend, config)
    step = gb.compile_step(model, loss_fn, optimizer, max_norm=1.0)
    x, y = _batches(config[2])[0]
    step(x, y)  # warm-up and capture
    (captured,) = step.graphs.values()
    kernels = [launch.kernel for launch in captured.graph.launches]
    assert {"dense_forward", "clip_coefficient", "sgd_update"} <= set(kernels)
    # The optimizer is one launch, the last of the step: it takes its step number from the
    # step scalars and counts the step there itself (no launch of its own for that).
    assert kernels.count("sgd_update") == 1 and kernels[-1] == "sgd_update"
    assert kernels[-3:-1] == ["sum_squares_partial", "clip_coefficient"]
    backend.seam.clear()
    step(x, y)
    assert backend.seam.launches == []
    assert optimizer.step_count == 2


class _SyncingLoss(gb.SoftmaxCrossEntropyLoss):
    """A loss that reads its value on the host inside the step: a planted sync."""

    def _compute(self, backend, pred, target):
        loss, grad = super()._compute(backend, pred, target)
        if not np.isfinite(float(loss)):
            raise FloatingPointError("diverged")
        return loss, grad


class _AllocatingLoss(gb.SoftmaxCrossEntropyLoss):
    """A loss that makes a new device array inside the step with NumPy-on-device calls."""

    def _compute(self, backend, pred, target):
        loss, grad = super()._compute(backend, pred, target)
        return loss, grad * 1.0


@pytest.mark.parametrize(
    ("loss_type", "named"),
    [(_SyncingLoss, "float(DeviceArray)"), (_AllocatingLoss, "numpy.multiply")],
)
def test_a_planted_sync_or_computation_in_the_step_is_refused(emu, loss_type, named):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(5, 6), gb.ReLU(), gb.Dense(6, 3)).to(emu)
    step = gb.compile_step(model, loss_type(), gb.SGD(model.parameters(), lr=0.1))
    x, y = _batches(gb.SoftmaxCrossEntropyLoss)[0]
    with pytest.raises(GraphCaptureError, match=named.replace("(", r"\(").replace(")", r"\)")):
        step(x, y)  # the warm-up runs eagerly; the capture refuses
    with pytest.raises(GraphCaptureError):
        step(x, y)  # no graph was kept: the next call tries again and is refused again
    assert step.graphs == {}
    float(model.forward(x).sum())  # and the device works normally after the refusal


def test_the_seam_refuses_inside_a_capture(emu):
    """Each call a real capture breaks on, refused with the call named."""
    seam = emu.seam
    static = emu.empty((4,), np.float32)
    other = emu.empty((4,), np.float32)
    pool = seam.new_pool()
    with seam.allocating_from(pool):
        first = emu.empty((3,), np.float32)
    checks = [
        (lambda: emu.to_numpy(static), "backend.to_numpy"),
        (emu.synchronize, "synchronize"),
        (lambda: static.get(), "DeviceArray.get"),
        (lambda: emu.xp.asarray(np.ones(4, np.float32)), "device_xp.asarray"),
        (lambda: seam.copy_in(other, np.ones(4, np.float32)), "not one of the static buffers"),
        (lambda: (emu.empty((3,), np.float32), emu.empty((5,), np.float32)), "warm-up"),
        (lambda: seam.compile_text("__global__ void k() {}", "planted.cu"), "compiling planted"),
        (lambda: emu.zeros((2,), np.float32), "numpy.zeros|device_xp.zeros"),
    ]
    for call, named in checks:
        with pytest.raises(GraphCaptureError, match=named), seam.capture([static], [first]):
            call()
    # Allowed: a copy into the static buffer (recorded) and the warm-up's allocation.
    with seam.capture([static], [first]) as holder:
        seam.copy_in(static, np.arange(4, dtype=np.float32))
        assert emu.empty((3,), np.float32) is first
    assert np.isnan(static.get()).all()  # captured, not run: still the poison of empty()
    seam.launch_graph(holder["graph"])
    assert np.array_equal(static.get(), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_fit_with_graph_trains_exactly_as_without(emu, max_norm):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((23, 5)).astype(np.float32)
    y = rng.integers(0, 3, 23)
    results = []
    for graph in (False, True):
        gb.seed(1)
        model = gb.Sequential(gb.Dense(5, 8), gb.Tanh(), gb.Dense(8, 3)).to(emu)
        opt = gb.Adam(model.parameters(), lr=1e-2)
        history = model.fit(
            x,
            y,
            loss=gb.SoftmaxCrossEntropyLoss(),
            optimizer=opt,
            epochs=2,
            batch_size=8,
            verbose=0,
            graph=graph,
            max_norm=max_norm,
        )
        results.append((model.state_dict(), history.history["loss"], history.history["accuracy"]))
    (state_a, loss_a, acc_a), (state_b, loss_b, acc_b) = results
    assert loss_a == loss_b and acc_a == acc_b
    for name in state_a:
        assert np.array_equal(state_a[name], state_b[name]), name
    if max_norm is not None:  # the clip did act: unclipped training ends elsewhere
        gb.seed(1)
        model = gb.Sequential(gb.Dense(5, 8), gb.Tanh(), gb.Dense(8, 3)).to(emu)
        model.fit(
            x,
            y,
            loss=gb.SoftmaxCrossEntropyLoss(),
            optimizer=gb.Adam(model.parameters(), lr=1e-2),
            epochs=2,
            batch_size=8,
            verbose=0,
        )
        assert not np.array_equal(model.state_dict()["0.weight"], state_a["0.weight"])


def test_bad_arguments_are_named(emu):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(5, 3)).to(emu)
    other = gb.Sequential(gb.Dense(5, 3)).to(emu)
    loss_fn = gb.SoftmaxCrossEntropyLoss()
    with pytest.raises(ValueError, match="max_norm"):
        gb.compile_step(model, loss_fn, gb.SGD(model.parameters()), max_norm=-1.0)
    with pytest.raises(ValueError, match="exactly this model's parameters"):
        gb.compile_step(model, loss_fn, gb.SGD(other.parameters()))
    with pytest.raises(TypeError, match="loss_fn"):
        gb.compile_step(model, "mse", gb.SGD(model.parameters()))
    step = gb.compile_step(model, loss_fn, gb.SGD(model.parameters()))
    x = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="label 3"):
        step(x, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="features per row"):
        step(np.zeros((4, 6), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="rows"):
        step(x, np.zeros(3, np.int64))


def test_clip_grad_norm_returns_a_device_norm_and_scales_on_the_device(emu):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(4, 3), gb.Tanh(), gb.Dense(3, 2)).to(emu, dtype="float64")
    rng = np.random.default_rng(0)
    grads = rng.standard_normal(model.store.size)
    model.store.grad[...] = emu.asarray(grads)
    norm = gb.clip_grad_norm(model.parameters(), 0.1)
    assert isinstance(norm, emu.xp.ndarray) and norm.shape == ()
    expected = np.sqrt(np.sum(grads**2))
    assert float(norm) == pytest.approx(expected, rel=1e-12)
    scaled = emu.to_numpy(model.store.grad)
    np.testing.assert_allclose(scaled, grads * 0.1 / (expected + 1e-6), rtol=1e-12)
    # A norm below max_norm leaves the gradients as they are.
    norm = gb.clip_grad_norm(model.parameters(), 100.0)
    assert np.array_equal(emu.to_numpy(model.store.grad), scaled)


def _kernels_of_the_public_step(backend, model, loss_fn, optimizer, x, y, max_norm):
    """The kernels one step written with the public calls launches on the recording seam."""
    backend.seam.clear()
    loss_fn.to(backend)
    loss_fn.check_labels = False
    pred = model.forward(x)
    loss_fn.forward(pred, backend.asarray(y, np.int64))
    model.backward(loss_fn.backward(), need_input_grad=False)
    if max_norm is not None:
        gb.clip_grad_norm(model.parameters(), max_norm)
    optimizer.step()
    return [launch.kernel for launch in backend.seam.launches]


@pytest.mark.parametrize("make_optimizer", [lambda p: gb.SGD(p, lr=0.1, momentum=0.9), gb.Adam])
def test_a_clipped_captured_step_scales_inside_the_update_launch(make_optimizer):
    """With max_norm the graph holds one launch fewer than the public calls: no clip_scale,
    the update launch applies the coefficient (and the unclipped step is the same launches)."""
    from gpubackprop.backends.recording import HostBackend

    config = CONFIGS["relu-tanh-gelu/xent/sgd-momentum/clip"]
    x, y = _batches(config[2])[0]
    for max_norm in (None, 0.5):
        backend = HostBackend()
        model, loss_fn, _ = _build(backend, config)
        optimizer = make_optimizer(model.parameters())
        public = _kernels_of_the_public_step(backend, model, loss_fn, optimizer, x, y, max_norm)
        step = gb.compile_step(model, loss_fn, optimizer, max_norm=max_norm)
        step(x, y)  # warm-up and capture
        (captured,) = step.graphs.values()
        kernels = [launch.kernel for launch in captured.graph.launches]
        assert "clip_scale" not in kernels
        if max_norm is None:
            assert kernels == public
        else:
            assert public.count("clip_scale") == 1 and "clip_coefficient" in kernels
            assert len(kernels) == len(public) - 1
            assert kernels == [k for k in public if k != "clip_scale"]


def _optimizers():
    return [
        lambda p: gb.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: gb.SGD(p, lr=0.1),
        lambda p: gb.Adam(p, lr=1e-2, weight_decay=1e-2),
        lambda p: gb.AdamW(p, lr=1e-2),
    ]


@pytest.mark.parametrize("backend_name", ["emu", "numpy"])
@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("subset", [False, True])
def test_step_with_max_norm_is_clip_grad_norm_then_step_bit_for_bit(
    emu, backend_name, index, subset
):
    """opt.step(max_norm=m) against gb.clip_grad_norm(params, m) + opt.step(): the norm, the
    parameters, the gradients after the step and the optimizer state, over 4 steps with c < 1
    and c >= 1, for a flat optimizer and one over a subset of the parameters."""
    backend = emu if backend_name == "emu" else get_backend("numpy")
    rng = np.random.default_rng(index)
    grads = [rng.standard_normal(size) for size in (70, 70, 70, 70)]
    results = []
    for fused in (False, True):
        gb.seed(4)
        model = gb.Sequential(gb.Dense(5, 7), gb.Tanh(), gb.Dense(7, 3)).to(backend)
        params = model.parameters()[:2] if subset else model.parameters()
        optimizer = _optimizers()[index](params)
        norms = []
        for step, (g, max_norm) in enumerate(zip(grads, (0.5, 1e3, 0.2, 0.5))):
            flat = np.zeros(model.store.size, np.float32)
            flat[: g.size] = g * (step + 1)
            model.store.grad[...] = backend.asarray(flat, np.float32)
            if fused:
                norm = optimizer.step(max_norm=max_norm)
            else:
                norm = gb.clip_grad_norm(params, max_norm)
                assert optimizer.step() is None
            norms.append(np.array(backend.to_numpy(norm)))
        results.append(
            (
                norms,
                np.array(backend.to_numpy(model.store.data)),
                np.array(backend.to_numpy(model.store.grad)),
                optimizer.state_dict()["buffers"],
            )
        )
    (norms_a, data_a, grad_a, state_a), (norms_b, data_b, grad_b, state_b) = results
    assert np.array_equal(np.array(norms_a), np.array(norms_b))
    assert np.array_equal(data_a, data_b)
    assert np.array_equal(grad_a, grad_b)
    for key in state_a:
        assert np.array_equal(state_a[key], state_b[key]), key
    with pytest.raises(ValueError, match="max_norm"):
        optimizer.step(max_norm=-1.0)


# -- data-parallel steps (compile_step(data_parallel=)); two ranks: tests/test_distributed.py -----


def _small_training(backend):
    gb.seed(0)
    model = gb.Sequential(gb.Dense(5, 6), gb.ReLU(), gb.Dense(6, 3)).to(backend)
    loss_fn = gb.SoftmaxCrossEntropyLoss().to(backend)
    return model, loss_fn, gb.SGD(model.parameters(), lr=0.1)


def test_a_planted_host_allreduce_in_the_capture_is_refused(emu, monkeypatch):
    """MPI's all-reduce on the host is a host synchronisation: a step that put it inside the
    capture (here by claiming MpiTransport capturable) is refused, naming the call."""
    pytest.importorskip("mpi4py")
    from gpubackprop import distributed as dist

    model, loss_fn, optimizer = _small_training(emu)
    # a one-rank MPI job (MPI's singleton, no mpiexec)
    parallel = dist.DataParallel(dist.init(), model, loss_fn, optimizer)
    monkeypatch.setattr(dist.MpiTransport, "capturable", True)
    step = gb.compile_step(model, loss_fn, optimizer, data_parallel=parallel)
    assert step.graphs_per_step == 1  # the lie: one graph, the all-reduce inside
    x, y = _batches(gb.SoftmaxCrossEntropyLoss)[0]
    with pytest.raises(GraphCaptureError, match=r"MPI Allreduce \(MpiTransport\.allreduce_sum_\)"):
        step(x, y)
    assert step.graphs == {}
    monkeypatch.setattr(dist.MpiTransport, "capturable", False)
    step = gb.compile_step(model, loss_fn, optimizer, data_parallel=parallel)
    step(x, y)  # two graphs, the all-reduce between them
    assert step.graphs_per_step == 2 and len(step.graphs) == 1


def test_data_parallel_arguments_are_checked():
    from gpubackprop import distributed as dist

    model, loss_fn, optimizer = _small_training(get_backend("numpy"))
    group = dist.ProcessGroup(comm=None, rank=0, size=2, local_rank=0, local_size=1)
    other_loss = gb.SoftmaxCrossEntropyLoss()
    parallel = dist.DataParallel(group, model, other_loss, optimizer)
    with pytest.raises(ValueError, match="built for another loss"):
        gb.compile_step(model, loss_fn, optimizer, data_parallel=parallel)
    step = gb.compile_step(model, loss_fn, optimizer)
    x, y = _batches(gb.SoftmaxCrossEntropyLoss)[0]
    with pytest.raises(ValueError, match="global_rows=14 is for a data-parallel step"):
        step(x, y, global_rows=14)
    with pytest.raises(ValueError, match="skip_batch is for a data-parallel step"):
        step.skip_batch(14)
    step = gb.compile_step(model, other_loss, optimizer, data_parallel=parallel)
    with pytest.raises(ValueError, match="global_rows=3 is less than this rank's 7 rows"):
        step(x, y, global_rows=3)


@pytest.mark.parametrize("max_norm", [None, 0.3])
def test_a_bf16_captured_step_equals_the_eager_bf16_steps(emu, max_norm):
    """A model placed in bf16: the captured step (whose update launch writes the weights' bf16
    copy) trains bit for bit as the public calls, and leaves the copy equal to bf16(θ)."""
    from gpubackprop.precision import bf16_bits

    config = CONFIGS["gelu_tanh-identity/bce-logits/adamw/clip+schedule"]
    config = (*config[:4], max_norm, False)
    batches = _batches(config[2])[:8]
    results = []
    for compiled in (False, True):
        model, loss_fn, optimizer = _build(emu, config)
        model.to(emu, precision="bf16")
        optimizer = config[3](model.parameters())
        if compiled:
            step = gb.compile_step(model, loss_fn, optimizer, max_norm=max_norm)
            losses = [np.array(emu.to_numpy(step(x, y))) for x, y in batches]
            assert len(step.graphs) == 2
        else:
            loss_fn.to(emu)
            losses = []
            for x, y in batches:
                value = loss_fn.forward(model.forward(x), emu.asarray(y, np.float32))
                model.backward(loss_fn.backward(), need_input_grad=False)
                if max_norm is not None:
                    gb.clip_grad_norm(model.parameters(), max_norm)
                optimizer.step()
                losses.append(np.array(emu.to_numpy(value)))
        data = np.array(emu.to_numpy(model.store.data))
        np.testing.assert_array_equal(np.array(emu.to_numpy(model.store.bf16)), bf16_bits(data))
        results.append((losses, data))
    np.testing.assert_array_equal(np.array(results[0][0]), np.array(results[1][0]))
    np.testing.assert_array_equal(results[0][1], results[1][1])
