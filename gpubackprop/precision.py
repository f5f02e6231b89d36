"""GEMM precisions: what "fp32", "tf32" and "bf16" round, as NumPy reference formulas.

A precision says how the operands of a matrix product are rounded before they are multiplied;
products are then accumulated in fp32, and everything around the product (bias, activation,
loss, reductions, optimizer) stays fp32.  This is what the tensor-core kernels of
kernels/gemm_mma.cu do (mma.sync with fp32 accumulators), so a NumPy model of it is the
reference they are checked against:

- ``fp32``: no rounding (the FP32-unit kernels of kernels/gemm.cu).
- ``tf32``: each operand rounded to TF32 (1 sign, 8 exponent, 10 mantissa bits; unit roundoff
  u = 2⁻¹¹), to nearest even.  Operands stay fp32 in memory.
- ``bf16``: each operand rounded to bfloat16 (8 exponent, 7 mantissa bits; u = 2⁻⁸), to nearest
  even, with ml_dtypes.bfloat16; operands are stored as bf16 (uint16 bits) between kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "PRECISIONS",
    "UNIT_ROUNDOFF",
    "bf16_bits",
    "bf16_from_bits",
    "check_precision",
    "gemm_error_bound",
    "matmul",
    "round_operand",
    "round_tf32",
]

PRECISIONS = ("fp32", "tf32", "bf16")
# Unit roundoff u = 2^-(significand bits): |round(x) - x| <= u |x| for round to nearest.
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of PRECISIONS, else a ValueError naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def round_tf32(x: np.ndarray) -> np.ndarray:
    """float32 → nearest TF32 value (ties to even), as float32: the low 13 mantissa bits
    rounded away in integer arithmetic (inf and NaN unchanged), as gb_round_tf32 does."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    special = (bits & 0x7F800000) == 0x7F800000
    out = np.where(special, bits, rounded).astype(np.uint32)
    return out.view(np.float32).reshape(x.shape)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 (round to nearest even) as uint16 bits, the kernels' bf16 storage."""
    import ml_dtypes

    return np.ascontiguousarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits → float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_operand(x: np.ndarray, precision: str) -> np.ndarray:
    """``x`` (float32) rounded as a GEMM operand of ``precision``, as float32."""
    check_precision(precision)
    x = np.asarray(x, dtype=np.float32)
    if precision == "tf32":
        return round_tf32(x)
    if precision == "bf16":
        return bf16_from_bits(bf16_bits(x)).reshape(x.shape)
    return x


def matmul(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """a @ b with both operands rounded to ``precision`` and the products accumulated in fp32
    (NumPy's float32 matmul)."""
    return round_operand(a, precision) @ round_operand(b, precision)


def gemm_error_bound(a: np.ndarray, b: np.ndarray, precision: str, exact: bool) -> np.ndarray:
    """Elementwise bound on |C − a @ b| for C computed in ``precision``:

    - ``exact=False``: against ``matmul(a, b, precision)`` (same rounded operands): only the
      fp32 summation order differs; each of the two sums of K terms is within γ_K Σ|a_k b_k|
      of the exact sum of the rounded products (γ_K = K u₃₂ / (1 − K u₃₂), Higham, Accuracy
      and Stability of Numerical Algorithms, §3.1), so |C − ref| ≤ 2 γ_K Σ|a_k b_k|.
    - ``exact=True``: against the float64 product of the unrounded operands: each rounded
      product is within (2u + u²)|a_k b_k| of the exact one (u the precision's unit roundoff),
      then the fp32 summation adds γ_K: |C − ab| ≤ (2u + u² + γ_K) Σ|a_k b_k|.
    """
    check_precision(precision)
    k = a.shape[-1]
    u32, u = UNIT_ROUNDOFF["fp32"], UNIT_ROUNDOFF[precision]
    gamma = k * u32 / (1 - k * u32)
    magnitude = np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))
    factor = (2 * u + u * u + gamma) if exact else 2 * gamma
    # + the smallest normal float32, so that an all-zero row/column still compares exactly.
    return factor * magnitude + np.finfo(np.float32).tiny
