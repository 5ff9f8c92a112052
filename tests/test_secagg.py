"""Secure aggregation: GF(p) quantization, Shamir sharing and the Bonawitz et al. protocol.

Every check compares against an independent reference (Python integers, Fractions, plain numpy
sums) rather than against the code under test."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from medichain_jax.privacy import secagg, shamir
from medichain_jax.privacy.field import (
    HALF,
    PRIME,
    dequantize,
    field_add,
    field_neg,
    field_sub,
    field_sum,
    levels,
    quantization_step,
    quantize,
    to_signed,
)
from medichain_jax.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    check_threshold,
    emulate_round,
    pairwise_seed,
    prg_field,
    self_mask,
    unmask,
    unmask_request,
)
from medichain_jax.privacy.shamir import Q, ShamirError, Share, combine, decode, encode, split

SEED = b"medichain-secagg-test-seed-32byt"
L10 = 107_374_182  # num_clients with L = 10, so bound 1 gives a step of 0.1


# ----------------------------------------------------------------------------- references


def ref_quantize(x: np.ndarray, bound: float, n: int) -> list[int]:
    """Exact rational round-half-away-from-zero of clip(x) * L / bound, as signed ints."""
    big, b = levels(n), Fraction(float(np.float32(bound)))
    out = []
    for v in np.asarray(x, np.float32).astype(np.float64):
        if math.isnan(v):
            out.append(0)
            continue
        f = max(-b, min(b, Fraction(v) if math.isfinite(v) else math.copysign(1, v) * b))
        mag = min(math.floor(abs(f) * big / b + Fraction(1, 2)), big)
        out.append(mag if f >= 0 else -mag)
    return out


def ref_field_sum(rows: np.ndarray) -> np.ndarray:
    """Sum mod p with Python integers."""
    rows = np.asarray(rows)
    return np.array(
        [sum(int(v) for v in rows[:, k]) % PRIME for k in range(rows.shape[1])], np.uint32
    )


def quantized_inputs(n: int, d: int, bound: float = 1.0, seed: int = 0):
    """Floats of n clients and their quantization (numpy)."""
    floats = np.random.default_rng(seed).normal(0, bound / 2, (n, d)).astype(np.float32)
    return floats, quantize(floats, bound, n)


# ------------------------------------------------------------------------------- field


def test_levels_and_step_by_hand():
    assert levels(1) == 2**30 - 1
    assert levels(2) == (2**31 - 2) // 4
    assert levels(L10) == 10
    assert quantization_step(1.0, L10) == pytest.approx(0.1, rel=1e-15)
    assert quantization_step(0.5, 1) == 0.5 / (2**30 - 1)
    for bad in (0, -3):
        with pytest.raises(ValueError):
            levels(bad)
    with pytest.raises(ValueError, match="bound"):
        quantize(np.zeros(3, np.float32), 0.0, 2)
    with pytest.raises(ValueError, match="bound"):
        quantize(np.zeros(3, np.float32), float("nan"), 2)


def test_quantize_hand_example():
    # L = 10, bound = 1: x * 10 rounded half away from zero; negatives stored as p - v
    x = np.float32([0.0, 0.25, -0.25, 0.125, 0.75, 2.0, -5.0, 0.0625, -0.0625, np.nan, -0.0])
    want = np.uint32([0, 3, PRIME - 3, 1, 8, 10, PRIME - 10, 1, PRIME - 1, 0, 0])
    for got in (quantize(x, 1.0, L10), quantize(jnp.asarray(x), 1.0, L10)):
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(np.asarray(got), want)
    # one client: L = 2**30 - 1 and 0.5 * L = 536870911.5 is an exact tie, rounded away from 0
    np.testing.assert_array_equal(
        quantize(np.float32([0.5, -0.5, 1.0]), 1.0, 1),
        np.uint32([536870912, PRIME - 536870912, 2**30 - 1]),
    )


def _hard_inputs(bound: float, n: int, rng) -> np.ndarray:
    """Uniform values, values one float32 ulp from a rounding tie, and special values."""
    big = levels(n)
    k = rng.integers(0, big, 300)
    ties = ((k + 0.5) * (bound / big) * rng.choice([-1, 1], 300)).astype(np.float32)
    uniform = (rng.uniform(-1.3, 1.3, 700) * bound).astype(np.float32)
    b32 = np.float32(bound)
    special = np.float32(
        [0, -0.0, b32, -b32, np.nextafter(b32, np.inf), np.inf, -np.inf, np.nan, 1e-38, -1e-30]
    )
    return np.concatenate([ties, uniform, special]).astype(np.float32)


BOUNDS_CLIENTS = [(1.0, 1), (1.0, 3), (0.37, 10), (123.4, 50), (1e-5, 7), (3e7, 2), (0.1, 1000)]


@pytest.mark.parametrize("bound,n", BOUNDS_CLIENTS)
def test_quantize_numpy_and_jax_bit_identical(bound, n):
    x = _hard_inputs(bound, n, np.random.default_rng(n))
    q_np = quantize(x, bound, n)
    q_jax = quantize(jnp.asarray(x), bound, n)
    q_jit = jax.jit(lambda v, b: quantize(v, b, n))(jnp.asarray(x), jnp.float32(bound))
    assert q_np.dtype == q_jax.dtype == q_jit.dtype == np.uint32
    np.testing.assert_array_equal(q_np, np.asarray(q_jax))
    np.testing.assert_array_equal(q_np, np.asarray(q_jit))
    assert int(q_np.max()) < PRIME


@pytest.mark.parametrize("bound,n", BOUNDS_CLIENTS)
def test_quantize_rounds_exactly_and_round_trips_within_half_a_step(bound, n):
    x = _hard_inputs(bound, n, np.random.default_rng(100 + n))
    big, b = levels(n), Fraction(float(np.float32(bound)))
    signed = to_signed(quantize(x, bound, n))
    ref = ref_quantize(x, bound, n)
    clipped = [max(-b, min(b, Fraction(float(v)))) for v in np.nan_to_num(x)]
    for s, r, c in zip(signed, ref, clipped, strict=True):
        exact = c * big / b
        # within half a level of the exact scaled value (2**-16 slack for float32 ties) ...
        assert abs(int(s) - exact) <= Fraction(1, 2) + Fraction(1, 2**16)
        # ... and equal to exact rounding unless the value is that close to a tie
        if abs(abs(exact - math.floor(exact)) - Fraction(1, 2)) > Fraction(1, 2**16):
            assert int(s) == r
    # round trip through numpy dequantize (float64): error <= step / 2 per value
    step = quantization_step(bound, n)
    back = dequantize(quantize(x, bound, n), bound, n)
    assert back.dtype == np.float64
    clip64 = np.clip(np.nan_to_num(x).astype(np.float64), -float(b), float(b))
    assert np.max(np.abs(back - clip64)) <= step * (0.5 + 2**-16)


def test_round_trip_per_client_and_for_the_sum():
    n, d, bound = 7, 500, 0.8
    floats, q = quantized_inputs(n, d, bound)
    step = quantization_step(bound, n)
    clipped = np.clip(
        floats.astype(np.float64), -float(np.float32(bound)), float(np.float32(bound))
    )
    per_client = dequantize(q, bound, n)
    assert np.max(np.abs(per_client - clipped)) <= step / 2 * (1 + 2**-15)
    total = dequantize(field_sum(q), bound, n)
    assert np.max(np.abs(total - clipped.sum(0))) <= n * step / 2 * (1 + 2**-15)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 1000])
def test_sum_of_n_values_at_the_bound_never_wraps(n):
    bound = 2.5
    big = levels(n)
    for sign in (1.0, -1.0):
        x = np.full((n, 4), sign * bound, np.float32)
        x[:, 1] *= 1.5  # beyond the bound: clipped
        x[:, 2] = sign * np.inf
        jitted = jax.jit(quantize, static_argnums=(1, 2))(jnp.asarray(x), bound, n)
        for q in (quantize(x, bound, n), jitted):
            total = field_sum(q, axis=0)
            signed = np.asarray(to_signed(np.asarray(total)))
            np.testing.assert_array_equal(signed[:3], [sign * n * big] * 3)
            assert n * big <= HALF  # the largest sum stays on its side of the field
            np.testing.assert_allclose(
                dequantize(np.asarray(total), bound, n)[:3], sign * n * bound, rtol=1e-12
            )


def test_field_ops_match_python_integers_and_do_not_overflow():
    rng = np.random.default_rng(3)
    rows = rng.integers(PRIME - 1000, PRIME, (300, 64)).astype(np.uint32)  # all near p - 1
    rows[:, :8] = rng.integers(0, PRIME, (300, 8))
    rows[0, 8] = 0
    want = ref_field_sum(rows)
    # a plain uint32 sum wraps here, so the test would catch a naive implementation
    assert not np.array_equal(rows.sum(axis=0, dtype=np.uint32) % PRIME, want)
    np.testing.assert_array_equal(field_sum(rows), want)
    np.testing.assert_array_equal(np.asarray(field_sum(jnp.asarray(rows))), want)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda r: field_sum(r, axis=1))(jnp.asarray(rows.T))), want
    )
    a, b = rows[0], rows[1]
    ai, bi = a.astype(object), b.astype(object)
    for xp_a, xp_b in ((a, b), (jnp.asarray(a), jnp.asarray(b))):
        np.testing.assert_array_equal(np.asarray(field_add(xp_a, xp_b)), (ai + bi) % PRIME)
        np.testing.assert_array_equal(np.asarray(field_sub(xp_a, xp_b)), (ai - bi) % PRIME)
        np.testing.assert_array_equal(np.asarray(field_neg(xp_a)), (-ai) % PRIME)
        assert np.asarray(field_add(xp_a, xp_b)).dtype == np.uint32


def test_dequantize_jax_float32_matches_numpy():
    _, q = quantized_inputs(5, 300, bound=3.0)
    total = field_sum(q)
    want = dequantize(total, 3.0, 5)
    got = dequantize(jnp.asarray(total), jnp.float32(3.0), 5)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2**-22, atol=1e-30)


# ------------------------------------------------------------------------------ Shamir


SECRETS = [b"", b"\x00", b"\x07" * 14, bytes(15), bytes(range(16)), b"\xff" * 31, bytes(32)]
SECRETS += [bytes(range(1, 33)), b"\x00" + b"\xff" * 32, bytes(range(100))]


def test_shamir_any_t_of_n_recover_and_t_minus_1_fail():
    n, t = 7, 4
    rng = np.random.default_rng(0)
    shares = split(SECRETS[7], t, range(1, n + 1), SEED)
    for subset in itertools.combinations(range(1, n + 1), t):
        assert combine([shares[i] for i in subset]) == SECRETS[7]
    for subset in itertools.combinations(range(1, n + 1), t - 1):
        with pytest.raises(ShamirError, match="need at least 4 shares"):
            combine([shares[i] for i in subset])
    for k, secret in enumerate(SECRETS):
        shares = split(secret, t, range(1, n + 1), SEED + bytes([k]))
        for size in (t, t + 1, n):
            pick = rng.choice(np.arange(1, n + 1), size, replace=False)
            assert combine({int(i): shares[int(i)] for i in pick}) == secret
        assert len(shares[1].values) == 1 + math.ceil(len(secret) / 15)


def test_shamir_hand_example():
    assert encode(b"\x05") == [1, 5]
    assert encode(bytes(range(16))) == [16, int.from_bytes(bytes(range(15)), "big"), 15]
    assert decode([3, 0x010203]) == b"\x01\x02\x03"
    assert decode([2, 1]) == b"\x00\x01"  # leading zero bytes survive
    # secret b"\x05" = [1, 5]; t = 2 with f_len(x) = 1 + 7 x and f_chunk(x) = 5 - x (mod q)
    hand = {i: Share(i, 2, (1 + 7 * i, (5 - i) % Q)) for i in (1, 2, 3)}
    assert hand[1].values == (8, 4) and hand[3].values == (22, 2)
    for pair in itertools.combinations(hand.values(), 2):
        assert combine(pair) == b"\x05"
    assert combine(hand) == b"\x05"  # three consistent shares
    # split: shares of a degree-1 polynomial are collinear, and no share is the secret
    made = split(b"\x05", 2, [1, 2, 3], SEED)
    for k in range(2):
        f1, f2, f3 = (made[i].values[k] for i in (1, 2, 3))
        assert (2 * f2 - f1 - f3) % Q == 0
        assert (f1, f2, f3) != (encode(b"\x05")[k],) * 3


def test_shamir_is_deterministic_in_its_seed():
    a = split(bytes(32), 3, [1, 2, 3, 4], SEED)
    assert a == split(bytes(32), 3, [1, 2, 3, 4], SEED)
    b = split(bytes(32), 3, [1, 2, 3, 4], SEED[:-1] + b"!")
    assert all(a[i].values != b[i].values for i in a)
    assert combine(b) == combine(a) == bytes(32)


def test_shamir_tampering():
    """Documented behaviour: with more than t shares one altered share is always detected
    (ShamirError, "inconsistent"); with exactly t it is not - an attacker who knows the
    Lagrange weight shifts the secret at will, a random change gives a wrong secret or a
    decode error."""
    n, t = 6, 3
    secret = bytes(range(1, 31)) + b"\x00\x00"  # 32 bytes: last chunk is 2 bytes ending in 0
    shares = split(secret, t, range(1, n + 1), SEED)
    for victim in range(1, n + 1):
        for element in range(len(shares[victim].values)):
            values = list(shares[victim].values)
            values[element] = (values[element] + 12345) % Q
            bad = dict(shares)
            bad[victim] = Share(victim, t, tuple(values))
            with pytest.raises(ShamirError, match="inconsistent shares"):
                combine(bad)
    # exactly t shares: shift the last chunk by +1 through share 2 (weight w of x=2 at 0)
    ids = [1, 2, 3]
    w = shamir._lagrange_at(0, ids)[1]
    values = list(shares[2].values)
    values[-1] = (values[-1] + pow(w, -1, Q)) % Q
    forged = combine([shares[1], Share(2, t, tuple(values)), shares[3]])
    assert forged == secret[:-1] + b"\x01"
    # a random change of the length element does not decode
    values = list(shares[2].values)
    values[0] = (values[0] + 99) % Q
    with pytest.raises(ShamirError, match="do not decode"):
        combine([shares[1], Share(2, t, tuple(values)), shares[3]])


def test_shamir_rejects_bad_input():
    with pytest.raises(ValueError, match="ids"):
        split(b"x", 2, [0, 1, 2], SEED)
    with pytest.raises(ValueError, match="distinct"):
        split(b"x", 2, [1, 1, 2], SEED)
    with pytest.raises(ValueError, match="threshold"):
        split(b"x", 4, [1, 2, 3], SEED)
    with pytest.raises(ValueError, match="seed"):
        split(b"x", 2, [1, 2, 3], b"short")
    one = split(b"abc", 2, [1, 2, 3], SEED)
    other = split(b"abc", 3, [1, 2, 3], SEED)
    with pytest.raises(ShamirError, match="different secrets"):
        combine([one[1], other[2], other[3]])
    with pytest.raises(ShamirError, match="distinct"):
        combine([one[1], one[1]])
    with pytest.raises(ShamirError, match="no shares"):
        combine([])


# ------------------------------------------------------------------------------ SecAgg


def signed_int_sum(q: np.ndarray) -> np.ndarray:
    """Sum of the quantized values as signed integers (int64), an independent reference."""
    q = q.astype(np.int64)
    return np.where(q > HALF, q - PRIME, q).sum(axis=0)


@pytest.mark.parametrize("n,d", [(2, 1000), (3, 700), (5, 500), (10, 300), (50, 100)])
def test_unmasked_sum_equals_plain_field_sum(n, d):
    bound = 1.5
    floats, q = quantized_inputs(n, d, bound, seed=n)
    res = emulate_round(q, n // 2 + 1, set(), round=3, seed=SEED)
    assert res.sum.dtype == np.uint32 and res.sum.shape == (d,)
    assert res.survivors == tuple(range(1, n + 1)) and res.dropped == ()
    np.testing.assert_array_equal(res.sum, ref_field_sum(q))
    np.testing.assert_array_equal(to_signed(res.sum), signed_int_sum(q))
    step = quantization_step(bound, n)
    np.testing.assert_array_equal(dequantize(res.sum, bound, n), signed_int_sum(q) * step)
    clipped = np.clip(floats.astype(np.float64), -bound, bound).sum(0)
    assert np.max(np.abs(dequantize(res.sum, bound, n) - clipped)) <= n * step / 2 * (1 + 1e-6)


@pytest.mark.parametrize(
    "n,t,dropped",
    [
        (3, 2, {2}),
        (5, 3, {1, 5}),
        (10, 6, {1}),
        (10, 6, {3, 7, 10}),
        (10, 6, {1, 2, 3, 4}),
        (20, 11, set(range(2, 20, 2))),  # n - t = 9 dropouts
    ],
)
def test_dropouts_after_key_sharing_recover_the_survivors_sum(n, t, dropped):
    _, q = quantized_inputs(n, 200, seed=n + len(dropped))
    res = emulate_round(q, t, dropped, round=11, seed=SEED)
    alive = [i for i in range(1, n + 1) if i not in dropped]
    assert res.survivors == tuple(alive) and res.dropped == tuple(sorted(dropped))
    np.testing.assert_array_equal(res.sum, ref_field_sum(q[[i - 1 for i in alive]]))
    assert not np.array_equal(res.sum, ref_field_sum(q))  # the dropped inputs are not in it


def test_survivors_that_do_not_answer_the_unmasking_request_still_count():
    n, t = 10, 6
    _, q = quantized_inputs(n, 150, seed=4)
    res = emulate_round(q, t, {1, 2}, round=0, seed=SEED, dropped_before_unmask={3, 4})
    assert res.responders == (5, 6, 7, 8, 9, 10)
    np.testing.assert_array_equal(res.sum, ref_field_sum(q[2:]))
    with pytest.raises(SecAggAbort, match="only 5 survivors sent their shares.*t = 6"):
        emulate_round(q, t, {1, 2}, round=0, seed=SEED, dropped_before_unmask={3, 4, 5})


def test_fewer_than_t_survivors_abort_with_a_clear_message():
    n, t = 10, 6
    _, q = quantized_inputs(n, 50)
    emulate_round(q, t, {1, 2, 3, 4}, round=1, seed=SEED)  # 6 survivors: fine
    with pytest.raises(SecAggAbort, match=r"only 5 of 10 clients survived.*threshold t = 6"):
        emulate_round(q, t, {1, 2, 3, 4, 5}, round=1, seed=SEED)
    with pytest.raises(SecAggAbort, match=r"only 1 of 2 clients survived.*t = 2"):
        emulate_round(q[:2], 2, {2}, round=1, seed=SEED)
    with pytest.raises(SecAggAbort, match="only 2 of 3"):
        unmask_request([1, 2], [1, 2, 3], 3)


def test_threshold_rules():
    for t, n in ((1, 5), (6, 5), (2, 4), (5, 10), (0, 3)):
        with pytest.raises(ValueError, match="threshold"):
            check_threshold(t, n)
    check_threshold(3, 4)
    check_threshold(2, 2)
    check_threshold(2, 4, allow_weak_threshold=True)
    with pytest.raises(ValueError, match="threshold"):
        check_threshold(1, 4, allow_weak_threshold=True)
    _, q = quantized_inputs(8, 64)
    with pytest.raises(ValueError, match="majority"):
        emulate_round(q, 3, set(), round=0, seed=SEED)
    res = emulate_round(q, 3, {1, 2, 3, 4, 5}, round=0, seed=SEED, allow_weak_threshold=True)
    np.testing.assert_array_equal(res.sum, ref_field_sum(q[5:]))


def make_clients(n: int, rnd: int = 5, threshold: int | None = None):
    """Clients 1..n after AdvertiseKeys and ShareKeys, plus the advertised keys."""
    clients = {
        i: SecAggClient.from_seed(i, secagg.client_seed(SEED, i), rnd) for i in range(1, n + 1)
    }
    keys = {i: c.public_key for i, c in clients.items()}
    for c in clients.values():
        for r, ks in c.shares_for(keys, threshold or n // 2 + 1).items():
            clients[r].receive([ks])
    return clients, keys


def uniformity_pvalue(y: np.ndarray, bins: int = 32) -> float:
    """Chi-square p-value of y against the uniform distribution on [0, p)."""
    counts = np.bincount((y.astype(np.uint64) * bins // PRIME).astype(np.int64), minlength=bins)
    return float(chisquare(counts).pvalue)


@pytest.mark.parametrize("n", [2, 5])
def test_a_single_masked_update_looks_uniform(n):
    d = 20_000
    _, q = quantized_inputs(n, d, bound=1.0, seed=9)
    clients, keys = make_clients(n)
    for i in (1, n):
        y = clients[i].mask(q[i - 1], keys)
        assert y.dtype == np.uint32 and int(y.max()) < PRIME
        assert uniformity_pvalue(y) > 1e-3
        assert uniformity_pvalue(q[i - 1]) < 1e-100  # the input itself is far from uniform


def test_masks_cancel_and_self_masks_are_what_unmasking_removes():
    n, d = 6, 500
    _, q = quantized_inputs(n, d, seed=2)
    clients, keys = make_clients(n)
    zero = np.zeros(d, np.uint32)
    pair_parts = []
    for i, c in clients.items():
        own = self_mask(c.self_seed, c.round, i, d)
        pair = (c.mask(zero, keys).astype(np.int64) - own) % PRIME
        assert np.count_nonzero(pair) > d * 0.99  # each client's pairwise mask is not zero
        pair_parts.append(pair)
    np.testing.assert_array_equal(np.sum(pair_parts, axis=0) % PRIME, 0)  # sum of masks = 0
    # with real inputs the raw sum is still hidden by the self masks ...
    ys = {i: c.mask(q[i - 1], keys) for i, c in clients.items()}
    raw = np.sum([y.astype(np.int64) for y in ys.values()], axis=0) % PRIME
    assert np.count_nonzero(raw != ref_field_sum(q)) > d * 0.99
    # ... and removing them leaves the exact sum
    selfs = sum(self_mask(c.self_seed, c.round, i, d).astype(np.int64) for i, c in clients.items())
    np.testing.assert_array_equal((raw - selfs) % PRIME, ref_field_sum(q))


def test_client_api_round_trip_and_safety_checks():
    n, t, d = 5, 3, 40
    _, q = quantized_inputs(n, d, seed=7)
    clients, keys = make_clients(n, threshold=t)
    ys = {i: clients[i].mask(q[i - 1], keys) for i in (1, 3, 4)}  # 2 and 5 drop
    survivors, dropped = unmask_request(ys, keys, t)
    assert (survivors, dropped) == ({1, 3, 4}, {2, 5})
    reveals = [clients[i].reveal(survivors, dropped) for i in (1, 3, 4)]
    assert set(reveals[0].self_seeds) == {1, 3, 4} and set(reveals[0].mask_keys) == {2, 5}
    total = unmask(ys, reveals, keys, t, round=5)
    np.testing.assert_array_equal(total, ref_field_sum(q[[0, 2, 3]]))
    # a client never reveals both shares of one client, nor answers when it did not survive
    with pytest.raises(ValueError, match="both survivor and dropped"):
        clients[1].reveal({1, 2, 3}, {2, 5})
    with pytest.raises(ValueError, match="not a survivor"):
        clients[2].reveal(survivors, dropped)
    with pytest.raises(SecAggAbort, match="only 2 of 5"):
        clients[1].reveal({1, 3}, {2, 4, 5})
    # the wrong round's masks do not cancel
    assert not np.array_equal(unmask(ys, reveals, keys, t, round=6), total)
    with pytest.raises(SecAggAbort, match="only 2 survivors sent"):
        unmask(ys, reveals[:2], keys, t, round=5)


def _alter(reveal: secagg.Reveal, owner: int, element: int) -> secagg.Reveal:
    """The reveal with one value of its share of ``owner``'s mask key increased by 1."""
    s = reveal.mask_keys[owner]
    values = list(s.values)
    values[element] = (values[element] + 1) % Q
    bad = Share(s.id, s.threshold, tuple(values))
    return secagg.Reveal(reveal.responder, reveal.self_seeds, {**reveal.mask_keys, owner: bad})


