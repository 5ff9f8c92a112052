"""``python -m calimero_adapter.site``: one hospital's site runner in the real mode.

It trains with the simulator's very code (same config, loaders, ``local_train`` inside the same
per-hospital client step, same codec) and talks to its own Calimero node only: it registers its
Ed25519 key, waits for each round the coordinator opens, downloads the base model blob and
checks its SHA-256 and the coordinator's signature, trains, uploads its update as a blob and
writes a signed update manifest, then waits for the next round. After the last round it
evaluates the final global model on its own test rows and posts the metrics.

Crash-safe: progress is kept in ``<workdir>/state.json``, and before training a round it looks
for its own signed manifest of that round in the ledger, so a restarted site never submits
twice. Every payload that leaves the hospital (manifests and update blobs) is appended to
``<workdir>/audit.jsonl`` with its kind, key or blob id, SHA-256 and size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from calimero_adapter import protocol
from calimero_adapter import secagg_rounds as secagg
from calimero_adapter.client import CalimeroClient, TokenAuth
from calimero_adapter.errors import BlobNotFound, NodeUnavailable
from calimero_adapter.ledger import APPS, Ledger, LedgerWatcher
from calimero_adapter.training import (
    Participant,
    client_step,
    compression_key,
    evaluate_global,
    load_participant,
)
from medichain_jax.codec import decode_tree, encode_tree, sha256_hex
from medichain_jax.privacy.envelope import (
    exchange_key_from_seed,
    public_key_hex,
    signing_key_from_seed,
)
from sim.config import ConfigError, RunConfig


class Audit:
    """Append-only log of every payload this hospital sends (one JSON line each)."""

    def __init__(self, path: Path):
        self.path = path

    def record(self, kind: str, what: str, ref: str, data: bytes) -> None:
        """Log one outbound payload (``kind``: manifest or blob)."""
        line = {
            "time": time.time(),
            "kind": kind,
            "what": what,
            "ref": ref,
            "sha256": sha256_hex(data),
            "size": len(data),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every logged payload."""
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]


def load_seed(path: Path) -> bytes:
    """A 32-byte secret from ``path``, drawn from the OS (and kept, mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def save_tree(path: Path, tree: Any) -> None:
    """Write a tree's encoding atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(encode_tree(jax.tree.map(np.asarray, tree)))
    os.replace(tmp, path)


def load_key(path: Path):
    """An Ed25519 signing key from a seed file (created on first use)."""
    return signing_key_from_seed(load_seed(path))


