"""Secure aggregation of one real-mode round, phase by phase, over the ledger.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS), semi-honest variant, as implemented by :mod:`medichain_jax.privacy.secagg`: the
coordinator learns the field sum of the surviving hospitals' quantized ``w_i * u_i`` and
nothing about any single one. This module only moves that protocol's messages through the
round's key-value state as signed manifests (:mod:`calimero_adapter.protocol`); it owns no
threads, clocks or ledger handles: callers poll the keys below, hand in what they read and
write what the methods return. Everything is a deterministic function of the seeds and keys.

Keys (all under ``medichain/<run>/round/<r>/secagg/``; every value is a signed manifest):

===================  ===========  ================================================================
key                  writer       content, and who can read what
===================  ===========  ================================================================
``keys/<site>``      the site     AdvertiseKeys: its SecAgg id, mask public key S_i and X25519
                                  exchange public key c_i (public keys only)
``advertised``       coordinator  the set U1 it fixes (id, S_i, c_i and Ed25519 signer of every
                                  site whose keys verified) and the threshold t, once >= t keys
                                  are in or its deadline passes
``shares/<site>``    the site     ShareKeys: for every other site in U1, that site's
                                  ``KeyShares`` (Shamir shares of b_i and s_i) sealed with AES-GCM
                                  under HKDF(X25519(c_i, c_j), "<run>/<r>/secagg"): only the
                                  addressee can open its entry, the coordinator only relays it
``relayed``          coordinator  the set U2 of sites whose shares manifests verified (>= t):
                                  sites mask against exactly U2's keys
(update blob)        the site     MaskedInputCollection: y_i, uniform in GF(p)^d without the
                                  other sites' pairwise masks (written by the caller)
``unmask``           coordinator  Unmasking request: survivors U3 (uploaded y) and dropped U2 - U3
``reveal/<site>``    a survivor   its shares of b_u for u in U3 and of s_d for d in U2 - U3,
                                  never both for one site, in clear
===================  ===========  ================================================================

Every context member can read every key and blob: reveals are public, so any reader learns what
the coordinator learns (the survivors' sum once t reveals are in) and, semi-honest, nothing
more: each y_u keeps the pairwise masks it shares with the other survivors. ``relayed`` is
Bonawitz's U2: a site that advertised keys but never sent shares is left out of the masks, so
its dropping cannot stall the round. A site answers one unmask request per round (a second,
different one is refused); a restarted site rebuilds its state by calling the same methods
with the manifests in the ledger.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from calimero_adapter import protocol
from calimero_adapter.protocol import PREFIX, ProtocolError
from medichain_jax.privacy.envelope import (
    EnvelopeError,
    canonical_json,
    derive_shared_key,
    exchange_public_key_from_bytes,
    open_envelope,
    peek_header,
    public_key_bytes,
    public_key_hex,
    seal,
)
from medichain_jax.privacy.field import PRIME, dequantize, quantize
from medichain_jax.privacy.secagg import (
    KeyShares,
    Reveal,
    SecAggAbort,
    SecAggClient,
    check_threshold,
    unmask_request,
)
from medichain_jax.privacy.secagg import unmask as field_unmask
from medichain_jax.privacy.shamir import Q, Share
from medichain_jax.types import PyTree

KIND_KEYS = "secagg_keys"
KIND_ADVERTISED = "secagg_advertised"
KIND_SHARES = "secagg_shares"
KIND_RELAYED = "secagg_relayed"
KIND_UNMASK = "secagg_unmask"
KIND_REVEAL = "secagg_reveal"
ENVELOPE_KIND = "secagg-key-shares"  # the ``kind`` in the header of every sealed KeyShares
MASKED_MAGIC = b"MCSM"
_RUN_SEED_INFO = b"medichain/calimero/secagg/v1/run-seed\x00"
_MAX_SHARE_DIGITS = 39  # a GF(2**127 - 1) element has at most 39 decimal digits
_HEX = frozenset("0123456789abcdef")


class Excluded(RuntimeError):
    """This site is not part of the round's secure aggregation (not advertised, relayed or a
    survivor): it skips the rest of the round."""


# --------------------------------------------------------------------------- keys


def secagg_prefix(run: str, rnd: int) -> str:
    """Prefix of every SecAgg key of round ``rnd``."""
    return f"{PREFIX}/{run}/round/{rnd}/secagg/"


def keys_key(run: str, rnd: int, site: str) -> str:
    """Where ``site`` advertises its SecAgg and exchange public keys."""
    return f"{secagg_prefix(run, rnd)}keys/{site}"


def keys_prefix(run: str, rnd: int) -> str:
    """Prefix of every keys manifest of round ``rnd``."""
    return f"{secagg_prefix(run, rnd)}keys/"


def advertised_key(run: str, rnd: int) -> str:
    """Where the coordinator fixes the advertised key set U1 and the threshold."""
    return f"{secagg_prefix(run, rnd)}advertised"


def shares_key(run: str, rnd: int, site: str) -> str:
    """Where ``site`` posts its sealed key shares, one entry per other advertised site."""
    return f"{secagg_prefix(run, rnd)}shares/{site}"


def shares_prefix(run: str, rnd: int) -> str:
    """Prefix of every shares manifest of round ``rnd``."""
    return f"{secagg_prefix(run, rnd)}shares/"


def relayed_key(run: str, rnd: int) -> str:
    """Where the coordinator fixes U2, the sites whose shares it relays."""
    return f"{secagg_prefix(run, rnd)}relayed"


def unmask_key(run: str, rnd: int) -> str:
    """Where the coordinator posts the unmasking request (survivors and dropped)."""
    return f"{secagg_prefix(run, rnd)}unmask"


def reveal_key(run: str, rnd: int, site: str) -> str:
    """Where survivor ``site`` answers the unmasking request."""
    return f"{secagg_prefix(run, rnd)}reveal/{site}"


def reveal_prefix(run: str, rnd: int) -> str:
    """Prefix of every reveal manifest of round ``rnd``."""
    return f"{secagg_prefix(run, rnd)}reveal/"


def by_site(entries: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``Ledger.entries(prefix)`` keyed by the site name that follows ``prefix``."""
    out = {}
    for key, value in entries.items():
        if key.startswith(prefix) and key[len(prefix) :] and "/" not in key[len(prefix) :]:
            out[key[len(prefix) :]] = value
    return out


