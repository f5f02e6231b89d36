"""CupySeam's own code, run on the CPU: a stand-in for the few CuPy entry points it calls,
implemented with the emulator, under CuPy's calling conventions.

CupySeam (backends/cupy_backend.py) turns kernels/ sources into cupy.RawModule and specs into
cupy.ElementwiseKernel, looks kernels up, launches them and wraps compile errors.  Without a GPU
that code never runs.  ``EmulatedCupy`` below gives it what those CuPy calls give on a GPU --
keyword-only RawModule(code=, options=), compile(), get_function() returning a function called
as (grid: tuple, block: tuple, args: tuple, shared_mem=), ElementwiseKernel(in_params,
out_params, operation, name, preamble=, options=), CuPy's CompileException, device arrays that
refuse implicit conversion -- with the emulator doing the work.  The whole op-parity suite then
runs through the real CupySeam and the real launchers.  What CuPy itself does (NVRTC, the driver)
is checked elsewhere: test_kernels_compile.py compiles every source and every ElementwiseKernel
the way CuPy builds it.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import kernels
from gpubackprop.arrays import to_host
from gpubackprop.backends import available_backends
from gpubackprop.backends.base import ACTIVATIONS
from gpubackprop.backends.kernel_backend import KernelBackend
from gpubackprop.backends.seam import ElementwiseSpec
from gpubackprop.emulator import EmuCompileError, EmuSeam
from gpubackprop.emulator.capture import GraphCaptureError, active_capture, refuse_during_capture
from gpubackprop.emulator.device import poisoned_empty
from gpubackprop.emulator.device_arrays import DeviceArray, device_xp
from gpubackprop.parity import MODEL_LOSSES, check_case, model_rows, op_cases

pytestmark = pytest.mark.skipif(
    not available_backends()["emu"][0], reason=f"emu unavailable: {available_backends()['emu'][1]}"
)
CompileException = pytest.importorskip("cupy.cuda.compiler").CompileException


class _Function:
    """What RawModule.get_function returns: called as CuPy's (tuple grid, tuple block, args)."""

    def __init__(self, seam: EmuSeam, module, name: str) -> None:
        self.seam, self.module, self.name = seam, module, name

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        # cupy/cuda/function.pyx declares ``tuple grid, tuple block``: a list is a TypeError.
        for what, value in (("grid", grid), ("block", block)):
            if type(value) is not tuple:
                raise TypeError(f"{what} must be a tuple, got {type(value).__name__}")
        _check_launch_stream(f"kernel {self.name!r}")
        self.seam.launch(self.module, self.name, grid, block, tuple(args), shared_mem)


class _RawModule:
    def __init__(self, *, code: str, options: tuple = (), name_expressions=None) -> None:
        if not isinstance(options, tuple):
            raise TypeError("options must be a tuple of str")
        self.code, self.options, self.module = code, options, None
        self.name_expressions = tuple(name_expressions or ())
        self.seam = EMULATED_SEAM

    def compile(self, log_stream=None):
        try:
            self.module = self.seam.compile_text(self.code, "RawModule", self.name_expressions)
        except EmuCompileError as error:  # what CuPy raises for an NVRTC error
            raise CompileException(str(error), self.code, "RawModule", self.options) from None

    def get_function(self, name: str) -> _Function:
        if self.module is None:
            self.compile()
        if name not in self.module.kernels:
            raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found ({name})")
        return _Function(self.seam, self.module, name)


class _ElementwiseKernel:
    def __init__(
        self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="", **kw
    ):
        if set(kw) - {"options", "loop_prep", "after_loop", "no_return", "return_tuple"}:
            raise TypeError(f"unexpected ElementwiseKernel arguments {sorted(kw)}")
        self.spec = ElementwiseSpec(name, in_params, out_params, operation)
        self.preamble = preamble

    def __call__(self, *args, size=-1, block_size=128, stream=None):
        _check_launch_stream(f"ElementwiseKernel {self.spec.name!r}")
        dtype = next(a.dtype for a in args if isinstance(a, DeviceArray))
        try:  # CuPy compiles at the first call, and raises CompileException then
            kernel = EMULATED_SEAM.elementwise(self.spec, dtype, self.preamble)
        except EmuCompileError as error:
            raise CompileException(str(error), self.preamble, self.spec.name, ()) from None
        return kernel(*args)


