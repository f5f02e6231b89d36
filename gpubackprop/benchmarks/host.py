"""The ``host.*`` rows: the host's own cost of launching our kernels, on any machine.

Each row runs the kernel backend's launchers over a RecordingSeam (backends/recording.py),
which keeps every launch (kernel, grid, block, arguments) instead of running it; the time is
what Python spends per op or per training step before CuPy would add its own per-launch cost,
and ``launches`` is how many kernel launches the call made (for a ``.graph`` row, how many
kernels the captured graph holds: its replay costs the host one copy per input and one graph
launch).  The check of a host row is on the launches, not on numbers: nothing is computed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from .cases import Case, Context, Prepared, build_mlp

# The rows' shapes: the layers of the small network whose step the host bounds on a GPU.
HOST_BATCH = 32
HOST_MLP = (64, 128, 128, 10)


def _recording_backend():
    from ..backends.recording import HostBackend

    return HostBackend()


def _op_case(name: str, shape: dict[str, Any], make) -> Case:
    """A row timing ``make(backend)()``, one op through the launchers, launches recorded."""

    def build(ctx: Context, copies: int) -> Prepared:
        backend = _recording_backend()
        seam = backend.seam
        call = make(backend, ctx.rng)

        def run():
            seam.clear()
            return call()

        def check():
            seam.clear()
            call()
            return _check_launches(name, seam.launches)

        run()
        return Prepared(run, check, launches=len(seam.launches))

    return Case(f"host.{name}", shape, [], 0.0, False, build)


def _check_launches(name: str, launches: list) -> tuple[list[Any], list[np.ndarray]]:
    """A host row passes its check when the op launched something, every grid and block of a
    raw launch positive: (outputs, references) that compare equal exactly then."""
    if not launches:
        raise AssertionError(f"host.{name} recorded no launch")
    sizes = [
        d for launch in launches if launch.grid is not None for d in launch.grid + launch.block
    ]
    ok = float(all(d >= 1 for d in sizes))
    return [np.array(ok)], [np.array(1.0)]


def _dense_forward(backend, rng):
    x = rng.standard_normal((HOST_BATCH, 64)).astype(np.float32)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    b = np.zeros(128, np.float32)
    return lambda: backend.dense_forward(x, w, b, "relu")


def _dense_backward(backend, rng):
    x = rng.standard_normal((HOST_BATCH, 64)).astype(np.float32)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    y = rng.standard_normal((HOST_BATCH, 128)).astype(np.float32)
    dout = rng.standard_normal((HOST_BATCH, 128)).astype(np.float32)
    dw, db = np.empty_like(w), np.empty(128, np.float32)
    return lambda: backend.dense_backward(dout, x, w, y, "relu", 0.0, dw, db, True)


def _softmax_cross_entropy(backend, rng):
    logits = rng.standard_normal((HOST_BATCH, 10)).astype(np.float32)
    labels = rng.integers(0, 10, HOST_BATCH)
    return lambda: backend.softmax_cross_entropy(logits, labels)


def _parameter_count(sizes: Sequence[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def _optimizer_step(make_optimizer, max_norm=None):
    """``optimizer.step()`` over the flat buffers of the HOST_MLP model, as a training step
    calls it: one update launch, which also counts the step in the device's step scalars
    (with ``max_norm``: the norm's reduction and coefficient first, applied inside the
    update)."""

    def make(backend, rng):
        model = build_mlp(HOST_MLP).to(backend, dtype="float32")
        optimizer = make_optimizer(model.parameters())
        if max_norm is None:
            return optimizer.step
        return lambda: optimizer.step(max_norm=max_norm)

    return make


def _sgd_momentum(params):
    from .. import SGD

    return SGD(params, lr=1e-3, momentum=0.9)


def _adam(params):
    from .. import Adam

    return Adam(params, lr=1e-3)


def _train_case(sizes: Sequence[int], batch: int, graph: bool = False) -> Case:
    """One training step of an MLP through the public API (forward, cross-entropy, backward,
    SGD with momentum), launches recorded; with ``graph``, the step of gb.compile_step after
    its capture: two copies into the static inputs and one graph launch, ``launches`` the
    kernels the graph holds."""
    label = "-".join(str(s) for s in sizes)
    suffix = ".graph" if graph else ""

    def build(ctx: Context, copies: int) -> Prepared:
        from .. import SGD, SoftmaxCrossEntropyLoss

        backend = _recording_backend()
        seam = backend.seam
        model = build_mlp(sizes).to(backend, dtype="float32")
        loss = SoftmaxCrossEntropyLoss().to(backend)
        loss.check_labels = False  # fit checks labels once per fit, not per step
        opt = SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = ctx.rng.standard_normal((batch, sizes[0])).astype(np.float32)
        labels = ctx.rng.integers(0, sizes[-1], batch)
        if graph:
            from .. import compile_step

            step = compile_step(model, loss, opt)
            step(x, labels)  # warm-up and capture
            (captured,) = step.graphs.values()

            def run_graph():
                seam.clear()
                return step(x, labels)

            def check_graph():
                run_graph()
                if seam.launches:
                    raise AssertionError(f"a graph replay launched {len(seam.launches)} kernels")
                return _check_launches(f"train_step.mlp_{label}.graph", captured.graph.launches)

            return Prepared(run_graph, check_graph, launches=captured.kernels)

        def run():
            seam.clear()
            pred = model.forward(x)
            value = loss.forward(pred, labels)
            model.backward(loss.backward(), need_input_grad=False)
            opt.step()
            return value

        def check():
            run()
            return _check_launches(f"train_step.mlp_{label}", seam.launches)

        run()
        return Prepared(run, check, launches=len(seam.launches))

    shape = {"layers": list(sizes), "batch": batch}
    return Case(f"host.train_step.mlp_{label}{suffix}", shape, [], 0.0, False, build)


def host_cases(only: Sequence[str] = ()) -> list[Case]:
    """The host rows, filtered like the others by ``only``."""
    shape = {"M": HOST_BATCH, "N": 128, "K": 64}
    n = _parameter_count(HOST_MLP)
    cases = [
        _op_case("dense_forward", shape, _dense_forward),
        _op_case("dense_backward", shape, _dense_backward),
        _op_case(
            "softmax_cross_entropy", {"rows": HOST_BATCH, "classes": 10}, _softmax_cross_entropy
        ),
        _op_case("sgd_momentum.step", {"n": n}, _optimizer_step(_sgd_momentum)),
        _op_case("adam.step", {"n": n}, _optimizer_step(_adam)),
        _op_case("adam.clipped.step", {"n": n}, _optimizer_step(_adam, 1.0)),
        _train_case(HOST_MLP, HOST_BATCH),
        _train_case(HOST_MLP, HOST_BATCH, graph=True),
    ]
    if only:
        cases = [c for c in cases if any(word in c.name for word in only)]
    return cases