class SiteRunner:
    """One hospital's side of the round protocol."""

    def __init__(
        self,
        participant: Participant,
        *,
        site: str,
        hospital: int,
        client: CalimeroClient,
        ledger: Ledger,
        context_id: str,
        coordinator_key: str,
        workdir: Path,
        signer: Any,
        poll_s: float = 0.2,
        watcher: LedgerWatcher | None = None,
        timeout_s: float = 600.0,
    ):
        self.p = participant
        self.run = participant.run_id
        self.site = site
        self.hospital = hospital
        self.client = client
        self.ledger = ledger
        self.context_id = context_id
        self.coordinator_key = coordinator_key
        self.workdir = workdir
        self.signer = signer
        self.public = public_key_hex(signer)
        self.poll_s = poll_s
        self.watcher = watcher
        self.timeout_s = timeout_s
        workdir.mkdir(parents=True, exist_ok=True)
        self.audit = Audit(workdir / "audit.jsonl")
        self.state_path = workdir / "state.json"
        self.data = participant.hospital_data(hospital)
        self.secagg_seed = load_seed(workdir / "secagg.seed")
        self._secagg: secagg.SiteSecAgg | None = None
        self.template = participant.message_template()
        self.step = client_step(participant)
        self.log = print

    def _pause(self) -> None:
        """Wait for the next look at the ledger: woken early by a node event if watching."""
        if self.watcher is not None:
            self.watcher.wait(self.poll_s)
        else:
            time.sleep(self.poll_s)

    # -- persistence ---------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"next_round": 0, "registered": False, "evaluated": False}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self.state_path)

    def _client_state(self) -> Any:
        tmpl = self.p.client_state_template()
        path = self.workdir / "client_state.bin"
        if tmpl is None:
            return None
        return decode_tree(path.read_bytes(), tmpl) if path.exists() else tmpl

    def _residual(self, like: Any) -> Any:
        """The error-feedback residual carried from this hospital's earlier rounds."""
        path = self.workdir / "residual.bin"
        init = jax.tree.map(np.asarray, self.p.parts.compressor.init(like))
        return decode_tree(path.read_bytes(), init) if path.exists() else init

    def _save_client_state(self, state: Any) -> None:
        if state is not None:
            save_tree(self.workdir / "client_state.bin", state)

    # -- outbound, always audited --------------------------------------------------------

    def _put_manifest(self, key: str, what: str, manifest: dict[str, Any]) -> None:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        self.audit.record("manifest", what, key, body)
        self.ledger.set(key, manifest)

    def _put_blob(self, what: str, data: bytes):
        ref = self.client.upload_blob(self.context_id, data)
        self.audit.record("blob", what, ref.blob_id, data)
        return ref

    # -- protocol ------------------------------------------------------------------------

    def register(self) -> None:
        """Publish this hospital's public key (once; the coordinator admits it)."""
        key = protocol.site_key(self.run, self.site)
        current = self.ledger.get(key)
        if isinstance(current, dict) and current.get("signer") == self.public:
            return
        manifest = protocol.make(
            "site", self.signer, run=self.run, site=self.site, hospital=self.hospital
        )
        self._put_manifest(key, "registration", manifest)

    def _wait(self, key: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            value = self.ledger.get(key)
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"site {self.site}: nothing at {key} after {self.timeout_s} s")
            self._pause()

    def _download_base(self, opened: dict[str, Any]) -> Any:
        """The round's base model; a blob not yet reachable (sync lag, a partition) is retried
        until the timeout, a hash mismatch is not."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                blob = self.client.download_blob(
                    self.context_id, opened["base_blob_id"], expected_sha256=opened["base_sha256"]
                )
                return decode_tree(blob, self.template)
            except (BlobNotFound, NodeUnavailable):
                if time.monotonic() > deadline:
                    raise
                self._pause()

    def _submitted(self, rnd: int) -> bool:
        """Whether this site's signed update of round ``rnd`` is already in the ledger."""
        key = protocol.update_key(self.run, rnd, self.site)
        try:  # a replayed or forged manifest at our key is not our submission: overwrite it
            protocol.check(
                self.ledger.get(key),
                kind="update",
                key=key,
                trusted={self.site: self.public},
                run=self.run,
                rnd=rnd,
                site=self.site,
            )
        except protocol.ProtocolError:
            return False
        return True

    def train_round(self, rnd: int, opened: dict[str, Any]) -> None:
        """Train on the round's base model and submit the update (blob + signed manifest)."""
        message = self._download_base(opened)
        dp_clip = opened.get("dp_clip")
        dp_clip = None if dp_clip is None else jnp.float32(dp_clip)
        out = self.step(
            message,
            self.data,
            jnp.asarray(self.p.config.seed, jnp.uint32),
            jnp.asarray(rnd, jnp.int32),
            jnp.asarray(self.hospital, jnp.int32),
            self._client_state(),
            dp_clip,
        )
        update = jax.tree.map(np.asarray, out.update)
        weight = float(np.asarray(out.weight))
        masked = {}
        if self.p.config.secagg != "off":
            blob = self._secagg_masked(rnd, opened, update, weight)
            if blob is None:
                return  # left out of this round's secure aggregation (too late, or dropped)
            masked = {"masked": True, "coordinates": secagg.flat_size(update)}
        elif self.p.parts.compressor is not None:  # sent as the simulator's codec encodes it
            c = self.p.parts.compressor
            residual = self._residual(update)
            key = compression_key(jnp.uint32(self.p.config.seed), rnd, self.hospital)
            payload, new_residual = c.compress(update, key, residual)
            blob = encode_tree(jax.tree.map(np.asarray, payload))
            masked = {"codec": c.name}
        else:
            blob = encode_tree(update)
        ref = self._put_blob("update", blob)
        metrics = {k: float(np.asarray(v)) for k, v in out.metrics.items()}
        manifest = protocol.make(
            "update",
            self.signer,
            run=self.run,
            round=rnd,
            site=self.site,
            hospital=self.hospital,
            blob_id=ref.blob_id,
            sha256=sha256_hex(blob),
            size=len(blob),
            weight=weight,
            num_examples=int(np.asarray(self.data.num_examples)),
            metrics=metrics,
            base_sha256=opened["base_sha256"],
            **masked,
        )
        self._put_manifest(protocol.update_key(self.run, rnd, self.site), "update", manifest)
        self._save_client_state(out.state)
        if self.p.parts.compressor is not None and self.p.parts.compressor.stateful:
            save_tree(
                self.workdir / "residual.bin", new_residual
            )  # error feedback, after submitting
        if masked.get("masked"):
            self._secagg_reveal(rnd)

    # -- secure aggregation (Bonawitz et al. 2017) over the ledger -----------------------

    def _put_once(self, key: str, what: str, manifest: dict[str, Any]) -> None:
        """Write a manifest unless this site's identical one is there (a restart replays the
        same deterministic phases)."""
        if self.ledger.get(key) != manifest:
            self._put_manifest(key, what, manifest)

    def _secagg_masked(self, rnd: int, opened: dict[str, Any], update: Any, weight: float):
        """Keys, shares, then the masked update blob (None when this site is left out)."""
        run, cohort = self.run, opened["cohort"]
        sa = secagg.SiteSecAgg(
            run,
            rnd,
            self.site,
            seed=self.secagg_seed,
            secagg_id=cohort.index(self.site) + 1,
            signer=self.signer,
            exchange_key=exchange_key_from_seed(self.secagg_seed + b"/exchange"),
            coordinator_key=self.coordinator_key,
        )
        self._secagg = sa
        try:
            self._put_once(secagg.keys_key(run, rnd, self.site), "secagg-keys", sa.keys_manifest())
            advertised = self._wait(secagg.advertised_key(run, rnd))
            sa.adopt_advertised(advertised)
            shares = sa.shares_manifest(advertised)
            self._put_once(secagg.shares_key(run, rnd, self.site), "secagg-shares", shares)
            relayed = self._wait(secagg.relayed_key(run, rnd))
            senders = sa.adopt_relayed(relayed)
            prefix = secagg.shares_prefix(run, rnd)
            got = secagg.by_site(self.ledger.entries(prefix), prefix)
            sa.receive_shares({s: got[s] for s in senders if s != self.site})
        except secagg.Excluded as err:
            self.log(f"site {self.site}: {err}")
            return None
        dp_clip = opened.get("dp_clip")
        bound = dp_clip if dp_clip is not None else self.p.config.clip_norm * self.data.capacity
        x = secagg.quantized_update(update, weight, bound, self.p.config.cohort_size)
        return secagg.encode_masked(sa.mask(x, relayed))

    def _secagg_reveal(self, rnd: int) -> None:
        """Answer the coordinator's unmasking request (survivors only)."""
        unmask = self._wait(secagg.unmask_key(self.run, rnd))
        try:
            reveal = self._secagg.reveal_manifest(unmask)
        except secagg.Excluded as err:
            self.log(f"site {self.site}: {err}")
            return
        self._put_once(secagg.reveal_key(self.run, rnd, self.site), "secagg-reveal", reveal)

    def evaluate(self, rnd: int, opened: dict[str, Any]) -> None:
        """Evaluate the final global model on this hospital's test rows and post the metrics."""
        variables = self._download_base(opened)
        metrics = evaluate_global(self.p, variables, self.hospital)
        manifest = protocol.make(
            "eval",
            self.signer,
            run=self.run,
            round=rnd,
            site=self.site,
            hospital=self.hospital,
            metrics=metrics,
            base_sha256=opened["base_sha256"],
            test_size=int(np.asarray(self.p.federation.test.num_examples)[self.hospital]),
        )
        self._put_manifest(protocol.eval_key(self.run, rnd, self.site), "eval", manifest)

    def run_protocol(self) -> dict[str, Any]:
        """Take part in every round until the coordinator opens the evaluation phase."""
        state = self._load_state()
        if not state["registered"]:
            self.register()
            state["registered"] = True
            self._save_state(state)
        rnd = state["next_round"]
        while True:
            key = protocol.open_key(self.run, rnd)
            opened = protocol.check(
                self._wait(key),
                kind="open",
                key=key,
                trusted=self.coordinator_key,
                run=self.run,
                rnd=rnd,
            ).body
            if opened["phase"] == "eval":
                if not state.get("evaluated"):
                    self.evaluate(rnd, opened)
                    state["evaluated"] = True
                    self._save_state(state)
                return state
            if self.site in opened.get("participants", opened["cohort"]):
                if self._submitted(rnd):
                    self.log(f"site {self.site}: round {rnd} already submitted (resumed)")
                else:
                    self.train_round(rnd, opened)
                    self.log(f"site {self.site}: round {rnd} submitted")
            rnd += 1
            state["next_round"] = rnd
            self._save_state(state)


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m calimero_adapter.site``."""
    p = argparse.ArgumentParser(
        prog="python -m calimero_adapter.site",
        description="A hospital's site runner: trains locally, exchanges updates via its node.",
    )
    p.add_argument("--node", required=True, help="this hospital's Calimero node URL")
    p.add_argument("--context", required=True, help="the federation's context id")
    p.add_argument("--config", required=True, type=Path, help="the run's config (JSON / YAML)")
    p.add_argument("--site", required=True, help="this hospital's name in the federation")
    p.add_argument("--hospital", type=int, required=True, help="its index in the config")
    p.add_argument("--coordinator-key", required=True, help="the coordinator's Ed25519 key (hex)")
    p.add_argument("--workdir", type=Path, required=True, help="state, audit log and keys")
    p.add_argument("--data-dir", help="this hospital's data (overrides the config's)")
    p.add_argument("--dataset", help="dataset name (overrides the config's)")
    p.add_argument("--app", choices=APPS, default="kv-store", help="the context's application")
    p.add_argument("--token", help="a JWT for the node (else none, or --user/--password)")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between ledger polls")
    p.add_argument(
        "--no-events", action="store_true", help="poll only (default: also wake on SSE events)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a round")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calimero_adapter.site``."""
    args = build_parser().parse_args(argv)
    try:
        values = RunConfig.read_values(args.config)
        for name in ("data_dir", "dataset"):
            if getattr(args, name):
                values[name] = getattr(args, name)
        config = RunConfig.from_dict(values, source=str(args.config))
        if not 0 <= args.hospital < config.hospitals:
            raise ConfigError(f"--hospital must be in [0, {config.hospitals}), got {args.hospital}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    participant = load_participant(config)
    auth = TokenAuth.static(args.token) if args.token else None
    with CalimeroClient(args.node, auth=auth) as client:
        watcher = None if args.no_events else LedgerWatcher(client, args.context)
        runner = SiteRunner(
            participant,
            site=args.site,
            hospital=args.hospital,
            client=client,
            ledger=Ledger(client, args.context, app=args.app),
            context_id=args.context,
            coordinator_key=args.coordinator_key,
            workdir=args.workdir,
            signer=load_key(args.workdir / "site.key"),
            poll_s=args.poll,
            watcher=watcher,
            timeout_s=args.timeout,
        )
        runner.run_protocol()
    print(f"site {args.site}: done; audit log {args.workdir / 'audit.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