class _Stream:
    """cupy.cuda.Stream: ``with stream`` makes it current; begin_capture/end_capture record
    what is launched meanwhile with the emulator's capture (the rules of a real capture
    enforced, emulator/capture.py) and end_capture returns the graph.  The emulator runs
    each launch to completion, so events and waits have nothing to order."""

    _count = 0

    def __init__(self, non_blocking: bool = False, null: bool = False) -> None:
        _Stream._count += 1
        self.ptr = 0 if null else 0x5000 + _Stream._count  # cudaStream_t: 0 is the legacy one
        self._capturing = None
        self._holder: dict = {}

    def __enter__(self):
        _CURRENT_STREAMS.append(self)
        return self

    def __exit__(self, *exc):
        _CURRENT_STREAMS.pop()

    def record(self):
        return SimpleNamespace(stream=self)  # a cupy.cuda.Event

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        refuse_during_capture("Stream.synchronize()", "a sync is illegal while capturing")

    @property
    def is_capturing(self) -> bool:
        return self._capturing is not None

    def begin_capture(self) -> None:
        if self.ptr == 0:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: the legacy stream")
        self._capturing = EMULATED_SEAM.capture([], [])
        self._holder = self._capturing.__enter__()

    def end_capture(self):
        capturing, self._capturing = self._capturing, None
        capturing.__exit__(None, None, None)
        return _Graph(self._holder["graph"])


class _Graph:
    """cupy.cuda.Graph: launch replays the recorded launch list."""

    def __init__(self, graph) -> None:
        self.graph = graph  # the emulator's EmuGraph

    def launch(self, stream=None) -> None:
        EMULATED_SEAM.launch_graph(self.graph)


_CURRENT_STREAMS = [_Stream(null=True)]


def _current_stream() -> _Stream:
    return _CURRENT_STREAMS[-1]


def _check_launch_stream(what: str) -> None:
    """On a GPU, work queued on another stream than the capturing one during a (global mode)
    capture is an error; CuPy launches on the current stream, which must be that one."""
    capture = active_capture()
    if capture is not None and not _current_stream().is_capturing:
        raise GraphCaptureError(f"{what} on a stream that is not capturing, during graph capture")


class _MemoryPool:
    """cupy.cuda.MemoryPool: the arrays of the emulated CuPy are host memory, so the pool only
    has to exist (EmulatedCupy.empty allocates)."""

    def malloc(self, size: int):
        raise NotImplementedError("the emulated CuPy allocates through EmulatedCupy.empty")


@contextmanager
def _using_allocator(allocator=None):
    yield


class EmulatedCupy:
    """The ``cupy`` module CupySeam is given: its own names, and device_xp for the rest."""

    __name__ = "cupy (emulated)"
    ndarray = DeviceArray
    RawModule = _RawModule
    ElementwiseKernel = _ElementwiseKernel
    cuda = SimpleNamespace(
        Device=lambda: SimpleNamespace(id=0, attributes={"MultiProcessorCount": 132}),
        get_current_stream=_current_stream,
        Stream=_Stream,
        MemoryPool=_MemoryPool,
        using_allocator=_using_allocator,
    )

    @staticmethod
    def empty(shape, dtype=np.float64):
        """cupy.empty: also during a capture, from the graph's private pool on a GPU."""
        return DeviceArray(poisoned_empty(tuple(shape), dtype))

    @staticmethod
    def copyto(dst, src) -> None:
        refuse_during_capture("cupy.copyto", "CupySeam copies inputs in outside the capture")
        dst._host[...] = src._host

    def __getattr__(self, name):
        return getattr(device_xp, name)


