"""Data-parallel training: N processes (MPI ranks), one model replica each, one all-reduce of
the flat gradient buffer per step.

Launch with ``mpiexec -n N python train.py`` (or ``srun``), call ``gb.distributed.init()`` and
train with ``model.fit(..., distributed=True)``.  What happens in a step (docs/distributed.md):

- every rank starts from rank 0's parameters and rank 0's shuffling generator (broadcast once
  when fit starts), so all ranks draw the same permutation of the rows each epoch;
- the global batch of B rows is split into N disjoint contiguous shards of that permutation,
  ⌊B·r/N⌋ ≤ row < ⌊B·(r+1)/N⌋ for rank r (sizes differ by at most one when N does not divide B);
- each rank runs forward and backward on its shard; its gradient g_r is the gradient of its
  shard's loss.  For a "mean" loss, g = Σ_r (n_r / B) · g_r is the gradient of the mean over the
  whole batch (for a "sum" loss g = Σ_r g_r): each rank scales its flat gradient buffer by its
  weight and ONE all-reduce (sum) leaves g on every rank;
- every rank then clips and applies the same optimizer step to the same numbers, so the
  parameters stay bitwise identical on every rank.

Transports: the numpy and emu backends all-reduce the host buffer with MPI (mpi4py); the cupy
backend all-reduces the device buffer with NCCL (``cupy.cuda.nccl``) on the current stream, one
GPU per rank chosen from the node-local rank.  A transport's ``capturable`` says whether its
all-reduce can sit inside a captured training step (gb.compile_step): NCCL's can (it is a
kernel enqueued on the capturing stream), MPI's cannot (the host reads and writes the buffer:
a host synchronisation), so a step over MPI is captured as two graphs with the all-reduce run
between them (docs/graphs.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import random
from .evaluation import evaluate

MPI_INSTALL_HINT = 'pip install "gpubackprop[mpi]" (mpi4py and the mpich wheel)'


@dataclass
class ProcessGroup:
    """The ranks of one data-parallel job: the MPI communicator, this process's rank among
    ``size``, and its rank among the ranks on the same node (``local_rank`` of
    ``local_size``), which picks its GPU."""

    comm: Any
    rank: int
    size: int
    local_rank: int
    local_size: int
    device: int | None = None  # the CUDA device this rank uses (None: no GPU chosen)
    # Why no GPU could be chosen (more ranks than GPUs on the node): an error only for a
    # model on the cupy backend, since ranks that train on the CPU need no GPU of their own.
    device_error: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def allreduce_host(self, values, op: str = "sum") -> np.ndarray:
        """Element-wise sum (or max) of a small float64 vector over the ranks."""
        from mpi4py import MPI

        buffer = np.array(values, dtype=np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM if op == "sum" else MPI.MAX)
        return buffer

    def abort(self, error: BaseException | None = None, code: int = 1) -> None:
        """Stop every rank: the others may be waiting in a collective that this rank will never
        join, and would otherwise hang.  Prints the error first (MPI_Abort prints no traceback)."""
        if error is not None:
            print(
                f"gpubackprop: rank {self.rank} of {self.size} failed; aborting all ranks:\n"
                + "".join(traceback.format_exception(error)),
                file=sys.stderr,
                flush=True,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards each rank's output through a pipe and stops forwarding when it
        # tears the job down: give it a moment to pass on the message just written.
        time.sleep(_ABORT_GRACE_S)
        self.comm.Abort(code)
        # MPICH's MPI_Abort can return to the caller once the launcher has been told (the
        # launcher then kills every rank): this rank must not go on running meanwhile.
        os._exit(code)


_group: ProcessGroup | None = None
_ABORT_GRACE_S = 0.5


class RanksDisagree(ValueError):
    """The ranks' setups differ.  Raised on every rank at once (collective), so the ranks can
    all stop by themselves: no MPI_Abort needed."""

    collective = True


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            f"distributed training needs mpi4py and an MPI library: {MPI_INSTALL_HINT}; "
            f"then launch with mpiexec -n N ({error})"
        ) from error
    return MPI


def init(abort_on_uncaught: bool = True) -> ProcessGroup:
    """Set up the process group from MPI (``mpiexec -n N`` or ``srun`` started the ranks).

    Callable before or after the model is built, and again (it returns the same group).  On a
    machine with GPUs it makes the rank's GPU (chosen from the node-local rank, see
    ``select_device``) the current CUDA device, so call it before ``model.to("cupy")``.
    With ``abort_on_uncaught`` an exception that nobody catches on one rank aborts every rank
    (MPI_Abort) instead of leaving the others waiting forever in a collective."""
    global _group
    if _group is not None:
        return _group
    MPI = _import_mpi()
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    group = ProcessGroup(
        comm=comm,
        rank=comm.Get_rank(),
        size=comm.Get_size(),
        local_rank=node.Get_rank(),
        local_size=node.Get_size(),
    )
    node.Free()
    count = _cuda_device_count()
    if count > 0:
        try:
            group.device = select_device(group.local_rank, group.local_size, count)
        except RuntimeError as error:
            group.device_error = str(error)
        else:
            import cupy

            cupy.cuda.Device(group.device).use()
    if abort_on_uncaught and group.size > 1:
        _install_abort_hook(group)
    _group = group
    return group


def _cuda_device_count() -> int:
    """Visible CUDA devices, 0 without CuPy or a driver (no error: the CPU backends need none)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def select_device(local_rank: int, local_size: int, device_count: int) -> int:
    """The CUDA device of the rank ``local_rank`` of ``local_size`` ranks on its node.

    One GPU per rank: rank i on a node takes device i.  When each rank sees exactly one device
    (``srun --gpus-per-task=1`` or a per-rank CUDA_VISIBLE_DEVICES), that device is the rank's
    own: device 0.  More ranks on a node than GPUs is refused (NCCL needs distinct GPUs)."""
    if device_count < 1:
        raise ValueError(f"device_count={device_count} but a GPU rank needs at least one device")
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise RuntimeError(
        f"{local_size} ranks run on this node but only {device_count} GPUs are visible; start "
        f"at most {device_count} ranks per node (one GPU per rank)"
    )


