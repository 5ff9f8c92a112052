"""Secure aggregation with dropouts, emulated exactly on the host.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS), the semi-honest protocol: the server learns the sum of the surviving clients' inputs in
GF(p), p = 2**31 - 1 (:mod:`medichain_jax.privacy.field`), and nothing about any single input.
Client ids are 1..n; every key, seed and mask belongs to one round.

0. AdvertiseKeys: client i publishes the X25519 public key S_i of its mask key pair (s_i, S_i).
1. ShareKeys: i draws a self-mask seed b_i and Shamir-shares b_i and the 32 private bytes of
   s_i, t of n, with every advertised client, itself included (:mod:`.shamir`).
2. MaskedInputCollection: i uploads, for x_i already quantized,
       y_i = x_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod p),
   s_ij = HKDF-SHA256(X25519(s_i, S_j), info = label, round, min(i, j), max(i, j)).
3. Unmasking: the server names the survivors U (sent y) and the dropped D (advertised, not in
   U); each responding survivor reveals its shares of b_u for u in U and of s_d for d in D,
   never both for one client. From at least t responders the server rebuilds every b_u and
   s_d, removes PRG(b_u) and the pairwise masks between D and U (pairs inside U cancel) and is
   left with sum_{u in U} x_u (mod p). Fewer than t survivors or responders: :class:`SecAggAbort`.

PRG: the ChaCha20 keystream (RFC 8439, from ``cryptography``) under a 32-byte HKDF key with a
zero nonce (each key is used for one stream only); 32-bit little-endian words are masked to 31
bits and the one value p = 2**31 - 1 is rejected, so masks are exactly uniform on GF(p).
Key derivation: HKDF-SHA256 everywhere, with a domain label, the round and the client ids in
``info``; :func:`keypair_from_seed` and :meth:`SecAggClient.from_seed` make the simulation
reproducible, while a real deployment passes keys and seeds it drew itself.

Left out, as the simulator and the coordinator do not need them here: the encryption key pair
and the authenticated channel that carries shares through the server, signatures, and the
consistency-check round of the malicious-secure variant. Everything is a pure function of its
seeds: no OS randomness, no clocks; :func:`emulate_round` reports counts and bytes instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medichain_jax.privacy.field import PRIME
from medichain_jax.privacy.shamir import ShamirError, Share, combine, split

KEY_BYTES = 32  # an X25519 public key on the wire
SEED_BYTES = 32
FIELD_BYTES = 4  # one masked coordinate (uint32) on the wire
_LABEL = b"medichain/secagg/v1/"
_REDUCE_EVERY = 1 << 20  # int64 accumulators of +-p terms are reduced mod p this often


class SecAggAbort(RuntimeError):
    """The round cannot finish without breaking privacy (too few survivors or responders)."""


def _hkdf(key_material: bytes, info: bytes) -> bytes:
    """32 bytes of HKDF-SHA256 (no salt) of ``key_material`` for the purpose named by ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL + info).derive(
        bytes(key_material)
    )