EMULATED_SEAM = EmuSeam(device_arrays=True)


@pytest.fixture(scope="module")
def backend():
    from gpubackprop.backends.cupy_backend import CupySeam

    return KernelBackend(CupySeam(EmulatedCupy()))


def _assert_rows(rows):
    failures = [r for r in rows if not r.passed]
    assert not failures, "\n".join(
        f"{r.op} {r.shape} {r.dtype} {r.tensor} {r.note}" for r in failures
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_op_through_the_cupy_seam(backend, dtype):
    for case in op_cases(seed=11, quick=True):
        if case.runs_in(dtype):
            _assert_rows(check_case(case, backend, dtype))


@pytest.mark.parametrize("loss_name", MODEL_LOSSES)
def test_training_through_the_cupy_seam(backend, loss_name):
    for activation in ("relu", "gelu_tanh"):
        assert activation in ACTIVATIONS
        _assert_rows(model_rows(backend, "float32", activation, loss_name))


def test_seam_caches_modules_and_names_a_missing_kernel(backend):
    seam = backend.seam
    module = seam.compile("reduce.cu", {"REAL_T": "float"})
    assert seam.compile("reduce.cu", {"REAL_T": "float"}) is module
    assert module.function("column_sum") is module.function("column_sum")
    with pytest.raises(ValueError, match=r"'no_such_kernel' is not an entry point of kernels/"):
        module.function("no_such_kernel")
    x = device_xp.asarray(np.ones((3, 4), np.float32))
    seam.check_device("x", x)  # device 0 on both sides
    assert isinstance(seam.empty((2,), np.float32), DeviceArray)


def test_seam_launches_a_templated_kernel_by_name_expression(tmp_path, monkeypatch):
    from gpubackprop.backends.cupy_backend import CupySeam

    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    (tmp_path / "scaled.cu").write_text(
        "template <typename T, int FACTOR>\n"
        "__global__ void scaled_copy(const T* x, T* y, int n) {\n"
        "    int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "    if (i < n) y[i] = FACTOR * x[i];\n"
        "}\n"
    )
    expressions = ("scaled_copy<float, 3>", "scaled_copy<double, -2>")
    for seam in (CupySeam(EmulatedCupy()), EmuSeam()):
        module = seam.compile("scaled.cu", {"REAL_T": "float"}, expressions)
        for expression, dtype, factor in zip(expressions, (np.float32, np.float64), (3, -2)):
            x = np.arange(5, dtype=dtype)
            if seam.name == "cupy":
                x = device_xp.asarray(x)
            y = seam.empty((5,), dtype)
            seam.launch(module, expression, (1, 1, 1), (32, 1, 1), (x, y, np.int32(5)))
            np.testing.assert_array_equal(to_host(y), factor * np.arange(5))


def test_seam_wraps_a_compile_error(tmp_path, monkeypatch):
    from gpubackprop.backends.cupy_backend import CupySeam

    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    (tmp_path / "broken.cu").write_text(
        'extern "C" __global__ void broken_forward(float* out) { out[0] = undefined_name; }\n'
    )
    with pytest.raises(kernels.KernelCompileError, match=r"kernels/broken\.cu.*broken_forward"):
        CupySeam(EmulatedCupy()).compile("broken.cu", {"REAL_T": "float"})


def test_seam_wraps_an_elementwise_compile_error():
    import dataclasses

    from gpubackprop.backends.cupy_backend import CupySeam
    from gpubackprop.backends.elementwise import elementwise_specs

    spec = dataclasses.replace(elementwise_specs()[0], operation="y = undefined_name;")
    kernel = CupySeam(EmulatedCupy()).elementwise(spec, np.float32)
    x = device_xp.asarray(np.ones(4, np.float32))
    with pytest.raises(kernels.KernelCompileError, match=f"ElementwiseKernel {spec.name}"):
        kernel(x, np.int32(1), np.float64(0.0), device_xp.empty((4,), np.float32))


# -- a machine with the driver but not the CUDA toolkit, and one with no GPU at all -------------


class _NoToolkitRawModule(_RawModule):
    def compile(self, log_stream=None):
        raise RuntimeError("Failed to find CUDA headers; set CUDA_PATH")


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("Failed to find CUDA headers; set CUDA_PATH"),
        CompileException(
            'kernel.cu(1): catastrophic error: cannot open source file "cuda_fp16.h"',
            "",
            "RawModule",
            (),
        ),
    ],
    ids=["cupy-message", "nvrtc-log"],
)
def test_seam_says_what_to_install_without_the_cuda_toolkit(monkeypatch, failure):
    from gpubackprop.backends.cupy_backend import CupySeam

    def fail(self, log_stream=None):
        raise failure

    monkeypatch.setattr(_RawModule, "compile", fail)
    with pytest.raises(kernels.KernelCompileError) as caught:
        CupySeam(EmulatedCupy()).compile("reduce.cu", {"REAL_T": "float"})
    message = str(caught.value)
    assert "kernels/reduce.cu" in message
    assert "cupy-cuda13x[ctk]" in message and "gpubackprop[cuda13]" in message


