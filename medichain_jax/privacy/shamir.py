"""Shamir t-of-n secret sharing of byte strings over GF(q), q = 2**127 - 1.

Shamir 1979, "How to Share a Secret", CACM 22(11): a secret is the constant term of a random
polynomial of degree t - 1; share ``i`` is its value at ``x = i`` (client ids 1..n, never 0) and
any t shares give it back by Lagrange interpolation at 0, while t - 1 shares say nothing about
it. Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS) shares each client's self-mask seed and mask key
this way.

Encoding: an m-byte secret becomes the field elements ``[m, c_1, ..., c_k]``, k = ceil(m / 15),
``c_j`` the big-endian integer of the j-th 15-byte chunk (the last may be shorter). Chunks are
15 bytes because 16 bytes can exceed q (2**128 > q); the length element makes every length,
empty and trailing zero bytes included, decode exactly. Each element gets its own polynomial.

Randomness: the coefficients come from SHA-256 in counter mode over the caller's ``seed`` (with
the threshold and a domain label), 127-bit words with rejection of the single value q, so they
are exactly uniform on GF(q). The seed must be secret and used for one secret only; nothing
here reads OS randomness.

Integrity: with more than t shares, :func:`combine` checks that every share lies on the
polynomial of the first t (by id) and raises :class:`ShamirError` otherwise, so one tampered
share is detected. With exactly t shares tampering cannot be detected: the result is a wrong
secret, or a :class:`ShamirError` when the wrong elements do not decode to bytes.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Q = 2**127 - 1
CHUNK_BYTES = 15
ELEMENT_BYTES = 16  # wire size of one share value
_LABEL = b"medichain/shamir/v1/coefficients"
_MIN_SEED_BYTES = 16


class ShamirError(ValueError):
    """Shares that cannot be combined: too few, mismatched, inconsistent or undecodable."""


@dataclass(frozen=True)
class Share:
    """One holder's share: the polynomials' values at ``x = id`` (one per encoded element)."""

    id: int
    threshold: int
    values: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the values take on the wire (16 per element; id and framing not counted)."""
        return ELEMENT_BYTES * len(self.values)


def encode(secret: bytes) -> list[int]:
    """The field elements ``[len, chunk_1, ...]`` of a byte string (15-byte big-endian chunks)."""
    data = bytes(secret)
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    return [len(data)] + [int.from_bytes(c, "big") for c in chunks]


def decode(elements: Sequence[int]) -> bytes:
    """Inverse of :func:`encode`; raises :class:`ShamirError` on elements no secret encodes to."""
    if not elements:
        raise ShamirError("no elements to decode")
    length, chunks = elements[0], elements[1:]
    if length < 0 or -(-length // CHUNK_BYTES) != len(chunks):
        raise ShamirError(
            f"shares do not decode: length element {length} does not fit {len(chunks)} chunk(s)"
        )
    out = bytearray()
    for j, c in enumerate(chunks):
        size = min(CHUNK_BYTES, length - j * CHUNK_BYTES)
        if not 0 <= c < 256**size:
            raise ShamirError(f"shares do not decode: chunk {j} does not fit {size} byte(s)")
        out += c.to_bytes(size, "big")
    return bytes(out)


def _coefficients(seed: bytes, threshold: int, count: int) -> list[int]:
    """``count`` uniform elements of GF(q) from SHA-256 in counter mode (rejection sampling)."""
    prefix = _LABEL + len(seed).to_bytes(4, "big") + seed + threshold.to_bytes(4, "big")
    out: list[int] = []
    counter = 0
    while len(out) < count:
        block = hashlib.sha256(prefix + counter.to_bytes(8, "big")).digest()
        counter += 1
        for half in (block[:16], block[16:]):
            value = int.from_bytes(half, "big") & Q  # 127 bits; only q itself is rejected
            if value != Q and len(out) < count:
                out.append(value)
    return out


def _check_ids(ids: Sequence[int]) -> None:
    """Share ids must be distinct integers in [1, q)."""
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 < i < Q:
            raise ValueError(f"share ids must be integers in [1, q), got {i!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"share ids must be distinct, got {sorted(ids)}")


def split(secret: bytes, threshold: int, share_ids: Sequence[int], seed: bytes) -> dict[int, Share]:
    """Shares of ``secret`` for ``share_ids``, any ``threshold`` of which recover it."""
    ids = list(share_ids)
    _check_ids(ids)
    threshold = operator.index(threshold)
    if not 1 <= threshold <= len(ids):
        raise ValueError(
            f"threshold must be in [1, {len(ids)}] for {len(ids)} shares, got {threshold}"
        )
    if len(seed) < _MIN_SEED_BYTES:
        raise ValueError(f"seed must have at least {_MIN_SEED_BYTES} bytes, got {len(seed)}")
    elements = encode(secret)
    coeffs = _coefficients(bytes(seed), threshold, len(elements) * (threshold - 1))
    polys = [
        [e] + coeffs[k * (threshold - 1) : (k + 1) * (threshold - 1)]
        for k, e in enumerate(elements)
    ]
    shares = {}
    for i in ids:
        values = []
        for poly in polys:
            acc = 0
            for c in reversed(poly):  # Horner
                acc = (acc * i + c) % Q
            values.append(acc)
        shares[i] = Share(i, threshold, tuple(values))
    return shares


def _lagrange_at(x: int, xs: Sequence[int]) -> list[int]:
    """Weights ``w_k`` with ``f(x) = sum_k w_k f(xs[k])`` for any f of degree < len(xs)."""
    weights = []
    for k, xk in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != k:
                num = num * (x - xm) % Q
                den = den * (xk - xm) % Q
        weights.append(num * pow(den, -1, Q) % Q)
    return weights


def combine(shares: Iterable[Share] | Mapping[int, Share]) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    given = list(shares.values() if isinstance(shares, Mapping) else shares)
    if not given:
        raise ShamirError("no shares given")
    threshold, width = given[0].threshold, len(given[0].values)
    for s in given:
        if s.threshold != threshold or len(s.values) != width:
            raise ShamirError(
                f"shares of different secrets: share {s.id} has threshold {s.threshold} and "
                f"{len(s.values)} values, share {given[0].id} has {threshold} and {width}"
            )
        if any(not 0 <= v < Q for v in s.values):
            raise ShamirError(f"share {s.id} holds a value outside GF(q)")
    ids = [s.id for s in given]
    try:
        _check_ids(ids)
    except ValueError as err:
        raise ShamirError(str(err)) from None
    if len(given) < threshold:
        raise ShamirError(
            f"need at least {threshold} shares to reconstruct the secret, got {len(given)}"
        )
    given.sort(key=lambda s: s.id)
    base, extra = given[:threshold], given[threshold:]
    xs = [s.id for s in base]
    at_zero = _lagrange_at(0, xs)
    elements = [
        sum(w * s.values[k] for w, s in zip(at_zero, base, strict=True)) % Q for k in range(width)
    ]
    for s in extra:
        weights = _lagrange_at(s.id, xs)
        for k in range(width):
            if sum(w * b.values[k] for w, b in zip(weights, base, strict=True)) % Q != s.values[k]:
                raise ShamirError(
                    f"inconsistent shares: share {s.id} does not lie on the polynomial of shares "
                    f"{xs} (a share was altered or belongs to another secret)"
                )
    return decode(elements)