def test_altered_shares_of_a_dropped_key_abort_the_round():
    n, t, d = 5, 3, 20
    _, q = quantized_inputs(n, d, seed=8)
    clients, keys = make_clients(n, threshold=t)
    ys = {i: clients[i].mask(q[i - 1], keys) for i in (1, 3, 4, 5)}  # client 2 drops
    survivors, dropped = unmask_request(ys, keys, t)
    reveals = [clients[i].reveal(survivors, dropped) for i in (1, 3, 4, 5)]
    np.testing.assert_array_equal(unmask(ys, reveals, keys, t, 5), ref_field_sum(q[[0, 2, 3, 4]]))
    # t + 1 answers: the altered share is inconsistent with the others
    for element in (0, -1):
        with pytest.raises(SecAggAbort, match="s_2.*inconsistent shares"):
            unmask(ys, [_alter(reveals[0], 2, element)] + reveals[1:], keys, t, 5)
    # exactly t answers (ids 1, 3, 4): share 1 has Lagrange weight 3 * 4 / (2 * 3) = 2 at 0, so
    # +1 on it adds 2 to the rebuilt element - the 32-byte length becomes 34, or the last
    # 2-byte chunk of the key changes; either way the server aborts instead of using it
    with pytest.raises(SecAggAbort, match="mask key of client 2 has 34 bytes, not 32"):
        unmask(ys, [_alter(reveals[0], 2, 0)] + reveals[1:3], keys, t, 5)
    with pytest.raises(SecAggAbort, match="mask key of client 2 does not match its public key"):
        unmask(ys, [_alter(reveals[0], 2, -1)] + reveals[1:3], keys, t, 5)


