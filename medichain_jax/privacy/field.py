"""The prime field GF(p), p = 2**31 - 1, and the fixed-point quantization secure aggregation needs.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS) sums masked integer vectors modulo a public number, so float updates are
first mapped to field elements. Here the field is GF(p) with the Mersenne prime p = 2**31 - 1:
elements fit ``uint32`` and the sum of two of them is below 2**32, so every operation below runs
in JAX without 64-bit mode and gives exactly what the NumPy twin gives.

Quantization of ``n`` clients' values with a per-coordinate ``bound``: clip to [-bound, bound],
scale by ``L / bound`` with ``L = (p - 1) // (2 n)`` and round to the nearest integer (ties away
from zero), so a sum of ``n`` values stays in [-(p - 1) / 2, (p - 1) / 2] and never wraps;
negative ``v`` is stored as ``p - v``. ``bound`` is read as a float32 (it may be a traced value).

Inputs are read as float32 (the simulator's dtype). The rounding is exact (the result is within
half a step of the float32 input, up to ~2**-20 of a step) although JAX works in float32: the
scale ``L / bound`` is carried as a float32 pair (error-free TwoSum, Knuth; Sum2 of Ogita, Rump
& Oishi 2005) and ``|x| * scale`` is summed from products of 12-bit halves (Dekker 1971), which
float32 holds exactly, split into integer parts (summed in int32) and fractions. Every
multiplication is exact, so a fused multiply-add cannot change a result, and NumPy and JAX (jit
or not) agree bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PRIME = 2**31 - 1
HALF = PRIME // 2  # field elements above this are negative numbers
MAX_ROWS = 2**15  # jax field_sum adds 16-bit halves in uint32: at most this many rows
_HIGH12 = 0xFFFFF000  # float32 bits that keep sign, exponent and the top 12 significant bits
_MIN_BOUND, _MAX_BOUND = 2.0**-60, 2.0**60
_NEGLIGIBLE = 2.0**-40  # |x| below bound * this quantizes to 0 (|x| * L / bound < 2**-10)

Array = np.ndarray | jax.Array


def _xp(*arrays: object):
    """jax.numpy when any argument is a jax array (or tracer), else numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def levels(num_clients: int) -> int:
    """``L = (p - 1) // (2 n)``: the largest magnitude a quantized value of one of n clients takes."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise TypeError(f"num_clients must be an int, got {type(num_clients).__name__}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    big = (PRIME - 1) // (2 * int(num_clients))
    if big < 1:
        raise ValueError(f"num_clients={num_clients} leaves no quantization levels in GF({PRIME})")
    return big


def _check_bound(bound: float | Array) -> None:
    """Reject a concrete bound that is not a positive finite float32 in [2**-60, 2**60]."""
    if isinstance(bound, jax.Array):  # possibly traced: the caller guarantees the range
        return
    b = float(np.float32(bound))
    if not _MIN_BOUND <= b <= _MAX_BOUND:
        raise ValueError(f"bound must be a finite float in [2**-60, 2**60], got {bound!r}")


def quantization_step(bound: float, num_clients: int) -> float:
    """The value of one quantization level, ``float32(bound) / L``."""
    _check_bound(bound)
    return float(np.float32(bound)) / levels(num_clients)


def _split(xp, v):
    """Split float32 ``v`` into ``(hi, lo)``, ``hi + lo == v`` exactly, each of <= 12 bits."""
    if xp is np:
        bits = np.asarray(v, np.float32).view(np.uint32) & np.uint32(_HIGH12)
        hi = np.asarray(bits, np.uint32).view(np.float32)
    else:
        bits = lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(_HIGH12)
        hi = lax.bitcast_convert_type(bits, jnp.float32)
    return hi, v - hi


def _two_sum(a, b):
    """Knuth's error-free sum: ``s + e == a + b`` exactly, ``s = fl(a + b)``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _scale_pair(xp, bound32, big: int):
    """``L / bound`` as float32 ``(hi, lo)`` with relative error about 2**-43."""
    shift = max(0, big.bit_length() - 24)
    top = (big >> shift) << shift  # L = top + rest, both exact in float32
    ratio = xp.float32(float(np.float32(big))) / bound32
    r_hi, r_lo = _split(xp, ratio)
    b_hi, b_lo = _split(xp, bound32)
    # residual L - ratio * bound from exact products, summed with TwoSum (Ogita-Rump-Oishi Sum2)
    total, err = _two_sum(xp.float32(top), -(r_hi * b_hi))
    for term in (xp.float32(big - top), -(r_hi * b_lo), -(r_lo * b_hi), -(r_lo * b_lo)):
        total, e = _two_sum(total, term)
        err = err + e
    return ratio, (total + err) / bound32