def shares_context(run: str, rnd: int) -> bytes:
    """The HKDF context of the pairwise keys that seal key shares in round ``rnd``."""
    return f"{run}/{rnd}/secagg".encode()


def run_seed(seed: bytes, run: str) -> bytes:
    """A site's SecAgg seed for one run (``SecAggClient.from_seed`` adds the id and round)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) < 16:
        raise ValueError("a site's SecAgg seed must be at least 16 bytes")
    info = _RUN_SEED_INFO + run.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(seed))


# --------------------------------------------------------------------------- JSON


def _int(value: Any, what: str, *, low: int = 0) -> int:
    """``value`` as an int >= ``low`` (bools rejected), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _hex32(value: Any, what: str) -> bytes:
    """32 bytes from 64 lowercase hex digits, else ValueError."""
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise ValueError(f"{what} must be 64 lowercase hex digits")
    return bytes.fromhex(value)


def _decimal(text: str) -> bool:
    """Whether ``text`` is an ASCII decimal number without leading zeros."""
    return text.isascii() and text.isdecimal() and (text == "0" or text[0] != "0")


def share_to_json(share: Share) -> dict[str, Any]:
    """A Shamir share as JSON: values as decimal strings (they exceed 2**53)."""
    return {
        "id": share.id,
        "threshold": share.threshold,
        "values": [str(v) for v in share.values],
    }


def share_from_json(data: Any) -> Share:
    """Inverse of :func:`share_to_json`; ValueError on anything else."""
    if not isinstance(data, Mapping) or set(data) != {"id", "threshold", "values"}:
        raise ValueError(f"a share must be {{id, threshold, values}}, got {data!r:.80}")
    values = data["values"]
    if not isinstance(values, list) or not values:
        raise ValueError("share values must be a non-empty list")
    for v in values:
        if not (isinstance(v, str) and 0 < len(v) <= _MAX_SHARE_DIGITS and _decimal(v)):
            raise ValueError(f"share values must be canonical decimal strings, got {v!r:.60}")
    ints = tuple(int(v) for v in values)
    if max(ints) >= Q:
        raise ValueError("share values must lie in GF(2**127 - 1)")
    return Share(
        _int(data["id"], "share id", low=1), _int(data["threshold"], "share threshold", low=1), ints
    )


def key_shares_to_json(ks: KeyShares) -> dict[str, Any]:
    """``KeyShares`` as JSON."""
    return {
        "owner": ks.owner,
        "recipient": ks.recipient,
        "self_seed": share_to_json(ks.self_seed),
        "mask_key": share_to_json(ks.mask_key),
    }


def key_shares_from_json(data: Any) -> KeyShares:
    """Inverse of :func:`key_shares_to_json`; ValueError on anything else."""
    if not isinstance(data, Mapping) or set(data) != {
        "owner",
        "recipient",
        "self_seed",
        "mask_key",
    }:
        raise ValueError("key shares must be {owner, recipient, self_seed, mask_key}")
    return KeyShares(
        _int(data["owner"], "owner", low=1),
        _int(data["recipient"], "recipient", low=1),
        share_from_json(data["self_seed"]),
        share_from_json(data["mask_key"]),
    )