def _u64(value: int) -> bytes:
    """An id or round number as 8 big-endian bytes (rejects negatives and bools)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"ids and rounds must be non-negative integers, got {value!r}")
    return int(value).to_bytes(8, "big")


def _check_id(client_id: int) -> int:
    """Client ids are integers >= 1 (0 is the Shamir secret's abscissa)."""
    _u64(client_id)
    if client_id < 1:
        raise ValueError(f"client ids start at 1, got {client_id}")
    return int(client_id)


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair: the private key object and the 32 raw public bytes."""

    private: X25519PrivateKey
    public: bytes


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key of ``private``."""
    return private.public_key().public_bytes_raw()


def keypair_from_seed(seed: bytes) -> KeyPair:
    """A deterministic X25519 key pair: private bytes = HKDF-SHA256(seed)."""
    private = X25519PrivateKey.from_private_bytes(_hkdf(seed, b"x25519"))
    return KeyPair(private, public_bytes(private))


def prg_field(key: bytes, size: int) -> np.ndarray:
    """``size`` uniform elements of GF(p) (uint32) from the ChaCha20 keystream under ``key``."""
    if len(key) != 32:
        raise ValueError(f"PRG keys have 32 bytes, got {len(key)}")
    stream = Cipher(algorithms.ChaCha20(bytes(key), bytes(16)), mode=None).encryptor()
    out = np.empty(size, np.uint32)
    filled = 0
    while filled < size:  # the first `size` accepted words of the stream
        need = size - filled
        words = np.frombuffer(stream.update(bytes(4 * (need + 8))), dtype="<u4") & 0x7FFFFFFF
        words = words[words != PRIME][:need]
        out[filled : filled + words.size] = words
        filled += words.size
    return out


def pairwise_seed(
    private: X25519PrivateKey, peer_public: bytes, round: int, i: int, j: int
) -> bytes:
    """``s_ij``: HKDF of the X25519 secret of clients i and j, bound to the round and the pair."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    a, b = sorted((_check_id(i), _check_id(j)))
    return _hkdf(shared, b"pairwise" + _u64(round) + _u64(a) + _u64(b))


def pairwise_mask(
    private: X25519PrivateKey, peer_public: bytes, round: int, i: int, j: int, size: int
) -> np.ndarray:
    """``PRG(s_ij)``: the mask clients i and j share (i adds it when j > i, subtracts otherwise)."""
    return prg_field(pairwise_seed(private, peer_public, round, i, j), size)


def self_mask(self_seed: bytes, round: int, client_id: int, size: int) -> np.ndarray:
    """``PRG(b_i)``: client i's self mask for one round."""
    return prg_field(_hkdf(self_seed, b"self" + _u64(round) + _u64(client_id)), size)


def check_threshold(
    threshold: int, num_clients: int, *, allow_weak_threshold: bool = False
) -> None:
    """Raise ValueError unless 2 <= t <= n and (unless allowed weak) t > n // 2."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer):
        raise ValueError(f"threshold must be an int, got {threshold!r}")
    if not 2 <= threshold <= num_clients:
        raise ValueError(
            f"threshold must be in [2, n] = [2, {num_clients}] for {num_clients} clients, "
            f"got {threshold}"
        )
    if threshold <= num_clients // 2 and not allow_weak_threshold:
        raise ValueError(
            f"threshold {threshold} of {num_clients} clients is not a majority: Bonawitz et al. "
            f"need t > n / 2 (here t >= {num_clients // 2 + 1}) so that a server cannot learn "
            "both shares of one client; pass allow_weak_threshold=True to accept it"
        )


def _field_vector(x: np.ndarray) -> np.ndarray:
    """``x`` as a uint32 array of field elements; raises on other dtypes or values >= p."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"inputs must be quantized field elements (integers), got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= PRIME):
        raise ValueError(f"field elements must lie in [0, {PRIME})")
    return arr.astype(np.uint32)


def _survivors_needed(survivors: int, advertised: int, threshold: int) -> None:
    """Abort when fewer than ``threshold`` clients uploaded masked inputs."""
    if survivors < threshold:
        raise SecAggAbort(
            f"secure aggregation aborted: only {survivors} of {advertised} clients survived to "
            f"upload masked inputs, below the threshold t = {threshold}; unmasking needs at least "
            "t survivors"
        )


def unmask_request(
    uploaded: Iterable[int], advertised: Iterable[int], threshold: int
) -> tuple[frozenset[int], frozenset[int]]:
    """The server's unmasking request ``(survivors, dropped)``; aborts below ``threshold``."""
    survivors, everyone = frozenset(uploaded), frozenset(advertised)
    if not survivors <= everyone:
        raise ValueError(
            f"clients {sorted(survivors - everyone)} uploaded without advertising keys"
        )
    _survivors_needed(len(survivors), len(everyone), threshold)
    return survivors, everyone - survivors


@dataclass(frozen=True)
class KeyShares:
    """What client ``owner`` gives client ``recipient`` in ShareKeys: shares of b and of s."""

    owner: int
    recipient: int
    self_seed: Share
    mask_key: Share

    @property
    def nbytes(self) -> int:
        """Bytes of the two shares on the wire."""
        return self.self_seed.nbytes + self.mask_key.nbytes


