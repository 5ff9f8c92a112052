"""Secure aggregation phases of a real-mode round over an in-memory ledger: the coordinator's
sum is the simulator's ``secure_sum`` bit for bit, dropouts are recovered, and neither the
coordinator nor a forger gets what it should not."""

from __future__ import annotations

import base64
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calimero_adapter import secagg_rounds as sr
from calimero_adapter.protocol import ProtocolError
from medichain_jax.engine.round import secure_sum
from medichain_jax.privacy.envelope import (
    EnvelopeError,
    derive_shared_key,
    exchange_key_from_seed,
    open_envelope,
    public_key_hex,
    signing_key_from_seed,
)
from medichain_jax.privacy.field import PRIME, quantization_step
from medichain_jax.privacy.secagg import KeyShares, Reveal, SecAggAbort
from medichain_jax.privacy.shamir import Share

RUN = "secagg-test"
RND = 3
BOUND = 64.0  # clip norm 4 x capacity 16, as a simulated round would use
SHAPES = {"conv": {"kernel": (3, 3, 1, 8)}, "dense": {"bias": (7,), "kernel": (40, 7)}}
COORDINATOR = signing_key_from_seed(b"coordinator-signing-seed")


class MemLedger:
    """Dict-backed stand-in for :class:`calimero_adapter.ledger.Ledger` (values go through
    JSON, as they do on a node)."""

    def __init__(self):
        self.data: dict[str, str] = {}

    def set(self, key, value):
        self.data[key] = json.dumps(value, sort_keys=True, separators=(",", ":"))

    def get(self, key):
        raw = self.data.get(key)
        return None if raw is None else json.loads(raw)

    def entries(self, prefix):
        return {k: json.loads(v) for k, v in self.data.items() if k.startswith(prefix)}


def site_name(i):
    return f"hospital-{i}"


def site_keys(i):
    """(Ed25519 signer, X25519 exchange key, SecAgg seed) of hospital i."""
    root = f"hospital-{i}-secret".encode()
    return signing_key_from_seed(root + b"/sign"), exchange_key_from_seed(root), root * 2


def make_site(i):
    signer, exchange, seed = site_keys(i)
    return sr.SiteSecAgg(
        RUN,
        RND,
        site_name(i),
        seed=seed,
        secagg_id=i + 1,
        signer=signer,
        exchange_key=exchange,
        coordinator_key=public_key_hex(COORDINATOR),
    )


def admitted(n):
    return {site_name(i): public_key_hex(site_keys(i)[0]) for i in range(n)}


def make_updates(n, seed=0):
    """Per-site update trees (float32) and integer example-count weights."""
    rng = np.random.default_rng(seed)
    trees = [
        jax.tree.map(
            lambda s: (0.2 * rng.standard_normal(s)).astype(np.float32),
            SHAPES,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        for _ in range(n)
    ]
    weights = rng.integers(3, 17, size=n).astype(np.float32)
    return trees, weights


def by_site(ledger, prefix):
    return sr.by_site(ledger.entries(prefix), prefix)


class Round:
    """Every phase of one round through the ledger; hooks drop or forge between phases."""

    def __init__(self, n, threshold, *, seed=0):
        self.n, self.t = n, threshold
        self.ledger = MemLedger()
        self.blobs: dict[str, bytes] = {}
        self.sites = {site_name(i): make_site(i) for i in range(n)}
        self.coord = sr.CoordinatorSecAgg(RUN, RND, signer=COORDINATOR, admitted=admitted(n))
        self.trees, self.weights = make_updates(n, seed)
        self.template = self.trees[0]
        self.size = sr.flat_size(self.template)
        self.quantized: dict[str, np.ndarray] = {}

    def keys(self, skip=()):
        for name, s in self.sites.items():
            if name not in skip:
                self.ledger.set(sr.keys_key(RUN, RND, name), s.keys_manifest())
        keys = by_site(self.ledger, sr.keys_prefix(RUN, RND))
        manifest = self.coord.advertise(keys, list(self.sites), self.t)
        self.ledger.set(sr.advertised_key(RUN, RND), manifest)

    def shares(self, skip=()):
        advertised = self.ledger.get(sr.advertised_key(RUN, RND))
        for name, s in self.sites.items():
            if name not in skip and name in self.coord.advertised.sites:
                self.ledger.set(sr.shares_key(RUN, RND, name), s.shares_manifest(advertised))
        shares = by_site(self.ledger, sr.shares_prefix(RUN, RND))
        self.ledger.set(sr.relayed_key(RUN, RND), self.coord.relay_manifest(shares))

    def upload(self, skip=()):
        relayed = self.ledger.get(sr.relayed_key(RUN, RND))
        shares = by_site(self.ledger, sr.shares_prefix(RUN, RND))
        chosen = relayed["sites"]
        for i, (name, s) in enumerate(self.sites.items()):
            if name in skip or name not in chosen:
                continue
            s.receive_shares({k: v for k, v in shares.items() if k in chosen})
            x = sr.quantized_update(self.trees[i], self.weights[i], BOUND, self.n)
            self.quantized[name] = x
            self.blobs[name] = sr.encode_masked(s.mask(x, relayed))
        manifest = self.coord.unmask_manifest(self.blobs)
        self.ledger.set(sr.unmask_key(RUN, RND), manifest)

    def reveal(self, skip=()):
        request = self.ledger.get(sr.unmask_key(RUN, RND))
        for name in request["survivors"]:
            if name not in skip:
                manifest = self.sites[name].reveal_manifest(request)
                self.ledger.set(sr.reveal_key(RUN, RND, name), manifest)

    def total(self, coord=None):
        coord = coord or self.coord
        masked = {s: sr.decode_masked(b, self.size) for s, b in self.blobs.items()}
        reveals = by_site(self.ledger, sr.reveal_prefix(RUN, RND))
        return sr.dequantized_sum(coord.unmask(masked, reveals), self.template, BOUND, self.n)

    def run(self):
        self.keys()
        self.shares()
        self.upload()
        self.reveal()
        return self.total()

    def simulated(self, present):
        """``secure_sum`` of the simulator over the whole cohort, absent sites weighted 0."""
        w = np.where(np.asarray(present), self.weights, 0).astype(np.float32)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *self.trees)
        return stacked, jnp.asarray(w), w


