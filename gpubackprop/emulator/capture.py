"""Graph capture on the emulator: a recorded launch list that replay runs, with the rules a
real CUDA stream capture imposes enforced instead of left to chance.

While a stream captures, a GPU records the kernels launched on it and runs none of them; the
graph then replays them with the arguments they were captured with.  Code that a capture breaks
on therefore breaks the graph, sometimes silently (a value read on the host during capture is
whatever the memory held then, not what the step computes).  The emulator's capture refuses,
with GraphCaptureError naming the call:

- a host synchronisation or a device-to-host copy (``backend.synchronize``,
  ``backend.to_numpy``, ``DeviceArray.get``, ``float(device_array)``, ``bool(...)``, ...);
- a device allocation that the warm-up step did not make (``seam.empty`` is served, in order,
  from the arrays the warm-up allocated, as a private memory pool serves a capture on a GPU;
  any other new device array is refused);
- a kernel compile (a module or elementwise kernel the warm-up did not build);
- a host-to-device copy into memory that is not one of the static buffers named at
  ``begin_capture``;
- any other computation on device arrays (NumPy on DeviceArrays): it would run once, now,
  instead of being recorded, so a replay would miss it;
- a host collective on device memory (MPI Allreduce or Bcast through
  ``distributed.MpiTransport``): a host synchronisation.  A data-parallel step over MPI is
  captured as two graphs with the all-reduce between them (step.py).

A device-side operation that is not a kernel of kernels/ (on a GPU, an NCCL collective
enqueued on the capturing stream) is recorded with ``Capture.record_operation`` and run at its
place by each replay.

The DeviceArray checks need ``device_arrays=True`` (plain NumPy arrays cannot notice being
read); the seam's own checks (allocation, compile, copies, sync through the backend) hold
either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["GraphCaptureError", "active_capture", "refuse_during_capture"]


class GraphCaptureError(RuntimeError):
    """Something inside a captured step that a CUDA graph capture would break on."""


class Capture:
    """The state of one capture on an EmuSeam: the launches recorded so far, the static
    buffers, the warm-up's allocations still to be served."""

    def __init__(self, static: list[Any], pool: list[Any]) -> None:
        self.static = static
        self.static_ids = {id(a) for a in static}
        self.pool = list(pool)
        self.served = 0
        self.entries: list[tuple[Any, ...]] = []

    def record_operation(self, label: str, run: Callable[[], None]) -> None:
        """Record a device-side operation that is not a kernel of kernels/ (on a GPU, a
        collective such as ncclAllReduce enqueued on the capturing stream): replay calls
        ``run()`` at its place among the launches.  ``label`` names it in the graph."""
        self.entries.append(("operation", label, run))


_active: Capture | None = None


def active_capture() -> Capture | None:
    """The capture in progress on this process's emulator, if any."""
    return _active


def set_active(capture: Capture | None) -> None:
    global _active
    _active = capture


def refuse_during_capture(what: str, why: str) -> None:
    """Raise GraphCaptureError naming ``what`` when a capture is in progress."""
    if _active is not None:
        raise GraphCaptureError(f"{what} during graph capture: {why}")