def _share_map_from_json(data: Any, what: str) -> dict[int, Share]:
    """``{"<id>": share}`` as ``{id: Share}``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be an object")
    out = {}
    for key, value in data.items():
        if not (isinstance(key, str) and _decimal(key) and key != "0"):
            raise ValueError(f"{what}: key {key!r:.30} is not a client id")
        out[int(key)] = share_from_json(value)
    return out


def reveal_to_json(reveal: Reveal) -> dict[str, Any]:
    """A ``Reveal`` as JSON (ids as object keys, in decimal)."""
    return {
        "responder": reveal.responder,
        "self_seeds": {str(k): share_to_json(v) for k, v in sorted(reveal.self_seeds.items())},
        "mask_keys": {str(k): share_to_json(v) for k, v in sorted(reveal.mask_keys.items())},
    }


def reveal_from_json(data: Any) -> Reveal:
    """Inverse of :func:`reveal_to_json`; ValueError on anything else."""
    if not isinstance(data, Mapping) or set(data) != {"responder", "self_seeds", "mask_keys"}:
        raise ValueError("a reveal must be {responder, self_seeds, mask_keys}")
    return Reveal(
        _int(data["responder"], "responder", low=1),
        _share_map_from_json(data["self_seeds"], "self_seeds"),
        _share_map_from_json(data["mask_keys"], "mask_keys"),
    )


def encode_masked(y: np.ndarray) -> bytes:
    """A masked vector as a blob: ``b"MCSM"``, uint64 big-endian length, uint32 LE values."""
    arr = np.asarray(y)
    if not np.issubdtype(arr.dtype, np.integer) or (
        arr.size and (arr.min() < 0 or arr.max() >= PRIME)
    ):
        raise ValueError(f"a masked vector holds field elements in [0, {PRIME})")
    flat = arr.reshape(-1).astype("<u4")
    return MASKED_MAGIC + struct.pack(">Q", flat.size) + flat.tobytes()


def decode_masked(blob: bytes, size: int) -> np.ndarray:
    """Inverse of :func:`encode_masked` for a vector of ``size`` elements; ValueError else."""
    blob = bytes(blob)
    if len(blob) < 12 or blob[:4] != MASKED_MAGIC:
        raise ValueError("not a masked vector (bad magic)")
    (count,) = struct.unpack(">Q", blob[4:12])
    if count != size or len(blob) != 12 + 4 * size:
        raise ValueError(f"masked vector of {count} elements ({len(blob)} bytes), expected {size}")
    y = np.frombuffer(blob, "<u4", offset=12).astype(np.uint32)
    if y.size and y.max() >= PRIME:
        raise ValueError(f"masked vector holds values >= p = {PRIME}")
    return y


# --------------------------------------------------------------------------- quantization


def flat_size(tree: PyTree) -> int:
    """Number of coordinates of ``tree`` (the length of its quantized vector)."""
    return sum(int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in jax.tree.leaves(tree))


def quantized_update(update_tree: PyTree, weight: float, bound: float, m: int) -> np.ndarray:
    """``quantize(w * u, bound, m)`` of every leaf (float32, ``jax.tree.leaves`` order),
    flattened and concatenated: site i's row of ``secure_sum``'s field sum."""
    w = jnp.asarray(weight, jnp.float32)
    parts = [
        quantize(w * jnp.asarray(u).astype(jnp.float32), bound, m).reshape(-1)
        for u in jax.tree.leaves(update_tree)
    ]
    if not parts:
        return np.zeros(0, np.uint32)
    return np.asarray(jnp.concatenate(parts), np.uint32)


def dequantized_sum(total: np.ndarray, template_tree: PyTree, bound: float, m: int) -> PyTree:
    """The field sum back as floats (JAX ``dequantize``), shaped and typed like the template."""
    leaves, treedef = jax.tree.flatten(template_tree)
    flat = np.asarray(total, np.uint32).reshape(-1)
    if flat.size != flat_size(template_tree):
        raise ValueError(
            f"a field sum of {flat.size} elements for a tree of {flat_size(template_tree)}"
        )
    out, pos = [], 0
    for leaf in leaves:
        shape, n = np.shape(leaf), int(np.prod(np.shape(leaf), dtype=np.int64))
        chunk = jnp.asarray(flat[pos : pos + n])
        out.append(dequantize(chunk, bound, m).reshape(shape).astype(jnp.asarray(leaf).dtype))
        pos += n
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- advertised set


@dataclasses.dataclass(frozen=True)
class Member:
    """One advertised site: SecAgg id, mask public key, exchange public key, Ed25519 signer."""

    id: int
    secagg_key: bytes
    exchange_key: bytes
    signer: str

    def to_json(self) -> dict[str, Any]:
        """The member as it appears in the advertised manifest."""
        return {
            "id": self.id,
            "secagg_key": self.secagg_key.hex(),
            "exchange_key": self.exchange_key.hex(),
            "signer": self.signer,
        }


@dataclasses.dataclass(frozen=True)
class Advertised:
    """The coordinator's fixed key set U1 and threshold of one round."""

    threshold: int
    sites: dict[str, Member]

    def ids(self, sites: Iterable[str]) -> list[int]:
        """SecAgg ids of ``sites``."""
        return [self.sites[s].id for s in sites]