def assert_trees_equal(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_all_phases_give_the_simulators_secure_sum_bit_for_bit():
    r = Round(5, 3)
    got = r.run()
    stacked, w, w_np = r.simulated([True] * 5)
    assert_trees_equal(got, secure_sum(stacked, w, BOUND))
    assert_trees_equal(got, jax.jit(secure_sum)(stacked, w, jnp.float32(BOUND)))
    step = quantization_step(BOUND, 5)
    for g, *us in zip(jax.tree.leaves(got), *map(jax.tree.leaves, r.trees), strict=True):
        plain = sum(
            np.float64(wi) * np.asarray(u, np.float64) for wi, u in zip(w_np, us, strict=True)
        )
        err = np.abs(np.asarray(g, np.float64) - plain).max()
        assert err <= 5 * step / 2 + 1e-5 * np.abs(plain).max(), err
        assert err > 0  # quantization really happened (the comparison is not vacuous)


def test_a_site_dropping_after_its_shares_is_unmasked_away():
    r = Round(5, 3, seed=1)
    r.keys()
    r.shares()
    r.upload(skip={site_name(2)})
    request = r.ledger.get(sr.unmask_key(RUN, RND))
    assert request["dropped"] == [site_name(2)]
    assert site_name(2) not in request["survivors"]
    r.reveal()
    # a restarted coordinator picks the round up from its own manifests in the ledger
    fresh = sr.CoordinatorSecAgg(RUN, RND, signer=COORDINATOR, admitted=admitted(5))
    fresh.resume(
        r.ledger.get(sr.advertised_key(RUN, RND)),
        r.ledger.get(sr.relayed_key(RUN, RND)),
        r.ledger.get(sr.unmask_key(RUN, RND)),
    )
    got = r.total(fresh)
    present = [i != 2 for i in range(5)]
    stacked, w, _ = r.simulated(present)
    assert_trees_equal(got, secure_sum(stacked, w, BOUND))
    everyone, w_all, _ = r.simulated([True] * 5)
    full = secure_sum(everyone, w_all, BOUND)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full), strict=True)
    )


def test_a_site_that_never_shares_is_left_out_of_the_masks():
    r = Round(5, 3, seed=2)
    r.keys()
    r.shares(skip={site_name(4)})
    assert r.ledger.get(sr.relayed_key(RUN, RND))["sites"] == [site_name(i) for i in range(4)]
    late = r.sites[site_name(4)]
    late.adopt_advertised(r.ledger.get(sr.advertised_key(RUN, RND)))
    with pytest.raises(sr.Excluded):
        late.mask(np.zeros(r.size, np.uint32), r.ledger.get(sr.relayed_key(RUN, RND)))
    r.upload()
    assert r.ledger.get(sr.unmask_key(RUN, RND))["dropped"] == []
    r.reveal()
    stacked, w, _ = r.simulated([i != 4 for i in range(5)])
    assert_trees_equal(r.total(), secure_sum(stacked, w, BOUND))


