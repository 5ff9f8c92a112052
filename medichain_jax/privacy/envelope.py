"""Signed, encrypted envelopes for model-update payloads exchanged between hospitals.

An envelope protects one payload (e.g. a serialized model update) in transit and at rest:

* **Confidentiality and integrity** with AES-256-GCM (NIST SP 800-38D). The 32-byte key is
  supplied by the caller, e.g. from :func:`derive_shared_key` (X25519, RFC 7748, followed by
  HKDF-SHA256, RFC 5869). The canonical header is the associated data, so the ciphertext is
  bound to its (run, round, sender, seq, ...) context.
* **Authenticity** with Ed25519 (RFC 8032): the sender signs the header and the ciphertext, so
  (run, round, sender, payload hash) cannot be changed without the sender's key. The receiver
  verifies the signature *before* decrypting anything.
* **Freshness** with :class:`ReplayGuard`, pure in-memory receive-side state that rejects
  replays and stale / reordered envelopes and can be persisted by the caller via
  :meth:`ReplayGuard.to_dict` / :meth:`ReplayGuard.from_dict`.

Nonces. This module never draws randomness. :func:`seal` takes an explicit ``nonce`` or, by
default, derives one with :func:`derive_nonce` = HKDF-SHA256(key, run, round, sender, seq,
payload hash) truncated to 96 bits. A deterministic nonce is only safe while every
(key, nonce) pair is used for one message: **a sender must never reuse a sequence number
under one key** (persist the counter across crashes; ``seq`` is one counter per
(run, sender) shared by all kinds). The payload hash in the derivation means an accidental
reuse of ``seq`` with a different payload still yields a different nonce (with overwhelming
probability), and the receiver's :class:`ReplayGuard` rejects any repeated (run, sender, seq).
Random-looking 96-bit GCM nonces keep the SP 800-38D collision bound only up to 2**32
messages per key; rotate keys well before that.

Binary layout (all integers unsigned big-endian; ``H``, ``C``, ``S`` are part lengths)::

    offset        size  field
    0             4     magic b"MCEV"
    4             4     H
    8             H     header: canonical JSON (sorted keys, no spaces, UTF-8)
    8+H           4     C
    12+H          C     ciphertext: AES-256-GCM(key, nonce, payload, aad=header) incl. 16-byte tag
    12+H+C        4     S (always 64)
    16+H+C        S     Ed25519 signature over bytes [0, 12+H+C) -- magic, header and ciphertext

Nothing may follow the signature. Header fields (exactly these): ``version`` (1), ``kind``,
``run``, ``round``, ``sender``, ``seq``, ``payload_sha256`` (lowercase hex), ``payload_size``,
``aead`` (``"aes-256-gcm"``), ``nonce`` (24 lowercase hex digits). The header is plaintext:
it reveals the payload's size and SHA-256 to anyone holding the blob.

Keys. :func:`signing_key_from_seed` and :func:`exchange_key_from_seed` are deterministic (for
simulation and tests): a key is exactly as secret as its seed, so a deployment seeds them with
>= 32 bytes from a CSPRNG or generates keys outside this module.

Rejections raise :class:`EnvelopeError`; its ``reason`` is one of :data:`REASONS`:

* ``malformed`` -- framing, header JSON/schema or manifest structure is invalid
* ``unsupported_version`` -- header ``version`` is not 1
* ``unsupported_aead`` -- header ``aead`` is not ``"aes-256-gcm"``
* ``bad_signature`` -- Ed25519 verification failed (tampered header/ciphertext, wrong key)
* ``wrong_sender`` -- authenticated sender differs from ``expected_sender``
* ``wrong_kind`` -- authenticated kind differs from ``expected_kind``
* ``wrong_run`` -- authenticated run differs from ``expected_run``
* ``wrong_round`` -- authenticated round differs from ``expected_round``
* ``replayed`` -- this (run, sender, seq) was already accepted
* ``stale`` -- older round than, or lower seq than, the newest accepted from that sender
* ``decryption_failed`` -- AEAD authentication failed (wrong key or ciphertext altered)
* ``payload_mismatch`` -- decrypted payload's size or SHA-256 differs from the header

Open order: framing -> header -> version/aead -> signature -> sender/kind/run/round ->
replay guard (check) -> decrypt -> payload hash -> replay guard (record). A failed open never
changes the guard.

JSON manifests (:func:`sign_manifest` / :func:`verify_manifest`) are signed over
``b"medichain-manifest-v1\\x00" + canonical_json(manifest + {"signer": <hex key>})``; a
verifier in another language must reproduce Python's ``json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` byte for byte (prefer integers
and strings; floats are written in Python's shortest round-trip form).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
AEAD = "aes-256-gcm"
MAGIC = b"MCEV"
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SIGNATURE_SIZE = 64
MAX_HEADER_BYTES = 64 * 1024
MAX_INT = 2**63 - 1  # round, seq and payload_size fit a signed 64-bit integer
MAX_PAYLOAD_BYTES = 2**31 - 1 - TAG_SIZE  # the AEAD backend's per-call data limit
HEADER_FIELDS = frozenset(
    {
        "version",
        "kind",
        "run",
        "round",
        "sender",
        "seq",
        "payload_sha256",
        "payload_size",
        "aead",
        "nonce",
    }
)
REASONS = frozenset(
    {
        "malformed",
        "unsupported_version",
        "unsupported_aead",
        "bad_signature",
        "wrong_sender",
        "wrong_kind",
        "wrong_run",
        "wrong_round",
        "replayed",
        "stale",
        "decryption_failed",
        "payload_mismatch",
    }
)

_LEN = struct.Struct(">I")
_HEX = frozenset("0123456789abcdef")
_MANIFEST_DOMAIN = b"medichain-manifest-v1\x00"
_NONCE_SALT = b"medichain/envelope/nonce/v1"
_SIGNING_SEED_INFO = b"medichain/ed25519-signing-key/v1"
_EXCHANGE_SEED_INFO = b"medichain/x25519-exchange-key/v1"
_SHARED_KEY_INFO = b"medichain/x25519-shared-key/v1\x00"


class EnvelopeError(Exception):
    """An envelope or manifest was rejected; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown EnvelopeError reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


