"""The backend contract: array handling plus one method per primitive op.

Every backend (numpy, cupy, emu) implements exactly these methods with the same
argument names and semantics.  Arrays are C-contiguous, row-major, of the
backend's dtype (float32 or float64); ``x`` is (batch, in_features), ``weight``
is (out_features, in_features) like torch.nn.Linear, ``bias`` is (out_features,).

Activation names (``ACTIVATIONS``): identity, relu, leaky_relu, sigmoid, tanh,
gelu (erf form), gelu_tanh, silu.  ``alpha`` is LeakyReLU's negative slope and
is ignored by the others.

What forward keeps for backward (``SAVES_OUTPUT``): relu, sigmoid and tanh
express f'(z) through y = f(z), so forward keeps y; leaky_relu, gelu,
gelu_tanh and silu need z, so forward keeps z; identity keeps nothing (None).

GEMM precision (``precision`` of dense_forward / dense_backward, gpubackprop/precision.py):
"fp32" (the default), "tf32" or "bf16": the matrix products' operands are rounded to that
format, products accumulate in fp32; everything else (bias, activation, loss, reductions,
optimizer) stays fp32.  Only float32 arrays take tf32 or bf16.
"""

from __future__ import annotations

from typing import Any

from ..precision import PRECISIONS, check_precision

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")
# f'(z) written through y = f(z): relu' = [y > 0], sigmoid' = y(1 - y), tanh' = 1 - y^2.
SAVES_OUTPUT = frozenset({"relu", "sigmoid", "tanh"})
# Integer codes shared with kernels/activations.cuh (ACT_* macros); keep in sync.
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
REDUCTIONS = ("mean", "sum")
# An optimizer's step scalars: a float64 device array of this layout (kernels/train_step.cu's
# STEP_* indices), so that a step reads its learning rate and step count from device memory
# and a captured graph, whose kernel arguments are frozen, still sees them change.
# "blocks_done" counts the finished blocks of a running update launch (0 between launches):
# its last block counts the step (train_step.cu: gb_finish_step).
STEP_SCALARS = ("step", "lr", "bias_correction1", "bias_correction2_sqrt", "blocks_done")
STEP_T, STEP_LR, STEP_BIAS1, STEP_BIAS2_SQRT, STEP_BLOCKS_DONE = range(len(STEP_SCALARS))