def test_below_the_threshold_every_phase_aborts():
    r = Round(4, 3)
    with pytest.raises(SecAggAbort, match="only 2 of 4 cohort sites advertised"):
        r.keys(skip={site_name(0), site_name(1)})

    r = Round(4, 3)
    r.keys()
    r.shares()
    with pytest.raises(SecAggAbort, match="below the threshold t = 3"):
        r.upload(skip={site_name(1), site_name(3)})
    assert r.ledger.get(sr.unmask_key(RUN, RND)) is None

    r = Round(4, 3)
    r.keys()
    r.shares()
    r.upload()
    r.reveal(skip={site_name(0), site_name(2)})
    with pytest.raises(SecAggAbort, match="only 2 valid reveals"):
        r.total()


def test_only_the_addressee_can_open_a_share():
    r = Round(3, 2)
    r.keys()
    r.shares()
    sender, to = site_name(0), site_name(1)
    entry = r.ledger.get(sr.shares_key(RUN, RND, sender))["shares"][to]
    blob = base64.b64decode(entry)
    sender_x = exchange_key_from_seed(f"{sender}-secret".encode()).public_key()
    context = sr.shares_context(RUN, RND)

    def open_with(own_exchange):
        return open_envelope(
            blob,
            key=derive_shared_key(own_exchange, sender_x, context),
            sender_public_key=public_key_hex(site_keys(0)[0]),
            expected_run=RUN,
            expected_round=RND,
            guard=None,
        )

    ks = sr.key_shares_from_json(json.loads(open_with(site_keys(1)[1]).payload))
    assert (ks.owner, ks.recipient) == (1, 2)
    for outsider in (exchange_key_from_seed(b"coordinator-exchange"), site_keys(2)[1]):
        with pytest.raises(EnvelopeError) as err:
            open_with(outsider)
        assert err.value.reason == "decryption_failed"
    # no share value appears in clear anywhere in the ledger
    ledger_text = "".join(r.ledger.data.values())
    assert str(ks.mask_key.values[1]) not in ledger_text
    assert str(ks.self_seed.values[1]) not in ledger_text


def test_forged_manifests_are_rejected():
    r = Round(4, 3)
    forger = site_keys(3)[0]  # an admitted site signing for another
    forged_keys = dict(r.sites[site_name(0)].keys_manifest())
    forged_keys = sr.protocol.make(
        sr.KIND_KEYS,
        forger,
        **{k: v for k, v in forged_keys.items() if k not in {"v", "kind", "signer", "signature"}},
    )
    with pytest.raises(ProtocolError, match="not site hospital-0's admitted key"):
        r.coord.check_keys(site_name(0), forged_keys)
    r.ledger.set(sr.keys_key(RUN, RND, site_name(0)), forged_keys)
    for name in list(r.sites)[1:]:
        r.ledger.set(sr.keys_key(RUN, RND, name), r.sites[name].keys_manifest())
    adv = r.coord.advertise(by_site(r.ledger, sr.keys_prefix(RUN, RND)), list(r.sites), 3)
    assert site_name(0) not in adv["sites"] and site_name(0) in r.coord.rejected

    # an advertised set not signed by the coordinator
    fake = sr.protocol.make(
        sr.KIND_ADVERTISED, forger, run=RUN, round=RND, threshold=3, cohort=[], sites=adv["sites"]
    )
    with pytest.raises(ProtocolError, match="not the coordinator"):
        r.sites[site_name(1)].shares_manifest(fake)

    # a shares manifest re-signed by another site
    real = r.sites[site_name(1)].shares_manifest(adv)
    fields = {k: v for k, v in real.items() if k not in {"v", "kind", "signer", "signature"}}
    forged_shares = sr.protocol.make(sr.KIND_SHARES, forger, **fields)
    site2 = r.sites[site_name(2)]
    site2.shares_manifest(adv)
    with pytest.raises(ProtocolError, match="admitted key"):
        site2.receive_shares({site_name(1): forged_shares})
    with pytest.raises(ProtocolError, match="admitted key"):
        r.coord.check_shares(site_name(1), forged_shares)
    site2.receive_shares({site_name(1): real})  # the genuine one passes

    # a sender's entry for one site copied over its entry for another: the key does not fit
    swapped = dict(fields, shares=dict(fields["shares"]))
    swapped["shares"][site_name(2)] = fields["shares"][site_name(3)]
    swapped = sr.protocol.make(sr.KIND_SHARES, site_keys(1)[0], **swapped)
    with pytest.raises(ProtocolError, match="decryption_failed"):
        site2.receive_shares({site_name(1): swapped})


