"""The real client against emulated merod nodes over loopback HTTP (calimero_adapter.emulator)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from calimero_adapter import errors  # noqa: E402
from calimero_adapter.client import CalimeroClient, NodeEvent, TokenAuth  # noqa: E402
from calimero_adapter.emulator import EmulatedNetwork  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "calimero"
USER, PASSWORD = "admin", "emulated-merod-password"


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll ``predicate`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class Clients:
    """Clients with token auth for the nodes of one network; closes them at the end."""

    def __init__(self, net: EmulatedNetwork):
        self.net = net
        self.opened: list = []

    def __call__(self, node, *, auth: bool = True, **kw) -> CalimeroClient:
        token = TokenAuth(node.url, USER, PASSWORD) if auth and self.net.auth else None
        kw.setdefault("backoff_s", 0.01)
        client = CalimeroClient(node.url, auth=token, timeout=10.0, **kw)
        self.opened += [client] + ([token] if token else [])
        return client

    def close(self):
        for c in self.opened:
            c.close()


@pytest.fixture
def net():
    with EmulatedNetwork(delay_s=0.05, seed=1) as network:
        yield network


@pytest.fixture
def clients(net):
    c = Clients(net)
    yield c
    c.close()


class Listener:
    """Collects a client's SSE events on a background thread."""

    def __init__(self, client: CalimeroClient, context_ids: list[str]):
        self.events: list[NodeEvent] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client, context_ids), daemon=True)
        self.thread.start()

    def _run(self, client, context_ids):
        for event in client.events(context_ids, stop=self.stop):
            self.events.append(event)

    def app_events(self) -> list[tuple[str, dict]]:
        return [(e["kind"], e["data"]) for ev in self.events for e in ev.events]

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


def subscribed(node, context_id: str) -> bool:
    with node.network._lock:
        return any(
            context_id in s.subscriptions and s.conn is not None for s in node._sessions.values()
        )


def listen(client, node, context_id) -> Listener:
    listener = Listener(client, [context_id])
    wait_for(lambda: subscribed(node, context_id), what="SSE subscription")
    return listener


# ------------------------------------------------------------------ kv-store semantics


