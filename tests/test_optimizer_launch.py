"""The optimizer step is one launch (kernels/train_step.cu: sgd_update, adam_update).

Each update launch takes its step t = scalars[STEP_T] + 1 and the bias corrections of step t
itself, and its last block to finish counts the step in the step scalars (a ticket counter in
the same buffer).  Checked here: the launch count on the recording seam; that over a grid of
several blocks, also one whose grid-stride loop iterates, every element is updated with the
step's own t (bitwise the elementwise update given t by the host) while the scalars after k
steps hold k and the bias corrections of step k; that an empty buffer still counts its step; that
an optimizer updating parameters one by one counts each step once; and the checkpoint of the
step count.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backends import get_backend, kernel_backend
from gpubackprop.backends.base import STEP_BLOCKS_DONE, STEP_LR, STEP_SCALARS, STEP_T

BETA1, BETA2 = 0.9, 0.99
SGD_HYPER = {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 1e-3}
ADAM_HYPER = {"beta1": BETA1, "beta2": BETA2, "eps": 1e-8, "weight_decay": 1e-2}


@pytest.fixture(scope="module")
def emu():
    from gpubackprop.backends.emu_backend import EmuBackend

    backend = EmuBackend()
    if not backend.available:
        pytest.skip(backend.reason)
    return backend


def _backend(name, emu):
    if name == "emu":
        return emu
    if name == "cupy":
        backend = get_backend("auto")
        if backend.name != "cupy":
            pytest.skip("no CUDA GPU")
        return backend
    return get_backend(name)


BACKENDS = ["numpy", "emu", pytest.param("cupy", marks=pytest.mark.gpu)]


def _scalars(backend, lr):
    host = np.zeros(len(STEP_SCALARS))
    host[STEP_LR] = lr
    return backend.asarray(host, np.float64)


def _expected_scalars(k, lr, beta1, beta2):
    """[k, lr, 1 − β₁ᵏ, √(1 − β₂ᵏ), 0]: the step scalars after k steps (the ticket counter back
    at 0 for the next launch)."""
    return np.array([k, lr, 1.0 - beta1**k, math.sqrt(1.0 - beta2**k), 0.0])


def _check_scalars(backend, scalars, expected):
    got = np.asarray(backend.to_numpy(scalars))
    np.testing.assert_array_equal(got[[STEP_T, STEP_LR, STEP_BLOCKS_DONE]], expected[[0, 1, 4]])
    if backend.name == "cupy":  # the device's pow, within an ulp or two of the host's
        np.testing.assert_allclose(got[2:4], expected[2:4], rtol=1e-15)
    else:  # the emulator's pow is the host's (glibc)
        np.testing.assert_array_equal(got[2:4], expected[2:4])


def _arrays(backend, rng, n, count):
    return [backend.asarray(rng.standard_normal(n), np.float32) for _ in range(count)]


def _host(backend, array):
    return np.array(backend.to_numpy(array))


def _assert_same_update(backend, ours, theirs):
    """Bitwise on the emulator (one compiler, the host's pow); on a GPU within float32 rounding:
    the update kernel and the elementwise one are two compilations (contraction into FMAs may
    differ) and the bias corrections the device's pow against the host's."""
    if backend.name == "cupy":
        np.testing.assert_allclose(_host(backend, ours), _host(backend, theirs), rtol=1e-6)
    else:
        np.testing.assert_array_equal(_host(backend, ours), _host(backend, theirs))


# grid of several blocks (n = 1000: 4 blocks of 256), then a grid capped at 3 blocks over
# 3000 elements (12 blocks' worth), so that each thread's loop takes up to 4 elements
@pytest.mark.parametrize("n, max_blocks", [(1000, None), (3000, 3)])
@pytest.mark.parametrize("name", BACKENDS)
def test_adam_counts_its_steps_over_several_blocks(name, emu, n, max_blocks, monkeypatch):
    backend = _backend(name, emu)
    if max_blocks is not None:
        monkeypatch.setattr(kernel_backend, "_MAX_GRID_STRIDE_BLOCKS", max_blocks)
    # On the emulator the blocks run in a shuffled order, as a GPU may run them: the last block
    # to finish is then not the one with the highest index.
    monkeypatch.setenv("GPUBACKPROP_EMU_SHUFFLE", "5")
    rng = np.random.default_rng(n)
    param, exp_avg, exp_avg_sq = _arrays(backend, rng, n, 3)
    exp_avg_sq = backend.asarray(np.abs(_host(backend, exp_avg_sq)), np.float32)  # v ≥ 0
    reference = [a.copy() for a in (param, exp_avg, exp_avg_sq)]
    scalars = _scalars(backend, 0.01)
    for k in range(1, 8):
        grad = backend.asarray(rng.standard_normal(n), np.float32)
        backend.adam_update(
            param, grad, exp_avg, exp_avg_sq, scalars, **ADAM_HYPER, decoupled=False
        )
        _check_scalars(backend, scalars, _expected_scalars(k, 0.01, BETA1, BETA2))
        # Every element took step k: bitwise the elementwise update given t = k by the host
        # (a block that read a t already advanced by another would differ).
        backend.adam_step(*reference[:1], grad, *reference[1:], lr=0.01, **ADAM_HYPER, step=k,
                          decoupled=False)  # fmt: skip
        for ours, theirs in zip((param, exp_avg, exp_avg_sq), reference, strict=True):
            _assert_same_update(backend, ours, theirs)


@pytest.mark.parametrize("n, max_blocks", [(1000, None), (3000, 3)])
@pytest.mark.parametrize("name", BACKENDS)
def test_sgd_first_step_is_the_launch_own_t(name, emu, n, max_blocks, monkeypatch):
    """SGD's first-step rule (b ← g) applies to exactly the first launch, in every block."""
    backend = _backend(name, emu)
    if max_blocks is not None:
        monkeypatch.setattr(kernel_backend, "_MAX_GRID_STRIDE_BLOCKS", max_blocks)
    # On the emulator the blocks run in a shuffled order, as a GPU may run them: the last block
    # to finish is then not the one with the highest index.
    monkeypatch.setenv("GPUBACKPROP_EMU_SHUFFLE", "5")
    rng = np.random.default_rng(n + 1)
    param, buf = _arrays(backend, rng, n, 2)
    ref_param, ref_buf = param.copy(), buf.copy()
    scalars = _scalars(backend, 0.05)
    for k in range(1, 5):
        grad = backend.asarray(rng.standard_normal(n), np.float32)
        backend.sgd_update(param, grad, buf, scalars, **SGD_HYPER)
        _check_scalars(backend, scalars, _expected_scalars(k, 0.05, 0.0, 0.0))
        backend.sgd_step(ref_param, grad, ref_buf, lr=0.05, **SGD_HYPER, first_step=k == 1)
        _assert_same_update(backend, param, ref_param)
        _assert_same_update(backend, buf, ref_buf)


@pytest.mark.parametrize("name", ["numpy", "emu"])
def test_an_empty_buffer_still_counts_its_step(name, emu):
    backend = _backend(name, emu)
    empty = backend.asarray(np.zeros(0), np.float32)
    scalars = _scalars(backend, 0.1)
    for k in (1, 2):
        backend.adam_update(empty, empty, empty, empty, scalars, **ADAM_HYPER, decoupled=True)
        _check_scalars(backend, scalars, _expected_scalars(k, 0.1, BETA1, BETA2))
    # advance=False: nothing to update and nothing to count, so nothing happens
    backend.sgd_update(empty, empty, None, scalars, **{**SGD_HYPER, "momentum": 0.0,
                       "nesterov": False}, advance=False)  # fmt: skip
    _check_scalars(backend, scalars, _expected_scalars(2, 0.1, BETA1, BETA2))


def _model(backend, sizes=(40, 30, 3)):
    gb.seed(5)
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [gb.Dense(a, b), gb.Tanh()]
    return gb.Sequential(*layers[:-1]).to(backend, dtype="float32")


def _assert_same_parameters(model, other):
    """Bitwise equal parameters (the flat store's padding between them is no parameter)."""
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), other.state_dict().items(), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=name)