def _member(data: Any, what: str) -> Member:
    """A member from the advertised manifest; ValueError if malformed."""
    if not isinstance(data, Mapping) or set(data) != {"id", "secagg_key", "exchange_key", "signer"}:
        raise ValueError(f"{what} must be {{id, secagg_key, exchange_key, signer}}")
    _hex32(data["signer"], f"{what} signer")
    return Member(
        _int(data["id"], f"{what} id", low=1),
        _hex32(data["secagg_key"], f"{what} secagg_key"),
        _hex32(data["exchange_key"], f"{what} exchange_key"),
        data["signer"],
    )


def parse_advertised(value: Any, *, run: str, rnd: int, coordinator_key: str) -> Advertised:
    """The verified advertised set of round ``rnd``; ProtocolError if forged or malformed."""
    key = advertised_key(run, rnd)
    body = protocol.check(
        value, kind=KIND_ADVERTISED, key=key, trusted=coordinator_key, run=run, rnd=rnd
    ).body
    try:
        threshold = _int(body.get("threshold"), "threshold", low=2)
        sites = body.get("sites")
        if not isinstance(sites, Mapping):
            raise ValueError("sites must be an object")
        members = {s: _member(m, f"site {s}") for s, m in sorted(sites.items())}
        if len({m.id for m in members.values()}) != len(members):
            raise ValueError("two sites share a SecAgg id")
        check_threshold(threshold, len(members))
    except ValueError as err:
        raise ProtocolError(f"{key}: {err}") from err
    return Advertised(threshold, members)


def _site_list(body: Mapping[str, Any], name: str, key: str, adv: Advertised) -> list[str]:
    """A sorted, duplicate-free list of advertised sites from a coordinator manifest."""
    sites = body.get(name)
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise ProtocolError(f"{key}: {name} must be a list of site names")
    if len(set(sites)) != len(sites) or sorted(sites) != sites:
        raise ProtocolError(f"{key}: {name} must be sorted and without duplicates")
    unknown = sorted(set(sites) - set(adv.sites))
    if unknown:
        raise ProtocolError(f"{key}: {name} names sites {unknown} that were not advertised")
    return sites


# --------------------------------------------------------------------------- site