def test_elementwise_says_what_to_install_without_the_cuda_toolkit(monkeypatch):
    from gpubackprop.backends.cupy_backend import CupySeam
    from gpubackprop.backends.elementwise import elementwise_specs

    def fail(self, *args, **kwargs):
        raise RuntimeError("Failed to find CUDA headers")

    kernel = CupySeam(EmulatedCupy()).elementwise(elementwise_specs()[0], np.float32)
    monkeypatch.setattr(type(kernel.kernel), "__call__", fail)
    with pytest.raises(kernels.KernelCompileError, match=r"cupy-cuda13x\[ctk\]"):
        kernel(device_xp.asarray(np.ones(4, np.float32)))


def test_other_seam_errors_pass_through(monkeypatch):
    from gpubackprop.backends.cupy_backend import CupySeam

    def fail(self, log_stream=None):
        raise MemoryError("out of host memory")

    monkeypatch.setattr(_RawModule, "compile", fail)
    with pytest.raises(MemoryError, match="out of host memory"):
        CupySeam(EmulatedCupy()).compile("reduce.cu", {"REAL_T": "float"})


class _RuntimeError(Exception):
    """Stands in for cupy.cuda.runtime.CUDARuntimeError."""


def _fake_cupy(error: Exception | None, count: int = 0):
    import types

    def device_count():
        if error is not None:
            raise error
        return count

    runtime = types.SimpleNamespace(CUDARuntimeError=_RuntimeError, getDeviceCount=device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("driver_present", [False, True])
def test_cupy_backend_without_a_gpu_names_the_cpu_backends(monkeypatch, driver_present):
    import sys

    from gpubackprop.backends import cupy_backend

    insufficient = _RuntimeError(
        "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
    )
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(insufficient))
    monkeypatch.setattr(cupy_backend, "nvidia_driver_present", lambda: driver_present)
    backend = cupy_backend.CupyBackend()
    assert not backend.available
    if driver_present:  # a real driver that is too old: the runtime's words are the right ones
        assert "insufficient" in backend.reason
    else:
        assert backend.reason.startswith("no NVIDIA GPU found")
        assert "insufficient" not in backend.reason
        assert "'numpy'" in backend.reason and "'emu'" in backend.reason
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(None, count=0))
    reason = cupy_backend.CupyBackend().reason
    assert "no CUDA device" in reason and "'numpy'" in reason and "'emu'" in reason