@dataclass(frozen=True)
class Reveal:
    """A responder's answer to the unmasking request: b-shares of survivors, s-shares of dropped."""

    responder: int
    self_seeds: Mapping[int, Share]
    mask_keys: Mapping[int, Share]

    @property
    def nbytes(self) -> int:
        """Bytes of the revealed shares on the wire."""
        shares = list(self.self_seeds.values()) + list(self.mask_keys.values())
        return sum(s.nbytes for s in shares)


@dataclass
class SecAggClient:
    """One client's secrets and received shares for one round (never reuse across rounds:
    revealing ``mask_key`` or ``self_seed`` exposes every mask derived from it)."""

    id: int
    round: int
    mask_key: X25519PrivateKey
    self_seed: bytes
    share_seed: bytes
    received: dict[int, KeyShares] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the id, round and seed lengths."""
        _check_id(self.id)
        _u64(self.round)
        if len(self.self_seed) < 16 or len(self.share_seed) < 16:
            raise ValueError("self_seed and share_seed need at least 16 bytes each")

    @classmethod
    def from_seed(cls, client_id: int, seed: bytes, round: int) -> SecAggClient:
        """A client whose mask key, self-mask seed and sharing seed derive from ``seed``."""
        info = _u64(_check_id(client_id)) + _u64(round)
        return cls(
            id=client_id,
            round=round,
            mask_key=keypair_from_seed(_hkdf(seed, b"client/mask-key" + info)).private,
            self_seed=_hkdf(seed, b"client/self-seed" + info),
            share_seed=_hkdf(seed, b"client/share-seed" + info),
        )

    @property
    def public_key(self) -> bytes:
        """AdvertiseKeys: the 32-byte public mask key S_i."""
        return public_bytes(self.mask_key)

    def shares_for(
        self, peers: Iterable[int], threshold: int, *, allow_weak_threshold: bool = False
    ) -> dict[int, KeyShares]:
        """ShareKeys: shares of b_i and s_i for every advertised client (this one included)."""
        ids = sorted({_check_id(p) for p in peers} | {self.id})
        check_threshold(threshold, len(ids), allow_weak_threshold=allow_weak_threshold)
        threshold = int(threshold)
        info = _u64(self.round) + _u64(threshold)
        b = split(self.self_seed, threshold, ids, _hkdf(self.share_seed, b"shamir/self" + info))
        secret_key = self.mask_key.private_bytes_raw()
        s = split(secret_key, threshold, ids, _hkdf(self.share_seed, b"shamir/mask-key" + info))
        return {r: KeyShares(self.id, r, b[r], s[r]) for r in ids}

    def receive(self, shares: Iterable[KeyShares]) -> None:
        """Keep the shares other clients (and this one) made for this client."""
        for ks in shares:
            if ks.recipient != self.id:
                raise ValueError(f"client {self.id} got shares meant for client {ks.recipient}")
            if ks.self_seed.id != self.id or ks.mask_key.id != self.id:
                raise ValueError(f"shares from client {ks.owner} are not evaluated at {self.id}")
            self.received[ks.owner] = ks

    def mask(self, x: np.ndarray, peers: Mapping[int, bytes]) -> np.ndarray:
        """MaskedInputCollection: y_i for quantized ``x`` and the advertised public keys."""
        arr = _field_vector(x)
        flat = arr.reshape(-1)
        if self.id in peers and bytes(peers[self.id]) != self.public_key:
            raise ValueError(f"the advertised key of client {self.id} is not its own")
        acc = flat.astype(np.int64) + self_mask(self.self_seed, self.round, self.id, flat.size)
        terms = 1
        for j in sorted(peers):
            if j == self.id:
                continue
            m = pairwise_mask(self.mask_key, peers[j], self.round, self.id, j, flat.size)
            if j > self.id:
                acc += m
            else:
                acc -= m
            terms += 1
            if terms % _REDUCE_EVERY == 0:
                acc %= PRIME
        return (acc % PRIME).astype(np.uint32).reshape(arr.shape)

    def reveal(self, survivors: Iterable[int], dropped: Iterable[int]) -> Reveal:
        """Unmasking: shares of b_u for survivors u and of s_d for dropped d, never both."""
        alive, gone = frozenset(survivors), frozenset(dropped)
        if alive & gone:
            raise ValueError(
                f"clients {sorted(alive & gone)} are named both survivor and dropped; revealing "
                "both of their shares would unmask their inputs"
            )
        if self.id not in alive:
            raise ValueError(f"client {self.id} is not a survivor and must not answer")
        thresholds = {ks.self_seed.threshold for ks in self.received.values()}
        if len(thresholds) != 1:
            raise ValueError(f"client {self.id} holds no shares or shares of mixed thresholds")
        threshold = thresholds.pop()
        _survivors_needed(len(alive), len(alive | gone), threshold)
        missing = sorted((alive | gone) - set(self.received))
        if missing:
            raise ValueError(f"client {self.id} holds no shares from clients {missing}")
        return Reveal(
            responder=self.id,
            self_seeds={u: self.received[u].self_seed for u in sorted(alive)},
            mask_keys={d: self.received[d].mask_key for d in sorted(gone)},
        )


@dataclass(frozen=True)
class _UnmaskCounts:
    """Work the server did while unmasking."""

    masks_expanded: int
    key_agreements: int
    secrets_reconstructed: int


def _combine(shares: list[Share], what: str) -> bytes:
    """Shamir-combine, turning a failure into an abort that names the secret."""
    try:
        return combine(shares)
    except ShamirError as err:
        raise SecAggAbort(f"cannot reconstruct {what}: {err}") from None


def _unmask(
    masked: Mapping[int, np.ndarray],
    reveals: Iterable[Reveal],
    public_keys: Mapping[int, bytes],
    threshold: int,
    round: int,
    allow_weak_threshold: bool,
) -> tuple[np.ndarray, _UnmaskCounts]:
    """:func:`unmask` plus the server's work counts."""
    check_threshold(threshold, len(public_keys), allow_weak_threshold=allow_weak_threshold)
    survivors, dropped = unmask_request(masked, public_keys, threshold)
    answers: dict[int, Reveal] = {}
    for r in reveals:
        if r.responder not in survivors:
            raise ValueError(f"responder {r.responder} is not a survivor")
        answers[r.responder] = r
    if len(answers) < threshold:
        raise SecAggAbort(
            f"secure aggregation aborted: only {len(answers)} survivors sent their shares, "
            f"below the threshold t = {threshold}"
        )
    arrays = {u: _field_vector(masked[u]) for u in sorted(survivors)}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"masked inputs differ in shape: {sorted(shapes)}")
    shape = shapes.pop()
    size = int(np.prod(shape))
    acc = np.zeros(size, np.int64)
    for u, y in arrays.items():
        acc += y.reshape(-1)
        seed = _combine([a.self_seeds[u] for a in answers.values() if u in a.self_seeds], f"b_{u}")
        acc -= self_mask(seed, round, u, size)
        acc %= PRIME
    agreements = 0
    for d in sorted(dropped):
        shares = [a.mask_keys[d] for a in answers.values() if d in a.mask_keys]
        raw = _combine(shares, f"s_{d}")
        if len(raw) != 32:
            raise SecAggAbort(f"the rebuilt mask key of client {d} has {len(raw)} bytes, not 32")
        key = X25519PrivateKey.from_private_bytes(raw)
        if public_bytes(key) != bytes(public_keys[d]):
            raise SecAggAbort(f"the rebuilt mask key of client {d} does not match its public key")
        for u in sorted(survivors):
            m = pairwise_mask(key, public_keys[u], round, d, u, size)
            if d > u:  # u added PRG(s_ud)
                acc -= m
            else:
                acc += m
            agreements += 1
        acc %= PRIME
    counts = _UnmaskCounts(
        masks_expanded=len(survivors) + agreements,
        key_agreements=agreements,
        secrets_reconstructed=len(survivors) + len(dropped),
    )
    return acc.astype(np.uint32).reshape(shape), counts


