"""Sequential: the model (a container of layers), its placement on a backend (the plan is
plan.py's), state dicts, and the entry points of training and evaluation (training.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import Array, dtype_of, import_array, shape_of, to_host
from .backends import get_backend
from .callbacks import Callback, History
from .checks import check_int
from .dtypes import check_dtype
from .layers import (
    LAYER_TYPES,
    Container,
    Dense,
    Layer,
    Standardize,
    activation_layer,
    init_for_activation,
)
from .losses import Loss, SoftmaxCrossEntropyLoss
from .parameters import FlatStore, Parameter
from .plan import Plan, Step, build_steps
from .precision import check_precision

if TYPE_CHECKING:
    from .optim import Optimizer

logger = logging.getLogger("gpubackprop")


class Sequential(Container):
    """Layers applied in order.  ``to()`` places the parameters in flat buffers on a
    backend and builds the execution plan (plan.py), in which each Dense + activation pair
    is one fused step; nested containers are walked at every depth and the layers
    themselves are left as they were built."""

    def __init__(self, *layers: Layer):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        super().__init__(*layers)
        self.plan: Plan | None = None
        self.stop_training = False
        for name, parameter in self.named_parameters().items():
            parameter.name = name

    # -- structure ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, depth: int = 0) -> Sequential:
        """Rebuild a model (fresh weights, identity Standardize buffers) from ``config()``
        output: the inverse of ``config()``; ``gpubackprop train --model`` reads this format."""
        if not isinstance(config, dict) or config.get("type") != "Sequential":
            raise ValueError(
                f"model config must be a dict with type 'Sequential', got {config!r:.200}"
            )
        return super().from_config(config, depth)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"

    @property
    def in_features(self) -> int | None:
        """Input width, from the first layer that fixes it (None for an activation-only
        model); checked against every later layer when the model was built (chain_widths)."""
        return self.widths[0]

    @property
    def out_features(self) -> int | None:
        """Output width, from the last layer that fixes it."""
        return self.widths[1]

    # -- placement ------------------------------------------------------------------------
    def to(
        self, backend: Any = None, dtype: Any = "float32", precision: str = "fp32"
    ) -> Sequential:
        """Move parameters to ``backend`` ("numpy" | "cupy" | "emu" | "auto" | None = the
        GPUBACKPROP_BACKEND variable or "auto") in ``dtype``; build the fused plan.

        ``precision`` ("fp32" | "tf32" | "bf16") is how the dense layers' matrix products
        round their operands (docs/derivation.md, Mixed precision): parameters, gradients and
        optimizer state stay ``dtype`` (the fp32 master copy); tf32 and bf16 need float32 and,
        on a GPU, compute capability 8.0 or later (the error names the GPU otherwise)."""
        check_precision(precision)
        dtype = check_dtype(dtype)
        if precision != "fp32" and dtype != np.float32:
            raise ValueError(
                f"precision={precision!r} needs dtype='float32' (fp32 master weights and "
                f"accumulation); got dtype={dtype.name!r}"
            )
        resolved = get_backend(backend)
        resolved.check_precision(precision)
        self.plan = Plan.build(self.layers, self.parameters(), resolved, dtype, precision)
        return self

    @property
    def precision(self) -> str:
        """The GEMM precision the plan runs ("fp32" before ``to()``)."""
        return "fp32" if self.plan is None else self.plan.precision

    def _ensure_placed(self) -> None:
        if self.plan is None:
            self.to()

    @property
    def backend(self):
        """The backend the model is placed on (None before ``to()``)."""
        return None if self.plan is None else self.plan.backend

    @property
    def dtype(self) -> np.dtype | None:
        return None if self.plan is None else self.plan.dtype

    @property
    def store(self) -> FlatStore | None:
        """The flat buffers every parameter's ``data`` and ``grad`` are views into."""
        return None if self.plan is None else self.plan.store

    @property
    def steps(self) -> list[Step]:
        """The execution plan's steps ([] before ``to()``)."""
        return [] if self.plan is None else self.plan.steps

    def parameters(self) -> list[Parameter]:
        """Every Parameter (``name``, ``data``, ``grad``; views into the flat buffers once the
        model is placed).  Reading them places nothing."""
        return list(self.named_parameters().values())

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

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
                f"{name} has {shape[1]} features per row; "
                f"the model's first layer expects {expected}"
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
        return self.plan.forward(h)

    __call__ = forward

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        """Backpropagate ∂L/∂output through the plan, overwriting every ``p.grad``.
        Returns ∂L/∂x (None when need_input_grad is False, which skips one GEMM)."""
        if self.plan is None or not self.plan.steps:
            raise RuntimeError("Sequential.backward called before forward")
        return self.plan.backward(dout, need_input_grad)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: NumPy copy} for every parameter and buffer (Standardize's mean and std), in
        the model's dtype (float64 before ``to()``).  Reading it places nothing."""
        dtype = self.dtype or np.dtype(np.float64)
        state = {
            name: np.array(to_host(p.data), dtype=dtype)
            for name, p in self.named_parameters().items()
        }
        for name, buffer in self.named_buffers().items():
            state[name] = np.array(buffer, dtype=dtype)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy values in by name.  Every name and shape is checked before anything is
        written, so a failed load changes nothing."""
        params = self.named_parameters()
        buffers = self.named_buffers()
        shapes = {name: p.shape for name, p in params.items()}
        shapes.update({name: b.shape for name, b in buffers.items()})
        missing = sorted(set(shapes) - set(state))
        unexpected = sorted(set(state) - set(shapes))
        if missing or unexpected:
            raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        host = {}
        for name, shape in shapes.items():
            value = to_host(state[name])
            if value.shape != shape:
                raise ValueError(f"state_dict[{name!r}] has shape {value.shape}; expected {shape}")
            if value.dtype.kind != "f":
                raise ValueError(f"state_dict[{name!r}] has dtype {value.dtype}; expected floats")
            if name in buffers and not np.all(np.isfinite(value)):
                raise ValueError(f"state_dict[{name!r}] holds non-finite values")
            host[name] = value
            if name.rsplit(".", 1)[-1] == "std" and not np.all(value > 0):
                raise ValueError(f"state_dict[{name!r}] holds a std <= 0; expected std > 0")
        for name, buffer in buffers.items():
            buffer[...] = host[name]
        if self.plan is None:
            for name, p in params.items():
                p.data[...] = host[name]
            return
        store = self.plan.store
        name_of = {id(p): name for name, p in params.items()}  # names by position, not p.name
        flat = np.zeros(store.size, dtype=self.dtype)
        for p, offset in zip(store.parameters, store.offsets):
            flat[offset : offset + p.size] = host[name_of[id(p)]].ravel()
        store.data[...] = self.plan.backend.asarray(flat, self.dtype)
        store.refresh_bf16()  # precision="bf16": the GEMMs' bf16 copy of the new values
        # the steps hold device copies of the buffers: rebuild them from the new values
        self.plan.steps = build_steps(
            self.layers, self.plan.backend, self.plan.dtype, self.plan.precision
        )

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
        graph: bool = False,
        distributed: bool = False,
        max_norm: float | None = None,
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
        prints, shows the bar and runs file-writing callbacks (ModelCheckpoint).

        graph=True runs each step through ``gb.compile_step`` (one CUDA graph per batch shape
        on cupy, docs/graphs.md), bitwise the same training; with distributed=True the NCCL
        all-reduce is inside the graph (cupy), MPI's runs between two graphs (emu).

        max_norm clips the gradients before each update as gb.clip_grad_norm does
        (``optimizer.step(max_norm=...)``: the scale inside the update launch)."""
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
            graph=graph,
            distributed=distributed,
            max_norm=max_norm,
        )

    def to_torch(self, device: Any = None) -> Any:
        """A ``torch.nn.Sequential`` with copies of this model's weights that computes the same
        function (Linear for Dense, the same activations and parameters, Residual blocks as a
        small module); see gpubackprop.torch_interop.  Needs PyTorch."""
        try:
            from .torch_interop import to_torch
        except ImportError as error:
            raise ImportError(f"to_torch needs PyTorch (pip install torch): {error}") from None
        return to_torch(self, device)

    def predict(self, x: Array, batch_size: int = 1024) -> np.ndarray:
        """Model outputs for ``x`` as a NumPy array, computed batch by batch."""
        from .threads import blas_threads_for

        batch_size = check_int("batch_size", batch_size)
        xd = self.prepare_input(x)
        outputs = []
        with blas_threads_for(self, min(batch_size, xd.shape[0])):
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