def test_cli_backend_cupy_without_a_gpu_says_so(monkeypatch, capsys):
    import sys

    from gpubackprop import backends, cli
    from gpubackprop.backends import cupy_backend

    insufficient = _RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(insufficient))
    monkeypatch.setattr(cupy_backend, "nvidia_driver_present", lambda: False)
    monkeypatch.setattr(backends, "_instances", {})
    status = cli.main(["train", "--backend", "cupy", "--epochs", "1", "--verbose", "0"])
    error = capsys.readouterr().err
    assert status == 1
    assert error.count("\n") == 1 and "no NVIDIA GPU found" in error
    assert "'numpy'" in error and "'emu'" in error


# -- the cupy backend's data-parallel step: the NCCL all-reduce inside the captured graph -------
#
# The single-graph NCCL path needs GPUs and NCCL.  Its control flow -- the real CupySeam
# capture, the real compile_step, the real NcclTransport issuing ncclAllReduce on CuPy's
# current stream -- runs here against the emulated CuPy above and a FAKE NCCL communicator.
# The fake does what NCCL does with a stream in capture: the all-reduce becomes an operation of
# the graph (recorded into the emulator's capture, run at each replay), and it is an error on
# any other stream while a capture is in progress.  Its "world" is two ranks of which the other
# is a mirror of this one (the same rows, hence the same gradient), so the sum is 2·g, exactly
# (x + x = 2x in floating point): unlike a one-rank identity, a step that skipped, repeated or
# misplaced the all-reduce (say after clipping) would give other numbers.  What this cannot
# show is NCCL's own behaviour on a GPU; test_distributed.py's gpu test runs that.

_NCCL_DTYPES = {7: np.float32, 8: np.float64}  # ncclFloat32, ncclFloat64 (nccl.h)


class FakeMirroredNcclCommunicator:
    """Stands in for cupy.cuda.nccl.NcclCommunicator: ``ndev`` ranks that all hold this
    rank's buffer, so allReduce(sum) multiplies it by ``ndev``.  Counts what it records into
    captures and what it runs."""

    def __init__(self, ndev: int, unique_id, rank: int) -> None:
        self.ndev, self.rank = ndev, rank
        self.captured = 0  # all-reduces recorded into a graph
        self.ran = 0  # all-reduces run (eagerly, or by a graph's replay)

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream) -> None:
        assert op == FakeNccl.NCCL_SUM and sendbuf == recvbuf  # in place, as the transport does
        dtype = np.dtype(_NCCL_DTYPES[datatype])
        memory = (ctypes.c_char * (count * dtype.itemsize)).from_address(recvbuf)
        buffer = np.frombuffer(memory, dtype=dtype)  # the device memory behind the pointer

        def run() -> None:
            self.ran += 1
            np.multiply(buffer, self.ndev, out=buffer)

        capture = active_capture()
        if capture is None:
            run()
            return
        current = _current_stream()
        if stream != current.ptr or not current.is_capturing:
            raise GraphCaptureError(
                f"ncclAllReduce on stream {stream:#x} while stream {current.ptr:#x} captures"
            )
        capture.record_operation("ncclAllReduce", run)
        self.captured += 1


class FakeNccl:
    """Stands in for the cupy.cuda.nccl module."""

    available = True
    NCCL_SUM = 0
    NCCL_FLOAT32, NCCL_FLOAT64 = 7, 8
    NcclCommunicator = FakeMirroredNcclCommunicator

    @staticmethod
    def get_unique_id():
        return b"fake-nccl-unique-id"


def _nccl_data_parallel(backend, rows: int):
    from gpubackprop import distributed as dist

    gb.seed(4)
    model = gb.Sequential(gb.Dense(5, 7), gb.Tanh(), gb.Dense(7, 3)).to(backend, dtype="float32")
    loss_fn = gb.SoftmaxCrossEntropyLoss().to(backend)
    optimizer = gb.Adam(model.parameters(), lr=1e-2)
    # two ranks, of which this is rank 0; the fake MPI communicator only passes the NCCL id on
    fake_mpi = SimpleNamespace(bcast=lambda value, root=0: value)
    group = dist.ProcessGroup(comm=fake_mpi, rank=0, size=2, local_rank=0, local_size=1)
    transport = dist.NcclTransport(group, cupy=backend.seam.cupy, nccl=FakeNccl)
    parallel = dist.DataParallel(group, model, loss_fn, optimizer, transport=transport)
    return model, loss_fn, optimizer, parallel