# --------------------------------------------------------------------------- keys


def _hkdf(ikm: bytes, *, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _require_bytes(value: object, name: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def signing_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """Deterministic Ed25519 key from ``seed`` via HKDF; for simulation/tests."""
    seed = _require_bytes(seed, "seed")
    if not seed:
        raise ValueError("seed must not be empty")
    return Ed25519PrivateKey.from_private_bytes(_hkdf(seed, length=32, info=_SIGNING_SEED_INFO))


def exchange_key_from_seed(seed: bytes) -> X25519PrivateKey:
    """Deterministic X25519 key from ``seed`` via HKDF; for simulation/tests."""
    seed = _require_bytes(seed, "seed")
    if not seed:
        raise ValueError("seed must not be empty")
    return X25519PrivateKey.from_private_bytes(_hkdf(seed, length=32, info=_EXCHANGE_SEED_INFO))


def public_key_bytes(
    key: Ed25519PrivateKey | Ed25519PublicKey | X25519PrivateKey | X25519PublicKey,
) -> bytes:
    """Raw 32-byte public key of an Ed25519 or X25519 key (private keys are reduced to public)."""
    if isinstance(key, Ed25519PrivateKey | X25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey | X25519PublicKey):
        raise TypeError(f"expected an Ed25519 or X25519 key, got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_hex(
    key: Ed25519PrivateKey | Ed25519PublicKey | X25519PrivateKey | X25519PublicKey,
) -> str:
    """Lowercase hex of :func:`public_key_bytes`."""
    return public_key_bytes(key).hex()


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Ed25519 public key from its raw 32-byte encoding."""
    raw = _require_bytes(raw, "raw")
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Ed25519 public key from 64 hex digits."""
    return public_key_from_bytes(bytes.fromhex(text))


def exchange_public_key_from_bytes(raw: bytes) -> X25519PublicKey:
    """X25519 public key from its raw 32-byte encoding."""
    raw = _require_bytes(raw, "raw")
    if len(raw) != 32:
        raise ValueError(f"an X25519 public key is 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def derive_shared_key(
    own_x25519_private: X25519PrivateKey,
    peer_x25519_public: X25519PublicKey | bytes,
    context: bytes,
) -> bytes:
    """32-byte AEAD key for a pair: HKDF-SHA256(X25519(own, peer), context, both public keys)."""
    if not isinstance(own_x25519_private, X25519PrivateKey):
        raise TypeError("own_x25519_private must be an X25519PrivateKey")
    if not isinstance(peer_x25519_public, X25519PublicKey):
        peer_x25519_public = exchange_public_key_from_bytes(peer_x25519_public)
    context = _require_bytes(context, "context")
    shared = own_x25519_private.exchange(peer_x25519_public)  # ValueError on small-order keys
    if not any(shared):
        raise ValueError("X25519 produced an all-zero shared secret")
    pair = sorted([public_key_bytes(own_x25519_private), public_key_bytes(peer_x25519_public)])
    info = _SHARED_KEY_INFO + _LEN.pack(len(context)) + context + pair[0] + pair[1]
    return _hkdf(shared, length=KEY_SIZE, info=info)


def _as_verify_key(key: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str):
        return public_key_from_hex(key)
    return public_key_from_bytes(key)


def _check_key(key: bytes) -> bytes:
    key = _require_bytes(key, "key")
    if len(key) != KEY_SIZE:
        raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
    return key


# --------------------------------------------------------------------------- header


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact separators, UTF-8, no NaN/Infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(value: object, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and set(value) <= _HEX


def _field_problem(fields: Mapping[str, Any]) -> str | None:
    """Why the header fields are invalid, or None (version and aead are checked elsewhere)."""
    for name in ("kind", "run", "sender"):
        if not isinstance(fields[name], str) or not fields[name]:
            return f"{name} must be a non-empty string, got {fields[name]!r}"
    for name in ("round", "seq", "payload_size"):
        if not _is_int(fields[name]) or not 0 <= fields[name] <= MAX_INT:
            return f"{name} must be an integer in [0, 2**63), got {fields[name]!r}"
    if fields["payload_size"] > MAX_PAYLOAD_BYTES:
        return f"payload_size {fields['payload_size']} exceeds {MAX_PAYLOAD_BYTES}"
    if not _is_hex(fields["payload_sha256"], 64):
        return "payload_sha256 must be 64 lowercase hex digits"
    if not _is_hex(fields["nonce"], 2 * NONCE_SIZE):
        return f"nonce must be {2 * NONCE_SIZE} lowercase hex digits"
    return None


@dataclass(frozen=True)
class Header:
    """The authenticated envelope header (plaintext; it is the AEAD associated data)."""

    version: int
    kind: str
    run: str
    round: int
    sender: str
    seq: int
    payload_sha256: str
    payload_size: int
    aead: str
    nonce: str

    def to_dict(self) -> dict[str, Any]:
        """Header fields as a plain dict."""
        return {name: getattr(self, name) for name in sorted(HEADER_FIELDS)}

    def to_bytes(self) -> bytes:
        """Canonical JSON encoding, exactly as framed and signed."""
        return canonical_json(self.to_dict())


def _parse_header(raw: bytes) -> Header:
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError("malformed", f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise EnvelopeError("malformed", f"header must be a JSON object, got {type(fields)}")
    version = fields.get("version")
    if not _is_int(version):
        raise EnvelopeError("malformed", f"header version must be an integer, got {version!r}")
    if version != VERSION:
        raise EnvelopeError("unsupported_version", f"version {version} (supported: {VERSION})")
    if set(fields) != HEADER_FIELDS:
        missing = sorted(HEADER_FIELDS - set(fields))
        extra = sorted(set(fields) - HEADER_FIELDS)
        raise EnvelopeError("malformed", f"header fields: missing {missing}, unexpected {extra}")
    if fields["aead"] != AEAD:
        raise EnvelopeError("unsupported_aead", f"aead {fields['aead']!r} (supported: {AEAD!r})")
    problem = _field_problem(fields)
    if problem is not None:
        raise EnvelopeError("malformed", f"header {problem}")
    header = Header(**fields)
    if header.to_bytes() != raw:
        raise EnvelopeError("malformed", "header is not in canonical JSON form")
    return header


# --------------------------------------------------------------------------- framing


def _frame_prefix(header: bytes, ciphertext: bytes) -> bytes:
    return MAGIC + _LEN.pack(len(header)) + header + _LEN.pack(len(ciphertext)) + ciphertext


def _unframe(blob: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(signed prefix, header, ciphertext, signature) of a framed envelope."""
    blob = _require_bytes(blob, "blob")
    pos = 0

    def take(size: int, what: str) -> bytes:
        nonlocal pos
        if len(blob) - pos < size:
            raise EnvelopeError(
                "malformed",
                f"truncated envelope: {what} needs {size} bytes at offset {pos}, "
                f"{len(blob) - pos} left",
            )
        part = blob[pos : pos + size]
        pos += size
        return part

    if take(len(MAGIC), "magic") != MAGIC:
        raise EnvelopeError("malformed", f"bad magic {blob[: len(MAGIC)]!r}, expected {MAGIC!r}")
    (header_len,) = _LEN.unpack(take(_LEN.size, "header length"))
    if header_len > MAX_HEADER_BYTES:
        raise EnvelopeError("malformed", f"header length {header_len} > {MAX_HEADER_BYTES}")
    header = take(header_len, "header")
    (ct_len,) = _LEN.unpack(take(_LEN.size, "ciphertext length"))
    ciphertext = take(ct_len, "ciphertext")
    prefix_end = pos
    (sig_len,) = _LEN.unpack(take(_LEN.size, "signature length"))
    if sig_len != SIGNATURE_SIZE:
        raise EnvelopeError("malformed", f"signature length {sig_len}, expected {SIGNATURE_SIZE}")
    signature = take(sig_len, "signature")
    if pos != len(blob):
        raise EnvelopeError("malformed", f"{len(blob) - pos} trailing bytes after the signature")
    return blob[:prefix_end], header, ciphertext, signature


def peek_header(blob: bytes) -> Header:
    """The header of ``blob`` WITHOUT authentication (e.g. to look up the sender's key)."""
    return _parse_header(_unframe(blob)[1])


# --------------------------------------------------------------------------- seal / open


def derive_nonce(
    key: bytes, *, run: str, round: int, sender: str, seq: int, payload_sha256: str = ""
) -> bytes:
    """96-bit nonce: HKDF-SHA256(key; run, round, sender, seq, payload hash). Never reuse seq."""
    key = _check_key(key)
    info = canonical_json([run, round, sender, seq, payload_sha256])
    return _hkdf(key, length=NONCE_SIZE, salt=_NONCE_SALT, info=info)


def seal(
    payload: bytes,
    *,
    run: str,
    round: int,
    sender: str,
    seq: int,
    key: bytes,
    signer: Ed25519PrivateKey,
    kind: str = "update",
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt ``payload`` under ``key``, sign header + ciphertext with ``signer``, frame it."""
    payload = _require_bytes(payload, "payload")
    key = _check_key(key)
    if not isinstance(signer, Ed25519PrivateKey):
        raise TypeError("signer must be an Ed25519PrivateKey")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    digest = hashlib.sha256(payload).hexdigest()
    fields = {
        "version": VERSION,
        "kind": kind,
        "run": run,
        "round": round,
        "sender": sender,
        "seq": seq,
        "payload_sha256": digest,
        "payload_size": len(payload),
        "aead": AEAD,
        "nonce": "00" * NONCE_SIZE,
    }
    problem = _field_problem(fields)
    if problem is not None:
        raise ValueError(problem)
    if nonce is None:
        nonce = derive_nonce(
            key, run=run, round=round, sender=sender, seq=seq, payload_sha256=digest
        )
    nonce = _require_bytes(nonce, "nonce")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    fields["nonce"] = nonce.hex()
    header = Header(**fields).to_bytes()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    ciphertext = AESGCM(key).encrypt(nonce, payload, header)
    prefix = _frame_prefix(header, ciphertext)
    signature = signer.sign(prefix)
    return prefix + _LEN.pack(len(signature)) + signature


@dataclass(frozen=True)
class Opened:
    """An authenticated, decrypted envelope."""

    header: Header
    payload: bytes


def open_envelope(
    blob: bytes,
    *,
    key: bytes,
    sender_public_key: Ed25519PublicKey | bytes | str,
    expected_run: str,
    expected_round: int | None,
    guard: ReplayGuard | None,
    expected_sender: str | None = None,
    expected_kind: str | None = None,
) -> Opened:
    """Verify, check context and freshness, decrypt; raise :class:`EnvelopeError` on any failure."""
    key = _check_key(key)
    verify_key = _as_verify_key(sender_public_key)
    prefix, raw_header, ciphertext, signature = _unframe(blob)
    header = _parse_header(raw_header)
    try:
        verify_key.verify(signature, prefix)
    except InvalidSignature:
        raise EnvelopeError(
            "bad_signature",
            f"signature does not verify under {public_key_hex(verify_key)} "
            f"(claimed sender {header.sender!r}): header or ciphertext altered, or wrong key",
        ) from None
    if expected_sender is not None and header.sender != expected_sender:
        raise EnvelopeError(
            "wrong_sender", f"expected sender {expected_sender!r}, got {header.sender!r}"
        )
    if expected_kind is not None and header.kind != expected_kind:
        raise EnvelopeError("wrong_kind", f"expected kind {expected_kind!r}, got {header.kind!r}")
    if header.run != expected_run:
        raise EnvelopeError("wrong_run", f"expected run {expected_run!r}, got {header.run!r}")
    if expected_round is not None and header.round != expected_round:
        raise EnvelopeError("wrong_round", f"expected round {expected_round}, got {header.round}")
    if guard is not None:
        guard.check(header)
    if len(ciphertext) != header.payload_size + TAG_SIZE:
        raise EnvelopeError(
            "payload_mismatch",
            f"ciphertext of {len(ciphertext)} bytes cannot hold a {header.payload_size}-byte "
            f"payload plus a {TAG_SIZE}-byte tag",
        )
    try:
        payload = AESGCM(key).decrypt(bytes.fromhex(header.nonce), ciphertext, raw_header)
    except InvalidTag:
        raise EnvelopeError(
            "decryption_failed",
            "AES-256-GCM authentication failed: wrong key or ciphertext/header altered",
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if len(payload) != header.payload_size or not hmac.compare_digest(
        digest, header.payload_sha256
    ):
        raise EnvelopeError(
            "payload_mismatch",
            f"payload sha256 {digest} ({len(payload)} bytes) differs from header "
            f"{header.payload_sha256} ({header.payload_size} bytes)",
        )
    if guard is not None:
        guard.record(header)
    return Opened(header=header, payload=payload)


# --------------------------------------------------------------------------- replay guard


@dataclass
class SenderHistory:
    """What a :class:`ReplayGuard` has accepted from one (run, sender)."""

    newest_round: int
    last_seq: int
    seqs: set[int] = field(default_factory=set)


@dataclass
class ReplayGuard:
    """Receive-side freshness state per (run, sender): seqs must increase, rounds never go back."""

    history: dict[tuple[str, str], SenderHistory] = field(default_factory=dict)

    def check(self, header: Header) -> None:
        """Raise ``replayed`` or ``stale`` if ``header`` must not be accepted; changes nothing."""
        seen = self.history.get((header.run, header.sender))
        if seen is None:
            return
        where = f"run {header.run!r}, sender {header.sender!r}"
        if header.seq in seen.seqs:
            raise EnvelopeError("replayed", f"seq {header.seq} already accepted ({where})")
        if header.seq < seen.last_seq:
            raise EnvelopeError(
                "stale", f"seq {header.seq} is below the last accepted {seen.last_seq} ({where})"
            )
        if header.round < seen.newest_round:
            raise EnvelopeError(
                "stale",
                f"round {header.round} is older than the newest accepted {seen.newest_round} "
                f"({where})",
            )

    def record(self, header: Header) -> None:
        """Remember ``header`` as accepted (call only after :meth:`check` and full verification)."""
        key = (header.run, header.sender)
        seen = self.history.get(key)
        if seen is None:
            self.history[key] = SenderHistory(header.round, header.seq, {header.seq})
            return
        seen.newest_round = max(seen.newest_round, header.round)
        seen.last_seq = max(seen.last_seq, header.seq)
        seen.seqs.add(header.seq)

    def check_and_record(self, header: Header) -> None:
        """:meth:`check`, then :meth:`record`."""
        self.check(header)
        self.record(header)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable snapshot of the state (for the caller to persist)."""
        entries = [
            {
                "run": run,
                "sender": sender,
                "newest_round": h.newest_round,
                "last_seq": h.last_seq,
                "seqs": sorted(h.seqs),
            }
            for (run, sender), h in sorted(self.history.items())
        ]
        return {"version": 1, "entries": entries}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplayGuard:
        """Rebuild a guard from :meth:`to_dict` output; ValueError if it is not one."""
        if not isinstance(data, Mapping) or data.get("version") != 1:
            raise ValueError("not a ReplayGuard snapshot (version 1)")
        guard = cls()
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise ValueError("ReplayGuard snapshot: entries must be a list")
        for entry in entries:
            try:
                run, sender = entry["run"], entry["sender"]
                newest, last, seqs = entry["newest_round"], entry["last_seq"], entry["seqs"]
            except (KeyError, TypeError):
                raise ValueError(f"ReplayGuard snapshot: bad entry {entry!r}") from None
            ok = (
                isinstance(run, str)
                and isinstance(sender, str)
                and _is_int(newest)
                and _is_int(last)
                and isinstance(seqs, list)
                and all(_is_int(s) for s in seqs)
                and last in seqs
            )
            if not ok or (run, sender) in guard.history:
                raise ValueError(f"ReplayGuard snapshot: bad entry {entry!r}")
            guard.history[(run, sender)] = SenderHistory(newest, last, set(seqs))
        return guard


# --------------------------------------------------------------------------- manifests


def _manifest_message(body: Mapping[str, Any]) -> bytes:
    try:
        encoded = canonical_json(body)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(
            "malformed", f"manifest is not canonical-JSON encodable: {exc}"
        ) from None
    return _MANIFEST_DOMAIN + encoded


def sign_manifest(manifest: Mapping[str, Any], signer: Ed25519PrivateKey) -> dict[str, Any]:
    """Copy of ``manifest`` plus ``signer`` (public key hex) and ``signature`` (Ed25519 hex)."""
    if not isinstance(signer, Ed25519PrivateKey):
        raise TypeError("signer must be an Ed25519PrivateKey")
    if not isinstance(manifest, Mapping):
        raise TypeError("manifest must be a mapping")
    reserved = {"signer", "signature"} & set(manifest)
    if reserved:
        raise ValueError(f"manifest must not contain reserved fields {sorted(reserved)}")
    body = {**manifest, "signer": public_key_hex(signer)}
    try:
        encoded = canonical_json(body)
        stable = canonical_json(json.loads(encoded)) == encoded
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest is not canonical-JSON encodable: {exc}") from None
    if not stable:
        raise ValueError("manifest does not survive a JSON round trip unchanged")
    return {**body, "signature": signer.sign(_MANIFEST_DOMAIN + encoded).hex()}


def verify_manifest(
    signed: Mapping[str, Any], public_key: Ed25519PublicKey | bytes | str
) -> dict[str, Any]:
    """The manifest without ``signer``/``signature`` if signed by ``public_key``, else raise."""
    verify_key = _as_verify_key(public_key)
    if not isinstance(signed, Mapping):
        raise EnvelopeError("malformed", f"signed manifest must be a mapping, got {type(signed)}")
    signature, signer = signed.get("signature"), signed.get("signer")
    if not _is_hex(signature, 2 * SIGNATURE_SIZE):
        raise EnvelopeError("malformed", "manifest signature must be 128 lowercase hex digits")
    if not _is_hex(signer, 64):
        raise EnvelopeError("malformed", "manifest signer must be 64 lowercase hex digits")
    expected = public_key_hex(verify_key)
    if not hmac.compare_digest(signer, expected):
        raise EnvelopeError("bad_signature", f"manifest signer {signer}, expected {expected}")
    body = {k: v for k, v in signed.items() if k != "signature"}
    try:
        verify_key.verify(bytes.fromhex(signature), _manifest_message(body))
    except InvalidSignature:
        raise EnvelopeError(
            "bad_signature", f"manifest signature does not verify under {expected}"
        ) from None
    return {k: v for k, v in body.items() if k != "signer"}
