"""NumPy backend: the reference formulas, and the CPU fallback.

Each op is written so it can be read beside the derivation.  For a dense layer
with pre-activation z = x Wᵀ + b and output y = f(z), the chain rule gives

    δ  = ∂L/∂z = ∂L/∂y ⊙ f'(z)          (the seed's δ⁽ˡ⁾ = (W⁽ˡ⁺¹⁾)ᵀ δ⁽ˡ⁺¹⁾ ⊙ f'(z⁽ˡ⁾))
    ∂L/∂W = δᵀ x,   ∂L/∂b = Σ_rows δ,   ∂L/∂x = δ W

Rows are samples, so the seed's column-vector δ (aˡ⁻¹)ᵀ becomes δᵀ x here.
"""

from __future__ import annotations

import math

import numpy as np

from ..precision import bf16_bits, bf16_from_bits, check_precision, matmul
from .base import (
    SAVES_OUTPUT,
    STEP_BIAS1,
    STEP_BIAS2_SQRT,
    STEP_LR,
    STEP_T,
    Backend,
    check_activation,
    check_reduction,
)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
try:  # SciPy's vectorised erf when installed: ~6x faster than math.erf per element (256x1024)
    from scipy.special import erf as _vectorised_erf
except ImportError:  # not a dependency: fall back to math.erf, element by element
    _vectorised_erf = None
_erf_per_element = np.frompyfunc(math.erf, 1, 1)


def erf(z: np.ndarray) -> np.ndarray:
    """Gauss error function erf(z) = (2/√π) ∫₀^z e^(−t²) dt, elementwise (NumPy has none)."""
    if _vectorised_erf is not None:
        return _vectorised_erf(z).astype(z.dtype, copy=False)
    return _erf_per_element(z).astype(z.dtype, copy=False)