class SiteSecAgg:
    """One hospital's side of one round's secure aggregation (no ledger: manifests in/out)."""

    def __init__(
        self,
        run: str,
        round: int,
        site: str,
        *,
        seed: bytes,
        secagg_id: int,
        signer: Ed25519PrivateKey,
        exchange_key: X25519PrivateKey,
        coordinator_key: str,
    ):
        self.run = run
        self.round = round
        self.site = site
        self.signer = signer
        self.exchange_key = exchange_key
        self.coordinator_key = coordinator_key
        self.client = SecAggClient.from_seed(secagg_id, run_seed(seed, run), round)
        self.advertised: Advertised | None = None
        self.relayed: tuple[str, ...] | None = None
        self.answered: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @property
    def id(self) -> int:
        """This site's SecAgg id (Shamir abscissa, >= 1)."""
        return self.client.id

    def keys_manifest(self) -> dict[str, Any]:
        """AdvertiseKeys: the signed manifest for ``keys/<site>``."""
        return protocol.make(
            KIND_KEYS,
            self.signer,
            run=self.run,
            round=self.round,
            site=self.site,
            id=self.id,
            secagg_key=self.client.public_key.hex(),
            exchange_key=public_key_hex(self.exchange_key),
        )

    def adopt_advertised(self, advertised: Mapping[str, Any]) -> Advertised:
        """Verify the coordinator's advertised manifest and find this site in it."""
        adv = parse_advertised(
            advertised, run=self.run, rnd=self.round, coordinator_key=self.coordinator_key
        )
        me = adv.sites.get(self.site)
        if me is None:
            raise Excluded(f"site {self.site} is not advertised in round {self.round}")
        own = Member(
            self.id, self.client.public_key, public_key_bytes(self.exchange_key), me.signer
        )
        if me != own or me.signer != public_key_hex(self.signer):
            raise ProtocolError(
                f"{advertised_key(self.run, self.round)}: the entry of site {self.site} is not "
                "its own keys"
            )
        self.advertised = adv
        return adv

    def _need_advertised(self) -> Advertised:
        """The adopted advertised set, or ValueError."""
        if self.advertised is None:
            raise ValueError(
                "no advertised set yet: call adopt_advertised or shares_manifest first"
            )
        return self.advertised

    def _pair_key(self, member: Member) -> bytes:
        """The AEAD key this site shares with ``member`` for this round's key shares."""
        return derive_shared_key(
            self.exchange_key, member.exchange_key, shares_context(self.run, self.round)
        )

    def shares_manifest(self, advertised: Mapping[str, Any]) -> dict[str, Any]:
        """ShareKeys: the signed manifest for ``shares/<site>``, one sealed ``KeyShares`` per
        other advertised site (this site keeps its own share)."""
        adv = self.adopt_advertised(advertised)
        shares = self.client.shares_for(adv.ids(adv.sites), adv.threshold)
        self.client.receive([shares[self.id]])
        entries = {}
        for site, member in adv.sites.items():
            if site == self.site:
                continue
            blob = seal(
                canonical_json(key_shares_to_json(shares[member.id])),
                run=self.run,
                round=self.round,
                sender=self.site,
                seq=member.id,
                key=self._pair_key(member),
                signer=self.signer,
                kind=ENVELOPE_KIND,
            )
            entries[site] = base64.b64encode(blob).decode("ascii")
        return protocol.make(
            KIND_SHARES,
            self.signer,
            run=self.run,
            round=self.round,
            site=self.site,
            id=self.id,
            shares=entries,
        )

    def open_share(self, sender: str, manifest: Mapping[str, Any]) -> KeyShares:
        """Verify ``sender``'s shares manifest and decrypt its entry for this site."""
        adv = self._need_advertised()
        key = shares_key(self.run, self.round, sender)
        member = adv.sites.get(sender)
        if member is None:
            raise ProtocolError(f"{key}: site {sender} was not advertised")
        body = protocol.check(
            manifest,
            kind=KIND_SHARES,
            key=key,
            trusted={sender: member.signer},
            run=self.run,
            rnd=self.round,
            site=sender,
        ).body
        if body.get("id") != member.id:
            raise ProtocolError(f"{key}: id {body.get('id')!r}, advertised {member.id}")
        entries = body.get("shares")
        entry = entries.get(self.site) if isinstance(entries, Mapping) else None
        if not isinstance(entry, str):
            raise ProtocolError(f"{key}: no share for site {self.site}")
        try:
            blob = base64.b64decode(entry, validate=True)
            opened = open_envelope(
                blob,
                key=self._pair_key(member),
                sender_public_key=member.signer,
                expected_run=self.run,
                expected_round=self.round,
                guard=None,
                expected_sender=sender,
                expected_kind=ENVELOPE_KIND,
            )
            ks = key_shares_from_json(json.loads(opened.payload))
        except (binascii.Error, EnvelopeError, ValueError) as err:
            raise ProtocolError(f"{key}: the share for site {self.site}: {err}") from err
        if (ks.owner, ks.recipient) != (member.id, self.id) or opened.header.seq != self.id:
            raise ProtocolError(
                f"{key}: shares of client {ks.owner} for {ks.recipient}, expected "
                f"{member.id} for {self.id}"
            )
        if ks.self_seed.threshold != adv.threshold or ks.mask_key.threshold != adv.threshold:
            raise ProtocolError(f"{key}: shares of threshold != t = {adv.threshold}")
        return ks

    def receive_shares(self, manifests_by_sender: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Verify and decrypt every sender's entry for this site and keep the shares (all or
        none: ProtocolError names the first bad one); returns the senders taken."""
        taken = [
            self.open_share(sender, value)
            for sender, value in sorted(manifests_by_sender.items())
            if sender != self.site
        ]
        self.client.receive(taken)
        adv = self._need_advertised()
        by_id = {m.id: s for s, m in adv.sites.items()}
        return [by_id[ks.owner] for ks in taken]

    def adopt_relayed(self, relayed: Mapping[str, Any]) -> tuple[str, ...]:
        """Verify the coordinator's relayed set U2 (>= t sites, this one included)."""
        adv = self._need_advertised()
        key = relayed_key(self.run, self.round)
        body = protocol.check(
            relayed,
            kind=KIND_RELAYED,
            key=key,
            trusted=self.coordinator_key,
            run=self.run,
            rnd=self.round,
        ).body
        sites = _site_list(body, "sites", key, adv)
        if len(sites) < adv.threshold:
            raise ProtocolError(f"{key}: {len(sites)} sites relayed, below t = {adv.threshold}")
        if self.site not in sites:
            raise Excluded(f"site {self.site}'s shares were not relayed in round {self.round}")
        self.relayed = tuple(sites)
        return self.relayed

    def mask(self, x: np.ndarray, relayed: Mapping[str, Any]) -> np.ndarray:
        """MaskedInputCollection: y for quantized ``x`` against the relayed sites' keys."""
        adv = self._need_advertised()
        sites = self.adopt_relayed(relayed)
        return self.client.mask(x, {adv.sites[s].id: adv.sites[s].secagg_key for s in sites})

    def reveal_manifest(self, unmask: Mapping[str, Any]) -> dict[str, Any]:
        """Unmasking: the signed manifest for ``reveal/<site>`` answering the coordinator's
        request (once per round; a different second request raises ProtocolError)."""
        adv = self._need_advertised()
        key = unmask_key(self.run, self.round)
        body = protocol.check(
            unmask,
            kind=KIND_UNMASK,
            key=key,
            trusted=self.coordinator_key,
            run=self.run,
            rnd=self.round,
        ).body
        survivors = _site_list(body, "survivors", key, adv)
        dropped = _site_list(body, "dropped", key, adv)
        if set(survivors) & set(dropped):
            raise ProtocolError(
                f"{key}: sites {sorted(set(survivors) & set(dropped))} are "
                "named survivor and dropped"
            )
        if self.relayed is not None and set(survivors) | set(dropped) != set(self.relayed):
            raise ProtocolError(f"{key}: survivors and dropped are not the relayed sites")
        request = (tuple(survivors), tuple(dropped))
        if self.answered is not None and self.answered != request:
            raise ProtocolError(
                f"{key}: a second, different unmasking request in round {self.round}; "
                "answering both could unmask a site's input"
            )
        if self.site not in survivors:
            raise Excluded(f"site {self.site} is not a survivor of round {self.round}")
        try:
            reveal = self.client.reveal(adv.ids(survivors), adv.ids(dropped))
        except ValueError as err:
            raise ProtocolError(f"{key}: site {self.site} cannot answer: {err}") from err
        self.answered = request
        return protocol.make(
            KIND_REVEAL,
            self.signer,
            run=self.run,
            round=self.round,
            site=self.site,
            id=self.id,
            survivors=survivors,
            dropped=dropped,
            reveal=reveal_to_json(reveal),
        )