def _install_abort_hook(group: ProcessGroup) -> None:
    previous = sys.excepthook

    def abort_all_ranks(kind, value, tb):
        previous(kind, value, tb)
        if not getattr(value, "collective", False):  # raised on every rank: all stop alone
            group.abort()

    sys.excepthook = abort_all_ranks


def abort_other_ranks(code: int, error: BaseException | None = None) -> None:
    """In a job of several ranks, end them all, this one included, with exit status ``code``
    (a rank that stops alone leaves the others waiting in their next collective); nothing in
    a process that is not distributed or is the only rank, or for an ``error`` that every
    rank raised together (RanksDisagree)."""
    if getattr(error, "collective", False):
        return
    if _group is not None and _group.size > 1:
        _group.abort(code=code)


def availability() -> dict[str, Any]:
    """What data-parallel training can use here, without starting MPI: the mpi4py and MPI wheel
    versions, the mpiexec found, and whether CuPy can load NCCL (else why not)."""
    from importlib import metadata

    report: dict[str, Any] = {}
    for package in ("mpi4py", "mpich"):
        try:
            report[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            report[package] = None
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    report["mpiexec"] = beside if os.path.isfile(beside) else shutil.which("mpiexec")
    report["mpi_hint"] = None if report["mpi4py"] and report["mpiexec"] else MPI_INSTALL_HINT
    with warnings.catch_warnings():  # CuPy warns when it cannot load NCCL: the reason is kept
        warnings.simplefilter("ignore")
        try:
            require_nccl()
            report["nccl"] = "available"
        except Exception as error:
            report["nccl"] = f"unavailable: {error}"
    return report


def is_initialized() -> bool:
    return _group is not None


def group() -> ProcessGroup:
    """The process group set up by ``init()``."""
    if _group is None:
        raise RuntimeError("gb.distributed.init() has not been called in this process")
    return _group


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return 0 if _group is None else _group.rank


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return 1 if _group is None else _group.size


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not distributed: the one that prints and
    writes files."""
    return _group is None or _group.rank == 0


# -- the batch split -----------------------------------------------------------------------------


def shard_bounds(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's rows [lo, hi) of the global batch [start, stop): contiguous, disjoint,
    covering, sizes ⌊B/N⌋ or ⌈B/N⌉ (B = stop − start).  A rank gets no rows when B < N."""
    rows = stop - start
    return start + rows * rank // size, start + rows * (rank + 1) // size


# -- transports ----------------------------------------------------------------------------------


class MpiTransport:
    """MPI collectives on the host memory of a buffer (numpy: the array itself; emu: the
    emulated device array's host memory, the memory its kernels write).

    Not capturable: the host calls MPI on memory the device writes, which needs the device's
    work done first (a host synchronisation) and runs once, now, instead of at every replay of
    a graph.  Inside an emulator capture it is refused (GraphCaptureError naming the call)."""

    name = "mpi"
    capturable = False  # the all-reduce cannot be recorded into a graph capture

    def __init__(self, group: ProcessGroup):
        self.group = group

    @staticmethod
    def host_view(flat) -> np.ndarray:
        """The buffer's own memory as a NumPy array (a view, never a copy: MPI writes it)."""
        host = flat if isinstance(flat, np.ndarray) else getattr(flat, "_host", None)
        if not isinstance(host, np.ndarray) or not host.flags.c_contiguous:
            raise TypeError(
                f"MPI all-reduce needs a contiguous host buffer; got {type(flat).__name__}"
            )
        return host

    def allreduce_sum_(self, flat) -> None:
        from mpi4py import MPI

        _refuse_host_collective("MPI Allreduce (MpiTransport.allreduce_sum_)")
        self.group.comm.Allreduce(MPI.IN_PLACE, self.host_view(flat), op=MPI.SUM)

    def broadcast_(self, flat, root: int = 0) -> None:
        _refuse_host_collective("MPI Bcast (MpiTransport.broadcast_)")
        self.group.comm.Bcast(self.host_view(flat), root=root)

    def synchronize(self) -> None:
        pass


def _refuse_host_collective(call: str) -> None:
    """GraphCaptureError when an emulator capture is in progress: a host collective on device
    memory is a host synchronisation, which no graph can record."""
    from .emulator.capture import refuse_during_capture

    refuse_during_capture(
        call,
        "a host all-reduce reads and writes the buffer from the host, a host synchronisation "
        "that a graph cannot record; a step over a transport with capturable=False is captured "
        "as two graphs with the all-reduce between them (gb.compile_step does so)",
    )


def nccl_install_hint(cuda_major: int | None) -> str:
    """The pip command that brings NCCL for the CUDA major version CuPy was built for."""
    major = cuda_major if cuda_major in (12, 13) else 13
    return f'pip install "nvidia-nccl-cu{major}>=2.27.7,<3"'


def require_nccl():
    """CuPy's NCCL module, or a RuntimeError naming the package to install."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as error:
        raise RuntimeError(
            f"the cupy backend all-reduces with NCCL through CuPy, which is not importable "
            f"({error}); install CuPy (gpubackprop[cuda13] or [cuda12]) and NCCL"
        ) from error
    if not getattr(nccl, "available", False):
        try:
            major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
        except Exception:
            major = None
        raise RuntimeError(
            "NCCL is not available to CuPy, and the cupy backend all-reduces gradients with "
            f"it: {nccl_install_hint(major)} (or put libnccl.so.2 on LD_LIBRARY_PATH)"
        )
    return nccl


class NcclTransport:
    """NCCL collectives on device buffers, in place, on CuPy's current stream.

    Rank 0 draws the NCCL unique id and MPI broadcasts it; each rank then joins the NCCL
    communicator with its MPI rank on its own GPU (the current device, set by init()).

    Capturable: ``ncclAllReduce`` enqueues a kernel on the given stream, and NCCL (2.9 and
    later) supports that stream being in CUDA graph capture, so a captured training step
    holds the all-reduce and every replay runs it.  ``cupy`` and ``nccl`` default to the
    imported modules (CuPy and its NCCL bindings); tests pass stand-ins."""

    name = "nccl"
    capturable = True  # the all-reduce is recorded into a graph captured on the stream

    def __init__(self, group: ProcessGroup, cupy: Any = None, nccl: Any = None):
        if cupy is None:
            import cupy
        if nccl is None:
            nccl = require_nccl()
        self.group = group
        self.cupy = cupy
        self.nccl = nccl
        unique_id = nccl.get_unique_id() if group.rank == 0 else None
        if group.size > 1:  # a one-rank group (a test, a benchmark) needs no MPI
            unique_id = group.comm.bcast(unique_id, root=0)
        self.comm = nccl.NcclCommunicator(group.size, unique_id, group.rank)
        self.datatypes = {
            np.dtype(np.float32): nccl.NCCL_FLOAT32,
            np.dtype(np.float64): nccl.NCCL_FLOAT64,
        }

    def _datatype(self, flat) -> int:
        try:
            return self.datatypes[np.dtype(flat.dtype)]
        except KeyError:
            raise TypeError(f"NCCL all-reduce of dtype {flat.dtype} is not supported") from None

    def allreduce_sum_(self, flat) -> None:
        stream = self.cupy.cuda.get_current_stream().ptr
        pointer = flat.data.ptr
        self.comm.allReduce(
            pointer, pointer, flat.size, self._datatype(flat), self.nccl.NCCL_SUM, stream
        )

    def broadcast_(self, flat, root: int = 0) -> None:
        stream = self.cupy.cuda.get_current_stream().ptr
        pointer = flat.data.ptr
        self.comm.broadcast(pointer, pointer, flat.size, self._datatype(flat), root, stream)

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()


_transports: dict[tuple[int, str], Any] = {}


def transport_for(group: ProcessGroup, backend) -> MpiTransport | NcclTransport:
    """NCCL for the cupy backend, MPI on host memory for numpy and emu (built once)."""
    key = (id(group), backend.name)
    if key not in _transports:
        _transports[key] = NcclTransport(group) if backend.name == "cupy" else MpiTransport(group)
    return _transports[key]


# -- the same setup on every rank --------------------------------------------------------------


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(path, a's value, b's value) of the first place where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return where, a.get(key, "<missing>"), b.get(key, "<missing>")
            found = first_difference(a[key], b[key], where)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        if len(a) != len(b):
            return f"{path} length", len(a), len(b)
        return None
    return None if a == b else (path, a, b)


def check_same_setup(group: ProcessGroup, setup: dict[str, Any]) -> None:
    """Raise ValueError on every rank when any rank's ``setup`` differs from rank 0's, naming
    the first difference.  Collective: every rank must call it."""
    setups = group.comm.allgather(setup)
    for other in range(1, group.size):
        found = first_difference(setups[0], setups[other])
        if found:
            where, on_zero, on_other = found
            raise RanksDisagree(
                f"distributed ranks disagree: {where} is {on_zero!r} on rank 0 but "
                f"{on_other!r} on rank {other}; every rank must build the same model, "
                "optimizer and loss and call fit with the same data and arguments"
            )


def training_setup(model, optimizer, loss, x_rows: int, batch_size: int, **extra) -> dict:
    """What must be the same on every rank for data-parallel training."""
    return {
        "model": model.config(),
        "backend": model.backend.name,
        "dtype": str(model.dtype),
        "flat_size": int(model.store.size),
        "optimizer": {
            "type": type(optimizer).__name__,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in optimizer.hyperparams.items()},
            "step": optimizer.step_count,
        },
        "loss": loss.config(),
        # Buffers (Standardize's mean and std) are constants of the model, not broadcast:
        # compare their bytes (a digest each).
        "buffers": {
            name: hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
            for name, value in model.named_buffers().items()
        },
        "rows": int(x_rows),
        "batch_size": int(batch_size),
        **extra,
    }


# -- what fit calls ------------------------------------------------------------------------------


class DataParallel:
    """The data-parallel pieces of one training run on ``group``: start every rank from rank
    0's parameters and shuffling generator, split batches, average the flat gradient buffer,
    reduce metrics."""

    def __init__(self, group: ProcessGroup, model, loss, optimizer, transport: Any = None):
        self.group = group
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self._check_device()
        # transport: the backend's (transport_for) unless given (a test's stand-in)
        self.transport = transport_for(group, model.backend) if transport is None else transport
        self.sum_reduction = getattr(loss, "reduction", "mean") == "sum"

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def _check_device(self) -> None:
        if self.model.backend.name != "cupy":
            return
        if self.group.device_error:
            raise RuntimeError(self.group.device_error)
        device = int(self.model.store.data.device.id)
        if self.group.device is not None and device != self.group.device:
            raise RuntimeError(
                f"rank {self.group.rank}'s model is on GPU {device} but its GPU is "
                f"{self.group.device}: call gb.distributed.init() before model.to('cupy')"
            )

    def start(self, setup: dict[str, Any]) -> None:
        """Check that every rank has the same setup, then broadcast rank 0's parameters,
        optimizer state and shuffling generator (collective)."""
        check_same_setup(self.group, setup)
        store = self.model.store
        self.transport.broadcast_(store.data)
        store.refresh_bf16()  # the bf16 GEMMs' copy of the parameters (precision="bf16")
        for buffers in self.optimizer._state.values():
            for buffer in buffers:
                self.transport.broadcast_(buffer)
        state = self.group.comm.bcast(random.generator().bit_generator.state, root=0)
        random.generator().bit_generator.state = state
        self.transport.synchronize()

    def shard(self, start: int, stop: int) -> tuple[int, int]:
        return shard_bounds(start, stop, self.group.rank, self.group.size)

    def average_gradients(self, local_rows: int, global_rows: int) -> None:
        """g = Σ_r w_r g_r in place in the flat gradient buffer, w_r = n_r / B for a mean loss
        (1 for a sum loss): scale, then one all-reduce (sum).  A rank without rows adds 0."""
        self.weight_gradients(local_rows, global_rows)
        self.allreduce_gradients()

    def weight_gradients(self, local_rows: int, global_rows: int) -> None:
        """The first half of average_gradients: g_r ← w_r g_r in place on the device (w_r =
        n_r / B for a mean loss, 1 for a sum loss; 0 for a rank without rows)."""
        store = self.model.store
        if local_rows == 0:
            store.grad[...] = 0
        elif not self.sum_reduction and local_rows != global_rows:
            self.model.backend.scale_(store.grad, local_rows / global_rows)

    def allreduce_gradients(self) -> None:
        """The second half: one all-reduce (sum) of the flat gradient buffer, in place."""
        self.transport.allreduce_sum_(self.model.store.grad)

    def reduce_epoch(
        self, loss_sum: float, correct: int | None, seen: int, elapsed: float
    ) -> tuple[float, int | None, int, float]:
        """Σ over ranks of the loss sum, correct count and rows; the slowest rank's time."""
        sums = self.group.allreduce_host([loss_sum, correct or 0, seen])
        slowest = float(self.group.allreduce_host([elapsed], op="max")[0])
        return (
            float(sums[0]),
            None if correct is None else round(sums[1]),
            round(sums[2]),
            slowest,
        )

    def evaluate(self, x, y, loss, batch_size: int = 1024) -> dict[str, float]:
        """``evaluate`` on this rank's share of the rows, reduced over the ranks: the same
        numbers on every rank, each rank evaluating 1/N of the rows."""
        n = int(x.shape[0])
        lo, hi = shard_bounds(0, n, self.group.rank, self.group.size)
        if hi > lo:
            local = evaluate(self.model, x[lo:hi], y[lo:hi], loss, batch_size)
        else:
            local = {"loss": 0.0}
        rows = hi - lo
        has_accuracy = self.group.comm.allreduce("accuracy" in local, op=_any_op())
        totals = self.group.allreduce_host(
            [local["loss"] * rows, local.get("accuracy", 0.0) * rows, rows]
        )
        metrics = {"loss": float(totals[0] / totals[2])}
        if has_accuracy:
            metrics["accuracy"] = float(totals[1] / totals[2])
        return metrics


def _any_op():
    from mpi4py import MPI

    return MPI.LOR


def guard(group: ProcessGroup, error: BaseException) -> None:
    """Abort every rank when one rank fails inside a data-parallel run (the others would wait
    in the next collective forever); a one-rank job, or an error every rank raised together
    (RanksDisagree), just raises."""
    if group.size > 1 and not getattr(error, "collective", False):
        group.abort(error)
