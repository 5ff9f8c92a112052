"""The round protocol's ledger layout and signed manifests.

Everything lives under ``medichain/<run>/`` in a context's key-value state (Calimero's stock
``kv-store`` app, or ours in ``app/``); model weights travel as blobs, the state holds only small
signed JSON manifests (state sync records are limited to 1 MiB):

========================================  =============================================  =========
key                                       value (a manifest signed with Ed25519)           writer
========================================  =============================================  =========
``medichain/<run>/site/<site>``           a hospital's registration: its public keys       the site
``medichain/<run>/roster/<site>``         the coordinator's admission of that site         coordinator
``medichain/<run>/round/<r>/open``        round r: cohort, base model blob + SHA-256       coordinator
``medichain/<run>/round/<r>/update/<s>``  site s's update: blob id, SHA-256, size, n, ...  the site
``medichain/<run>/round/<r>/global``      the new global model: blob id, SHA-256, ...      coordinator
``medichain/<run>/round/<R>/eval/<s>``    site s's metrics of the final model (R = rounds)  the site
========================================  =============================================  =========

Round ``r``'s ``open`` manifest names the cohort sampled from (seed, round), the
``participants`` (those of the cohort admitted so far; the others weigh 0), the base model (the server's message) as a blob
id and SHA-256, and ``phase`` ``train``; after the last round the coordinator opens round
``R = rounds`` with phase ``eval`` and the final global model as its base.

Integrity never relies on the app: every manifest is signed by its writer's key, the
coordinator's key is fixed in every site's configuration and sites' keys are admitted by the
coordinator (roster); a reader checks the signature, the key it sits under, the run and the
round, and the blob's SHA-256 before using anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medichain_jax.privacy.envelope import EnvelopeError, sign_manifest, verify_manifest

PREFIX = "medichain"
VERSION = 1


class ProtocolError(ValueError):
    """A manifest is forged, misplaced, stale or malformed; the message says which and why."""


def run_prefix(run: str) -> str:
    """All of a run's keys start with this."""
    return f"{PREFIX}/{run}/"


def site_key(run: str, site: str) -> str:
    """Where a hospital registers its public keys."""
    return f"{PREFIX}/{run}/site/{site}"


def roster_key(run: str, site: str) -> str:
    """Where the coordinator admits a hospital."""
    return f"{PREFIX}/{run}/roster/{site}"


def open_key(run: str, rnd: int) -> str:
    """Where the coordinator opens round ``rnd``."""
    return f"{PREFIX}/{run}/round/{rnd}/open"


def update_key(run: str, rnd: int, site: str) -> str:
    """Where hospital ``site`` submits its update of round ``rnd``."""
    return f"{PREFIX}/{run}/round/{rnd}/update/{site}"


def update_prefix(run: str, rnd: int) -> str:
    """Prefix of every update key of round ``rnd``."""
    return f"{PREFIX}/{run}/round/{rnd}/update/"


def eval_key(run: str, rnd: int, site: str) -> str:
    """Where hospital ``site`` reports its metrics of the final global model."""
    return f"{PREFIX}/{run}/round/{rnd}/eval/{site}"


def eval_prefix(run: str, rnd: int) -> str:
    """Prefix of every evaluation report of round ``rnd``."""
    return f"{PREFIX}/{run}/round/{rnd}/eval/"


def global_key(run: str, rnd: int) -> str:
    """Where the coordinator publishes round ``rnd``'s new global model."""
    return f"{PREFIX}/{run}/round/{rnd}/global"


@dataclasses.dataclass(frozen=True)
class Signed:
    """A verified manifest and the hex public key that signed it."""

    body: dict[str, Any]
    signer: str


def make(kind: str, signer: Any, **fields: Any) -> dict[str, Any]:
    """A signed manifest of ``kind`` (fields must be JSON values)."""
    return sign_manifest({"v": VERSION, "kind": kind, **fields}, signer)


def check(
    value: Mapping[str, Any] | None,
    *,
    kind: str,
    key: str,
    trusted: Mapping[str, str] | str,
    run: str,
    rnd: int | None = None,
    site: str | None = None,
) -> Signed:
    """Verify a manifest read at ``key``: signed by a trusted key (a hex key, or site -> hex
    key), of ``kind``, for this ``run`` / round / site. Raises :class:`ProtocolError`."""
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{key}: no manifest (got {type(value).__name__})")
    signer = value.get("signer")
    if isinstance(trusted, str):
        allowed = {trusted}
    else:
        allowed = {trusted[site]} if site is not None and site in trusted else set()
    if signer not in allowed:
        who = "the coordinator" if isinstance(trusted, str) else f"site {site}'s admitted key"
        raise ProtocolError(f"{key}: signed by {str(signer)[:16]}..., not {who}")
    try:
        body = verify_manifest(value, signer)
    except EnvelopeError as err:
        raise ProtocolError(f"{key}: {err}") from err
    if body.get("v") != VERSION or body.get("kind") != kind:
        raise ProtocolError(
            f"{key}: expected a v{VERSION} {kind!r} manifest, got {body.get('kind')!r}"
        )
    if body.get("run") != run:
        raise ProtocolError(f"{key}: manifest of run {body.get('run')!r}, expected {run!r}")
    if rnd is not None and body.get("round") != rnd:
        raise ProtocolError(
            f"{key}: manifest of round {body.get('round')!r} replayed into round {rnd}"
        )
    if site is not None and body.get("site") != site:
        raise ProtocolError(f"{key}: manifest of site {body.get('site')!r}, expected {site!r}")
    return Signed(body, signer)