def test_determinism_and_key_agreement():
    a = SecAggClient.from_seed(1, b"a" * 32, round=4)
    b = SecAggClient.from_seed(2, b"b" * 32, round=4)
    assert a.public_key == SecAggClient.from_seed(1, b"a" * 32, round=4).public_key
    assert a.public_key != SecAggClient.from_seed(1, b"a" * 32, round=5).public_key
    s_ab = pairwise_seed(a.mask_key, b.public_key, 4, 1, 2)
    assert s_ab == pairwise_seed(b.mask_key, a.public_key, 4, 2, 1)
    assert s_ab != pairwise_seed(a.mask_key, b.public_key, 5, 1, 2)
    keys = {1: a.public_key, 2: b.public_key}
    x = np.arange(100, dtype=np.uint32)
    y = a.mask(x, keys)
    np.testing.assert_array_equal(y, SecAggClient.from_seed(1, b"a" * 32, round=4).mask(x, keys))
    a5, b5 = (SecAggClient.from_seed(i, s * 32, round=5) for i, s in ((1, b"a"), (2, b"b")))
    y5 = a5.mask(x, {1: a5.public_key, 2: b5.public_key})
    assert np.count_nonzero(y != y5) > 90
    with pytest.raises(ValueError, match="field elements"):
        a.mask(np.array([PRIME], np.int64), keys)
    with pytest.raises(ValueError, match="integers"):
        a.mask(np.zeros(3, np.float32), keys)
    with pytest.raises(ValueError, match="not its own"):
        a.mask(x, {1: b.public_key, 2: b.public_key})
    kp = secagg.keypair_from_seed(SEED)
    assert kp.public == secagg.keypair_from_seed(SEED).public == secagg.public_bytes(kp.private)


