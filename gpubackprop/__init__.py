"""gpubackprop: dense neural networks trained with backpropagation, every dense layer
and activation in hand-written CUDA kernels (CuPy), with a NumPy reference backend
and a CPU emulator that runs the same kernels without a GPU."""

from __future__ import annotations

import logging
import os
from typing import Any

from . import data, distributed
from .backends import available_backends, get_backend
from .callbacks import Callback, CosineSchedule, EarlyStopping, History, ModelCheckpoint
from .gradcheck import gradcheck
from .layers import (
    GELU,
    Dense,
    Identity,
    LeakyReLU,
    ReLU,
    Residual,
    Sigmoid,
    SiLU,
    Standardize,
    Tanh,
    init_for_activation,
)
from .losses import BCELoss, BCEWithLogitsLoss, MSELoss, SoftmaxCrossEntropyLoss
from .model import Sequential, mlp
from .optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm
from .parameters import Parameter
from .random import seed
from .step import CompiledStep, compile_step

__version__ = "0.1.0"

logging.getLogger("gpubackprop").addHandler(logging.NullHandler())


def save(
    path: str | os.PathLike,
    model: Sequential,
    optimizer: Optimizer | None = None,
    metadata: dict | None = None,
) -> None:
    """Write ``model`` (and optionally ``optimizer``) to a safetensors checkpoint, atomically."""
    from .checkpoint import save as _save

    return _save(path, model, optimizer, metadata=metadata)


def load(
    path: str | os.PathLike,
    backend: Any = None,
    dtype: Any = None,
    with_optimizer: bool = False,
) -> Sequential | tuple[Sequential, Optimizer | None]:
    """Read a checkpoint written by gb.save; see gpubackprop.checkpoint.load."""
    from .checkpoint import load as _load

    return _load(path, backend=backend, dtype=dtype, with_optimizer=with_optimizer)


def from_torch(module: Any, backend: Any = None, dtype: Any = None) -> Sequential:
    """A model with the layers and weights of a ``torch.nn.Sequential`` (Linear, the activations,
    nested Sequential, torch_interop.Residual); other modules are refused by name.  See
    gpubackprop.torch_interop.from_torch.  Needs PyTorch."""
    try:
        from .torch_interop import from_torch as _from_torch
    except ImportError as error:
        raise ImportError(f"gb.from_torch needs PyTorch (pip install torch): {error}") from None

    return _from_torch(module, backend=backend, dtype=dtype)


def export_onnx(model: Sequential, path: str | os.PathLike) -> None:
    """Write ``model`` as an ONNX model (opset 17, its input preprocessing included); see
    gpubackprop.onnx_export.  Needs the onnx package (extra ``onnx``)."""
    from .onnx_export import export_onnx as _export_onnx

    _export_onnx(model, path)


__all__ = [
    "GELU",
    "SGD",
    "Adam",
    "AdamW",
    "BCELoss",
    "BCEWithLogitsLoss",
    "Callback",
    "CompiledStep",
    "CosineSchedule",
    "Dense",
    "EarlyStopping",
    "History",
    "Identity",
    "LeakyReLU",
    "MSELoss",
    "ModelCheckpoint",
    "Parameter",
    "ReLU",
    "Residual",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "SoftmaxCrossEntropyLoss",
    "Standardize",
    "Tanh",
    "__version__",
    "available_backends",
    "clip_grad_norm",
    "compile_step",
    "data",
    "distributed",
    "export_onnx",
    "from_torch",
    "get_backend",
    "gradcheck",
    "init_for_activation",
    "load",
    "mlp",
    "save",
    "seed",
]
