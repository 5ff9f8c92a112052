"""``python -m calimero_adapter.coordinate``: the coordinator of a real-mode federation.

It admits the hospitals' registered keys (a roster signed by its own key; hospitals that
register later join from the next round), opens each round (the cohort sampled from
(seed, round) exactly as in simulation, the base model as a blob), collects the hospitals'
signed update manifests until all of the cohort or a quorum after the deadline have answered,
downloads and verifies every blob (SHA-256, signature, run, round, site, base model), applies
the simulator's server step to the stacked updates and publishes the new global model. After
the last round it opens an evaluation phase and writes the same ``results/<run>/`` files as the
simulator: ``config.json``, ``metrics.jsonl``, ``summary.json`` (plus ``global_params.bin``).

Every rejected submission is reported with its reason and never aggregated; a site's key is
read once per round, so a duplicate or replayed submission counts once at most.
"""

from __future__ import annotations

import argparse
import json
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
from calimero_adapter.errors import BlobNotFound, CalimeroError, NodeUnavailable
from calimero_adapter.ledger import APPS, Ledger, LedgerWatcher
from calimero_adapter.site import load_key, save_tree
from calimero_adapter.training import (
    Participant,
    load_participant,
    payload_template,
    server_update,
    server_update_from_sum,
    update_template,
)
from medichain_jax.codec import CodecError, decode_tree, encode_tree, sha256_hex
from medichain_jax.fl.update_checks import tree_all_finite
from medichain_jax.privacy.envelope import public_key_hex
from sim.config import ConfigError, RunConfig
from sim.results import MetricsLog, write_json


class QuorumError(RuntimeError):
    """Too few valid updates arrived before the deadline."""