# --------------------------------------------------------------------------- coordinator


class CoordinatorSecAgg:
    """The coordinator's side of one round's secure aggregation: it fixes U1, U2 and the
    unmasking request and rebuilds the survivors' field sum; it never sees a share in clear.
    Invalid site manifests are skipped and recorded in ``rejected`` (site -> reason)."""

    def __init__(
        self, run: str, round: int, *, signer: Ed25519PrivateKey, admitted: Mapping[str, str]
    ):
        self.run = run
        self.round = round
        self.signer = signer
        self.public = public_key_hex(signer)
        self.admitted = dict(admitted)
        self.rejected: dict[str, str] = {}
        self.advertised: Advertised | None = None
        self.relayed: tuple[str, ...] | None = None
        self.request: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def _need(self, what: str) -> Any:
        """A phase's state, or ValueError naming the phase that must come first."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"round {self.round}: no {what} set yet")
        return value

    def check_keys(self, site: str, manifest: Mapping[str, Any]) -> Member:
        """A verified keys manifest of ``site`` (signed by its admitted key); ProtocolError."""
        key = keys_key(self.run, self.round, site)
        signed = protocol.check(
            manifest,
            kind=KIND_KEYS,
            key=key,
            trusted=self.admitted,
            run=self.run,
            rnd=self.round,
            site=site,
        )
        body = signed.body
        try:
            member = Member(
                _int(body.get("id"), "id", low=1),
                _hex32(body.get("secagg_key"), "secagg_key"),
                _hex32(body.get("exchange_key"), "exchange_key"),
                signed.signer,
            )
            exchange_public_key_from_bytes(member.exchange_key)
        except ValueError as err:
            raise ProtocolError(f"{key}: {err}") from err
        return member

    def advertise(
        self,
        keys_manifests: Mapping[str, Mapping[str, Any]],
        cohort_sites: Iterable[str],
        threshold: int,
    ) -> dict[str, Any]:
        """AdvertiseKeys, server side: the signed ``advertised`` manifest of every cohort site
        whose keys verify; SecAggAbort below ``threshold``."""
        if self.advertised is not None:
            raise ValueError(f"round {self.round}: the key set is already advertised")
        cohort = sorted(set(cohort_sites))
        check_threshold(threshold, len(cohort))
        members: dict[str, Member] = {}
        for site in sorted(keys_manifests):
            if site not in cohort:
                self.rejected[site] = f"site {site} posted keys but is not in the cohort"
                continue
            try:
                member = self.check_keys(site, keys_manifests[site])
            except ProtocolError as err:
                self.rejected[site] = str(err)
                continue
            if any(m.id == member.id for m in members.values()):
                self.rejected[site] = f"site {site} claims SecAgg id {member.id}, already taken"
                continue
            members[site] = member
        if len(members) < threshold:
            raise SecAggAbort(
                f"secure aggregation of round {self.round} aborted: only {len(members)} of "
                f"{len(cohort)} cohort sites advertised valid keys ({sorted(members)}), below "
                f"the threshold t = {threshold}; rejected: {self.rejected}"
            )
        manifest = protocol.make(
            KIND_ADVERTISED,
            self.signer,
            run=self.run,
            round=self.round,
            threshold=int(threshold),
            cohort=cohort,
            sites={s: m.to_json() for s, m in members.items()},
        )
        self.advertised = Advertised(int(threshold), members)
        return manifest

    def check_shares(self, site: str, manifest: Mapping[str, Any]) -> None:
        """Verify ``site``'s shares manifest: signature, id, and one well-formed envelope from
        it for every other advertised site (their contents stay sealed); ProtocolError."""
        adv: Advertised = self._need("advertised")
        key = shares_key(self.run, self.round, site)
        if site not in adv.sites:
            raise ProtocolError(f"{key}: site {site} was not advertised")
        body = protocol.check(
            manifest,
            kind=KIND_SHARES,
            key=key,
            trusted={site: adv.sites[site].signer},
            run=self.run,
            rnd=self.round,
            site=site,
        ).body
        if body.get("id") != adv.sites[site].id:
            raise ProtocolError(f"{key}: id {body.get('id')!r}, advertised {adv.sites[site].id}")
        entries = body.get("shares")
        expected = set(adv.sites) - {site}
        if not isinstance(entries, Mapping) or set(entries) != expected:
            raise ProtocolError(f"{key}: needs one entry for each of {sorted(expected)}")
        for recipient, entry in sorted(entries.items()):
            try:
                header = peek_header(base64.b64decode(str(entry), validate=True))
            except (binascii.Error, EnvelopeError) as err:
                raise ProtocolError(f"{key}: entry for {recipient}: {err}") from err
            wanted = (self.run, self.round, site, ENVELOPE_KIND, adv.sites[recipient].id)
            if (header.run, header.round, header.sender, header.kind, header.seq) != wanted:
                raise ProtocolError(f"{key}: entry for {recipient} has a foreign header")

    def relay_manifest(self, shares_manifests: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """ShareKeys, server side: the signed ``relayed`` manifest fixing U2 (the advertised
        sites whose shares verify); SecAggAbort below the threshold."""
        adv: Advertised = self._need("advertised")
        if self.relayed is not None:
            raise ValueError(f"round {self.round}: the relayed set is already fixed")
        ok = []
        for site in sorted(shares_manifests):
            try:
                self.check_shares(site, shares_manifests[site])
            except ProtocolError as err:
                self.rejected[site] = str(err)
                continue
            ok.append(site)
        if len(ok) < adv.threshold:
            raise SecAggAbort(
                f"secure aggregation of round {self.round} aborted: only {len(ok)} of "
                f"{len(adv.sites)} advertised sites shared their keys ({ok}), below the "
                f"threshold t = {adv.threshold}"
            )
        self.relayed = tuple(ok)
        return protocol.make(KIND_RELAYED, self.signer, run=self.run, round=self.round, sites=ok)

    def unmask_manifest(self, uploaded_sites: Iterable[str]) -> dict[str, Any]:
        """Unmasking request: the signed ``unmask`` manifest naming survivors (relayed sites
        that uploaded y) and dropped (the other relayed sites); SecAggAbort below t."""
        adv: Advertised = self._need("advertised")
        relayed: tuple[str, ...] = self._need("relayed")
        uploaded = set(uploaded_sites)
        for site in sorted(uploaded - set(relayed)):
            self.rejected[site] = f"site {site} uploaded a masked update but was not relayed"
        alive = sorted(uploaded & set(relayed))
        try:
            unmask_request(adv.ids(alive), adv.ids(relayed), adv.threshold)
        except SecAggAbort as err:
            raise SecAggAbort(
                f"round {self.round}: {err} (uploaded: {alive}; relayed: {list(relayed)})"
            ) from err
        request = (tuple(alive), tuple(s for s in relayed if s not in alive))
        if self.request is not None and self.request != request:
            raise ValueError(f"round {self.round}: a different unmasking request was already sent")
        self.request = request
        return protocol.make(
            KIND_UNMASK,
            self.signer,
            run=self.run,
            round=self.round,
            survivors=list(request[0]),
            dropped=list(request[1]),
        )

    def check_reveal(self, site: str, manifest: Mapping[str, Any]) -> Reveal:
        """A verified reveal of survivor ``site`` answering this round's request; ProtocolError."""
        adv: Advertised = self._need("advertised")
        survivors, dropped = self._need("request")
        key = reveal_key(self.run, self.round, site)
        if site not in survivors:
            raise ProtocolError(f"{key}: site {site} is not a survivor")
        body = protocol.check(
            manifest,
            kind=KIND_REVEAL,
            key=key,
            trusted=self.admitted,
            run=self.run,
            rnd=self.round,
            site=site,
        ).body
        me = adv.sites[site].id
        if body.get("id") != me:
            raise ProtocolError(f"{key}: id {body.get('id')!r}, advertised {me}")
        if body.get("survivors") != list(survivors) or body.get("dropped") != list(dropped):
            raise ProtocolError(f"{key}: answers another unmasking request")
        try:
            reveal = reveal_from_json(body.get("reveal"))
        except ValueError as err:
            raise ProtocolError(f"{key}: {err}") from err
        shares = list(reveal.self_seeds.values()) + list(reveal.mask_keys.values())
        if (
            reveal.responder != me
            or set(reveal.self_seeds) != set(adv.ids(survivors))
            or set(reveal.mask_keys) != set(adv.ids(dropped))
            or any(s.id != me or s.threshold != adv.threshold for s in shares)
        ):
            raise ProtocolError(f"{key}: the revealed shares do not answer the request")
        return reveal

    def unmask(
        self,
        masked_by_site: Mapping[str, np.ndarray],
        reveal_manifests: Mapping[str, Mapping[str, Any]],
    ) -> np.ndarray:
        """The survivors' exact field sum (uint32) from their masked vectors and >= t valid
        reveals (invalid ones are skipped); SecAggAbort below t."""
        adv: Advertised = self._need("advertised")
        relayed: tuple[str, ...] = self._need("relayed")
        survivors, _ = self._need("request")
        if set(masked_by_site) != set(survivors):
            raise ValueError(
                f"masked vectors of {sorted(masked_by_site)}, the survivors are {list(survivors)}"
            )
        reveals = []
        for site in sorted(reveal_manifests):
            try:
                reveals.append(self.check_reveal(site, reveal_manifests[site]))
            except ProtocolError as err:
                self.rejected[site] = str(err)
        if len(reveals) < adv.threshold:
            raise SecAggAbort(
                f"secure aggregation of round {self.round} aborted: only {len(reveals)} valid "
                f"reveals, below the threshold t = {adv.threshold}; rejected: {self.rejected}"
            )
        masked = {adv.sites[s].id: np.asarray(y) for s, y in masked_by_site.items()}
        public_keys = {adv.sites[s].id: adv.sites[s].secagg_key for s in relayed}
        return field_unmask(masked, reveals, public_keys, adv.threshold, self.round)

    def resume(
        self,
        advertised: Mapping[str, Any],
        relayed: Mapping[str, Any] | None = None,
        unmask: Mapping[str, Any] | None = None,
    ) -> None:
        """Restore the phases already published (a restarted coordinator reads its own
        manifests back from the ledger); ProtocolError if they are not its own."""
        self.advertised = parse_advertised(
            advertised, run=self.run, rnd=self.round, coordinator_key=self.public
        )
        adv = self.advertised
        if relayed is not None:
            key = relayed_key(self.run, self.round)
            body = protocol.check(
                relayed,
                kind=KIND_RELAYED,
                key=key,
                trusted=self.public,
                run=self.run,
                rnd=self.round,
            ).body
            self.relayed = tuple(_site_list(body, "sites", key, adv))
        if unmask is not None:
            key = unmask_key(self.run, self.round)
            body = protocol.check(
                unmask,
                kind=KIND_UNMASK,
                key=key,
                trusted=self.public,
                run=self.run,
                rnd=self.round,
            ).body
            self.request = (
                tuple(_site_list(body, "survivors", key, adv)),
                tuple(_site_list(body, "dropped", key, adv)),
            )