def test_set_get_entries_remove_with_events(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    ca = clients(a)
    assert ca.health() == {"status": "alive"}
    listener = listen(clients(a), a, ctx)
    try:
        assert ca.execute(ctx, "get", {"key": "k"}) is None
        assert ca.execute(ctx, "set", {"key": "k", "value": "v1"}) is None
        assert ca.execute(ctx, "set", {"key": "k", "value": "v2"}) is None
        assert ca.execute(ctx, "set", {"key": "j", "value": "w"}) is None
        assert ca.execute(ctx, "get", {"key": "k"}) == "v2"
        assert ca.execute(ctx, "entries", {}) == {"j": "w", "k": "v2"}
        assert ca.execute(ctx, "remove", {"key": "k"}) == "v2"
        assert ca.execute(ctx, "remove", {"key": "k"}) is None  # absent: no event
        assert ca.execute(ctx, "entries", {}) == {"j": "w"}
        expected = [
            ("Inserted", {"key": "k", "value": "v1"}),
            ("Updated", {"key": "k", "value": "v2"}),
            ("Inserted", {"key": "j", "value": "w"}),
            ("Removed", {"key": "k"}),
        ]
        wait_for(lambda: len(listener.app_events()) >= 4, what="four app events")
        assert listener.app_events() == expected
        assert {e.kind for e in listener.events} == {"StateMutation"}
        assert all(e.context_id == ctx for e in listener.events)
    finally:
        listener.close()


def test_unknown_method_bad_args_and_unknown_context(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    ca = clients(a, retries=0)
    with pytest.raises(errors.FunctionCallError, match="not found"):
        ca.execute(ctx, "transfer", {})
    with pytest.raises(errors.FunctionCallError, match="key"):
        ca.execute(ctx, "set", {"key": 3, "value": "v"})
    with pytest.raises(errors.ContextNotFound):
        ca.execute("1" * 32, "get", {"key": "k"})
    with pytest.raises(errors.ParseError):
        ca.execute("not-base58-0OIl", "get", {"key": "k"})


def test_two_nodes_converge_after_a_write_with_delay(clients):
    delay = 0.3
    with EmulatedNetwork(delay_s=delay, seed=2) as net:
        a, b = net.add_node("a"), net.add_node("b")
        ctx = net.create_context()
        ca, cb = clients(a), clients(b)
        listener = listen(clients(b), b, ctx)
        try:
            t0 = time.monotonic()
            ca.execute(ctx, "set", {"key": "round-1", "value": "ref-a"})
            early = cb.execute(ctx, "get", {"key": "round-1"})
            if time.monotonic() - t0 < delay * 0.8:  # only meaningful if we were quick
                assert early is None
            wait_for(lambda: cb.execute(ctx, "get", {"key": "round-1"}) == "ref-a", what="sync")
            assert time.monotonic() - t0 >= delay * 0.9
            # the change arrived by sync and still produced the app event on b
            wait_for(lambda: listener.app_events(), what="synced event")
            assert listener.app_events() == [("Inserted", {"key": "round-1", "value": "ref-a"})]
            assert cb.sync_status(ctx)["isInitialized"] is True
        finally:
            listener.close()


def test_partition_diverges_and_heal_converges_last_writer_wins(net, clients):
    a, b = net.add_node("a"), net.add_node("b")
    ctx = net.create_context()
    ca, cb = clients(a), clients(b)
    net.partition([a], [b])
    for key, value in [("k1", "a1"), ("k1", "a2"), ("k2", "a-k2")]:  # a's clock: 1, 2, 3
        ca.execute(ctx, "set", {"key": key, "value": value})
    for key, value in [("k1", "b1"), ("k2", "b-k2"), ("k3", "b3"), ("k2", "b-k2-last")]:
        cb.execute(ctx, "set", {"key": key, "value": value})  # b's clock: 1, 2, 3, 4
    assert net.settle()  # every delivery across the cut has run (and was dropped)
    assert ca.execute(ctx, "entries", {}) == {"k1": "a2", "k2": "a-k2"}
    assert cb.execute(ctx, "entries", {}) == {"k1": "b1", "k2": "b-k2-last", "k3": "b3"}
    status = cb.sync_status(ctx)
    assert status["lastError"] == "No peers to sync with"

    net.heal()
    # per key the greater (logical timestamp, node) wins: k1 (2,a) > (1,b); k2 (4,b) > (3,a)
    expected = {"k1": "a2", "k2": "b-k2-last", "k3": "b3"}
    wait_for(lambda: ca.execute(ctx, "entries", {}) == expected, what="a converged")
    wait_for(lambda: cb.execute(ctx, "entries", {}) == expected, what="b converged")
    assert a.kv(ctx) == b.kv(ctx) == expected


def test_partition_groups_keep_syncing_inside(net, clients):
    a, b, c = (net.add_node(n) for n in "abc")
    ctx = net.create_context()
    net.partition([a, b])  # c alone in the remainder group
    clients(a).execute(ctx, "set", {"key": "k", "value": "v"})
    wait_for(lambda: b.kv(ctx) == {"k": "v"}, what="b inside the group")
    assert net.settle()
    assert c.kv(ctx) == {}
    net.heal()
    wait_for(lambda: c.kv(ctx) == {"k": "v"}, what="c after heal")


def test_join_later_starts_uninitialized_then_syncs(net, clients):
    a, b = net.add_node("a"), net.add_node("b")
    ctx = net.create_context(members=[a])
    clients(a).execute(ctx, "set", {"key": "k", "value": "v"})
    cb = clients(b, retries=0)
    with pytest.raises(errors.HttpStatusError) as info:
        cb.join_context(ctx)  # not invited
    assert info.value.status == 403
    net.invite(ctx, b)
    joined = cb.join_context(ctx)
    assert joined["contextId"] == ctx and joined["memberPublicKey"] == b.identity(ctx)
    ids = cb.context_identities(ctx)
    assert set(ids) == {a.identity(ctx), b.identity(ctx)}
    assert cb.context_identities(ctx, owned=True) == [b.identity(ctx)]
    wait_for(lambda: cb.sync_status(ctx)["isInitialized"], what="initial sync")
    assert cb.execute(ctx, "get", {"key": "k"}) == "v"


def test_uninitialized_until_synced(clients):
    with EmulatedNetwork(delay_s=5.0, seed=3) as net:
        a, b = net.add_node("a"), net.add_node("b")
        ctx = net.create_context(members=[a])
        net.join(ctx, b)
        cb = clients(b, retries=0)
        with pytest.raises(errors.Uninitialized):
            cb.execute(ctx, "get", {"key": "k"})
        assert cb.sync_status(ctx)["syncState"] == {"state": "waitingForPeers"}


# ------------------------------------------------------------------ blobs


def test_blob_uploaded_on_a_is_readable_on_b_but_not_by_a_non_member(net, clients):
    a, b, c = (net.add_node(n) for n in "abc")
    ctx = net.create_context(members=[a, b])
    ca, cb, cc = clients(a), clients(b), clients(c)
    payload = os.urandom(3 << 20) + b"tail"  # > 1 MiB: several blob-store chunks
    ref = ca.upload_blob(ctx, payload)
    assert ref.size == len(payload) and ref.sha256 == hashlib.sha256(payload).hexdigest()
    assert ca.download_blob(ctx, ref.blob_id, expected_sha256=ref.sha256) == payload

    def on_b():
        try:
            return cb.download_blob(ctx, ref.blob_id, expected_sha256=ref.sha256)
        except errors.BlobNotFound:
            return None

    assert wait_for(on_b, what="blob on b") == payload
    with pytest.raises(errors.BlobNotFound) as info:
        cc.download_blob(ctx, ref.blob_id)
    assert "Blob not found locally or in network" in str(info.value)


def test_blob_not_shared_across_a_partition(net, clients):
    a, b = net.add_node("a"), net.add_node("b")
    ctx = net.create_context()
    ca, cb = clients(a), clients(b)
    net.partition([a], [b])
    ref = ca.upload_blob(ctx, b"weights")
    time.sleep(net.delay_s * 2)  # past the announce delay: only the partition hides it
    with pytest.raises(errors.BlobNotFound):
        cb.download_blob(ctx, ref.blob_id)
    net.heal()
    assert cb.download_blob(ctx, ref.blob_id) == b"weights"


def test_blob_upload_with_wrong_hash_is_refused(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    token = TokenAuth(a.url, USER, PASSWORD)
    try:
        with httpx.Client(base_url=a.url) as raw:
            r = raw.put(
                "/admin-api/blobs",
                params={"context_id": ctx, "hash": "1" * 32},
                content=b"data",
                headers={"Authorization": f"Bearer {token.token()}"},
            )
    finally:
        token.close()
    assert r.status_code == 500
    assert r.json() == {"error": "Failed to store blob: fatal: blob hash mismatch"}


# ------------------------------------------------------------------ faults and auth


def test_group_key_pending_injected_is_retried(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    sleeps: list[float] = []
    ca = clients(a, sleep=sleeps.append)
    a.fail_next("set", "GroupKeyPending", times=2)
    assert ca.execute(ctx, "set", {"key": "k", "value": "v"}) is None
    assert len(sleeps) == 2
    assert a.kv(ctx) == {"k": "v"}
    a.fail_next("execute", "http503")
    assert ca.execute(ctx, "get", {"key": "k"}) == "v"
    assert len(sleeps) == 3
    a.fail_next("/admin-api/blobs", "http502")
    ref = ca.upload_blob(ctx, b"x")
    assert len(sleeps) == 4 and ca.download_blob(ctx, ref.blob_id) == b"x"
    a.fail_next("get", "UpgradeInProgress", times=3)
    with pytest.raises(errors.UpgradeInProgress) as info:
        clients(a, retries=1, sleep=sleeps.append).execute(ctx, "get", {"key": "k"})
    assert len(info.value.data["group_id"]) == 32


def test_emulator_error_member_has_the_fixture_shape(net):
    """Same wire shape as merod's: compare the raw body with the fixture from core's source."""
    net.auth = False
    a = net.add_node("a")
    ctx = net.create_context()
    a.fail_next("get", "GroupKeyPending")
    fixture = json.loads((FIXTURES / "execute_error_group_key_pending.json").read_text())
    request = fixture["request"]["json"]
    request["params"]["contextId"] = ctx
    with httpx.Client(base_url=a.url) as raw:
        r = raw.post("/jsonrpc", json=request)
        ok = raw.post("/jsonrpc", json=request)
    assert r.status_code == 200
    expected = fixture["response"]["json"]
    expected["error"]["data"]["context_id"] = ctx
    assert r.json() == expected
    assert ok.json() == {"jsonrpc": "2.0", "id": 1, "result": {"output": None}}


def test_expired_token_is_refreshed(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    token = TokenAuth(a.url, USER, PASSWORD)
    client = CalimeroClient(a.url, auth=token)
    try:
        client.execute(ctx, "set", {"key": "k", "value": "v"})
        first = token.token()
        a.expire_tokens()
        assert client.execute(ctx, "get", {"key": "k"}) == "v"
        assert token.token() != first
        # the emulated node refuses a second refresh with the consumed refresh token
        assert len(a._refresh) == 2 and sum(used for _, used in a._refresh.values()) == 1
    finally:
        client.close()
        token.close()


def test_requests_without_valid_token_get_401(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    anonymous = clients(a, auth=False)
    assert anonymous.health() == {"status": "alive"}  # public route
    with pytest.raises(errors.AuthError):
        anonymous.execute(ctx, "get", {"key": "k"})
    static = CalimeroClient(a.url, auth=TokenAuth.static("emu-at-forged"))
    try:
        with pytest.raises(errors.AuthError):
            static.execute(ctx, "get", {"key": "k"})
    finally:
        static.close()
    wrong = TokenAuth(a.url, USER, "wrong")
    bad = CalimeroClient(a.url, auth=wrong)
    try:
        with pytest.raises(errors.AuthError, match="Invalid credentials"):
            bad.execute(ctx, "get", {"key": "k"})
    finally:
        bad.close()
        wrong.close()


def test_auth_can_be_turned_off(clients):
    with EmulatedNetwork(auth=False) as net:
        a = net.add_node("a")
        ctx = net.create_context()
        ca = clients(a, auth=False)
        ca.execute(ctx, "set", {"key": "k", "value": "v"})
        assert ca.execute(ctx, "get", {"key": "k"}) == "v"


def test_request_delay_hits_client_timeout(net):
    a = net.add_node("a")
    ctx = net.create_context()
    token = TokenAuth(a.url, USER, PASSWORD)
    token.token()
    a.set_delay(0.5)
    client = CalimeroClient(a.url, auth=token, timeout=0.1, retries=0)
    try:
        with pytest.raises(errors.NodeTimeout):
            client.execute(ctx, "get", {"key": "k"})
    finally:
        a.set_delay(0.0)
        client.close()
        token.close()


def test_sse_reconnects_after_dropped_stream(net, clients):
    a = net.add_node("a")
    ctx = net.create_context()
    ca = clients(a)
    listener = listen(clients(a), a, ctx)
    try:
        ca.execute(ctx, "set", {"key": "k", "value": "1"})
        wait_for(lambda: listener.app_events(), what="first event")
        a.drop_sse()
        wait_for(lambda: any(e.kind == "reconnected" for e in listener.events), what="reconnected")
        ca.execute(ctx, "set", {"key": "k", "value": "2"})
        wait_for(lambda: len(listener.app_events()) == 2, what="event after reconnect")
        kinds = [e.kind for e in listener.events]
        assert kinds == ["StateMutation", "reconnected", "StateMutation"]
        assert listener.events[1].raw["reconnect"] is True  # same session resumed
        assert listener.app_events()[1] == ("Updated", {"key": "k", "value": "2"})
    finally:
        listener.close()


# ------------------------------------------------------------------ command line


def test_cli_starts_nodes_and_writes_info_file(tmp_path):
    info_file = tmp_path / "emulator.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "calimero_adapter.emulator", "--nodes", "2", "--delay", "0.01"]
        + ["--auth", "--info-file", str(info_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(info_file.exists, timeout=15, what="info file")
        info = json.loads(info_file.read_text())
        assert set(info["nodes"]) == {"node0", "node1"}
        assert "emulated merod" in info["emulator"]
        ctx = info["context_id"]
        creds = info["auth"]
        url0, url1 = info["nodes"]["node0"], info["nodes"]["node1"]
        login = TokenAuth(url0, creds["username"], creds["password"])
        c0 = CalimeroClient(url0, auth=login)
        c1 = CalimeroClient(url1, auth=TokenAuth.static(creds["tokens"]["node1"]))
        with c0, c1:
            c0.execute(ctx, "set", {"key": "k", "value": "v"})
            wait_for(lambda: c1.execute(ctx, "get", {"key": "k"}) == "v", what="CLI sync")
        login.close()
        with CalimeroClient(url1) as anonymous, pytest.raises(errors.AuthError):
            anonymous.execute(ctx, "get", {"key": "k"})  # --auth: tokens required
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert json.loads(out)["context_id"] == info["context_id"]


def test_tokens_expire_after_their_ttl():
    with EmulatedNetwork(token_ttl_s=0.2) as net:
        a = net.add_node("a")
        ctx = net.create_context()
        token = TokenAuth(a.url, USER, PASSWORD)
        client = CalimeroClient(a.url, auth=token)
        try:
            client.execute(ctx, "set", {"key": "k", "value": "v"})
            first = token.token()
            time.sleep(0.25)
            assert client.execute(ctx, "get", {"key": "k"}) == "v"
            assert token.token() != first
        finally:
            client.close()
            token.close()