class Coordinator:
    """The server side of the round protocol."""

    def __init__(
        self,
        participant: Participant,
        *,
        sites: list[str],
        client: CalimeroClient,
        ledger: Ledger,
        context_id: str,
        signer: Any,
        out: Path,
        quorum: int | None = None,
        deadline_s: float = 60.0,
        max_wait_s: float = 600.0,
        join_wait_s: float | None = None,
        poll_s: float = 0.2,
        watcher: LedgerWatcher | None = None,
    ):
        if len(sites) != participant.config.hospitals:
            raise ConfigError(
                f"--sites names {len(sites)} hospitals, the config has {participant.config.hospitals}"
            )
        self.p = participant
        self.run = participant.run_id
        self.sites = sites
        self.client = client
        self.ledger = ledger
        self.context_id = context_id
        self.signer = signer
        self.public = public_key_hex(signer)
        self.out = out
        self.quorum = quorum or max(1, participant.config.cohort_size // 2 + 1)
        self.deadline_s = deadline_s
        self.join_wait_s = deadline_s if join_wait_s is None else join_wait_s
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.watcher = watcher
        self.admitted: dict[str, str] = {}
        self.template = participant.message_template()
        self.update_fn = server_update(participant)
        self.sum_update_fn = server_update_from_sum(participant)
        self.utemplate = update_template(participant)
        self.log = print
        out.mkdir(parents=True, exist_ok=True)

    def _pause(self) -> None:
        """Wait for the next look at the ledger: woken early by a node event if watching."""
        if self.watcher is not None:
            self.watcher.wait(self.poll_s)
        else:
            time.sleep(self.poll_s)

    # -- admission -----------------------------------------------------------------------

    def admit(self) -> list[str]:
        """Admit every listed hospital whose registration is present and valid; returns the
        newly admitted names."""
        new = []
        for hospital, site in enumerate(self.sites):
            if site in self.admitted:
                continue
            key = protocol.site_key(self.run, site)
            value = self.ledger.get(key)
            if not isinstance(value, dict):
                continue
            signer = str(value.get("signer"))
            try:
                body = protocol.check(
                    value, kind="site", key=key, trusted={site: signer}, run=self.run, site=site
                ).body
            except protocol.ProtocolError as err:
                self.log(f"not admitted: {err}")
                continue
            if body.get("hospital") != hospital:
                self.log(
                    f"not admitted: {key} claims hospital {body.get('hospital')}, not {hospital}"
                )
                continue
            roster = protocol.make(
                "roster", self.signer, run=self.run, site=site, hospital=hospital, key=signer
            )
            self.ledger.set(protocol.roster_key(self.run, site), roster)
            self.admitted[site] = signer
            new.append(site)
        return new

    def wait_for_sites(self) -> None:
        """Before the first round, wait up to ``join_wait_s`` for every listed hospital to
        register (the rest join between rounds, when they appear)."""
        start = time.monotonic()
        while True:
            joined = self.admit()
            if joined:
                self.log(f"admitted {', '.join(joined)}")
            if len(self.admitted) == len(self.sites) or time.monotonic() - start > self.join_wait_s:
                return
            self._pause()

    # -- rounds --------------------------------------------------------------------------

    def _upload(self, tree: Any) -> tuple[str, str]:
        blob = encode_tree(jax.tree.map(np.asarray, tree))
        ref = self.client.upload_blob(self.context_id, blob)
        return ref.blob_id, sha256_hex(blob)

    def open_round(self, rnd: int, state: Any, phase: str = "train") -> dict[str, Any]:
        """Publish the base model and the round's signed ``open`` manifest."""
        existing = self.ledger.get(protocol.open_key(self.run, rnd))
        if isinstance(existing, dict) and existing.get("signer") == self.public:
            return verify_open(existing, self.public, self.run, rnd)  # resumed coordinator
        message = self.p.parts.algorithm.broadcast(state) if phase == "train" else state.params
        blob_id, sha = self._upload(message)
        cohort = [self.sites[i] for i in self.p.cohort(rnd)] if phase == "train" else self.sites
        dp_clip = None
        if phase == "train" and state.privacy_state is not None:
            dp_clip = float(np.asarray(state.privacy_state.clip_norm))
        manifest = protocol.make(
            "open",
            self.signer,
            run=self.run,
            round=rnd,
            phase=phase,
            cohort=cohort,
            participants=[site for site in cohort if site in self.admitted],
            base_blob_id=blob_id,
            base_sha256=sha,
            dp_clip=dp_clip,
        )
        self.ledger.set(protocol.open_key(self.run, rnd), manifest)
        return verify_open(manifest, self.public, self.run, rnd)

    def _gather(self, prefix: str, expected: list[str], need: int, what: str) -> dict[str, Any]:
        """Manifests under ``prefix`` of the ``expected`` sites: all of them, or at least
        ``need`` once the deadline has passed (verified by the caller)."""
        start = time.monotonic()
        while True:
            got = {k[len(prefix) :]: v for k, v in self.ledger.entries(prefix).items()}
            got = {site: v for site, v in got.items() if site in expected}
            waited = time.monotonic() - start
            if len(got) == len(expected) or (waited > self.deadline_s and len(got) >= need):
                return got
            if waited > self.max_wait_s:
                raise QuorumError(f"{what}: {len(got)} of {len(expected)} after {waited:.0f} s")
            self._pause()

    def secure_round(self, rnd: int, opened: dict[str, Any], state: Any):
        """Secure aggregation of round ``rnd`` (Bonawitz et al. 2017 over the ledger): fix
        the advertised and relayed sets, collect the masked updates, request the unmasking,
        rebuild the survivors' sum. Returns ``(accepted, refused, bytes, total)``."""
        run, cfg = self.run, self.p.config
        m = cfg.cohort_size
        t = cfg.secagg_threshold or m // 2 + 1
        sa = secagg.CoordinatorSecAgg(run, rnd, signer=self.signer, admitted=self.admitted)
        cohort = [s for s in opened["participants"] if s in self.admitted]
        keys = self._gather(secagg.keys_prefix(run, rnd), cohort, t, f"round {rnd} SecAgg keys")
        advertised = sa.advertise(keys, opened["cohort"], t)
        self.ledger.set(secagg.advertised_key(run, rnd), advertised)
        shares = self._gather(
            secagg.shares_prefix(run, rnd), sorted(advertised["sites"]), t, f"round {rnd} shares"
        )
        relayed = sa.relay_manifest(shares)
        self.ledger.set(secagg.relayed_key(run, rnd), relayed)
        accepted, refused, received = self.collect(rnd, opened, expected=list(relayed["sites"]))
        unmask = sa.unmask_manifest(accepted)
        self.ledger.set(secagg.unmask_key(run, rnd), unmask)
        reveals = self._gather(
            secagg.reveal_prefix(run, rnd), list(unmask["survivors"]), t, f"round {rnd} reveals"
        )
        survivors = {s: accepted[s][1] for s in unmask["survivors"]}
        total = sa.unmask(survivors, reveals)
        accepted = {s: accepted[s] for s in survivors}
        refused += [{"site": s, "reason": why} for s, why in sa.rejected.items()]
        dp_clip = opened.get("dp_clip")
        capacity = int(np.asarray(self.p.federation.train.x).shape[1])
        bound = dp_clip if dp_clip is not None else cfg.clip_norm * capacity
        return accepted, refused, received, secagg.dequantized_sum(total, self.utemplate, bound, m)

    def _verify_update(self, key: str, value: Any, site: str, rnd: int, base: str):
        body = protocol.check(
            value, kind="update", key=key, trusted=self.admitted, run=self.run, rnd=rnd, site=site
        ).body
        if body.get("base_sha256") != base:
            raise protocol.ProtocolError(
                f"{key}: trained on base {body.get('base_sha256')}, not {base}"
            )
        blob = self.client.download_blob(
            self.context_id, body["blob_id"], expected_sha256=body["sha256"]
        )
        if self.p.config.secagg != "off":
            if body.get("coordinates") != secagg.flat_size(self.utemplate):
                raise protocol.ProtocolError(f"{key}: not a masked update of this model")
            try:
                return body, secagg.decode_masked(blob, body["coordinates"]), len(blob)
            except ValueError as err:
                raise CodecError(f"{key}: {err}") from err
        c = self.p.parts.compressor
        if c is not None:
            payload = decode_tree(blob, payload_template(self.p))
            update = jax.tree.map(np.asarray, c.decompress(payload, self.utemplate))
        else:
            update = decode_tree(blob, self.utemplate)
        if not bool(tree_all_finite(update)):
            raise protocol.ProtocolError(f"{key}: update holds NaN/Inf")
        return body, update, len(blob)

    def collect(
        self, rnd: int, opened: dict[str, Any], expected: list[str] | None = None
    ) -> tuple[dict, list[dict[str, str]], int]:
        """Valid updates of the cohort's admitted sites (site -> (manifest, update)), every
        rejected submission (``{"site", "reason"}``, also those a valid one replaced later)
        and bytes received."""
        if expected is None:
            expected = [s for s in opened["participants"] if s in self.admitted]
        accepted: dict[str, tuple[dict, Any]] = {}
        refused: list[dict[str, str]] = []
        seen: dict[str, str] = {}  # site -> signature of the last manifest looked at
        received = 0
        start = time.monotonic()
        prefix = protocol.update_prefix(self.run, rnd)
        while True:
            for key, value in sorted(self.ledger.entries(prefix).items()):
                site = key[len(prefix) :]
                if site in accepted:
                    continue  # a site's first valid update counts; duplicates are ignored
                sig = str(value.get("signature")) if isinstance(value, dict) else repr(value)
                if seen.get(site) == sig:
                    continue
                seen[site] = sig
                if site not in expected:
                    refused.append({"site": site, "reason": f"{key}: not in round {rnd}'s cohort"})
                    continue
                try:
                    body, update, nbytes = self._verify_update(
                        key, value, site, rnd, opened["base_sha256"]
                    )
                except (BlobNotFound, NodeUnavailable):
                    del seen[site]  # not reachable yet (sync lag, a partition): look again
                    continue
                except (protocol.ProtocolError, CodecError, CalimeroError) as err:
                    refused.append({"site": site, "reason": f"{type(err).__name__}: {err}"})
                    self.log(f"round {rnd}: rejected {site}: {err}")
                    continue
                accepted[site] = (body, update)
                received += nbytes
            waited = time.monotonic() - start
            if len(accepted) == len(expected):
                break
            if waited > self.deadline_s and len(accepted) >= min(self.quorum, len(expected)):
                break
            if waited > self.max_wait_s:
                raise QuorumError(
                    f"round {rnd}: {len(accepted)} of {len(expected)} valid updates after "
                    f"{waited:.0f} s, quorum {self.quorum}; rejected: {refused}"
                )
            self._pause()
        return accepted, refused, received

    def aggregate(self, state: Any, cohort: list[str], accepted: dict) -> tuple[Any, dict]:
        """The simulator's server step on the cohort's updates (absent sites weigh 0)."""
        updates = [accepted[s][1] if s in accepted else self.utemplate for s in cohort]
        stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *updates)
        weights, metrics = self._per_client(cohort, accepted)
        seed = jnp.asarray(self.p.config.seed, jnp.uint32)
        new_state, scalars = self.update_fn(state, stacked, weights, metrics, seed)
        return new_state, {k: float(np.asarray(v)) for k, v in scalars.items()}

    def aggregate_sum(self, state: Any, cohort: list[str], accepted: dict, total: Any):
        """The server step on a securely aggregated sum (absent sites weigh 0)."""
        weights, metrics = self._per_client(cohort, accepted)
        seed = jnp.asarray(self.p.config.seed, jnp.uint32)
        total = jax.tree.map(jnp.asarray, total)
        new_state, scalars = self.sum_update_fn(state, total, weights, metrics, seed)
        return new_state, {k: float(np.asarray(v)) for k, v in scalars.items()}

    def _per_client(self, cohort: list[str], accepted: dict) -> tuple[Any, dict]:
        keys = sorted({k for body, _ in accepted.values() for k in body["metrics"]})
        weights = jnp.asarray(
            [accepted[s][0]["weight"] if s in accepted else 0.0 for s in cohort], jnp.float32
        )
        m = {
            k: jnp.asarray(
                [accepted[s][0]["metrics"].get(k, 0.0) if s in accepted else 0.0 for s in cohort],
                jnp.float32,
            )
            for k in keys
        }
        if "clipped" in m:
            m["clipped"] = m["clipped"] > 0.5
        return weights, m

    # -- persistence ---------------------------------------------------------------------

    def _save(self, state: Any, next_round: int) -> None:
        save_tree(self.out / "coordinator_state.bin", state)
        (self.out / "coordinator.json").write_text(json.dumps({"next_round": next_round}))

    def _restore(self) -> tuple[Any, int]:
        state = self.p.initial_state()
        path = self.out / "coordinator_state.bin"
        if not path.exists():
            return state, 0
        state = decode_tree(path.read_bytes(), jax.tree.map(np.asarray, state))
        state = jax.tree.map(jnp.asarray, state)
        return state, json.loads((self.out / "coordinator.json").read_text())["next_round"]

    # -- the run -------------------------------------------------------------------------

    def run_protocol(self) -> dict[str, Any]:
        """Every round, then the evaluation phase; writes and returns ``summary.json``."""
        cfg = self.p.config
        write_json(self.out / "config.json", cfg.to_dict())
        log = MetricsLog(self.out / "metrics.jsonl")
        state, start = self._restore()
        history = log.truncate(start)
        self.wait_for_sites()
        for rnd in range(start, cfg.rounds):
            t0 = time.perf_counter()
            joined = self.admit()
            if joined:
                self.log(f"round {rnd}: admitted {', '.join(joined)}")
            opened = self.open_round(rnd, state)
            cohort = opened["cohort"]
            if self.p.config.secagg != "off":
                accepted, refused, received, total = self.secure_round(rnd, opened, state)
                state, scalars = self.aggregate_sum(state, cohort, accepted, total)
            else:
                accepted, refused, received = self.collect(rnd, opened)
                state, scalars = self.aggregate(state, cohort, accepted)
            rejected = {r["site"] for r in refused if r["site"] not in accepted}
            blob_id, sha = self._upload(state.params)
            self.ledger.set(
                protocol.global_key(self.run, rnd),
                protocol.make(
                    "global",
                    self.signer,
                    run=self.run,
                    round=rnd,
                    blob_id=blob_id,
                    sha256=sha,
                    participants=sorted(accepted),
                ),
            )
            w = np.array([accepted[s][0]["weight"] if s in accepted else 0.0 for s in cohort])
            losses = np.array(
                [accepted[s][0]["metrics"]["loss"] if s in accepted else 0.0 for s in cohort]
            )
            record = {
                "round": rnd + 1,
                "train_loss": float(np.sum(w * losses) / max(w.sum(), 1.0)),
                "cohort": [self.sites.index(s) for s in cohort],
                "sites": cohort,
                "absent": [
                    self.sites.index(s) for s in cohort if s not in accepted and s not in rejected
                ],
                "rejected": sorted(self.sites.index(s) for s in rejected if s in self.sites),
                "rejected_submissions": refused,
                "bytes_up": received,
                "global_sha256": sha,
                "seconds": time.perf_counter() - t0,
                **({"server": scalars} if scalars else {}),
            }
            log.append(record)
            history.append(record)
            self._save(state, rnd + 1)
            self.log(
                f"round {rnd + 1}/{cfg.rounds}: {len(accepted)} updates, {len(refused)} rejected"
            )
        (self.out / "global_params.bin").write_bytes(
            encode_tree(jax.tree.map(np.asarray, state.params))
        )
        evals = self.evaluation(state)
        summary = self.summarize(state, history, evals)
        write_json(self.out / "summary.json", summary)
        return summary

    def evaluation(self, state: Any) -> dict[str, dict[str, Any]]:
        """Open the evaluation phase and collect each site's metrics of the final model."""
        rnd = self.p.config.rounds
        opened = self.open_round(rnd, state, phase="eval")
        prefix = protocol.eval_prefix(self.run, rnd)
        start = time.monotonic()
        evals: dict[str, dict[str, Any]] = {}
        while len(evals) < len(self.admitted) and time.monotonic() - start < self.deadline_s:
            for key, value in self.ledger.entries(prefix).items():
                site = key[len(prefix) :]
                if site in evals or site not in self.admitted:
                    continue
                try:
                    body = protocol.check(
                        value,
                        kind="eval",
                        key=key,
                        trusted=self.admitted,
                        run=self.run,
                        rnd=rnd,
                        site=site,
                    ).body
                except protocol.ProtocolError as err:
                    self.log(f"evaluation: rejected {site}: {err}")
                    continue
                if body.get("base_sha256") == opened["base_sha256"]:
                    evals[site] = body
            self._pause()
        return evals

    def summarize(self, state: Any, history: list[dict], evals: dict) -> dict[str, Any]:
        """The run's summary: per-hospital metrics of the final model as the sites report."""
        auc = [evals[s]["metrics"].get("auc") if s in evals else None for s in self.sites]
        loss = [evals[s]["metrics"].get("loss") if s in evals else None for s in self.sites]
        known = [a for a in auc if a is not None]
        return {
            "mode": "calimero",
            "run_id": self.run,
            "rounds": self.p.config.rounds,
            "algorithm": self.p.config.algorithm,
            "metric": "auc",
            "sites": [
                {"site": s, "hospital": i, "key": self.admitted.get(s)}
                for i, s in enumerate(self.sites)
            ],
            "federated": {
                "per_hospital": {"auc": auc, "loss": loss},
                "mean": float(np.mean(known)) if known else None,
                "reported_by": sorted(evals),
            },
            "rejected_updates": [
                {"round": r["round"], **x} for r in history for x in r["rejected_submissions"]
            ],
            "bytes_up_total": int(sum(r["bytes_up"] for r in history)),
            "global_sha256": history[-1]["global_sha256"] if history else None,
            "coordinator_key": self.public,
        }