def quantize(x: Array, bound: float | Array, num_clients: int) -> Array:
    """Clip ``x`` to [-bound, bound] and map it to GF(p) as round(x * L / bound) (uint32)."""
    xp = _xp(x, bound)
    _check_bound(bound)
    big = levels(num_clients)
    f32 = xp.float32
    bound32 = xp.asarray(bound, dtype=xp.float32)
    v = xp.asarray(x, dtype=xp.float32)
    v = xp.where(xp.isnan(v), f32(0), v)
    negative = v < 0
    a = xp.minimum(xp.abs(v), bound32)
    a = xp.where(a < bound32 * f32(_NEGLIGIBLE), f32(0), a)
    ratio, ratio_lo = _scale_pair(xp, bound32, big)
    a_hi, a_lo = _split(xp, a)
    r_hi, r_lo = _split(xp, ratio)
    c_hi, c_lo = _split(xp, ratio_lo)
    whole = xp.zeros(a.shape, xp.int32)
    frac = xp.zeros(a.shape, xp.float32)
    for w in (r_hi, r_lo, c_hi, c_lo):
        for u in (a_hi, a_lo):
            prod = u * w  # exact: both factors have <= 12 significant bits
            floor = xp.floor(prod)
            whole = whole + floor.astype(xp.int32)
            frac = frac + (prod - floor)
    magnitude = whole + xp.floor(frac + f32(0.5)).astype(xp.int32)
    magnitude = xp.clip(magnitude, 0, big)
    out = xp.where(negative & (magnitude > 0), PRIME - magnitude, magnitude)
    return out.astype(xp.uint32)


def to_signed(s: Array) -> Array:
    """Field elements as signed integers in [-(p - 1) / 2, (p - 1) / 2] (int64 numpy, int32 jax)."""
    xp = _xp(s)
    s = xp.asarray(s, dtype=xp.uint32)
    signed = s.astype(np.int64 if xp is np else jnp.int32)
    return xp.where(s > HALF, signed - PRIME, signed)


def dequantize(s: Array, bound: float | Array, num_clients: int) -> Array:
    """Map a field sum of quantized values back to floats: signed(s) * float32(bound) / L.

    NumPy returns float64 (exact to 2**-52 relative), JAX float32 (to about 2**-23)."""
    xp = _xp(s, bound)
    _check_bound(bound)
    big = levels(num_clients)
    signed = to_signed(s)
    if xp is np:
        return signed * (float(np.float32(bound)) / big)
    step = jnp.asarray(bound, jnp.float32) / jnp.float32(float(np.float32(big)))
    return signed.astype(jnp.float32) * step


def _reduce(xp, v):
    """``v mod p`` for uint32 ``v`` (any value below 2**32), using 2**31 = 1 (mod p)."""
    r = (v & xp.uint32(PRIME)) + (v >> xp.uint32(31))
    return r - xp.where(r >= PRIME, xp.uint32(PRIME), xp.uint32(0))


def field_add(a: Array, b: Array) -> Array:
    """``(a + b) mod p`` of field elements (uint32; the sum never overflows)."""
    xp = _xp(a, b)
    s = xp.asarray(a, dtype=xp.uint32) + xp.asarray(b, dtype=xp.uint32)
    return s - xp.where(s >= PRIME, xp.uint32(PRIME), xp.uint32(0))


def field_neg(a: Array) -> Array:
    """``-a mod p`` of field elements (uint32)."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=xp.uint32)
    return xp.where(a == 0, xp.uint32(0), xp.uint32(PRIME) - a)


def field_sub(a: Array, b: Array) -> Array:
    """``(a - b) mod p`` of field elements (uint32)."""
    return field_add(a, field_neg(b))


def field_sum(stack: Array, axis: int = 0) -> Array:
    """Exact ``sum mod p`` of field elements along ``axis`` (uint32).

    NumPy sums in uint64; JAX sums the 16-bit halves in uint32 (exact for up to ``MAX_ROWS``
    rows, any order, so it shards) and folds them with 2**31 = 1 (mod p)."""
    xp = _xp(stack)
    if xp is np:
        total = np.asarray(stack, np.uint32).astype(np.uint64).sum(axis=axis)
        return (total % np.uint64(PRIME)).astype(np.uint32)
    stack = jnp.asarray(stack, jnp.uint32)
    if stack.shape[axis] > MAX_ROWS:
        raise ValueError(f"field_sum adds at most {MAX_ROWS} rows at once, got {stack.shape[axis]}")
    lo = jnp.sum(stack & jnp.uint32(0xFFFF), axis=axis, dtype=jnp.uint32)  # < 2**31
    hi = jnp.sum(stack >> jnp.uint32(16), axis=axis, dtype=jnp.uint32)  # < 2**30
    # hi * 2**16 = (hi >> 15) * 2**31 + (hi & 0x7FFF) * 2**16 = (hi >> 15) + (hi & 0x7FFF) << 16
    hi_mod = (hi >> jnp.uint32(15)) + ((hi & jnp.uint32(0x7FFF)) << jnp.uint32(16))
    return field_add(_reduce(jnp, lo), _reduce(jnp, hi_mod))