LAYER_TYPES["Sequential"] = Sequential


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "relu",
    *,
    alpha: float = 0.01,
    standardize: tuple[Any, Any] | None = None,
) -> Sequential:
    """A multi-layer perceptron: [Standardize(mean, std)], then Dense + ``activation`` per
    width in ``hidden``, then a Dense to ``out_features`` (no activation: logits or values).

    Hidden layers take the init that suits ``activation`` (init_for_activation); the output
    layer Xavier, as it feeds a loss, not a ReLU.  ``standardize=(mean, std)`` puts the input
    standardisation in the model as its first layer."""
    layers: list[Layer] = []
    if standardize is not None:
        layers.append(Standardize(*standardize))
    init = init_for_activation(activation)
    width = in_features
    for size in hidden:
        layers += [Dense(width, size, init=init), activation_layer(activation, alpha)]
        width = size
    layers.append(Dense(width, out_features, init="xavier_uniform"))
    return Sequential(*layers)


def from_torch(module: Any, backend: Any = None, dtype: Any = None) -> Sequential:
    """A model with the layers and weights of a ``torch.nn.Sequential`` (Linear, the activations,
    nested Sequential, torch_interop.Residual); other modules are refused by name, placed on
    ``backend`` in ``dtype`` (default: the dtype of the module's first floating-point
    parameter, float32 or float64; float32 without any).  See gpubackprop.torch_interop.
    Needs PyTorch."""
    try:  # PyTorch is optional: imported on use
        from .torch_interop import layers_from_torch
    except ImportError as error:
        raise ImportError(f"gb.from_torch needs PyTorch (pip install torch): {error}") from None

    layers, module_dtype = layers_from_torch(module, Sequential)
    return Sequential(*layers).to(backend, dtype=dtype or module_dtype)
