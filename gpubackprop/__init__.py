"""gpubackprop: dense neural networks trained with backpropagation, every dense layer
and activation in hand-written CUDA kernels (CuPy), with a NumPy reference backend
and a CPU emulator that runs the same kernels without a GPU."""

from __future__ import annotations

import logging

from . import data, distributed
from ._version import __version__
from .backends import available_backends, get_backend
from .callbacks import Callback, CosineSchedule, EarlyStopping, History
from .checkpoint import ModelCheckpoint, load, save
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
from .model import Sequential, from_torch, mlp
from .onnx_export import export_onnx
from .optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm
from .parameters import Parameter
from .random import seed
from .step import CompiledStep, compile_step

logging.getLogger("gpubackprop").addHandler(logging.NullHandler())


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
    "Optimizer",
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