def verify_open(value: Any, coordinator: str, run: str, rnd: int) -> dict[str, Any]:
    """An ``open`` manifest checked against the coordinator's key."""
    key = protocol.open_key(run, rnd)
    return protocol.check(value, kind="open", key=key, trusted=coordinator, run=run, rnd=rnd).body


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m calimero_adapter.coordinate``."""
    p = argparse.ArgumentParser(
        prog="python -m calimero_adapter.coordinate",
        description="Coordinate a real-mode federation through a Calimero node.",
    )
    p.add_argument("--node", required=True, help="the coordinator's Calimero node URL")
    p.add_argument("--context", required=True, help="the federation's context id")
    p.add_argument("--config", required=True, type=Path, help="the run's config (JSON / YAML)")
    p.add_argument("--sites", required=True, help="comma-separated site names, hospital order")
    p.add_argument("--out", type=Path, help="results folder (default results/<run-id>)")
    p.add_argument("--key-file", type=Path, help="32-byte seed of the coordinator's key")
    p.add_argument("--quorum", type=int, help="valid updates needed after the deadline")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds before quorum counts")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds before a round fails")
    p.add_argument("--app", choices=APPS, default="kv-store", help="the context's application")
    p.add_argument("--token", help="a JWT for the node")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between ledger polls")
    p.add_argument(
        "--no-events", action="store_true", help="poll only (default: also wake on SSE events)"
    )
    p.add_argument("--print-key", action="store_true", help="print the public key and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calimero_adapter.coordinate``."""
    args = build_parser().parse_args(argv)
    try:
        config = RunConfig.load(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / config.run_id()
    signer = load_key(args.key_file or out / "coordinator.key")
    if args.print_key:
        print(public_key_hex(signer))
        return 0
    participant = load_participant(config)
    auth = TokenAuth.static(args.token) if args.token else None
    with CalimeroClient(args.node, auth=auth) as client:
        watcher = None if args.no_events else LedgerWatcher(client, args.context)
        try:
            coordinator = Coordinator(
                participant,
                sites=args.sites.split(","),
                client=client,
                ledger=Ledger(client, args.context, app=args.app),
                context_id=args.context,
                signer=signer,
                out=out,
                quorum=args.quorum,
                deadline_s=args.deadline,
                max_wait_s=args.max_wait,
                poll_s=args.poll,
                watcher=watcher,
            )
            summary = coordinator.run_protocol()
        except (ConfigError, QuorumError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(f"federated: mean per-hospital AUC {summary['federated']['mean']}; results: {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