def test_nccl_allreduce_is_captured_once_per_step_on_the_capture_stream(backend):
    """compile_step(data_parallel=) on the cupy seam: the warm-up runs the all-reduce, the
    capture records it once into the one graph (after backward and the n_r / B weighting,
    before clipping and the update), and each replay runs it once; the parameters are bitwise
    those of the eager data-parallel loop with the same communicator."""
    rows, steps, max_norm = 6, 5, 0.05
    rng = np.random.default_rng(8)
    batches = [
        (rng.standard_normal((rows, 5)).astype(np.float32), rng.integers(0, 3, rows))
        for _ in range(steps)
    ]
    model, loss_fn, optimizer, parallel = _nccl_data_parallel(backend, rows)
    for x, y in batches:  # the eager data-parallel loop (DataParallel.average_gradients)
        pred = model.forward(x)
        loss_fn.forward(pred, backend.asarray(y, np.int64))
        model.backward(loss_fn.backward(), need_input_grad=False)
        parallel.average_gradients(rows, 2 * rows)
        gb.clip_grad_norm(model.parameters(), max_norm)
        optimizer.step()
    eager = to_host(model.store.data).copy()
    assert parallel.transport.comm.ran == steps

    model, loss_fn, optimizer, parallel = _nccl_data_parallel(backend, rows)
    communicator = parallel.transport.comm
    step = gb.compile_step(model, loss_fn, optimizer, max_norm=max_norm, data_parallel=parallel)
    assert parallel.transport.capturable and step.graphs_per_step == 1
    for x, y in batches:
        step(x, y, global_rows=2 * rows)
    assert communicator.captured == 1  # one capture, one all-reduce in it
    assert communicator.ran == steps  # the warm-up's, then one per replay
    assert np.array_equal(to_host(model.store.data), eager)
    assert optimizer.step_count == steps

    (entry,) = step.graphs.values()
    emu_graph = entry.graph.graph.graph  # _CupyGraph -> emulated cupy.cuda.Graph -> EmuGraph
    assert emu_graph.operations() == ["ncclAllReduce"]
    names = [e[2] if e[0] == "launch" else e[1] for e in emu_graph.entries]
    labels = [n if isinstance(n, str) else n.spec.name for n in names]
    reduce_at = labels.index("ncclAllReduce")
    assert "gb_scale" in labels[:reduce_at]  # the weight n_r / B = 1/2, before the sum
    assert any("backward" in n for n in labels[:reduce_at])
    after = labels[reduce_at + 1 :]
    assert "clip_coefficient" in after and "adam_update" in after
    assert not any("backward" in n or n == "gb_scale" for n in after)


def test_an_allreduce_off_the_capture_stream_is_refused(backend, monkeypatch):
    """The fake holds NCCL's rule: an all-reduce queued on the legacy stream while another
    stream captures is an error (so the test above proves the capture stream was used)."""
    from gpubackprop import distributed as dist

    model, loss_fn, optimizer, parallel = _nccl_data_parallel(backend, 4)
    monkeypatch.setattr(
        dist.NcclTransport,
        "allreduce_sum_",
        lambda self, flat: self.comm.allReduce(
            flat.data.ptr, flat.data.ptr, flat.size, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_SUM, 0
        ),
    )
    step = gb.compile_step(model, loss_fn, optimizer, data_parallel=parallel)
    x = np.zeros((4, 5), np.float32)
    with pytest.raises(GraphCaptureError, match="ncclAllReduce on stream 0x0"):
        step(x, np.zeros(4, np.int64))