def check_activation(activation: str) -> int:
    """The activation's code (ACTIVATION_CODES); ValueError naming the valid ones otherwise."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(
            f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}"
        )
    return ACTIVATION_CODES[activation]


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")


Array = Any  # numpy.ndarray or cupy.ndarray


class Backend:
    """Interface every backend implements.  See the module docstring for layouts."""

    name: str = "abstract"
    available: bool = False
    reason: str = ""  # why it is unavailable, kept for `gpubackprop info`
    xp: Any = None  # the array module used for glue (numpy or cupy)

    # -- arrays -------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """Copy host data (or an array of this backend) to a contiguous array of this backend."""
        raise NotImplementedError

    def to_numpy(self, a: Array) -> Any:
        """Return a NumPy copy (or view, on the CPU) of ``a``; synchronises."""
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Block until all queued work has finished (no-op on the CPU)."""

    def device_name(self) -> str:
        raise NotImplementedError

    def precisions(self) -> tuple[str, ...]:
        """The GEMM precisions this backend's device can run (every one, unless a GPU lacks
        the tensor-core instructions)."""
        return PRECISIONS

    def check_precision(self, precision: str) -> str:
        """``precision`` if this backend runs it, else a ValueError naming the device and the
        precisions it can use."""
        check_precision(precision)
        allowed = self.precisions()
        if precision not in allowed:
            raise ValueError(
                f"precision={precision!r} is not available on {self.device_name()}; it can use "
                f"{', '.join(repr(p) for p in allowed)}"
            )
        return precision

    # -- dense layer ---------------------------------------------------------------
    def dense_forward(
        self,
        x,
        weight,
        bias,
        activation: str,
        alpha: float = 0.01,
        precision: str = "fp32",
        weight_bf16=None,
        x_bf16=None,
        y_bf16=None,
        *,
        params_checked: bool = False,
    ):
        """z = x Wᵀ + b, y = f(z).  Returns (y, saved), saved y, z or None (SAVES_OUTPUT).
        ``weight_bf16`` (precision "bf16" only): uint16 bf16 bits of ``weight``, the model's
        copy that the optimizer keeps (FlatStore.bf16), used as the GEMM's weight operand
        instead of rounding ``weight`` again; the same bits when the copy is current.
        ``x_bf16`` likewise bf16(x) (the previous layer's ``y_bf16``); ``y_bf16``, a uint16
        array of y's shape, receives bf16(y) (round to nearest even), the next layer's x
        operand, so that activations are stored in bf16 between layers.  ``params_checked``:
        weight, bias and weight_bf16 are a placed model's own buffers, checked when it was
        placed; a backend may then skip their checks on every call (only x varies)."""
        raise NotImplementedError

    def dense_backward(
        self,
        dout,
        x,
        weight,
        saved,
        activation: str,
        alpha: float,
        dweight,
        dbias,
        need_dinp: bool,
        precision: str = "fp32",
        weight_bf16=None,
        x_bf16=None,
        *,
        params_checked: bool = False,
    ):
        """δ = dout ⊙ f'(z); writes dweight[...] = δᵀ x and dbias[...] = Σ_rows δ (dbias may be
        None); returns dinp = δ W, or None when need_dinp is False.  ``weight_bf16`` and
        ``x_bf16`` and ``params_checked`` (weight, dweight, dbias, weight_bf16) as in
        dense_forward."""
        raise NotImplementedError

    # -- standalone activation -----------------------------------------------------------
    def activation_forward(self, x, activation: str, alpha: float = 0.01):
        """y = f(x) elementwise.  Returns (y, saved) as dense_forward does."""
        raise NotImplementedError

    def activation_backward(self, dout, saved, activation: str, alpha: float = 0.01):
        """dinp = dout ⊙ f'(z), f' computed from ``saved``."""
        raise NotImplementedError

    def add(self, a, b, out_bf16=None):
        """a + b (residual connections); ``out_bf16`` (a uint16 array of a's shape, float32
        operands) also receives bf16(a + b), the next layer's operand in a bf16 model."""
        raise NotImplementedError

    # -- input standardisation (gb.Standardize) ----------------------------------------------
    def standardize_forward(self, x, mean, std):
        """y = (x − mean) / std per feature: x (batch, features), mean and std (features,)."""
        raise NotImplementedError

    def standardize_backward(self, dout, std):
        """∂L/∂x = ∂L/∂y / std per feature."""
        raise NotImplementedError

    # -- losses: each returns (loss as a 0-d array, dL/dinput) ------------------------------
    def mse_loss(self, pred, target, reduction: str):
        """Squared error summed over every element, divided by their count for "mean";
        the gradient is 2(pred − target) with the same scale."""
        raise NotImplementedError

    def softmax_cross_entropy(self, logits, target):
        """Mean over rows.  target: int labels (N,) or probabilities (N, C)."""
        raise NotImplementedError

    def bce_with_logits(self, logits, target, reduction: str):
        """Binary cross-entropy of σ(logits) against targets in [0, 1], computed from the logits
        without overflow; the gradient is σ(logits) − target (scaled for "mean")."""
        raise NotImplementedError

    def bce(self, probs, target, reduction: str):
        """Binary cross-entropy of probabilities in [0, 1], log clamped at −100 as torch's
        BCELoss does."""
        raise NotImplementedError

    # -- optimizers: update flat buffers in place, one call for the whole model ------------
    def sgd_step(
        self,
        param,
        grad,
        momentum_buf,
        *,
        lr: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        weight_decay: float,
        first_step: bool,
    ) -> None:
        """One torch.optim.SGD step on flat buffers, in place (param and momentum_buf)."""
        raise NotImplementedError

    def adam_step(
        self,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        step: int,
        decoupled: bool,
    ) -> None:
        """One torch.optim.Adam step (AdamW's decoupled weight decay when ``decoupled``) on
        flat buffers, in place (param, exp_avg, exp_avg_sq); ``step`` counts from 1."""
        raise NotImplementedError

    # -- the same updates with step-dependent scalars in device memory (graph-safe) ---------
    def sgd_update(
        self,
        param,
        grad,
        momentum_buf,
        scalars,
        *,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        clip=None,
        param_bf16=None,
        advance: bool = True,
    ) -> None:
        """sgd_step of step t = scalars[STEP_T] + 1 (the steps taken before it, plus one), with
        lr = scalars[STEP_LR] and first_step = (t == 1), read on the device.  With ``advance``
        the same launch counts the step: scalars[STEP_T] ← t and the bias corrections of step t
        (1 and 1: SGD has none), after every part of the update has read the old values; an
        optimizer updating several buffers in one step advances with the last.  ``clip``: the
        float64 (1,) coefficient c of clip_coefficient; the update then first does
        g ← g·(c rounded to g's dtype) where c < 1 and writes that g back to ``grad``, exactly
        as clip_grad_norm_ would have scaled it.  ``param_bf16``: a uint16 array of param's
        shape (float32 only) that receives bf16(θ) (round to nearest even) of the updated
        parameters."""
        raise NotImplementedError

    def adam_update(
        self,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        scalars,
        *,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        clip=None,
        param_bf16=None,
        advance: bool = True,
    ) -> None:
        """adam_step of step t = scalars[STEP_T] + 1 with lr = scalars[STEP_LR], both read on
        the device, and the bias corrections 1 − β₁ᵗ, √(1 − β₂ᵗ) computed there; ``advance``
        (which also stores those corrections), ``clip`` and ``param_bf16`` as in sgd_update."""
        raise NotImplementedError

    def clip_coefficient(self, grads: list, max_norm: float) -> tuple[Any, Any]:
        """(‖g‖, c): ‖g‖ = √(Σ over every array of Σ g²) as a 0-d array of the gradients'
        dtype, c = max_norm / (‖g‖ + 1e−6) as a float64 array of shape (1,), both computed on
        the device and nothing scaled (sgd_update / adam_update apply c with ``clip=c``)."""
        raise NotImplementedError

    def clip_grad_norm_(self, grads: list, max_norm: float):
        """‖g‖ = √(Σ over every array of Σ g²); each g ← g · c where c = max_norm / (‖g‖ + 1e−6)
        is below 1 (torch.nn.utils.clip_grad_norm_).  Returns ‖g‖ as a 0-d array of the
        gradients' dtype, computed and applied without reading anything back to the host."""
        raise NotImplementedError

    def sum_of_squares(self, x):
        """Σ x², a 0-d array (deterministic order)."""
        raise NotImplementedError

    def scale_(self, x, factor: float) -> None:
        """x *= factor in place."""
        raise NotImplementedError
