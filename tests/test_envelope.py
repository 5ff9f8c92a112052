"""Signed/encrypted update envelopes, replay guard and signed manifests."""

import hashlib
import json
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medichain_jax.privacy import envelope as env
from medichain_jax.privacy.envelope import (
    EnvelopeError,
    ReplayGuard,
    derive_nonce,
    derive_shared_key,
    exchange_key_from_seed,
    open_envelope,
    seal,
    sign_manifest,
    signing_key_from_seed,
    verify_manifest,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ALICE = signing_key_from_seed(b"hospital-a signing seed")
MALLORY = signing_key_from_seed(b"mallory signing seed")
PAYLOAD = b"model-update-weights:" + bytes(range(256)) * 4
RUN = "run-7"


def sealed(payload=PAYLOAD, *, round=3, seq=0, sender="hospital-a", key=KEY, signer=ALICE):
    return seal(payload, run=RUN, round=round, sender=sender, seq=seq, key=key, signer=signer)


def opened(blob, *, key=KEY, pub=None, run=RUN, expected_round=None, guard=None, **kw):
    pub = ALICE.public_key() if pub is None else pub
    return open_envelope(
        blob,
        key=key,
        sender_public_key=pub,
        expected_run=run,
        expected_round=expected_round,
        guard=guard,
        **kw,
    )


def reject(reason, blob, **kw):
    with pytest.raises(EnvelopeError) as info:
        opened(blob, **kw)
    assert info.value.reason == reason, str(info.value)
    return info.value


# The documented layout, implemented independently of the module.
def unframe(blob):
    assert blob[:4] == b"MCEV"
    (h,) = struct.unpack(">I", blob[4:8])
    header = blob[8 : 8 + h]
    (c,) = struct.unpack(">I", blob[8 + h : 12 + h])
    ciphertext = blob[12 + h : 12 + h + c]
    (s,) = struct.unpack(">I", blob[12 + h + c : 16 + h + c])
    signature = blob[16 + h + c :]
    assert len(signature) == s == 64
    return header, ciphertext, signature


def frame(header, ciphertext, signer=None, signature=None):
    prefix = b"MCEV" + struct.pack(">I", len(header)) + header
    prefix += struct.pack(">I", len(ciphertext)) + ciphertext
    if signature is None:
        signature = signer.sign(prefix)
    return prefix + struct.pack(">I", len(signature)) + signature


def canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def test_round_trip_and_header_contents():
    blob = sealed()
    out = opened(blob, expected_round=3, guard=ReplayGuard(), expected_sender="hospital-a")
    assert out.payload == PAYLOAD
    h = out.header
    assert (h.version, h.kind, h.run, h.round, h.sender, h.seq) == (
        1,
        "update",
        RUN,
        3,
        "hospital-a",
        0,
    )
    assert h.aead == "aes-256-gcm"
    assert h.payload_sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert h.payload_size == len(PAYLOAD)
    assert PAYLOAD[:64] not in blob  # the payload travels encrypted
    assert env.peek_header(blob) == h


def test_binary_layout_matches_documentation():
    blob = sealed()
    header, ciphertext, signature = unframe(blob)
    fields = json.loads(header)
    assert header == canon(fields)
    names = "version kind run round sender seq payload_sha256 payload_size aead nonce"
    assert set(fields) == set(names.split())
    assert len(ciphertext) == len(PAYLOAD) + 16
    ALICE.public_key().verify(signature, blob[: len(blob) - 4 - 64])
    nonce = bytes.fromhex(fields["nonce"])
    assert AESGCM(KEY).decrypt(nonce, ciphertext, header) == PAYLOAD


def test_seal_is_deterministic_and_nonce_matches_helper():
    assert sealed() == sealed()
    fields = json.loads(unframe(sealed())[0])
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    expect = derive_nonce(KEY, run=RUN, round=3, sender="hospital-a", seq=0, payload_sha256=digest)
    assert fields["nonce"] == expect.hex()
    kw = {"run": RUN, "round": 3, "sender": "hospital-a", "seq": 0, "key": KEY, "signer": ALICE}
    explicit = seal(PAYLOAD, **kw, nonce=b"\x07" * 12)
    assert json.loads(unframe(explicit)[0])["nonce"] == "07" * 12
    assert opened(explicit).payload == PAYLOAD


def test_tampered_ciphertext_byte_is_rejected_before_decryption():
    header, ciphertext, signature = unframe(sealed())
    bad = bytearray(ciphertext)
    bad[5] ^= 0x01
    reject("bad_signature", frame(header, bytes(bad), signature=signature))


def test_tampered_ciphertext_resigned_by_sender_fails_decryption():
    header, ciphertext, _ = unframe(sealed())
    bad = bytearray(ciphertext)
    bad[-1] ^= 0x80  # the GCM tag
    reject("decryption_failed", frame(header, bytes(bad), signer=ALICE))


@pytest.mark.parametrize(
    "field,value",
    [
        ("round", 4),
        ("sender", "hospital-b"),
        ("payload_sha256", "ab" * 32),
        ("run", "run-8"),
        ("seq", 1),
        ("kind", "metrics"),
        ("payload_size", 1),
        ("nonce", "00" * 12),
    ],
)
def test_tampered_header_field_breaks_signature(field, value):
    header, ciphertext, signature = unframe(sealed())
    fields = json.loads(header)
    assert fields[field] != value
    fields[field] = value
    reject("bad_signature", frame(canon(fields), ciphertext, signature=signature))


def test_signature_from_another_key_is_rejected():
    reject("bad_signature", sealed(signer=MALLORY))
    header, ciphertext, _ = unframe(sealed())
    reject("bad_signature", frame(header, ciphertext, signer=MALLORY))
    # the same envelope verifies under the key that really signed it
    assert opened(sealed(signer=MALLORY), pub=MALLORY.public_key()).payload == PAYLOAD


def test_wrong_aead_key_fails_decryption():
    reject("decryption_failed", sealed(), key=OTHER_KEY)


def test_payload_hash_mismatch_from_a_signing_sender():
    fields = json.loads(unframe(sealed())[0])
    fields["payload_sha256"] = hashlib.sha256(b"something else").hexdigest()
    header = canon(fields)
    ciphertext = AESGCM(KEY).encrypt(bytes.fromhex(fields["nonce"]), PAYLOAD, header)
    reject("payload_mismatch", frame(header, ciphertext, signer=ALICE))


def test_replay_of_same_envelope_is_rejected():
    guard = ReplayGuard()
    blob = sealed(seq=0)
    opened(blob, guard=guard)
    reject("replayed", blob, guard=guard)
    opened(sealed(seq=1, round=4), guard=guard)
    reject("replayed", blob, guard=guard)  # an old replay is still a replay
    # another sender's seq space is independent
    bob = signing_key_from_seed(b"hospital-b")
    opened(sealed(seq=0, sender="hospital-b", signer=bob), pub=bob.public_key(), guard=guard)


def test_older_round_after_newer_is_stale():
    guard = ReplayGuard()
    opened(sealed(round=5, seq=0), guard=guard)
    err = reject("stale", sealed(round=4, seq=1), guard=guard)
    assert "round 4" in str(err) and "5" in str(err)
    opened(sealed(round=5, seq=2), guard=guard)  # same round, higher seq is fine


def test_decreasing_seq_is_stale():
    guard = ReplayGuard()
    opened(sealed(round=1, seq=5), guard=guard)
    reject("stale", sealed(round=1, seq=4), guard=guard)
    reject("stale", sealed(round=2, seq=3), guard=guard)


def test_failed_open_does_not_poison_guard():
    guard = ReplayGuard()
    blob = sealed()
    reject("decryption_failed", blob, key=OTHER_KEY, guard=guard)
    assert opened(blob, guard=guard).payload == PAYLOAD


def test_wrong_run_and_round_and_sender():
    blob = sealed(round=3)
    reject("wrong_run", blob, run="run-8")
    err = reject("wrong_round", blob, expected_round=4)
    assert "expected round 4, got 3" in str(err)
    reject("wrong_sender", blob, expected_sender="hospital-b")
    reject("wrong_kind", blob, expected_kind="metrics")


def test_context_checks_come_after_signature():
    reject("bad_signature", sealed(signer=MALLORY), run="run-8", expected_round=9)


def test_truncated_or_garbage_blob_is_malformed():
    blob = sealed()
    for bad in (b"", b"garbage" * 20, blob[:10], blob[:-1], blob + b"\x00", b"XXXX" + blob[4:]):
        reject("malformed", bad)
    header, ciphertext, signature = unframe(blob)
    reject("malformed", frame(b"{not json", ciphertext, signature=signature))
    spaced = json.dumps(json.loads(header), sort_keys=True).encode()  # valid, not canonical
    reject("malformed", frame(spaced, ciphertext, signer=ALICE))
    deep = b"[" * 50_000  # must not escape as RecursionError
    reject("malformed", frame(deep, ciphertext, signature=signature))
    huge = {**json.loads(header), "round": 2**64}
    reject("malformed", frame(canon(huge), ciphertext, signer=ALICE))
    missing = json.loads(header)
    del missing["seq"]
    reject("malformed", frame(canon(missing), ciphertext, signer=ALICE))
    with pytest.raises(EnvelopeError) as info:
        env.peek_header(blob[:-3])
    assert info.value.reason == "malformed"


def test_unknown_version_and_aead():
    header, ciphertext, _ = unframe(sealed())
    v2 = {**json.loads(header), "version": 2}
    reject("unsupported_version", frame(canon(v2), ciphertext, signer=ALICE))
    chacha = {**json.loads(header), "aead": "chacha20-poly1305"}
    reject("unsupported_aead", frame(canon(chacha), ciphertext, signer=ALICE))


def test_replay_guard_survives_restart():
    guard = ReplayGuard()
    first, later = sealed(round=2, seq=0), sealed(round=3, seq=1)
    opened(first, guard=guard)
    opened(later, guard=guard)
    restored = ReplayGuard.from_dict(json.loads(json.dumps(guard.to_dict())))
    assert restored == guard
    reject("replayed", later, guard=restored)
    reject("stale", sealed(round=1, seq=2), guard=restored)
    opened(sealed(round=3, seq=2), guard=restored)
    opened(later, guard=ReplayGuard())  # a guard without the history would accept it
    with pytest.raises(ValueError):
        ReplayGuard.from_dict({"version": 1, "entries": [{"run": RUN}]})


def test_reason_codes_are_documented_and_closed():
    for reason in env.REASONS:
        assert f"``{reason}``" in env.__doc__
    with pytest.raises(ValueError):
        EnvelopeError("not-a-reason", "x")


MANIFEST = {
    "round": 4,
    "site": "hospital-a",
    "blob_id": "blob-123",
    "sha256": "cd" * 32,
    "size": 4096,
    "num_examples": 250,
    "metrics": {"loss": 0.25, "auc": 0.875},
    "base_model_sha256": "ef" * 32,
}


def test_manifest_round_trip():
    signed = sign_manifest(MANIFEST, ALICE)
    assert signed["signer"] == env.public_key_hex(ALICE)
    assert len(signed["signature"]) == 128
    assert verify_manifest(signed, ALICE.public_key()) == MANIFEST
    wire = json.loads(json.dumps(signed))  # survives transport as JSON
    assert verify_manifest(wire, env.public_key_hex(ALICE)) == MANIFEST


def _tampered(signed, path, value):
    out = json.loads(json.dumps(signed))
    target = out
    for key in path[:-1]:
        target = target[key]
    assert target[path[-1]] != value
    target[path[-1]] = value
    return out


@pytest.mark.parametrize(
    "path,value",
    [
        (("round",), 5),
        (("site",), "hospital-b"),
        (("blob_id",), "blob-124"),
        (("sha256",), "ce" + "cd" * 31),
        (("size",), 4097),
        (("num_examples",), 251),
        (("metrics", "loss"), 0.125),
        (("metrics", "auc"), 0.9),
        (("base_model_sha256",), "ff" * 32),
        (("signer",), env.public_key_hex(MALLORY)),
        (("signature",), "00" * 64),
    ],
)
def test_manifest_tampering_is_rejected(path, value):
    signed = sign_manifest(MANIFEST, ALICE)
    with pytest.raises(EnvelopeError) as info:
        verify_manifest(_tampered(signed, path, value), ALICE.public_key())
    assert info.value.reason == "bad_signature"


def test_manifest_added_or_removed_field_and_wrong_key():
    signed = sign_manifest(MANIFEST, ALICE)
    for bad in ({**signed, "extra": 1}, {k: v for k, v in signed.items() if k != "size"}):
        with pytest.raises(EnvelopeError) as info:
            verify_manifest(bad, ALICE.public_key())
        assert info.value.reason == "bad_signature"
    with pytest.raises(EnvelopeError) as info:
        verify_manifest(signed, MALLORY.public_key())
    assert info.value.reason == "bad_signature"
    resigned = sign_manifest(MANIFEST, MALLORY)  # self-consistent but from the wrong site key
    with pytest.raises(EnvelopeError) as info:
        verify_manifest(resigned, ALICE.public_key())
    assert info.value.reason == "bad_signature"
    assert f"signer {env.public_key_hex(MALLORY)}" in str(info.value)  # names the wrong signer
    with pytest.raises(EnvelopeError) as info:
        verify_manifest({**resigned, "signer": signed["signer"]}, ALICE.public_key())
    assert info.value.reason == "bad_signature"
    with pytest.raises(EnvelopeError) as info:
        verify_manifest({k: v for k, v in signed.items() if k != "signature"}, ALICE.public_key())
    assert info.value.reason == "malformed"
    with pytest.raises(ValueError):
        sign_manifest({**MANIFEST, "signature": "x"}, ALICE)
    with pytest.raises(ValueError):
        sign_manifest({**MANIFEST, "bad": float("nan")}, ALICE)


def test_derive_shared_key_is_symmetric_and_bound_to_pair_and_context():
    a, b, c = (exchange_key_from_seed(s) for s in (b"site-a", b"site-b", b"site-c"))
    ab = derive_shared_key(a, b.public_key(), b"medichain/run-7")
    assert len(ab) == 32
    assert ab == derive_shared_key(b, a.public_key(), b"medichain/run-7")
    assert ab == derive_shared_key(b, env.public_key_bytes(a), b"medichain/run-7")
    assert ab != derive_shared_key(a, b.public_key(), b"medichain/run-8")
    assert ab != derive_shared_key(a, c.public_key(), b"medichain/run-7")
    assert ab != derive_shared_key(c, b.public_key(), b"medichain/run-7")
    blob = sealed(key=ab)
    assert opened(blob, key=derive_shared_key(b, a.public_key(), b"medichain/run-7")).payload
    reject("decryption_failed", blob, key=derive_shared_key(c, a.public_key(), b"medichain/run-7"))


def test_derive_nonce_unique_per_input_and_deterministic():
    base = {"run": RUN, "round": 1, "sender": "hospital-a", "seq": 0}
    n0 = derive_nonce(KEY, **base)
    assert len(n0) == 12
    assert n0 == derive_nonce(KEY, **base)
    nonces = {derive_nonce(KEY, **{**base, "seq": s}) for s in range(1000)}
    assert len(nonces) == 1000
    for change in ({"round": 2}, {"sender": "hospital-b"}, {"run": "run-8"}):
        assert derive_nonce(KEY, **{**base, **change}) != n0
    assert derive_nonce(OTHER_KEY, **base) != n0
    assert derive_nonce(KEY, **base, payload_sha256="ab" * 32) != n0


def test_key_helpers_round_trip():
    assert signing_key_from_seed(b"x").private_bytes_raw() == (
        signing_key_from_seed(b"x").private_bytes_raw()
    )
    assert env.public_key_bytes(signing_key_from_seed(b"x")) != env.public_key_bytes(
        signing_key_from_seed(b"y")
    )
    raw = env.public_key_bytes(ALICE)
    assert len(raw) == 32
    assert env.public_key_bytes(env.public_key_from_bytes(raw)) == raw
    assert env.public_key_bytes(env.public_key_from_hex(raw.hex())) == raw
    assert env.public_key_hex(ALICE) == raw.hex()
    with pytest.raises(ValueError):
        env.public_key_from_bytes(raw[:31])
    assert opened(sealed(), pub=raw).payload == PAYLOAD
    assert opened(sealed(), pub=raw.hex()).payload == PAYLOAD


def test_seal_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sealed(key=KEY[:16])
    with pytest.raises(ValueError):
        sealed(round=-1)
    with pytest.raises(ValueError):
        sealed(sender="")
    with pytest.raises(ValueError):
        seal(PAYLOAD, run=RUN, round=1, sender="a", seq=0, key=KEY, signer=ALICE, nonce=b"1")
