"""Independent numpy references: float64 values of stored tensors, and a numpy emulation of the
engine's fp32 recipe. Shared by the tests and the benchmarks."""

from __future__ import annotations

import ml_dtypes
import numpy as np

FORMATS = {  # exponent bits, mantissa bits, finite-only (no inf: overflow -> NaN)
    "F16": (5, 10, False),
    "BF16": (8, 7, False),
    "F8_E4M3": (4, 3, True),
    "F8_E5M2": (5, 2, False),
}
BITS_DTYPE = {"F16": np.uint16, "BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}
ML = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bytes (uint8) -> exact float64 values, through numpy / ml_dtypes."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float64)
    if dtype == "F32":
        return raw.view(np.float32).astype(np.float64)
    if dtype == "F64":
        return raw.view(np.float64).copy()
    return raw.view(ML[dtype]).astype(np.float64)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 (or float32) values -> stored bits, rounded to nearest even, as raw uint8."""
    x = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return _encode(x, dtype)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F64":
        return x.astype(np.float64).view(np.uint8)
    if dtype == "F32":
        return x.astype(np.float32).view(np.uint8)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint8)  # numpy: direct, correctly rounded
    return round_minifloat(x.astype(np.float64), dtype).view(np.uint8)


def round_minifloat(x: np.ndarray, dtype: str) -> np.ndarray:
    """Correctly rounded (RNE) bits of float64 ``x`` in a small float format, vectorised."""
    e_bits, m_bits, finite_only = FORMATS[dtype]
    bias = (1 << (e_bits - 1)) - 1
    top = (1 << e_bits) - 1
    nan_bits = (top << m_bits) | (((1 << m_bits) - 1) if finite_only else (1 << (m_bits - 1)))
    over_bits = nan_bits if finite_only else top << m_bits
    sign = np.signbit(x).astype(np.int64) << (e_bits + m_bits)
    a = np.abs(x)
    with np.errstate(all="ignore"):
        _, ex = np.frexp(a)
        q = np.maximum(ex - 1, 1 - bias) - m_bits
        r = np.rint(np.ldexp(a, -q))
        carry = r >= (1 << (m_bits + 1))
        r = np.where(carry, r / 2, r)
        q = q + carry
        ri = np.where(np.isfinite(r), r, 0).astype(np.int64)
    sub = ri < (1 << m_bits)
    ef = q + m_bits + bias
    man = ri - (1 << m_bits)
    limit = top if finite_only else top - 1
    overflow = (ef > limit) | (finite_only & (ef == limit) & (man == (1 << m_bits) - 1))
    bits = np.where(sub, ri, (ef << m_bits) | man)
    bits = np.where(~sub & overflow, over_bits, bits)
    bits = np.where(np.isinf(a), over_bits, bits)
    bits = np.where(np.isnan(a), nan_bits, bits)
    bits = np.where(a == 0, 0, bits)
    return (bits | sign).astype(BITS_DTYPE[dtype])


def emulate_mean(raws: list[tuple[np.ndarray, str]], out_dtype: str, weights=None, accumulate="f32") -> np.ndarray:
    """The engine's recipe in numpy: returns the output's raw bytes."""
    xs = [decode(r, d) for r, d in raws]
    n = len(xs)
    if accumulate == "f32":
        acc = np.full(xs[0].shape, -0.0, np.float32)  # -0.0: addition's identity, as the engine
        for i, x in enumerate(xs):
            x32 = x.astype(np.float32)
            acc = acc + x32 if weights is None else acc + np.float32(weights[i]) * x32
        if weights is None:
            acc = acc / np.float32(n)
        return encode(acc, out_dtype)
    acc = np.full(xs[0].shape, -0.0, np.float64)
    for i, x in enumerate(xs):
        acc = acc + x if weights is None else acc + np.float64(weights[i]) * x
    if weights is None:
        acc = acc / np.float64(n)
    return encode(acc, out_dtype)


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of ``dtype`` at |x| (its subnormal spacing below the normal range)."""
    if dtype in ("F32", "F64"):
        return np.spacing(np.abs(x).astype(np.float32 if dtype == "F32" else np.float64)).astype(np.float64)
    e_bits, m_bits, _ = FORMATS[dtype]
    bias = (1 << (e_bits - 1)) - 1
    _, ex = np.frexp(np.abs(x))
    return np.ldexp(1.0, np.maximum(ex - 1, 1 - bias) - m_bits)