def unmask(
    masked: Mapping[int, np.ndarray],
    reveals: Iterable[Reveal],
    public_keys: Mapping[int, bytes],
    threshold: int,
    round: int,
    *,
    allow_weak_threshold: bool = False,
) -> np.ndarray:
    """The server's result: the exact field sum of the survivors' inputs (uint32).

    ``masked`` maps survivor id -> y; ``public_keys`` is the advertised set (id -> S_i);
    ``reveals`` are the answers to :func:`unmask_request` from at least ``threshold`` survivors."""
    total, _ = _unmask(masked, reveals, public_keys, threshold, round, allow_weak_threshold)
    return total


@dataclass(frozen=True)
class EmulationResult:
    """One emulated round: the unmasked sum and what the protocol cost (counts, no clocks)."""

    sum: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    responders: tuple[int, ...]
    bytes_sent_per_client: dict[int, int]
    server_bytes_sent: int
    masks_expanded: int
    key_agreements: int
    shares_made: int
    secrets_reconstructed: int


def client_seed(seed: bytes, client_id: int) -> bytes:
    """The emulation's root seed of one client, derived from the round's ``seed``."""
    return _hkdf(seed, b"emulation/client" + _u64(_check_id(client_id)))


def emulate_round(
    x_quantized: np.ndarray,
    threshold: int,
    dropped_before_upload: Iterable[int],
    round: int,
    seed: bytes,
    *,
    dropped_before_unmask: Iterable[int] = (),
    allow_weak_threshold: bool = False,
) -> EmulationResult:
    """Run the whole protocol for ``x_quantized[i - 1]`` of clients 1..n (shape [n, d], uint32).

    Every client advertises keys and shares them; ``dropped_before_upload`` then never send y
    and ``dropped_before_unmask`` send y but not their shares. Bytes count payloads only: 32
    per public key, 16 per Shamir value, 4 per masked coordinate."""
    x = _field_vector(x_quantized)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x_quantized must have shape [n >= 2, d], got {x.shape}")
    n, d = x.shape
    ids = list(range(1, n + 1))
    check_threshold(threshold, n, allow_weak_threshold=allow_weak_threshold)
    early, late = frozenset(dropped_before_upload), frozenset(dropped_before_unmask)
    if not early | late <= set(ids):
        raise ValueError(f"dropped clients must be among 1..{n}, got {sorted(early | late)}")
    clients = {i: SecAggClient.from_seed(i, client_seed(seed, i), round) for i in ids}
    public_keys = {i: c.public_key for i, c in clients.items()}
    sent = dict.fromkeys(ids, KEY_BYTES)
    server_sent = n * n * KEY_BYTES  # every client gets the advertised key list
    for i, c in clients.items():
        for r, ks in c.shares_for(
            ids, threshold, allow_weak_threshold=allow_weak_threshold
        ).items():
            clients[r].receive([ks])
            if r != i:  # relayed through the server
                sent[i] += ks.nbytes
                server_sent += ks.nbytes
    uploaded = [i for i in ids if i not in early]
    survivors, dropped = unmask_request(uploaded, ids, threshold)
    masked = {u: clients[u].mask(x[u - 1], public_keys) for u in sorted(survivors)}
    for u in survivors:
        sent[u] += FIELD_BYTES * d
    responders = [u for u in sorted(survivors) if u not in late]
    server_sent += len(responders) * FIELD_BYTES * n  # the request names U and D (ids as uint32)
    reveals = [clients[u].reveal(survivors, dropped) for u in responders]
    for r in reveals:
        sent[r.responder] += r.nbytes
    total, counts = _unmask(masked, reveals, public_keys, threshold, round, allow_weak_threshold)
    return EmulationResult(
        sum=total,
        survivors=tuple(sorted(survivors)),
        dropped=tuple(sorted(dropped)),
        responders=tuple(responders),
        bytes_sent_per_client=sent,
        server_bytes_sent=server_sent,
        masks_expanded=len(survivors) * n + counts.masks_expanded,
        key_agreements=len(survivors) * (n - 1) + counts.key_agreements,
        shares_made=2 * n * n,
        secrets_reconstructed=counts.secrets_reconstructed,
    )
