"""What a benchmark run measures: the tolerance of the correctness check, the size sweep
per device class and mode (``SIZES``), the timing settings per preset (``TIMING``) and
``BenchConfig``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.base import ACTIVATIONS
from ..dtypes import DTYPES
from ..ops import tolerance

SCHEMA = "gpubackprop-bench/1"


# Normwise tolerance of the check run before timing: max|out − ref| / max|ref| against
# float64, the op table's (ops.TOLERANCES, where each number has its reason).
RTOL = {dtype: tolerance(dtype).normwise for dtype in DTYPES}


def blank_row(
    name: str,
    backend: str,
    shape: Any,
    dtype: str,
    *,
    flops: float | None = None,
    bytes_moved: float | None = None,
    bound: str = "memory",
    floor_s: float | None = None,
) -> dict[str, Any]:
    """A row of the record before it is measured: every field a row has (bench/README.md),
    the measured ones None, so that every kind of row has the same schema."""
    return {
        "name": name,
        "backend": backend,
        "shape": shape,
        "dtype": dtype,
        "status": "ok",
        "median_s": None,
        "q1_s": None,
        "q3_s": None,
        "calls": 0,
        "tflops": None,
        "gbps": None,
        "flops": flops,
        "bytes": bytes_moved,
        "bound": bound,
        "floor_s": floor_s,
        "floor_fraction": None,
        "max_rel_error": None,
        "rtol": RTOL[dtype],
        "input_copies": 1,
        "launches": None,
        "vs": {},
        "baselines": {},
        "baselines_skipped": {},
        "reason": "",
    }


ACTIVATION_NAMES = tuple(name for name in ACTIVATIONS if name != "identity")


LEAKY_ALPHA = 0.01


ENV_KEYS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_THREAD_TIMEOUT",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "CUPY_TF32",
    "NVIDIA_TF32_OVERRIDE",
    "CUDA_VISIBLE_DEVICES",
    "GPUBACKPROP_BACKEND",
    "GPUBACKPROP_EMU_GUARD_CHECK",
    "GPUBACKPROP_EMU_SHUFFLE",
    "GPUBACKPROP_EMU_DEVICE_ARRAYS",
)


MLP_784 = (784, 1024, 1024, 10)


MLP_SMALL = (64, 128, 128, 10)


MLP_NARROW = (64, 64, 64, 64, 64, 10)  # 64 wide, 4 hidden layers


@dataclass(frozen=True)
class Sizes:
    """The sweep for one device class.  gemm: (M, N, K) = (batch, out_features, in_features)."""

    gemm: tuple[tuple[int, int, int], ...]
    activation: tuple[tuple[int, int], ...]  # (rows, cols)
    activation_names: tuple[str, ...]
    loss: tuple[tuple[int, int], ...]  # (rows, classes)
    optimizer: tuple[int, ...]  # flat buffer lengths
    train: tuple[tuple[tuple[int, ...], int], ...]  # (layer sizes, batch)


_MLP_PARAMS = sum(a * b + b for a, b in itertools.pairwise(MLP_784))  # 1 863 690


SIZES: dict[str, Sizes] = {
    "gpu": Sizes(
        gemm=(
            (256, 256, 256),
            (512, 512, 512),
            (1024, 1024, 1024),
            (2048, 2048, 2048),
            (4096, 4096, 4096),
            (256, 1024, 784),
            (4096, 1024, 784),
            (4096, 1024, 1024),
            (4096, 10, 1024),
            (65536, 64, 64),
        ),
        activation=((4096, 1024), (65536, 1024)),
        activation_names=ACTIVATION_NAMES,
        loss=((4096, 10), (65536, 10), (4096, 1000), (65536, 1000)),
        optimizer=(_MLP_PARAMS, 1 << 26),
        train=((MLP_784, 256), (MLP_784, 4096), (MLP_NARROW, 65536), (MLP_SMALL, 32)),
    ),
    "gpu_quick": Sizes(
        gemm=((1024, 1024, 1024), (4096, 4096, 4096), (4096, 1024, 784), (65536, 64, 64)),
        activation=((4096, 1024),),
        activation_names=("relu", "gelu", "silu"),
        loss=((65536, 10), (4096, 1000)),
        optimizer=(_MLP_PARAMS,),
        train=((MLP_784, 256), (MLP_784, 4096), (MLP_NARROW, 65536)),
    ),
    "cpu": Sizes(
        gemm=(
            (128, 128, 128),
            (256, 256, 256),
            (512, 512, 512),
            (1024, 1024, 1024),
            (256, 1024, 784),
            (256, 1024, 1024),
            (256, 10, 1024),
            (4096, 64, 64),
        ),
        activation=((256, 1024), (4096, 1024)),
        activation_names=ACTIVATION_NAMES,
        loss=((256, 10), (4096, 10), (4096, 1000)),
        optimizer=(1 << 16, _MLP_PARAMS),
        train=((MLP_784, 256), (MLP_SMALL, 32), (MLP_784, 4096), (MLP_NARROW, 65536)),
    ),
    "cpu_quick": Sizes(
        gemm=((256, 256, 256), (1024, 1024, 1024), (256, 1024, 784)),
        activation=((256, 1024),),
        activation_names=("relu", "tanh", "gelu_tanh"),
        loss=((4096, 1000),),
        optimizer=(_MLP_PARAMS,),
        train=((MLP_784, 256), (MLP_SMALL, 32)),
    ),
    # The CPU emulator runs every CUDA thread as a fiber: a 129³ GEMM takes tens of ms.
    "emu": Sizes(
        gemm=((64, 64, 64), (33, 129, 65)),
        activation=((64, 256),),
        activation_names=("relu", "gelu"),
        loss=((64, 10),),
        optimizer=(1 << 14,),
        train=((MLP_SMALL, 32),),
    ),
    # For the test suite: a few of everything, tiny.
    "tiny": Sizes(
        gemm=((33, 17, 9),),
        activation=((7, 33),),
        activation_names=("relu", "tanh"),
        loss=((16, 10),),
        optimizer=(1000,),
        train=(((12, 16, 5), 8),),
    ),
}


@dataclass(frozen=True)
class TimingSettings:
    """warmup_calls/warmup_s: calls before timing (at least the count, and for at least the
    time).  Each round times ``inner`` calls, chosen so that one round lasts about batch_s;
    rounds alternate between the implementations of a row until each has had budget_s (and
    at least min_rounds, at most max_rounds).  The row reports the median over rounds."""

    warmup_calls: int = 3
    warmup_s: float = 0.05
    batch_s: float = 0.002
    min_rounds: int = 7
    max_rounds: int = 200
    budget_s: float = 0.5


TIMING: dict[str, TimingSettings] = {
    "gpu": TimingSettings(
        warmup_calls=5, warmup_s=0.1, batch_s=0.002, min_rounds=15, max_rounds=400, budget_s=0.6
    ),
    "gpu_quick": TimingSettings(
        warmup_calls=5, warmup_s=0.05, batch_s=0.002, min_rounds=11, max_rounds=200, budget_s=0.2
    ),
    "cpu": TimingSettings(
        warmup_calls=2, warmup_s=0.05, batch_s=0.005, min_rounds=9, max_rounds=200, budget_s=1.0
    ),
    "cpu_quick": TimingSettings(
        warmup_calls=2, warmup_s=0.02, batch_s=0.005, min_rounds=5, max_rounds=100, budget_s=0.3
    ),
    "emu": TimingSettings(
        warmup_calls=1, warmup_s=0.0, batch_s=0.0, min_rounds=3, max_rounds=5, budget_s=0.05
    ),
    # The host rows: microseconds per call, timed in rounds of ~5 ms.
    "host": TimingSettings(
        warmup_calls=20, warmup_s=0.02, batch_s=0.005, min_rounds=9, max_rounds=100, budget_s=0.2
    ),
    "tiny": TimingSettings(
        warmup_calls=1, warmup_s=0.0, batch_s=0.0002, min_rounds=3, max_rounds=5, budget_s=0.005
    ),
}


@dataclass
class BenchConfig:
    """What to run.  preset: None picks gpu/cpu (+ _quick) per backend, emu for the emulator;
    "tiny" is for tests.  only: substrings that row names must contain (any of them)."""

    backends: Sequence[str] | None = None
    quick: bool = False
    dtype: str = "float32"
    only: Sequence[str] = ()
    torch: bool = True
    torch_compile: str = "auto"  # auto | on | off
    preset: str | None = None
    seed: int = 0
    verbose: bool = True
    gemm_versions: bool = True  # also time the kernel backends' other GEMM versions (full mode)
    # Called with the record so far after each row: a run cut short by a time limit keeps what
    # it measured (the CLI's --json rewrites its file here; "complete" stays false until the end).
    on_row: Callable[[dict[str, Any]], None] | None = None
