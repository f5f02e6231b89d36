"""Sequential: the model, its execution plan, and the training loop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import Array, dtype_of, import_array, shape_of, to_host
from .backends import get_backend
from .callbacks import Callback, History
from .dtypes import check_dtype
from .layers import Container, Dense, Layer, Residual, build_steps, layer_from_config
from .losses import Loss, SoftmaxCrossEntropyLoss
from .parameters import FlatStore, Parameter

if TYPE_CHECKING:
    from .optim import Optimizer

logger = logging.getLogger("gpubackprop")


class Sequential(Container):
    """Layers applied in order.  ``to()`` places the parameters in flat buffers on a
    backend and builds the plan in which each Dense + activation pair is one fused step."""

    def __init__(self, *layers: Layer):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} is {layer!r}, not a gpubackprop Layer")
        self.layers = list(layers)
        self.backend = None
        self.dtype: np.dtype | None = None
        self.store: FlatStore | None = None
        self.steps: list[Layer] = []
        self.stop_training = False
        self._name_parameters(self.layers, "")

    # -- structure ----------------------------------------------------------------------
    @staticmethod
    def _name_parameters(layers: list[Layer], prefix: str) -> None:
        for i, layer in enumerate(layers):
            if isinstance(layer, Container):
                Sequential._name_parameters(layer.layers, f"{prefix}{i}.")
            elif isinstance(layer, Dense):
                layer.weight.name = f"{prefix}{i}.weight"
                if layer.bias is not None:
                    layer.bias.name = f"{prefix}{i}.bias"

    def config(self) -> dict:
        return {"type": "Sequential", "layers": [layer.config() for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        """Rebuild a model (fresh weights) from ``config()`` output."""
        if not isinstance(config, dict) or config.get("type") != "Sequential":
            raise ValueError(
                f"model config must be a dict with type 'Sequential', got {config!r:.200}"
            )
        return cls(*(layer_from_config(c) for c in config.get("layers", [])))

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"

    @property
    def in_features(self) -> int | None:
        for layer in self.layers:
            if isinstance(layer, Dense):
                return layer.in_features
            if isinstance(layer, (Residual, Sequential)):
                return None
        return None

    # -- placement ------------------------------------------------------------------------
    def to(self, backend: Any = None, dtype: Any = "float32") -> Sequential:
        """Move parameters to ``backend`` ("numpy" | "cupy" | "emu" | "auto" | None = the
        GPUBACKPROP_BACKEND variable or "auto") in ``dtype``; build the fused plan."""
        self.backend = get_backend(backend)
        self.dtype = check_dtype(dtype)
        params = self._all_parameters()
        self.store = FlatStore(self.backend, self.dtype, params)
        self.steps = build_steps(self.layers, self.backend)
        return self

    def _ensure_placed(self) -> None:
        if self.backend is None:
            self.to()

    def _all_parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def parameters(self) -> list[Parameter]:
        """Every Parameter (``name``, ``data``, ``grad`` views into the flat buffers)."""
        self._ensure_placed()
        return self._all_parameters()

    def named_parameters(self) -> dict[str, Parameter]:
        return {p.name: p for p in self.parameters()}

    def num_parameters(self) -> int:
        return sum(p.size for p in self._all_parameters())

    # -- forward / backward ------------------------------------------------------------------
    def prepare_input(self, x: Array, name: str = "x") -> Array:
        """``x`` checked (2-D, this model's feature count, at least one row, numbers) and
        returned as an array of this model's backend and dtype (copied only if needed).
        ``x`` may be any array arrays.import_array reads (DLPack, the NumPy array protocol)."""
        self._ensure_placed()
        x = import_array(x, self.backend.xp, name)
        shape = shape_of(x)
        if len(shape) != 2:
            raise ValueError(f"{name} has shape {shape}; expected (batch, features)")
        expected = self.in_features
        if expected is not None and shape[1] != expected:
            raise ValueError(
                f"{name} has {shape[1]} features per row; the first Dense layer expects {expected}"
            )
        if shape[0] == 0:
            raise ValueError(f"{name} has no rows")
        kind = dtype_of(x).kind
        if kind not in "fiub":
            raise ValueError(f"{name} has dtype {getattr(x, 'dtype', '?')}; expected numbers")
        return self.backend.asarray(x, self.dtype)

    def forward(self, x: Array) -> Array:
        """Run the plan; each step keeps what its backward needs."""
        return self.run_steps(self.prepare_input(x))

    def run_steps(self, h):
        """The plan on ``h``, already an array of this model's backend and dtype."""
        for step in self.steps:
            h = step.forward(h)
        return h

    __call__ = forward

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        """Backpropagate ∂L/∂output through the plan, overwriting every ``p.grad``.
        Returns ∂L/∂x (None when need_input_grad is False, which skips one GEMM)."""
        if not self.steps:
            raise RuntimeError("Sequential.backward called before forward")
        grad = dout
        for i in range(len(self.steps) - 1, -1, -1):
            grad = self.steps[i].backward(grad, need_input_grad or i > 0)
        return grad

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: NumPy copy} for every parameter."""
        self._ensure_placed()
        return {p.name: np.array(self.backend.to_numpy(p.data)) for p in self._all_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy values in by name.  Every name and shape is checked before anything is
        written, so a failed load changes nothing."""
        self._ensure_placed()
        params = {p.name: p for p in self._all_parameters()}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        host = {}
        for name, p in params.items():
            value = to_host(state[name])
            if value.shape != p.shape:
                raise ValueError(
                    f"state_dict[{name!r}] has shape {value.shape}; expected {p.shape}"
                )
            if value.dtype.kind != "f":
                raise ValueError(f"state_dict[{name!r}] has dtype {value.dtype}; expected floats")
            host[name] = value
        flat = np.zeros(self.store.size, dtype=self.dtype)
        for p, offset in zip(self.store.parameters, self.store.offsets):
            flat[offset : offset + p.size] = host[p.name].ravel()
        self.store.data[...] = self.backend.asarray(flat, self.dtype)

    # -- training loop -------------------------------------------------------------------------
    def fit(
        self,
        x: Array,
        y: Array,
        *,
        loss: Loss,
        optimizer: Optimizer,
        epochs: int = 1,
        batch_size: int = 32,
        shuffle: bool = True,
        validation_data: tuple | None = None,
        verbose: int = 1,
        callbacks: list[Callback] | None = None,
        distributed: bool = False,
    ) -> History:
        """Mini-batch training: for each batch, forward, loss, backward, optimizer step.

        Data is copied to the backend once; batches are drawn in a fresh order every
        epoch (the generator seeded by gb.seed).  verbose: 0 silent, 1 a progress bar
        (loss, accuracy, samples/s), 2 one line per epoch.  Returns a History.

        distributed=True trains data-parallel over the ranks of ``gb.distributed.init()``
        (docs/distributed.md): ``batch_size`` stays the GLOBAL batch, split into one disjoint
        shard per rank (sizes ⌊B/N⌋ or ⌈B/N⌉), and the flat gradient buffer is averaged
        across the ranks in one all-reduce after backward, so the same script optimises the
        same way on any number of ranks.  The metrics are reduced over the ranks; only rank 0
        prints, shows the bar and runs file-writing callbacks (ModelCheckpoint)."""
        from .training import run_fit

        return run_fit(
            self,
            x,
            y,
            loss=loss,
            optimizer=optimizer,
            epochs=epochs,
            batch_size=batch_size,
            shuffle=shuffle,
            validation_data=validation_data,
            verbose=verbose,
            callbacks=callbacks or [],
            distributed=distributed,
        )

    def to_torch(self, device: Any = None) -> Any:
        """A ``torch.nn.Sequential`` with copies of this model's weights that computes the same
        function (Linear for Dense, the same activations and parameters, Residual blocks as a
        small module); see gpubackprop.torch_interop.  Needs PyTorch."""
        from .torch_interop import to_torch

        return to_torch(self, device)

    def predict(self, x: Array, batch_size: int = 1024) -> np.ndarray:
        """Model outputs for ``x`` as a NumPy array, computed batch by batch."""
        xd = self.prepare_input(x)
        outputs = []
        for start in range(0, xd.shape[0], batch_size):
            h = self.run_steps(xd[start : start + batch_size])
            outputs.append(np.array(self.backend.to_numpy(h)))
        return np.concatenate(outputs, axis=0)

    def evaluate(
        self, x: Array, y: Array, loss: Loss | None = None, batch_size: int = 1024
    ) -> dict[str, float]:
        """{"loss": mean loss, "accuracy": fraction correct (classification losses)}."""
        from .training import evaluate

        return evaluate(self, x, y, loss or SoftmaxCrossEntropyLoss(), batch_size)


def from_torch(module: Any, backend: Any = None, dtype: Any = None) -> Sequential:
    """A model with the layers and weights of a ``torch.nn.Sequential`` (Linear, the activations,
    nested Sequential, torch_interop.Residual); other modules are refused by name, placed on
    ``backend`` in ``dtype`` (default: the dtype of the module's first floating-point
    parameter, float32 or float64; float32 without any).  See gpubackprop.torch_interop.
    Needs PyTorch."""
    from .torch_interop import layers_from_torch  # PyTorch is optional: imported on use

    layers, module_dtype = layers_from_torch(module)
    return Sequential(*layers).to(backend, dtype=dtype or module_dtype)
