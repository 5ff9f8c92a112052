"""The real mode's round protocol over emulated merod nodes: it ends at the simulation's global
params, and every fault is handled with nothing lost or double-counted."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from calimero_adapter import protocol
from calimero_adapter.client import CalimeroClient, TokenAuth
from calimero_adapter.coordinate import Coordinator
from calimero_adapter.demo import ALLOWED_PAYLOADS, max_abs_diff, run_demo, simulate, spawn
from calimero_adapter.emulator import EmulatedNetwork
from calimero_adapter.ledger import Ledger, LedgerWatcher
from calimero_adapter.site import SiteRunner, load_key
from calimero_adapter.training import load_participant
from medichain_jax.codec import CodecError, decode_tree, encode_tree
from medichain_jax.privacy.envelope import public_key_hex, signing_key_from_seed
from sim.config import RunConfig

CONFIG = RunConfig(
    hospitals=3,
    rounds=3,
    train_per_hospital=24,
    test_per_hospital=8,
    image_size=16,
    batch_size=8,
    non_iid=True,
    client_parallelism="map",
    devices=1,
)
SITES = ["hospital-0", "hospital-1", "hospital-2"]


@pytest.fixture(scope="module")
def participant():
    return load_participant(CONFIG)


@pytest.fixture(scope="module")
def reference():
    return simulate(CONFIG)


class Crash(RuntimeError):
    """A simulated crash of a site process."""


class Harness:
    """Three hospitals and a coordinator, each with its own emulated node, in threads."""

    def __init__(self, participant, tmp: Path, *, auth: bool = False):
        self.p = participant
        self.tmp = tmp
        self.auth = auth
        self.net = EmulatedNetwork(auth=auth, seed=1)
        self.nodes = [self.net.add_node(f"node{i}") for i in range(4)]
        self.ctx = self.net.create_context()
        self.coordinator_signer = signing_key_from_seed(b"coordinator" * 3)
        self.errors: dict[str, BaseException] = {}
        self.threads: dict[str, threading.Thread] = {}

    def client(self, i: int) -> CalimeroClient:
        url = self.nodes[i].url
        user, password = next(iter(self.net.users.items()))
        auth = TokenAuth(url, user, password) if self.auth else None
        return CalimeroClient(url, auth=auth, backoff_s=0.01, max_backoff_s=0.1)

    def site(self, i: int, cls: type = SiteRunner) -> SiteRunner:
        client = self.client(i + 1)
        return cls(
            self.p,
            site=SITES[i],
            hospital=i,
            client=client,
            ledger=Ledger(client, self.ctx),
            context_id=self.ctx,
            coordinator_key=public_key_hex(self.coordinator_signer),
            workdir=self.tmp / SITES[i],
            signer=signing_key_from_seed(SITES[i].encode() * 4),
            poll_s=0.05,
            timeout_s=120,
        )

    def coordinator(self) -> Coordinator:
        client = self.client(0)
        c = Coordinator(
            self.p,
            sites=SITES,
            client=client,
            ledger=Ledger(client, self.ctx),
            context_id=self.ctx,
            signer=self.coordinator_signer,
            out=self.tmp / "coordinator",
            deadline_s=60,
            max_wait_s=120,
            poll_s=0.05,
        )
        c.log = lambda *a: None
        return c

    def start(self, name: str, fn) -> None:
        def target():
            try:
                fn()
            except BaseException as err:  # noqa: BLE001  (reported to the test)
                self.errors[name] = err

        t = threading.Thread(target=target, name=name, daemon=True)
        self.threads[name] = t
        t.start()

    def run(self, sites: list[SiteRunner], coordinator: Coordinator | None = None) -> dict:
        coordinator = coordinator or self.coordinator()
        result: dict = {}
        self.start("coordinator", lambda: result.update(coordinator.run_protocol()))
        for s in sites:
            s.log = lambda *a: None
            self.start(s.site, s.run_protocol)
        return result

    def join(self, timeout: float = 180) -> None:
        for t in list(self.threads.values()):
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads.values()), "a participant hung"

    def final_params(self):
        blob = (self.tmp / "coordinator" / "global_params.bin").read_bytes()
        return decode_tree(blob, jax.tree.map(np.asarray, self.p.init_vars))

    def close(self) -> None:
        self.net.close()


@pytest.fixture
def harness(participant, tmp_path):
    h = Harness(participant, tmp_path)
    yield h
    h.close()


def accepted_per_round(h: Harness) -> list[int]:
    lines = (h.tmp / "coordinator" / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        r = json.loads(line)
        out.append(len(r["cohort"]) - len(r["absent"]) - len(r["rejected"]))
    return out


def test_emulated_federation_ends_at_the_simulations_params(harness, reference):
    sites = [harness.site(i) for i in range(3)]
    watchers = [LedgerWatcher(s.client, harness.ctx) for s in sites]
    for s, w in zip(sites, watchers, strict=True):  # wake on SSE events, poll rarely
        s.watcher, s.poll_s = w, 2.0
    summary = harness.run(sites)
    harness.join()
    for w in watchers:
        w.close()
        assert w.failed is None and w.events > 0
    assert not harness.errors, harness.errors
    assert max_abs_diff(harness.final_params(), reference) <= 1e-6
    assert accepted_per_round(harness) == [3, 3, 3]
    assert summary["rejected_updates"] == []
    assert summary["federated"]["reported_by"] == SITES
    for site in SITES:  # only manifests and update blobs left each hospital
        rows = [
            json.loads(x) for x in (harness.tmp / site / "audit.jsonl").read_text().splitlines()
        ]
        assert {(r["kind"], r["what"]) for r in rows} <= ALLOWED_PAYLOADS
        assert sum(r["what"] == "update" and r["kind"] == "manifest" for r in rows) == 3


def test_a_site_killed_mid_round_resumes_without_double_submitting(harness, reference):
    class CrashBeforeManifest(SiteRunner):  # dies after uploading its round-1 blob
        def _put_manifest(self, key, what, manifest):
            if what == "update" and manifest["round"] == 1:
                raise Crash("killed after the upload, before the manifest")
            super()._put_manifest(key, what, manifest)

    class CrashAfterManifest(SiteRunner):  # dies after writing round 2, before saving state
        def _save_state(self, state):
            if state.get("next_round") == 3 and not getattr(self, "crashed", False):
                self.crashed = True
                raise Crash("killed after the manifest, before saving progress")
            super()._save_state(state)

    harness.run([harness.site(0), harness.site(1, CrashBeforeManifest), harness.site(2)])
    harness.threads["hospital-1"].join(120)
    assert isinstance(harness.errors.pop("hospital-1"), Crash)
    restarted = harness.site(1, CrashAfterManifest)
    restarted.log = lambda *a: None
    harness.start("hospital-1", restarted.run_protocol)
    harness.threads["hospital-1"].join(120)
    assert isinstance(harness.errors.pop("hospital-1"), Crash)
    lines = []
    again = harness.site(1)
    again.log = lines.append
    harness.start("hospital-1", again.run_protocol)
    harness.join()
    assert not harness.errors, harness.errors
    assert any("round 2 already submitted" in x for x in lines)
    assert accepted_per_round(harness) == [3, 3, 3]
    assert max_abs_diff(harness.final_params(), reference) <= 1e-6
    audit = (harness.tmp / "hospital-1" / "audit.jsonl").read_text()
    assert audit.count('"kind": "blob", "ref"') == 4  # round 1's blob was uploaded twice
    assert audit.count('"kind": "manifest"') == 1 + 3 + 1  # registration, 3 updates, eval


def test_duplicate_replayed_and_forged_manifests(harness, reference):
    run = harness.p.run_id
    attacker = Ledger(harness.client(0), harness.ctx)
    ready = threading.Event()  # both bad manifests were seen and rejected
    coordinator = harness.coordinator()
    rejections: list[str] = []

    def log(msg: str) -> None:
        if msg.startswith("round 1: rejected"):
            rejections.append(msg)
            if len(rejections) == 2:
                ready.set()

    coordinator.log = log

    def adversary():  # as soon as round 1 opens, before any hospital trains
        key = protocol.open_key(run, 1)
        while attacker.get(key) is None:
            threading.Event().wait(0.02)
        old = attacker.get(protocol.update_key(run, 0, SITES[0]))
        attacker.set(protocol.update_key(run, 1, SITES[0]), old)  # replay of round 0
        forged = protocol.make(
            "update", signing_key_from_seed(b"mallory" * 5), run=run, round=1, site=SITES[2]
        )
        attacker.set(protocol.update_key(run, 1, SITES[2]), forged)

    class Waits(SiteRunner):
        def train_round(self, rnd, opened):
            if rnd == 1:
                assert ready.wait(60)
            super().train_round(rnd, opened)

    class Twice(Waits):  # submits every manifest twice
        def _put_manifest(self, key, what, manifest):
            super()._put_manifest(key, what, manifest)
            super()._put_manifest(key, what, manifest)

    harness.start("adversary", adversary)
    sites = [harness.site(0, Waits), harness.site(1, Twice), harness.site(2, Waits)]
    summary = harness.run(sites, coordinator)
    harness.join()
    assert not harness.errors, harness.errors
    assert accepted_per_round(harness) == [3, 3, 3]  # duplicates counted once
    assert max_abs_diff(harness.final_params(), reference) <= 1e-6  # honest updates all in
    reasons = " | ".join(r["reason"] for r in summary["rejected_updates"])
    assert "manifest of round 0 replayed into round 1" in reasons
    assert "not site hospital-2's admitted key" in reasons


def test_a_tampered_blob_is_rejected_and_the_round_goes_on(harness):
    class Tamper(SiteRunner):
        def _put_blob(self, what, data):
            if what == "update" and not getattr(self, "done", False):
                self.done = True
                data = data[:-1] + bytes([data[-1] ^ 1])  # a flipped bit in transit / storage
            return super()._put_blob(what, data)

    h = harness
    coordinator = h.coordinator()
    coordinator.deadline_s = 3  # the tampering site's round-0 update never becomes valid
    summary = h.run([h.site(0), h.site(1), h.site(2, Tamper)], coordinator)
    h.join()
    assert not h.errors, h.errors
    rejected = summary["rejected_updates"]
    assert [(r["round"], r["site"]) for r in rejected] == [(1, "hospital-2")]
    assert "BlobHashMismatch" in rejected[0]["reason"] or "hash" in rejected[0]["reason"].lower()
    assert accepted_per_round(h) == [2, 3, 3]


def test_expired_tokens_group_key_pending_and_a_healed_partition(participant, tmp_path, reference):
    h = Harness(participant, tmp_path, auth=True)
    try:
        run = participant.run_id
        watcher = Ledger(h.client(0), h.ctx)

        def faults():
            while watcher.get(protocol.open_key(run, 1)) is None:
                threading.Event().wait(0.02)
            for node in h.nodes:
                node.expire_tokens()
            h.nodes[2].fail_next("set", "GroupKeyPending", times=2)
            h.net.partition([h.nodes[0]], h.nodes[1:])  # the coordinator cut off
            threading.Event().wait(1.5)
            h.net.heal()

        h.start("faults", faults)
        summary = h.run([h.site(i) for i in range(3)])
        h.join()
        assert not h.errors, h.errors
        assert summary["rejected_updates"] == []
        assert accepted_per_round(h) == [3, 3, 3]
        assert max_abs_diff(h.final_params(), reference) <= 1e-6
    finally:
        h.close()


@pytest.mark.slow  # the process-kill test above runs the same processes in the default suite
def test_demo_runs_sites_and_coordinator_as_processes(tmp_path):
    s = run_demo(3, 2, tmp_path / "demo")
    assert s["exit_codes"] == {"coordinator": 0, **dict.fromkeys(SITES, 0)}
    assert s["max_abs_diff_vs_simulation"] is not None
    assert s["max_abs_diff_vs_simulation"] <= 1e-6
    assert all(a["only_manifests_and_updates"] for a in s["audit"].values())
    assert (tmp_path / "demo" / "summary.json").exists()
    assert s["coordinator"]["federated"]["mean"] is not None
    assert np.isfinite(s["coordinator"]["federated"]["mean"])


SECAGG = RunConfig(**{**CONFIG.to_dict(), "secagg": "fast", "clip_norm": 2.0})


@pytest.fixture(scope="module")
def secure_participant():
    return load_participant(SECAGG)


def test_secure_aggregation_over_the_ledger_equals_the_simulation(secure_participant, tmp_path):
    h = Harness(secure_participant, tmp_path)
    try:
        summary = h.run([h.site(i) for i in range(3)])
        h.join()
        assert not h.errors, h.errors
        assert summary["rejected_updates"] == []
        assert accepted_per_round(h) == [3, 3, 3]
        assert max_abs_diff(h.final_params(), simulate(SECAGG)) <= 1e-6
        run = secure_participant.run_id
        # what the coordinator received is masked: the blob is no model update
        client = h.client(0)
        manifest = Ledger(client, h.ctx).get(protocol.update_key(run, 0, SITES[0]))
        assert manifest["masked"] is True
        blob = client.download_blob(h.ctx, manifest["blob_id"], expected_sha256=manifest["sha256"])
        with pytest.raises(CodecError):
            decode_tree(blob, jax.tree.map(np.asarray, secure_participant.init_vars))
    finally:
        h.close()


def test_secure_aggregation_recovers_from_a_site_dropping_after_its_shares(
    secure_participant, tmp_path
):
    class DropsInRound1(SiteRunner):
        def _secagg_masked(self, rnd, opened, update, weight):
            blob = super()._secagg_masked(rnd, opened, update, weight)
            return None if rnd == 1 else blob  # shares sent, masked update never uploaded

    h = Harness(secure_participant, tmp_path)
    try:
        coordinator = h.coordinator()
        coordinator.deadline_s = 3
        summary = h.run([h.site(0), h.site(1), h.site(2, DropsInRound1)], coordinator)
        h.join()
        assert not h.errors, h.errors
        assert summary["rejected_updates"] == []
        assert accepted_per_round(h) == [3, 2, 3]  # round 1: hospital-2's masks removed
        unmask = Ledger(h.client(0), h.ctx).get(
            f"medichain/{secure_participant.run_id}/round/1/secagg/unmask"
        )
        assert unmask["dropped"] == ["hospital-2"]
        assert np.isfinite(summary["federated"]["mean"])
    finally:
        h.close()


def test_a_hospital_that_registers_late_joins_from_the_next_round(harness):
    run = harness.p.run_id
    coordinator = harness.coordinator()
    coordinator.join_wait_s = 0.5  # round 0 starts without hospital-2
    harness.run([harness.site(0), harness.site(1)], coordinator)
    watcher = Ledger(harness.client(3), harness.ctx)
    deadline = time.monotonic() + 120
    while watcher.get(protocol.open_key(run, 0)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    late = harness.site(2)
    late.log = lambda *a: None
    harness.start("hospital-2", late.run_protocol)
    harness.join()
    assert not harness.errors, harness.errors
    assert accepted_per_round(harness) == [2, 3, 3]
    lines = (harness.tmp / "coordinator" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["absent"] == [2]


def test_a_site_process_killed_mid_round_is_restarted(participant, reference, tmp_path):
    """Real processes: SIGKILL a site right after it uploads its round-1 blob, start it again
    with the same work folder; the run ends at the simulation's params, one update a round."""
    out = tmp_path / "run"
    out.mkdir()
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(CONFIG.to_dict()))
    net = EmulatedNetwork(auth=False, seed=3)
    try:
        nodes = [net.add_node(f"node{i}") for i in range(4)]
        ctx = net.create_context()
        key_file = out / "coordinator.key"
        coordinator_key = public_key_hex(load_key(key_file))
        common = ["--context", ctx, "--config", str(cfg_path)]
        procs = {
            "coordinator": spawn(
                ["calimero_adapter.coordinate", "--node", nodes[0].url, *common]
                + ["--sites", ",".join(SITES), "--out", str(out / "coordinator")]
                + ["--key-file", str(key_file), "--deadline", "120"],
                out / "coordinator.log",
            )
        }

        def site(i: int, log: str):
            return spawn(
                ["calimero_adapter.site", "--node", nodes[i + 1].url, *common]
                + ["--site", SITES[i], "--hospital", str(i), "--coordinator-key", coordinator_key]
                + ["--workdir", str(out / SITES[i])],
                out / log,
            )

        for i in range(3):
            procs[SITES[i]] = site(i, f"{SITES[i]}.log")
        audit = out / SITES[1] / "audit.jsonl"
        deadline = time.monotonic() + 300
        while audit.read_text().count('"kind": "blob"') < 2 if audit.exists() else True:
            assert time.monotonic() < deadline, "hospital-1 never reached round 1"
            time.sleep(0.01)
        procs[SITES[1]].send_signal(signal.SIGKILL)  # mid-round: blob up, manifest maybe not
        procs[SITES[1]].wait(30)
        procs[SITES[1]] = site(1, "hospital-1.restarted.log")
        codes = {name: p.wait(300) for name, p in procs.items()}
    finally:
        for p in locals().get("procs", {}).values():
            if p.poll() is None:
                p.kill()
        net.close()
    assert codes == dict.fromkeys(["coordinator", *SITES], 0)
    final = decode_tree(
        (out / "coordinator" / "global_params.bin").read_bytes(),
        jax.tree.map(np.asarray, participant.init_vars),
    )
    assert max_abs_diff(final, reference) <= 1e-6
    for line in (out / "coordinator" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["absent"] == [] and r["rejected"] == []
    manifests = [json.loads(x) for x in audit.read_text().splitlines()]
    updates = [m for m in manifests if m["kind"] == "manifest" and m["what"] == "update"]
    assert len({m["ref"] for m in updates}) == 3  # one manifest key per round, never two


@pytest.mark.parametrize(
    ("codec", "extra"),
    [pytest.param("int8", {}, marks=pytest.mark.slow), ("topk", {"topk_fraction": 0.1})],
)
def test_compressed_updates_travel_and_end_at_the_simulations_params(tmp_path, codec, extra):
    config = RunConfig(**{**CONFIG.to_dict(), "compression": codec, **extra})
    p = load_participant(config)
    h = Harness(p, tmp_path)
    try:
        summary = h.run([h.site(i) for i in range(3)])
        h.join()
        assert not h.errors, h.errors
        assert summary["rejected_updates"] == []
        assert max_abs_diff(h.final_params(), simulate(config)) <= 1e-6
        manifest = Ledger(h.client(0), h.ctx).get(protocol.update_key(p.run_id, 0, SITES[0]))
        assert manifest["codec"] == codec
        assert manifest["size"] < 0.5 * len(encode_tree(jax.tree.map(np.asarray, p.init_vars)))
    finally:
        h.close()