def test_prg_is_uniform_deterministic_and_prefix_stable():
    key = bytes(range(32))
    a = prg_field(key, 50_000)
    assert a.dtype == np.uint32 and int(a.max()) < PRIME
    np.testing.assert_array_equal(a, prg_field(key, 50_000))
    np.testing.assert_array_equal(a[:1234], prg_field(key, 1234))
    assert np.count_nonzero(a == prg_field(bytes(31) + b"\x01", 50_000)) < 5
    assert uniformity_pvalue(a, bins=64) > 1e-3
    with pytest.raises(ValueError, match="32 bytes"):
        prg_field(b"short", 3)


def test_emulation_counts_and_bytes():
    n, d, t = 4, 10, 3
    _, q = quantized_inputs(n, d)
    res = emulate_round(q, t, {4}, round=2, seed=SEED)
    share_pair = 2 * 16 * 4  # b and s: 32 bytes each -> length + 3 chunks of 16-byte values
    reveal = 3 * share_pair // 2 + 1 * share_pair // 2  # b-shares of 3 survivors, s-share of 1
    for i in (1, 2, 3):
        assert res.bytes_sent_per_client[i] == 32 + 3 * share_pair + 4 * d + reveal
    assert res.bytes_sent_per_client[4] == 32 + 3 * share_pair
    assert res.masks_expanded == 3 * 4 + (3 + 1 * 3)  # clients: self + 3 pairs; server
    assert res.key_agreements == 3 * 3 + 3
    assert res.shares_made == 2 * n * n
    assert res.secrets_reconstructed == 4
    again = emulate_round(q, t, {4}, round=2, seed=SEED)
    assert again.bytes_sent_per_client == res.bytes_sent_per_client
    np.testing.assert_array_equal(again.sum, res.sum)