def test_a_forged_reveal_is_rejected_and_skipped():
    r = Round(4, 3)
    r.keys()
    r.shares()
    r.upload()
    r.reveal()
    key = sr.reveal_key(RUN, RND, site_name(1))
    real = r.ledger.get(key)
    fields = {k: v for k, v in real.items() if k not in {"v", "kind", "signer", "signature"}}
    forged = sr.protocol.make(sr.KIND_REVEAL, site_keys(0)[0], **fields)
    with pytest.raises(ProtocolError, match="admitted key"):
        r.coord.check_reveal(site_name(1), forged)
    r.ledger.set(key, forged)
    got = r.total()  # three genuine reveals remain, t = 3
    assert site_name(1) in r.coord.rejected
    stacked, w, _ = r.simulated([True] * 4)
    assert_trees_equal(got, secure_sum(stacked, w, BOUND))
    r.ledger.set(sr.reveal_key(RUN, RND, site_name(2)), forged)  # now only two
    with pytest.raises(SecAggAbort):
        r.total()


def test_a_site_answers_one_unmasking_request_only():
    r = Round(4, 3)
    r.keys()
    r.shares()
    r.upload()
    r.reveal()
    other = sr.CoordinatorSecAgg(RUN, RND, signer=COORDINATOR, admitted=admitted(4))
    other.resume(r.ledger.get(sr.advertised_key(RUN, RND)), r.ledger.get(sr.relayed_key(RUN, RND)))
    second = other.unmask_manifest([site_name(i) for i in range(3)])  # hospital-3 "dropped"
    with pytest.raises(ProtocolError, match="second, different unmasking request"):
        r.sites[site_name(0)].reveal_manifest(second)
    again = r.sites[site_name(0)].reveal_manifest(r.ledger.get(sr.unmask_key(RUN, RND)))
    assert again == r.ledger.get(sr.reveal_key(RUN, RND, site_name(0)))


def test_a_masked_vector_hides_the_update():
    r = Round(4, 3)
    r.run()
    name = site_name(0)
    x, y = r.quantized[name], sr.decode_masked(r.blobs[name], r.size)
    assert x.shape == y.shape == (r.size,)
    assert np.mean(x == y) < 0.01

    def chi2(v):
        counts = np.bincount((v.astype(np.uint64) * 16 // PRIME).astype(np.int64), minlength=16)
        expected = v.size / 16
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(y) < 40.0  # 15 degrees of freedom: p ~ 5e-4
    assert chi2(x) > 1000.0  # the quantized update itself is far from uniform


def test_the_round_is_deterministic():
    a, b = Round(4, 3), Round(4, 3)
    assert_trees_equal(a.run(), b.run())
    assert a.ledger.data == b.ledger.data and a.blobs == b.blobs
    other_run = sr.SiteSecAgg(
        "another-run",
        RND,
        site_name(0),
        seed=site_keys(0)[2],
        secagg_id=1,
        signer=site_keys(0)[0],
        exchange_key=site_keys(0)[1],
        coordinator_key=public_key_hex(COORDINATOR),
    )
    assert other_run.client.public_key != a.sites[site_name(0)].client.public_key


def test_wire_formats_round_trip_and_reject_garbage():
    share = Share(3, 2, (0, 5, 2**126 + 7))
    ks = KeyShares(1, 3, share, Share(3, 2, (9,)))
    reveal = Reveal(3, {1: share, 2: share}, {4: Share(3, 2, (1, 2))})
    through = json.loads(json.dumps(sr.key_shares_to_json(ks)))
    assert sr.key_shares_from_json(through) == ks
    got = sr.reveal_from_json(json.loads(json.dumps(sr.reveal_to_json(reveal))))
    assert (got.responder, dict(got.self_seeds), dict(got.mask_keys)) == (
        3,
        dict(reveal.self_seeds),
        dict(reveal.mask_keys),
    )
    for bad in ("01", "-1", "1e3", str(2**127 - 1), "١"):
        with pytest.raises(ValueError):
            sr.share_from_json({"id": 3, "threshold": 2, "values": [bad]})
    with pytest.raises(ValueError):
        sr.share_from_json({"id": 3, "threshold": 2, "values": [5]})
    y = np.array([0, 1, PRIME - 1, 12345], np.uint32)
    blob = sr.encode_masked(y)
    np.testing.assert_array_equal(sr.decode_masked(blob, 4), y)
    with pytest.raises(ValueError):
        sr.decode_masked(blob, 5)
    with pytest.raises(ValueError):
        sr.decode_masked(b"XXXX" + blob[4:], 4)
    with pytest.raises(ValueError):
        sr.decode_masked(blob[:-4] + np.uint32(PRIME).tobytes(), 4)
    with pytest.raises(ValueError):
        sr.encode_masked(np.array([PRIME], np.uint32))
