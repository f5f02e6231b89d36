"""The kernel launchers' own paths, which the op-parity suite does not reach: argument errors
(each naming the argument, the value and what is accepted), strided inputs, out-of-range labels,
operands on another GPU, and a CuPy backend built where CuPy or a GPU is missing."""

from __future__ import annotations

import numpy as np
import pytest

from gpubackprop.precision import bf16_bits


def test_cupy_backend_construction_never_raises_and_keeps_the_reason():
    from gpubackprop.backends.cupy_backend import CupyBackend

    backend = CupyBackend()
    assert backend.name == "cupy"
    if backend.available:
        assert backend.reason == "" and "unavailable" not in backend.device_name()
    else:
        assert backend.reason
        assert backend.reason in backend.device_name()
        with pytest.raises(RuntimeError, match="not available"):
            backend.with_gemm_version("warptiled")


def test_launcher_argument_errors(emu_backends):
    backend = emu_backends[0]
    x = np.ones((4, 3), np.float32)
    w = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"weight\.dtype=float64 differs"):
        backend.dense_forward(x, w.astype(np.float64), None, "relu")
    with pytest.raises(ValueError, match=r"weight\.shape=\(5, 2\)"):
        backend.dense_forward(x, w[:, :2], None, "relu")
    with pytest.raises(ValueError, match=r"x\.dtype=int64 is not supported"):
        backend.dense_forward(x.astype(np.int64), w, None, "relu")
    with pytest.raises(ValueError, match=r"activation='swish'"):
        backend.dense_forward(x, w, None, "swish")
    dweight = np.empty((3, 5), np.float32).T  # right shape, not contiguous: must not be written
    with pytest.raises(ValueError, match=r"dweight is not C-contiguous"):
        backend.dense_backward(
            np.ones((4, 5), np.float32), x, w, None, "identity", 0.0, dweight, None, False
        )
    with pytest.raises(ValueError, match=r"reduction='avg'"):
        backend.mse_loss(x, x, "avg")


@pytest.mark.parametrize("name", ["emu", "numpy"])
def test_update_clip_and_bf16_copy_arguments_are_checked(emu_backends, name):
    """sgd_update / adam_update's ``clip`` (clip_coefficient's float64 (1,) array) and
    ``param_bf16`` (uint16 bits of param's shape, float32 parameters only) are refused by name,
    before anything is written."""
    from gpubackprop.backends import get_backend

    backend = emu_backends[0] if name == "emu" else get_backend("numpy")
    param = np.ones(10, np.float32)
    grad = np.full(10, 3.0, np.float32)
    scalars = np.array([0.0, 0.1, 0.0, 0.0, 0.0])  # layout STEP_SCALARS: t, lr, ...
    hyper = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
    bad = [
        ({"clip": np.array([0.5], np.float32)}, "clip"),
        ({"clip": np.array([0.5, 0.5])}, "clip"),
        ({"param_bf16": np.zeros(9, np.uint16)}, "param_bf16"),
        ({"param_bf16": np.zeros(10, np.int32)}, "param_bf16"),
        ({"clip": np.array([0.5]), "param_bf16": np.zeros(9, np.uint16)}, "param_bf16"),
    ]
    for extra, named in bad:
        with pytest.raises(ValueError, match=named):
            backend.sgd_update(param, grad, None, scalars, **hyper, **extra)
    with pytest.raises(ValueError, match="param_bf16 is accepted with float32 parameters only"):
        backend.adam_update(
            *(np.ones(10) for _ in range(4)),
            scalars,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=False,
            param_bf16=np.zeros(10, np.uint16),
        )
    assert np.all(param == 1.0) and np.all(grad == 3.0)
    # Accepted: c = 0.5 scales g (written back) and the copy receives bf16(θ).
    copy = np.zeros(10, np.uint16)
    clip = np.array([0.5])
    backend.sgd_update(param, grad, None, scalars, **hyper, clip=clip, param_bf16=copy)
    np.testing.assert_array_equal(grad, np.full(10, 1.5, np.float32))
    np.testing.assert_array_equal(param, np.full(10, np.float32(1.0) - np.float32(0.1) * 1.5))
    np.testing.assert_array_equal(copy, bf16_bits(param))


def test_strided_input_is_copied_and_bad_label_gives_nan(emu_backends):
    backend = emu_backends[0]
    x = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]  # (3, 2), strided
    w = np.eye(2)
    y, _ = backend.dense_forward(x, w, None, "identity")
    np.testing.assert_array_equal(y, x)
    loss, grad = backend.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    assert np.isnan(float(loss)) and np.isnan(grad[1]).all() and np.isfinite(grad[0]).all()


def test_cupy_seam_refuses_an_operand_on_another_gpu():
    """The device check runs without a GPU: a stand-in for CuPy's device objects."""
    from types import SimpleNamespace

    from gpubackprop.backends.cupy_backend import CupySeam

    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(id=0)))
    seam = CupySeam(fake_cupy)
    seam.check_device("x", SimpleNamespace(device=SimpleNamespace(id=0)))
    with pytest.raises(ValueError, match="x is on GPU 1 but the kernels run on GPU 0"):
        seam.check_device("x", SimpleNamespace(device=SimpleNamespace(id=1)))


def test_params_checked_skips_only_the_model_buffers_checks():
    """With params_checked (what a placed model's plan passes), the launches are the same as
    with every operand checked, and x is still checked against the weight."""
    from gpubackprop.backends.recording import HostBackend

    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    w = rng.standard_normal((7, 12)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    runs = []
    for checked in (False, True):
        backend = HostBackend()
        y, saved = backend.dense_forward(x, w, b, "gelu", 0.0, params_checked=checked)
        dw, db = np.empty_like(w), np.empty_like(b)
        backend.dense_backward(y, x, w, saved, "gelu", 0.0, dw, db, True, params_checked=checked)
        runs.append([(r.kernel, r.grid, r.block, len(r.args)) for r in backend.seam.launches])
    assert runs[0] == runs[1] and len(runs[0]) == 3
    with pytest.raises(ValueError, match=r"x \(shape \(5, 11\).*weight \(shape \(7, 12\)"):
        HostBackend().dense_forward(x[:, :11].copy(), w, b, "relu", params_checked=True)
    with pytest.raises(ValueError, match=r"x\.dtype=float64 differs"):
        HostBackend().dense_backward(
            y, x.astype(np.float64), w, saved, "gelu", 0.0, dw, db, True, params_checked=True
        )
