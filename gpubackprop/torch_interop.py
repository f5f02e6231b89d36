"""PyTorch modules both ways: ``model.to_torch()`` and ``gb.from_torch(module)``.

Layer by layer, with the same weights and the same function:

=====================================  =========================================
gpubackprop                            PyTorch
=====================================  =========================================
Dense(in, out, bias)                   torch.nn.Linear(in, out, bias) (same layout)
Identity, ReLU, Sigmoid, Tanh, SiLU    torch.nn.Identity, ReLU, Sigmoid, Tanh, SiLU
LeakyReLU(alpha)                       torch.nn.LeakyReLU(negative_slope=alpha)
GELU(approximate)                      torch.nn.GELU(approximate) ("none" | "tanh")
Residual(*layers)                      Residual(*modules) below: y = x + f(x)
Standardize(mean, std)                 Standardize(mean, std) below: (x − mean) / std
Sequential (nested)                    torch.nn.Sequential (nested)
=====================================  =========================================

Residual and Standardize here are small torch modules.  Residual is a torch.nn.Sequential whose
forward adds its input, so the parameter names of both sides agree ("1.0.weight" is the first
Dense inside the block at index 1).  This module imports torch; gpubackprop imports it only when
one of these functions is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import layers as gbl
from .arrays import to_host

__all__ = ["Residual", "Standardize", "layers_from_torch", "to_torch"]

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class Residual(torch.nn.Sequential):
    """y = x + f(x), f the child modules in order (gpubackprop's Residual)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class Standardize(torch.nn.Module):
    """y = (x − mean) / std per feature (gpubackprop's Standardize); mean and std are buffers."""

    def __init__(self, mean: Any, std: Any, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=dtype).clone())
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"features={self.mean.numel()}"


# Activations without parameters: the same function under the same name on both sides.
_SIMPLE_ACTIVATIONS: list[tuple[type[gbl.Layer], type[torch.nn.Module]]] = [
    (gbl.Identity, torch.nn.Identity),
    (gbl.ReLU, torch.nn.ReLU),
    (gbl.Sigmoid, torch.nn.Sigmoid),
    (gbl.Tanh, torch.nn.Tanh),
    (gbl.SiLU, torch.nn.SiLU),
]
SUPPORTED_TORCH_MODULES = (
    "Linear, Identity, ReLU, LeakyReLU, Sigmoid, Tanh, GELU, SiLU, Sequential (nested), and "
    "gpubackprop.torch_interop.Residual / Standardize"
)


# -- gpubackprop -> torch -------------------------------------------------------------------------


def to_torch(model: Any, device: Any = None) -> torch.nn.Sequential:
    """A torch.nn.Sequential computing what ``model`` computes, with copies of its weights in
    the model's dtype (float32 before the model is placed), on ``device`` (default CPU)."""
    if not isinstance(model, gbl.Container) or isinstance(model, gbl.Residual):
        raise TypeError(f"model is {type(model).__name__}; expected a gpubackprop Sequential")
    dtype = _TORCH_DTYPES[np.dtype(model.dtype or np.float32)]
    module = torch.nn.Sequential(*(_module_of(layer, dtype) for layer in model.layers))
    return module.to(device) if device is not None else module


def _tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(to_host(values))).to(dtype)


def _module_of(layer: gbl.Layer, dtype: torch.dtype) -> torch.nn.Module:
    if isinstance(layer, gbl.Dense):
        linear = torch.nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(_tensor(layer.weight.data, dtype))
            if layer.bias is not None:
                linear.bias.copy_(_tensor(layer.bias.data, dtype))
        return linear
    if isinstance(layer, gbl.Standardize):
        return Standardize(to_host(layer.mean), to_host(layer.std), dtype)
    if isinstance(layer, gbl.Residual):
        return Residual(*(_module_of(inner, dtype) for inner in layer.layers))
    if isinstance(layer, gbl.Container):  # a nested Sequential
        return torch.nn.Sequential(*(_module_of(inner, dtype) for inner in layer.layers))
    if isinstance(layer, gbl.LeakyReLU):
        return torch.nn.LeakyReLU(negative_slope=layer.alpha)
    if isinstance(layer, gbl.GELU):
        return torch.nn.GELU(approximate=layer.approximate)
    for ours, theirs in _SIMPLE_ACTIVATIONS:
        if type(layer) is ours:
            return theirs()
    raise TypeError(f"layer {layer!r} has no PyTorch counterpart in to_torch")


# -- torch -> gpubackprop -------------------------------------------------------------------------


def layers_from_torch(
    module: torch.nn.Module, sequential: Callable[..., gbl.Container]
) -> tuple[list[gbl.Layer], str]:
    """The gpubackprop layers (with copies of the weights) computing what the
    torch.nn.Sequential ``module`` computes, and the dtype of its first floating-point
    parameter ("float32" or "float64"; "float32" without any).  model.from_torch (gb.from_torch)
    builds the Sequential from them.

    A nested torch.nn.Sequential becomes a nested ``sequential`` (model.Sequential, passed in
    so that this module sits below model.py), so parameter names agree.  A module with no
    gpubackprop counterpart (a subclass of a supported one included: its forward may differ) is
    refused with TypeError naming it and its place in ``module``."""
    if type(module) is not torch.nn.Sequential:  # a subclass may compute something else
        raise TypeError(
            f"module is {type(module).__module__}.{type(module).__qualname__}; expected a "
            "torch.nn.Sequential"
        )
    floats = [p.dtype for p in module.parameters() if p.dtype.is_floating_point]
    dtype = {torch.float64: "float64"}.get(floats[0], "float32") if floats else "float32"
    return _layers_of(module, "", sequential), dtype


def _host_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def _layers_of(
    container: torch.nn.Module, prefix: str, sequential: Callable[..., gbl.Container]
) -> list[gbl.Layer]:
    layers: list[gbl.Layer] = []
    for name, child in container.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, Residual):
            layers.append(gbl.Residual(*_layers_of(child, f"{path}.", sequential)))
        elif type(child) is torch.nn.Sequential:
            layers.append(sequential(*_layers_of(child, f"{path}.", sequential)))
        else:
            layers.append(_layer_of(child, path))
    return layers


def _layer_of(child: torch.nn.Module, path: str) -> gbl.Layer:
    if type(child) is torch.nn.Linear:
        dense = gbl.Dense(child.in_features, child.out_features, bias=child.bias is not None)
        # Before placement a Parameter holds a float64 host array; to() copies it in.
        dense.weight.data = _host_float64(child.weight)
        if child.bias is not None:
            dense.bias.data = _host_float64(child.bias)
        return dense
    if type(child) is torch.nn.LeakyReLU:
        return gbl.LeakyReLU(child.negative_slope)
    if type(child) is torch.nn.GELU:
        return gbl.GELU(child.approximate)
    if type(child) is Standardize:
        return gbl.Standardize(_host_float64(child.mean), _host_float64(child.std))
    for ours, theirs in _SIMPLE_ACTIVATIONS:
        if type(child) is theirs:
            return ours()
    kind = f"{type(child).__module__}.{type(child).__qualname__}"
    raise TypeError(
        f"module {path!r} is {kind} ({child!r:.80}), which has no gpubackprop layer; "
        f"supported: {SUPPORTED_TORCH_MODULES}"
    )
