"""Losses with PyTorch's semantics.  ``forward(pred, target)`` returns the loss as a 0-d
array on the model's backend and keeps ∂L/∂pred (computed in the same fused pass);
``backward()`` returns it."""

from __future__ import annotations

import numpy as np

from .arrays import DLPACK_CUDA, dlpack_device_type, dtype_of, import_array, is_cupy_array, shape_of
from .backends import get_backend
from .backends.base import check_reduction


def _backend_of(array):
    """The backend for an array: CuPy arrays and other arrays on a CUDA GPU (DLPack) belong to
    the GPU backend; host arrays to the emulator when it is the default
    (GPUBACKPROP_BACKEND=emu), else to NumPy."""
    if is_cupy_array(array) or dlpack_device_type(array) == DLPACK_CUDA:
        return get_backend("cupy")
    default = get_backend(None)
    return default if default.xp is np else get_backend("numpy")


def _host_min_max(backend, array) -> tuple[float, float]:
    if shape_of(array) == () or np.prod(shape_of(array)) == 0:
        return 0.0, 0.0
    return float(backend.xp.min(array)), float(backend.xp.max(array))


def check_label_range(backend, labels, classes: int) -> None:
    """Raise ValueError unless every label is in [0, classes)."""
    low, high = _host_min_max(backend, labels)
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"target holds label {int(bad)}; expected labels in [0, {classes - 1}] "
            f"for pred with {classes} classes"
        )


class Loss:
    """Base class: subclasses implement ``_compute(backend, pred, target) -> (loss, grad)``."""

    def __init__(self, reduction: str = "mean"):
        check_reduction(reduction)
        self.reduction = reduction
        self.backend = None  # set by Sequential.fit, or with .to(); else inferred from pred
        self._grad = None

    def to(self, backend) -> Loss:
        """Run this loss on ``backend`` (a name or a Backend)."""
        self.backend = get_backend(backend)
        return self

    def forward(self, pred, target):
        """The loss of ``pred`` against ``target`` (any arrays import_array reads: a foreign
        array is imported through DLPack or the NumPy array protocol, copied only if needed)."""
        backend = self.backend or _backend_of(pred)
        pred = import_array(pred, backend.xp, "pred")
        if not isinstance(pred, backend.xp.ndarray):  # the model's output passes untouched
            pred = backend.asarray(pred)
        target = import_array(target, backend.xp, "target")
        if shape_of(pred) and len(shape_of(pred)) != 2:
            raise ValueError(f"pred has shape {shape_of(pred)}; expected (batch, features)")
        target = self._prepare_target(backend, pred, target)
        loss, self._grad = self._compute(backend, pred, target)
        return loss

    __call__ = forward

    def backward(self):
        """∂L/∂pred of the last forward."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._grad

    def _prepare_target(self, backend, pred, target):
        target = backend.asarray(target, pred.dtype)
        if shape_of(target) != shape_of(pred):
            raise ValueError(
                f"target has shape {shape_of(target)} but pred has {shape_of(pred)}; "
                f"{type(self).__name__} needs equal shapes"
            )
        return target

    def _compute(self, backend, pred, target):
        raise NotImplementedError

    def config(self) -> dict:
        return {"type": type(self).__name__, "reduction": self.reduction}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class MSELoss(Loss):
    """L = Σ(ŷ − y)² / n ("mean", n elements) or Σ(ŷ − y)² ("sum").
    The seed's ½(y − ŷ)² is ½ · MSELoss(reduction="sum")."""

    def _compute(self, backend, pred, target):
        return backend.mse_loss(pred, target, self.reduction)


class SoftmaxCrossEntropyLoss(Loss):
    """torch.nn.CrossEntropyLoss on logits: L = −(1/N) Σ_i Σ_j p_ij log softmax(z_i)_j,
    p one-hot for integer labels (N,) or given probabilities (N, C).  Mean over rows."""

    def __init__(self):
        super().__init__("mean")
        # The range check costs a device-to-host sync; fit checks all labels once instead.
        self.check_labels = True

    def config(self) -> dict:
        return {"type": "SoftmaxCrossEntropyLoss"}

    def __repr__(self) -> str:
        return "SoftmaxCrossEntropyLoss()"

    def _prepare_target(self, backend, pred, target):
        n, classes = shape_of(pred)
        target_shape = shape_of(target)
        kind = dtype_of(target).kind
        if len(target_shape) == 1 and kind in "iub":
            if target_shape[0] != n:
                raise ValueError(f"target has {target_shape[0]} labels but pred has {n} rows")
            labels = backend.asarray(target, np.int64)
            if self.check_labels:
                check_label_range(backend, labels, classes)
            return labels
        if target_shape == (n, classes) and kind == "f":
            return backend.asarray(target, pred.dtype)
        raise ValueError(
            f"target has shape {target_shape} and dtype kind {kind!r}; expected integer labels "
            f"of shape ({n},) or float probabilities of shape ({n}, {classes})"
        )

    def _compute(self, backend, pred, target):
        return backend.softmax_cross_entropy(pred, target)


class BCEWithLogitsLoss(Loss):
    """ℓ = −[y log σ(z) + (1 − y) log(1 − σ(z))], computed stably from logits z."""

    def _compute(self, backend, pred, target):
        return backend.bce_with_logits(pred, target, self.reduction)


class BCELoss(Loss):
    """ℓ = −[y log p + (1 − y) log(1 − p)] on probabilities p ∈ [0, 1] (logs clamped at −100)."""

    def _prepare_target(self, backend, pred, target):
        target = super()._prepare_target(backend, pred, target)
        low, high = _host_min_max(backend, pred)
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"BCELoss got pred values in [{low}, {high}]; expected probabilities in [0, 1] "
                "(use BCEWithLogitsLoss for logits)"
            )
        return target

    def _compute(self, backend, pred, target):
        return backend.bce(pred, target, self.reduction)


LOSS_TYPES = {
    cls.__name__: cls for cls in (MSELoss, SoftmaxCrossEntropyLoss, BCEWithLogitsLoss, BCELoss)
}