def _select(mask: np.ndarray, if_true: np.ndarray, if_false: np.ndarray) -> np.ndarray:
    """mask ? if_true : if_false for finite values, exactly (one term is exactly 0).  np.where
    branches per element: on signs of random data it runs about 10x slower than this."""
    m = mask.astype(if_true.dtype)
    return if_true * m + if_false * (1 - m)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1 / (1 + e^(−z)), through e = e^(−|z|) so that no exp overflows for large |z|:
    1 / (1 + e) for z ≥ 0 and e / (1 + e) below."""
    e = np.exp(-np.abs(z))
    r = 1.0 / (1.0 + e)
    return _select(z >= 0, r, e * r).astype(z.dtype, copy=False)


def _check_clip(clip) -> None:
    if not (isinstance(clip, np.ndarray) and clip.dtype == np.float64 and clip.shape == (1,)):
        raise ValueError(
            f"clip={clip!r:.80} is not accepted; expected the float64 array of shape (1,) "
            "that clip_coefficient returns"
        )


def _check_param_bf16(param: np.ndarray, param_bf16) -> None:
    if param.dtype != np.float32:
        raise ValueError(
            f"param_bf16 is accepted with float32 parameters only; param is {param.dtype}"
        )
    if not (
        isinstance(param_bf16, np.ndarray)
        and param_bf16.dtype == np.uint16
        and param_bf16.shape == param.shape
    ):
        raise ValueError(
            f"param_bf16 is {type(param_bf16).__name__} "
            f"{getattr(param_bf16, 'dtype', '')}{tuple(getattr(param_bf16, 'shape', ()))}; "
            f"expected a uint16 array of param's shape {param.shape} (bf16 bits)"
        )


def check_bf16(name: str, a, shape: tuple[int, ...], precision: str, xp=np) -> None:
    """``a`` (dense_forward / dense_backward's weight_bf16, x_bf16, y_bf16) is bf16 bits of
    ``shape``, and given with precision="bf16" only; ValueError naming what is wrong
    otherwise."""
    if precision != "bf16":
        raise ValueError(
            f"{name} is accepted with precision='bf16' only; got precision={precision!r}"
        )
    if not isinstance(a, xp.ndarray) or a.dtype != np.uint16:
        raise ValueError(
            f"{name} is {type(a).__name__} {getattr(a, 'dtype', '')}; "
            "expected a uint16 array of bf16 bits on this backend"
        )
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}.shape={tuple(a.shape)} is not accepted; expected {tuple(shape)}")


def _matmul(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """a @ b in ``precision``: fp32/fp64 as is; tf32/bf16 (float32 only) with both operands
    rounded to that format and the products accumulated in fp32 (precision.matmul)."""
    if precision == "fp32":
        return a @ b
    check_precision(precision)
    if a.dtype != np.float32:
        raise ValueError(f"precision={precision!r} needs float32 arrays; got {a.dtype}")
    return matmul(a, b, precision)


def activation_value(name: str, z: np.ndarray, alpha: float) -> np.ndarray:
    """y = f(z) for every activation of base.ACTIVATIONS."""
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0)
    if name == "leaky_relu":
        # max(z, 0) + α min(z, 0): branch-free, and ±inf stay themselves.
        return np.maximum(z, 0) + z.dtype.type(alpha) * np.minimum(z, 0)
    if name == "sigmoid":
        return sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "gelu":  # z Φ(z), Φ the standard normal CDF
        return 0.5 * z * (1.0 + erf(z * _INV_SQRT_2))
    if name == "gelu_tanh":  # ½ z (1 + tanh(√(2/π)(z + 0.044715 z³)))
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
    if name == "silu":  # z σ(z)
        return z * sigmoid(z)
    check_activation(name)  # raises: every valid name returned above
    raise AssertionError(name)


def activation_derivative(name: str, saved: np.ndarray, alpha: float) -> np.ndarray:
    """f'(z), from y = f(z) for the activations in SAVES_OUTPUT and from z otherwise."""
    if name == "relu":  # [z > 0] = [y > 0]
        return (saved > 0).astype(saved.dtype)
    if name == "sigmoid":  # σ' = σ(1 − σ) = y(1 − y)
        return saved * (1.0 - saved)
    if name == "tanh":  # tanh' = 1 − tanh² = 1 − y²
        return 1.0 - saved * saved
    z = saved
    if name == "leaky_relu":
        positive = (z > 0).astype(z.dtype)
        return positive + z.dtype.type(alpha) * (1 - positive)
    if name == "gelu":  # Φ(z) + z φ(z)
        cdf = 0.5 * (1.0 + erf(z * _INV_SQRT_2))
        return cdf + z * _INV_SQRT_2PI * np.exp(-0.5 * z * z)
    if name == "gelu_tanh":  # ½(1 + t) + ½ z (1 − t²) u', u = √(2/π)(z + c z³)
        t = np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if name == "silu":  # σ(z)(1 + z(1 − σ(z)))
        s = sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    check_activation(name)  # raises: every valid name returned above
    raise AssertionError(name)


def activation_gradient(name: str, dout: np.ndarray, saved: np.ndarray, alpha: float) -> np.ndarray:
    """∂L/∂z = ∂L/∂y ⊙ f'(z) with PyTorch's choices at NaN and ±Inf (docs/derivation.md):
    ReLU and LeakyReLU select the gradient, the smooth activations multiply in IEEE arithmetic."""
    if name == "relu":  # 0 where y <= 0, else ∂L/∂y: a NaN y passes the gradient on
        return _select(~(saved <= 0), dout, None)
    if name == "leaky_relu":  # ∂L/∂y where z > 0, else α ∂L/∂y
        return _select(saved > 0, dout, dout * dout.dtype.type(alpha))
    return dout * activation_derivative(name, saved, alpha)


def _select(mask: np.ndarray, a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """a where mask, else b (0 for None), bit for bit (NaN and ±Inf of the chosen side kept):
    np.where's own select runs about 4× slower than these integer AND/OR passes."""
    bits = np.dtype(f"u{a.dtype.itemsize}")
    ones = mask.astype(bits)
    np.negative(ones, out=ones)  # True → all bits set, False → 0 (unsigned wrap-around)
    chosen = np.bitwise_and(np.ascontiguousarray(a).view(bits), ones)
    if b is not None:
        np.bitwise_or(chosen, np.ascontiguousarray(b).view(bits) & ~ones, out=chosen)
    return chosen.view(a.dtype)


class NumpyBackend(Backend):
    """Reference implementation of the backend contract in NumPy (float32 and float64)."""

    name = "numpy"
    available = True
    reason = ""
    xp = np

    # -- arrays ---------------------------------------------------------------------
    def asarray(self, x, dtype=None):
        return np.ascontiguousarray(x, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def device_name(self) -> str:
        import platform

        return f"CPU ({platform.machine()}, NumPy {np.__version__})"

    # -- dense layer ------------------------------------------------------------------
    def _bf16_operand(self, name, a, a_bf16, precision):
        """A GEMM operand: its bf16 copy ``a_bf16`` as float32 (exactly bf16(a) when the copy is
        current, so the product is the same as rounding ``a``), or ``a``."""
        if a_bf16 is None:
            return a
        check_bf16(name, a_bf16, a.shape, precision)
        return bf16_from_bits(a_bf16).reshape(a.shape)

    def dense_forward(
        self,
        x,
        weight,
        bias,
        activation,
        alpha=0.01,
        precision="fp32",
        weight_bf16=None,
        x_bf16=None,
        y_bf16=None,
        *,
        params_checked=False,  # NumPy checks nothing per call that this would save
    ):
        weight = self._bf16_operand("weight_bf16", weight, weight_bf16, precision)
        x = self._bf16_operand("x_bf16", x, x_bf16, precision)
        z = _matmul(x, weight.T, precision)  # z = x Wᵀ + b
        if bias is not None:
            z += bias
        y, saved = self.activation_forward(z, activation, alpha)
        if y_bf16 is not None:  # bf16(y), the next layer's operand
            check_bf16("y_bf16", y_bf16, y.shape, precision)
            y_bf16[...] = bf16_bits(y).reshape(y.shape)
        return y, saved

    def dense_backward(
        self,
        dout,
        x,
        weight,
        saved,
        activation,
        alpha,
        dweight,
        dbias,
        need_dinp,
        precision="fp32",
        weight_bf16=None,
        x_bf16=None,
        *,
        params_checked=False,
    ):
        weight = self._bf16_operand("weight_bf16", weight, weight_bf16, precision)
        x = self._bf16_operand("x_bf16", x, x_bf16, precision)
        delta = (
            dout
            if activation == "identity"
            else activation_gradient(activation, dout, saved, alpha)
        )  # δ = ∂L/∂y ⊙ f'(z)
        if precision == "fp32":
            np.matmul(delta.T, x, out=dweight)  # ∂L/∂W = δᵀ x
        else:
            dweight[...] = _matmul(delta.T, x, precision)
        if dbias is not None:
            np.sum(delta, axis=0, out=dbias)  # ∂L/∂b = Σ_rows δ
        return _matmul(delta, weight, precision) if need_dinp else None  # ∂L/∂x = δ W

    # -- standalone activation ----------------------------------------------------------
    def activation_forward(self, x, activation, alpha=0.01):
        y = activation_value(activation, x, alpha)
        if activation == "identity":
            return y, None
        return y, (y if activation in SAVES_OUTPUT else x)

    def activation_backward(self, dout, saved, activation, alpha=0.01):
        if activation == "identity":
            return dout
        return activation_gradient(activation, dout, saved, alpha)

    def add(self, a, b, out_bf16=None):
        out = a + b
        if out_bf16 is not None:  # bf16(a + b), the next layer's operand
            check_bf16("out_bf16", out_bf16, out.shape, "bf16")
            out_bf16[...] = bf16_bits(out).reshape(out.shape)
        return out

    # -- input standardisation ------------------------------------------------------------
    def standardize_forward(self, x, mean, std):
        """y = (x − μ) / σ, μ and σ per feature (column)."""
        return (x - mean) / std

    def standardize_backward(self, dout, std):
        """∂L/∂x = ∂L/∂y / σ."""
        return dout / std

    # -- losses ---------------------------------------------------------------------------
    def mse_loss(self, pred, target, reduction):
        """L = Σ (ŷ − y)² [/ n];  ∂L/∂ŷ = 2(ŷ − y) [/ n]."""
        check_reduction(reduction)
        diff = pred - target
        scale = 1.0 / diff.size if reduction == "mean" else 1.0
        loss = np.asarray(np.sum(diff * diff) * scale, dtype=pred.dtype)
        return loss, (2.0 * scale) * diff

    def softmax_cross_entropy(self, logits, target):
        """L = (1/N) Σ_i (lse(z_i)·Σ_j p_ij − Σ_j p_ij z_ij);  ∂L/∂z = (softmax(z)·Σp − p) / N.

        For integer labels p is one-hot.  lse(z) = m + log Σ e^(z − m), m = max z, is
        the overflow-free log-sum-exp."""
        n = logits.shape[0]
        m = logits.max(axis=1, keepdims=True)
        softmax = np.subtract(logits, m)
        np.exp(softmax, out=softmax)  # e^(z − m) in one buffer: the gradient is built in it
        sum_e = softmax.sum(axis=1, keepdims=True)
        lse = m + np.log(sum_e)
        if target.ndim == 1:
            rows = np.arange(n)
            loss = np.sum(lse[:, 0] - logits[rows, target]) / n
            grad = softmax
            grad *= 1.0 / (sum_e * n)  # softmax / N
            grad[rows, target] -= 1.0 / n
        else:
            softmax /= sum_e
            mass = target.sum(axis=1, keepdims=True)
            loss = np.sum(lse * mass - np.sum(target * logits, axis=1, keepdims=True)) / n
            grad = (softmax * mass - target) / n
        return np.asarray(loss, dtype=logits.dtype), grad.astype(logits.dtype, copy=False)

    def bce_with_logits(self, logits, target, reduction):
        """ℓ = max(z, 0) − z y + log(1 + e^(−|z|))  (= −y log σ(z) − (1 − y) log(1 − σ(z)),
        stable);  ∂ℓ/∂z = σ(z) − y."""
        check_reduction(reduction)
        z = logits
        elementwise = np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))
        scale = 1.0 / z.size if reduction == "mean" else 1.0
        loss = np.asarray(np.sum(elementwise) * scale, dtype=z.dtype)
        return loss, ((sigmoid(z) - target) * scale).astype(z.dtype, copy=False)

    def bce(self, probs, target, reduction):
        """ℓ = −(y max(log p, −100) + (1 − y) max(log(1 − p), −100))  (torch's clamp);
        ∂ℓ/∂p = (p − y) / max(p(1 − p), 1e−12)."""
        check_reduction(reduction)
        p = probs
        with np.errstate(divide="ignore"):
            log_p = np.maximum(np.log(p), -100.0)
            log_1mp = np.maximum(np.log(1.0 - p), -100.0)
        elementwise = -(target * log_p + (1.0 - target) * log_1mp)
        scale = 1.0 / p.size if reduction == "mean" else 1.0
        loss = np.asarray(np.sum(elementwise) * scale, dtype=p.dtype)
        grad = (p - target) / np.maximum(p * (1.0 - p), 1e-12) * scale
        return loss, grad.astype(p.dtype, copy=False)

    # -- optimizers --------------------------------------------------------------------------
    def sgd_step(
        self,
        param,
        grad,
        momentum_buf,
        *,
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        first_step,
    ):
        """torch.optim.SGD: g = ∇ + λθ;  b = g (first step) or μb + (1 − τ)g;
        g = g + μb (Nesterov) or b;  θ −= η g."""
        g = grad + weight_decay * param if weight_decay != 0 else grad
        if momentum != 0:
            if first_step:
                momentum_buf[...] = g
            else:
                momentum_buf *= momentum
                momentum_buf += g if dampening == 0 else (1.0 - dampening) * g
            g = g + momentum * momentum_buf if nesterov else momentum_buf
        param -= lr * g

    def adam_step(
        self,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        *,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        decoupled,
    ):
        """torch.optim.Adam / AdamW, step t ≥ 1:
        AdamW: θ ← θ(1 − ηλ);  Adam: g = ∇ + λθ.
        m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²;
        θ ← θ − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)."""
        g = grad
        if weight_decay != 0:
            if decoupled:
                param *= 1.0 - lr * weight_decay
            else:
                g = grad + weight_decay * param
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * g
        exp_avg_sq *= beta2
        exp_avg_sq += (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        # denom = √v / √(1 − β₂ᵗ) + ε, then the step, each in place to spare temporaries
        step_buffer = np.sqrt(exp_avg_sq)
        step_buffer /= bias_correction2_sqrt
        step_buffer += eps
        np.divide(exp_avg, step_buffer, out=step_buffer)
        step_buffer *= lr / bias_correction1
        param -= step_buffer

    @staticmethod
    def _count_step(scalars, advance, beta1, beta2) -> float:
        """The step t = scalars[STEP_T] + 1 an update takes; with ``advance`` t and its bias
        corrections 1 − β₁ᵗ, √(1 − β₂ᵗ) are stored (the kernels' last block does so)."""
        t = float(scalars[STEP_T]) + 1.0
        if advance:
            scalars[STEP_T] = t
            scalars[STEP_BIAS1] = 1.0 - beta1**t
            scalars[STEP_BIAS2_SQRT] = math.sqrt(1.0 - beta2**t)
        return t

    @staticmethod
    def _clip_and_copy(param, grad, clip, param_bf16):
        """The clip and bf16-copy arguments of sgd_update / adam_update, checked; returns a
        function that writes bf16(θ) after the update (or does nothing)."""
        if param_bf16 is not None:
            _check_param_bf16(param, param_bf16)
        if clip is not None:
            _check_clip(clip)
            if clip[0] < 1.0:  # g ← g·c, as clip_grad_norm_ scales (the gradient keeps it)
                grad *= grad.dtype.type(clip[0])
        if param_bf16 is None:
            return lambda: None
        return lambda: np.copyto(param_bf16, bf16_bits(param).reshape(param_bf16.shape))

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
        advance=True,
    ):
        write_bf16 = self._clip_and_copy(param, grad, clip, param_bf16)
        lr = float(scalars[STEP_LR])
        t = self._count_step(scalars, advance, 0.0, 0.0)
        self.sgd_step(
            param,
            grad,
            momentum_buf,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            first_step=t == 1.0,
        )
        write_bf16()

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
        advance=True,
    ):
        write_bf16 = self._clip_and_copy(param, grad, clip, param_bf16)
        lr = float(scalars[STEP_LR])
        t = self._count_step(scalars, advance, beta1, beta2)
        self.adam_step(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=int(t),
            decoupled=decoupled,
        )
        write_bf16()

    def clip_coefficient(self, grads, max_norm):
        # ‖g‖ = √Σ g² over every gradient; c = max_norm / (‖g‖ + 1e−6)
        if not grads:
            raise ValueError("grads=[] is not accepted; expected at least one gradient array")
        total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
        coefficient = np.array([max_norm / (total + 1e-6)], dtype=np.float64)
        return np.asarray(total, dtype=grads[0].dtype), coefficient

    def clip_grad_norm_(self, grads, max_norm):
        norm, coefficient = self.clip_coefficient(grads, max_norm)
        if coefficient[0] < 1.0:  # g ← c·g only when that shrinks it
            for g in grads:
                self.scale_(g, coefficient[0])
        return norm

    def sum_of_squares(self, x):
        return np.asarray(np.dot(x.ravel(), x.ravel()), dtype=x.dtype)

    def scale_(self, x, factor):
        x *= x.dtype.type(factor)