OPTIMIZERS = {
    "sgd": lambda p: gb.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: gb.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: gb.Adam(p, lr=1e-2),
    "adamw": lambda p: gb.AdamW(p, lr=1e-2),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_an_optimizer_step_is_one_launch_on_the_recording_seam(kind):
    from gpubackprop.backends.recording import HostBackend

    backend = HostBackend()
    model = _model(backend)
    opt = OPTIMIZERS[kind](model.parameters())
    opt.step()  # the first step makes the state buffers and the step scalars
    for max_norm, expected in ((None, 1), (0.5, 3)):
        backend.seam.clear()
        opt.step(max_norm=max_norm)
        kernels = [launch.kernel for launch in backend.seam.launches]
        update = "sgd_update" if kind.startswith("sgd") else "adam_update"
        assert len(kernels) == expected and kernels[-1] == update, kernels
        (launch,) = backend.seam.launches[-1:]
        assert int(launch.args[-1]) == 1  # it counts the step
        assert launch.args[5 if update == "sgd_update" else 6] is opt.step_scalars
    # Parameters outside one flat buffer: one launch each, the last one counting the step.
    opt = OPTIMIZERS[kind](model.parameters()[:-1])
    backend.seam.clear()
    opt.step()
    launches = backend.seam.launches
    assert len(launches) == len(model.parameters()) - 1
    assert [int(launch.args[-1]) for launch in launches] == [0] * (len(launches) - 1) + [1]


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_step_over_parameters_one_by_one_counts_once_and_equals_the_flat_step(emu, kind):
    """The same parameters updated as one flat buffer and one by one (in reverse order, which
    is not the store's): bitwise the same, and the step counted once per step."""
    models = [_model(emu) for _ in range(2)]
    flat = OPTIMIZERS[kind](models[0].parameters())
    by_parameter = OPTIMIZERS[kind](models[1].parameters()[::-1])
    rng = np.random.default_rng(7)
    for k in range(1, 6):
        grad = rng.standard_normal(models[0].store.size).astype(np.float32)
        for model, opt in zip(models, (flat, by_parameter), strict=True):
            model.store.grad[...] = grad
            opt.step()
            scalars = _host(emu, opt.step_scalars)
            assert scalars[STEP_T] == k and scalars[STEP_BLOCKS_DONE] == 0
    _assert_same_parameters(models[0], models[1])
    np.testing.assert_array_equal(
        _host(emu, flat.step_scalars), _host(emu, by_parameter.step_scalars)
    )


@pytest.mark.parametrize("name", ["numpy", "emu"])
def test_the_step_count_survives_a_checkpoint(name, emu):
    """state_dict's step after k device-counted steps is k; a fresh optimizer loaded from it
    continues as the original does, bit for bit, its step scalars counting on from k."""
    backend = _backend(name, emu)
    rng = np.random.default_rng(11)
    grads = [rng.standard_normal(_model(backend).store.size).astype(np.float32) for _ in range(6)]
    model = _model(backend)
    opt = gb.Adam(model.parameters(), lr=1e-2)
    for grad in grads[:3]:
        model.store.grad[...] = backend.asarray(grad, np.float32)
        opt.step()
    state, weights = opt.state_dict(), model.state_dict()
    assert state["step"] == 3
    for grad in grads[3:]:
        model.store.grad[...] = backend.asarray(grad, np.float32)
        opt.step()
    resumed = _model(backend)
    resumed.load_state_dict(weights)
    opt2 = gb.Adam(resumed.parameters(), lr=1e-2)
    opt2.step_scalars  # noqa: B018 (made before the load: the load must rewrite it in place)
    opt2.load_state_dict(state)
    for grad in grads[3:]:
        resumed.store.grad[...] = backend.asarray(grad, np.float32)
        opt2.step()
    _assert_same_parameters(resumed, model)
    _check_scalars(backend, opt2.step_scalars, _expected_scalars(6, 1e-2, 0.9, 0.999))
