"""Wire tests of calimero_adapter.client against merod's documented shapes (httpx.MockTransport).

The fixtures in tests/fixtures/calimero/ follow Calimero core's server source; each names the
file it follows in its "source" field.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from calimero_adapter import errors  # noqa: E402
from calimero_adapter.client import (  # noqa: E402
    MAX_BLOB_BYTES,
    BlobRef,
    CalimeroClient,
    NodeEvent,
    TokenAuth,
    b58decode,
    b58encode,
    decode_app_event,
)

FIXTURES = Path(__file__).parent / "fixtures" / "calimero"
URL = "http://node-a.test:2528"
CTX = "488eavc5AH1VcDGADhYikqZjFbDGNQhgD83xPqkSCY51"


def fx(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def response_of(fixture: dict) -> httpx.Response:
    spec = fixture["response"]
    if "json" in spec:
        return httpx.Response(spec["status"], headers=spec.get("headers"), json=spec["json"])
    return httpx.Response(
        spec["status"], headers=spec.get("headers"), content=spec.get("body_utf8", "").encode()
    )


class Node:
    """A scripted node: answers requests in order, records them."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def bodies(self) -> list:
        return [json.loads(r.content) if r.content else None for r in self.requests]


def make_client(node: Node, *, retries: int = 5, auth: TokenAuth | None = None, **kw):
    sleeps: list[float] = []
    client = CalimeroClient(
        URL,
        transport=httpx.MockTransport(node),
        retries=retries,
        sleep=sleeps.append,
        auth=auth,
        **kw,
    )
    return client, sleeps


# ------------------------------------------------------------------ fixtures themselves


def test_every_fixture_names_the_core_file_it_follows():
    files = sorted(FIXTURES.glob("*.json"))
    assert len(files) >= 20
    for path in files:
        source = json.loads(path.read_text()).get("source", "")
        assert source.startswith("calimero-network/core@"), path.name
        assert "crates/" in source or "apps/" in source, path.name


def test_base58_round_trip_matches_bs58_vector():
    # crates/primitives/src/blobs.rs: [1; 32] encodes to this string
    assert b58encode(bytes([1] * 32)) == "4vJ9JU1bJJE96FWSJKvHsmmFADCg4gpZQff4P3bkLKi"
    assert b58decode("4vJ9JU1bJJE96FWSJKvHsmmFADCg4gpZQff4P3bkLKi") == bytes([1] * 32)
    assert b58decode(b58encode(b"\0\0abc")) == b"\0\0abc"
    with pytest.raises(ValueError):
        b58decode("0OIl")


# ------------------------------------------------------------------ JSON-RPC


def test_health():
    node = Node(response_of(fx("health")))
    client, _ = make_client(node)
    assert client.health() == {"status": "alive"}
    assert node.requests[0].method == "GET"
    assert node.requests[0].url.path == "/admin-api/health"


def test_execute_ok_sends_documented_request_and_returns_output():
    f = fx("execute_ok")
    node = Node(response_of(f))
    client, sleeps = make_client(node)
    out = client.execute(CTX, "get", {"key": "round-1/site-a"})
    assert out == "blob-ref-1"
    (body,) = node.bodies()
    expected = f["request"]["json"]
    assert body["jsonrpc"] == "2.0" and isinstance(body["id"], int)
    assert body["method"] == expected["method"]
    assert body["params"] == expected["params"]
    assert "executorPublicKey" not in body["params"]
    assert node.requests[0].headers["content-type"] == "application/json"
    assert node.requests[0].url.path == "/jsonrpc"
    assert sleeps == []


def test_execute_sends_executor_key_only_when_given():
    node = Node(response_of(fx("execute_ok")))
    client, _ = make_client(node)
    client.execute(CTX, "get", {"key": "k"}, executor_public_key="PK")
    assert node.bodies()[0]["params"]["executorPublicKey"] == "PK"


ERROR_FIXTURES = sorted(p.stem for p in FIXTURES.glob("execute_error_*.json"))


@pytest.mark.parametrize("name", ERROR_FIXTURES)
def test_each_error_shape_maps_to_its_exception(name):
    f = fx(name)
    cls = getattr(errors, f["raises"])
    node = Node(*[response_of(f)] * 10)
    client, sleeps = make_client(node, retries=2)
    with pytest.raises(cls) as info:
        client.execute(CTX, "get", {"key": "round-1/site-a"})
    exc = info.value
    assert type(exc) is cls
    assert exc.rpc_type == f["response"]["json"]["error"]["type"]
    assert exc.data == f["response"]["json"]["error"].get("data")
    text = str(exc)
    for part in (URL, "/jsonrpc", CTX, "method=get"):
        assert part in text, (part, text)
    # only the two transient shapes are retried
    attempts = 3 if cls.transient else 1
    assert len(node.requests) == attempts and len(sleeps) == attempts - 1


def test_transient_error_classes_are_marked():
    assert errors.GroupKeyPending.transient and errors.UpgradeInProgress.transient
    for cls in (errors.ParseError, errors.FunctionCallError, errors.Uninitialized):
        assert not cls.transient
    assert issubclass(errors.GroupKeyPending, errors.RpcError)
    assert issubclass(errors.RpcError, errors.CalimeroError)


def test_group_key_pending_twice_then_ok_is_retried_with_growing_backoff():
    pending = response_of(fx("execute_error_group_key_pending"))
    node = Node(pending, pending, response_of(fx("execute_ok")))
    client, sleeps = make_client(node, backoff_s=0.2)
    assert client.execute(CTX, "get", {"key": "round-1/site-a"}) == "blob-ref-1"
    assert len(node.requests) == 3
    assert len(sleeps) == 2
    assert 0.2 <= sleeps[0] <= 0.3 and 0.4 <= sleeps[1] <= 0.6


def test_backoff_jitter_is_seeded_not_global():
    pending = response_of(fx("execute_error_upgrade_in_progress"))
    runs = []
    for _ in range(2):
        node = Node(pending, pending, pending, response_of(fx("execute_ok")))
        client, sleeps = make_client(node, seed=7)
        client.execute(CTX, "get", {"key": "k"})
        runs.append(sleeps)
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_503_then_ok_is_retried():
    node = Node(response_of(fx("node_not_ready_503")), response_of(fx("join_context")))
    client, sleeps = make_client(node)
    data = client.join_context(CTX)
    assert data == fx("join_context")["response"]["json"]["data"]
    assert len(sleeps) == 1
    assert [r.url.path for r in node.requests] == [f"/admin-api/contexts/{CTX}/join"] * 2
    assert node.requests[0].method == "POST"


def test_retries_exhausted_raises_the_last_error():
    node = Node(*[response_of(fx("execute_error_group_key_pending"))] * 4)
    client, sleeps = make_client(node, retries=3)
    with pytest.raises(errors.GroupKeyPending) as info:
        client.execute(CTX, "set", {"key": "k", "value": "v"})
    assert len(node.requests) == 4 and len(sleeps) == 3
    assert "gave up after 4 attempts" in "".join(getattr(info.value, "__notes__", []))


def test_503_exhausted_raises_node_unavailable():
    node = Node(*[response_of(fx("node_not_ready_503"))] * 3)
    client, sleeps = make_client(node, retries=2)
    with pytest.raises(errors.NodeUnavailable) as info:
        client.join_context(CTX)
    assert info.value.status == 503
    assert len(sleeps) == 2 and "not yet resolvable" in str(info.value)


def test_connection_refused_is_retried_then_node_unavailable():
    node = Node(*[httpx.ConnectError("Connection refused")] * 3)
    client, sleeps = make_client(node, retries=2)
    with pytest.raises(errors.NodeUnavailable) as info:
        client.execute(CTX, "get", {"key": "k"})
    assert "Connection refused" in str(info.value) and URL in str(info.value)
    assert len(node.requests) == 3 and len(sleeps) == 2


def test_connection_refused_then_ok():
    node = Node(httpx.ConnectError("refused"), response_of(fx("execute_ok")))
    client, sleeps = make_client(node)
    assert client.execute(CTX, "get", {"key": "k"}) == "blob-ref-1"
    assert len(sleeps) == 1


def test_read_timeout_raises_node_timeout_without_replaying_execute():
    node = Node(httpx.ReadTimeout("timed out"), response_of(fx("execute_ok")))
    client, sleeps = make_client(node, timeout=1.5)
    with pytest.raises(errors.NodeTimeout) as info:
        client.execute(CTX, "set", {"key": "k", "value": "v"})
    assert "1.5" in str(info.value) and "method=set" in str(info.value)
    assert len(node.requests) == 1 and sleeps == []


def test_non_json_answer_is_a_protocol_error():
    node = Node(httpx.Response(200, content=b"<html>proxy</html>"))
    client, _ = make_client(node)
    with pytest.raises(errors.ProtocolError):
        client.execute(CTX, "get", {"key": "k"})


def test_admin_404_maps_to_http_status_error():
    f = fx("context_not_found_404")
    node = Node(response_of(f))
    client, _ = make_client(node)
    with pytest.raises(errors.HttpStatusError) as info:
        client.context_identities(CTX)
    assert info.value.status == 404 and "Context not found" in str(info.value)


def test_sync_status_and_identities():
    node = Node(response_of(fx("sync_status")), response_of(fx("context_identities")))
    client, _ = make_client(node)
    status = client.sync_status(CTX)
    assert status["isInitialized"] is True and status["syncState"] == {"state": "idle"}
    assert node.bodies()[0]["method"] == "sync_status"
    assert node.bodies()[0]["params"] == {"contextId": CTX}
    ids = client.context_identities(CTX)
    assert ids == fx("context_identities")["response"]["json"]["data"]["identities"]


# ------------------------------------------------------------------ auth


def auth_node(*answers):
    node = Node(*answers)
    return node, TokenAuth(
        URL,
        "hospital-a",
        "correct horse battery",
        transport=httpx.MockTransport(node),
        clock=lambda: 1767225600,
    )


def test_token_expired_refreshes_once_and_retries():
    anode, auth = auth_node(response_of(fx("auth_token")), response_of(fx("auth_refresh")))
    expired = response_of(fx("auth_token_expired_401"))
    node = Node(expired, response_of(fx("execute_ok")))
    client, sleeps = make_client(node, auth=auth)
    assert client.execute(CTX, "get", {"key": "k"}) == "blob-ref-1"
    # login then refresh, in the documented body shapes
    assert [r.url.path for r in anode.requests] == ["/auth/token", "/auth/refresh"]
    token_body, refresh_body = anode.bodies()
    assert token_body == fx("auth_token")["request"]["json"]
    assert refresh_body == fx("auth_refresh")["request"]["json"]
    auths = [r.headers["authorization"] for r in node.requests]
    assert auths == [
        "Bearer eyJhbGciOiJIUzI1NiJ9.access-1.sig",
        "Bearer eyJhbGciOiJIUzI1NiJ9.access-2.sig",
    ]
    assert sleeps == []


def test_second_token_expired_raises_token_expired():
    anode, auth = auth_node(response_of(fx("auth_token")), response_of(fx("auth_refresh")))
    expired = response_of(fx("auth_token_expired_401"))
    node = Node(expired, expired, response_of(fx("execute_ok")))
    client, _ = make_client(node, auth=auth)
    with pytest.raises(errors.TokenExpired) as info:
        client.execute(CTX, "get", {"key": "k"})
    assert info.value.status == 401 and len(node.requests) == 2


def test_plain_401_is_an_auth_error_without_refresh():
    anode, auth = auth_node(response_of(fx("auth_token")))
    node = Node(httpx.Response(401))
    client, _ = make_client(node, auth=auth)
    with pytest.raises(errors.AuthError) as info:
        client.health()
    assert not isinstance(info.value, errors.TokenExpired)
    assert [r.url.path for r in anode.requests] == ["/auth/token"]


def test_failed_refresh_falls_back_to_login():
    denied = httpx.Response(401, json={"data": None, "error": "Invalid refresh token: x"})
    anode, auth = auth_node(response_of(fx("auth_token")), denied, response_of(fx("auth_token")))
    node = Node(response_of(fx("auth_token_expired_401")), response_of(fx("execute_ok")))
    client, _ = make_client(node, auth=auth)
    assert client.execute(CTX, "get", {"key": "k"}) == "blob-ref-1"
    assert [r.url.path for r in anode.requests] == ["/auth/token", "/auth/refresh", "/auth/token"]


def test_wrong_credentials_raise_auth_error():
    bad = httpx.Response(
        401, json={"data": None, "error": "Authentication failed: Invalid credentials"}
    )
    _, auth = auth_node(bad)
    client, _ = make_client(Node(), auth=auth)
    with pytest.raises(errors.AuthError, match="Invalid credentials"):
        client.health()


def test_static_token_cannot_refresh():
    node = Node(response_of(fx("auth_token_expired_401")))
    client, _ = make_client(node, auth=TokenAuth.static("tok"))
    with pytest.raises(errors.TokenExpired):
        client.execute(CTX, "get", {"key": "k"})
    assert node.requests[0].headers["authorization"] == "Bearer tok"


# ------------------------------------------------------------------ blobs


def test_blob_upload_request_shape():
    f = fx("blob_upload")
    body = f["request"]["body_utf8"].encode()
    node = Node(response_of(f))
    client, _ = make_client(node)
    ref = client.upload_blob(CTX, body)
    (req,) = node.requests
    assert req.method == "PUT" and req.url.path == "/admin-api/blobs"
    assert dict(req.url.params) == f["request"]["query"]
    assert b58decode(req.url.params["hash"]) == hashlib.sha256(body).digest()
    assert req.content == body
    assert req.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in req.headers
    assert ref == BlobRef(
        blob_id=f["response"]["json"]["data"]["blob_id"],
        sha256=hashlib.sha256(body).hexdigest(),
        size=len(body),
    )


@pytest.mark.parametrize("kind", ["iterable", "file", "unseekable"])
def test_blob_upload_streams_other_sources_identically(kind, tmp_path):
    f = fx("blob_upload")
    body = f["request"]["body_utf8"].encode() * 50_000  # ~6 MiB, several chunks
    answer = httpx.Response(200, json={"data": {"blob_id": "X", "size": len(body)}})
    node = Node(answer)
    client, _ = make_client(node)
    if kind == "iterable":
        data = (body[i : i + 777_777] for i in range(0, len(body), 777_777))
    elif kind == "file":
        path = tmp_path / "blob.bin"
        path.write_bytes(b"skip" + body)
        data = open(path, "rb")  # noqa: SIM115 - closed below
        data.seek(4)
    else:
        data = io.BufferedReader(io.BytesIO(body))
        data.seekable = lambda: False
    try:
        ref = client.upload_blob(CTX, data)
    finally:
        if hasattr(data, "close"):
            data.close()
    assert ref.size == len(body) and ref.sha256 == hashlib.sha256(body).hexdigest()
    assert node.requests[0].content == body
    assert b58decode(node.requests[0].url.params["hash"]) == hashlib.sha256(body).digest()


def test_blob_over_one_gib_is_rejected_before_sending(tmp_path):
    node = Node()
    client, _ = make_client(node)

    def sizes():  # 1 MiB of data, then a 1 GiB chunk: virtual memory, never touched
        yield b"\0" * (1 << 20)
        yield mmap.mmap(-1, MAX_BLOB_BYTES)

    with pytest.raises(errors.BlobTooLarge) as info:
        client.upload_blob(CTX, sizes())
    assert info.value.size == MAX_BLOB_BYTES + (1 << 20) and CTX in str(info.value)

    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(MAX_BLOB_BYTES + 1)  # a sparse file: no disk blocks
    with open(sparse, "rb") as f, pytest.raises(errors.BlobTooLarge):
        client.upload_blob(CTX, f)

    with pytest.raises(errors.BlobTooLarge):
        client.upload_blob(CTX, mmap.mmap(-1, MAX_BLOB_BYTES + 1))
    assert node.requests == []


def test_blob_at_exactly_the_cap_size_is_not_rejected_by_size():
    # the cap is inclusive (merod rejects only `total > MAX_BLOB_UPLOAD_BYTES`)
    from calimero_adapter.client import _BlobBody

    class Huge(io.RawIOBase):
        def seekable(self):
            return True

        def tell(self):
            return 0

        def seek(self, offset, whence=0):
            return MAX_BLOB_BYTES if whence == io.SEEK_END else 0

        def read(self, n=-1):
            raise RuntimeError("stop: size check passed")

    with pytest.raises(RuntimeError, match="size check passed"):
        _BlobBody(Huge())


def test_blob_download_verifies_hash():
    f = fx("blob_download")
    body = f["response"]["body_utf8"].encode()
    node = Node(response_of(f))
    client, _ = make_client(node)
    sha = hashlib.sha256(body).hexdigest()
    assert client.download_blob(CTX, "BLOB", expected_sha256=sha) == body
    (req,) = node.requests
    assert req.url.path == "/admin-api/blobs/BLOB" and req.url.params["context_id"] == CTX


def test_tampered_blob_body_raises_hash_mismatch():
    f = fx("blob_download")
    body = bytearray(f["response"]["body_utf8"].encode())
    body[3] ^= 1
    node = Node(httpx.Response(200, headers=f["response"]["headers"], content=bytes(body)))
    client, _ = make_client(node)
    with pytest.raises(errors.BlobHashMismatch) as info:
        client.download_blob(CTX, "BLOB")
    assert info.value.expected == f["response"]["headers"]["x-blob-hash"]
    assert info.value.got == hashlib.sha256(bytes(body)).hexdigest()


def test_download_checks_expected_hash_without_header():
    node = Node(httpx.Response(200, content=b"abc"))
    client, _ = make_client(node)
    with pytest.raises(errors.BlobHashMismatch):
        client.download_blob(CTX, "BLOB", expected_sha256="00" * 32)


def test_blob_not_found():
    node = Node(response_of(fx("blob_not_found_404")))
    client, sleeps = make_client(node)
    with pytest.raises(errors.BlobNotFound) as info:
        client.download_blob(CTX, "BLOB")
    assert info.value.status == 404 and sleeps == []


# ------------------------------------------------------------------ SSE


def sse_response(text: str, headers: dict) -> httpx.Response:
    data = text.encode()
    chunks = [data[i : i + 37] for i in range(0, len(data), 37)]  # frames split mid-line
    return httpx.Response(200, headers=headers, content=iter(chunks))


def test_decode_app_event():
    raw = {"kind": "Inserted", "data": list(b'{"key":"k","value":"v"}'), "handler": None}
    assert decode_app_event(raw) == {
        "kind": "Inserted",
        "data": {"key": "k", "value": "v"},
        "handler": None,
    }
    assert decode_app_event({"kind": "Cleared", "data": []})["data"] is None
    assert decode_app_event({"kind": "X", "data": list(b"plain")})["data"] == "plain"
    assert decode_app_event({"kind": "X", "data": [255, 0]})["data"] == b"\xff\x00"


def test_sse_parsing_subscribe_and_reconnect_after_drop():
    f = fx("sse_stream")
    sub = httpx.Response(200, json=f["subscribe_response"]["json"])
    node = Node(
        sse_response(f["first_connection"], f["stream_headers"]),
        sub,
        sse_response(f["second_connection"], f["stream_headers"]),
        sub,
    )
    client, sleeps = make_client(node)
    stream = client.events([CTX])
    got: list[NodeEvent] = [next(stream) for _ in range(3)]
    stream.close()
    assert [e.kind for e in got] == ["StateMutation", "reconnected", "StateMutation"]
    assert got[0].context_id == CTX
    assert got[0].events == [
        {
            "kind": "Inserted",
            "data": {"key": "round-1/site-a", "value": "blob-ref-1"},
            "handler": None,
        }
    ]
    assert [e["kind"] for e in got[2].events] == ["Updated", "Removed"]
    assert got[2].events[1]["data"] == {"key": "round-0/site-a"}
    assert got[2].raw["data"]["newRoot"]
    assert got[1].raw["reconnect"] is True
    # requests: GET /sse, subscribe, GET /sse again carrying Last-Event-ID, subscribe
    paths = [(r.method, r.url.path) for r in node.requests]
    assert paths == [
        ("GET", "/sse"),
        ("POST", "/sse/subscription"),
        ("GET", "/sse"),
        ("POST", "/sse/subscription"),
    ]
    assert node.requests[0].headers["accept"] == "text/event-stream"
    assert "last-event-id" not in node.requests[0].headers
    sid = f["stream_headers"]["x-sse-session-id"]
    assert node.requests[2].headers["last-event-id"] == f"{sid}-1"
    assert node.bodies()[1] == f["subscribe_request"]["json"]
    assert len(sleeps) == 1  # one backoff before reconnecting


def test_sse_close_frame_and_failed_reconnects_give_up():
    f = fx("sse_stream")
    sub = httpx.Response(200, json=f["subscribe_response"]["json"])
    node = Node(
        sse_response(f["second_connection"], f["stream_headers"]),
        sub,
        httpx.ConnectError("refused"),
        httpx.ConnectError("refused"),
    )
    client, sleeps = make_client(node, retries=0)
    got = []
    with pytest.raises(errors.NodeUnavailable):
        for event in client.events([CTX], max_reconnects=2):
            got.append(event.kind)
    assert got == ["StateMutation"]  # the close frame ended the first stream
    assert len(sleeps) == 2


def test_sse_stop_event_ends_the_iterator_promptly():
    f = fx("sse_stream")
    release = threading.Event()
    first = f["first_connection"].encode()

    def endless():
        yield first
        while not release.wait(0.01):
            yield b":\n\n"

    node = Node(
        httpx.Response(200, headers=f["stream_headers"], content=endless()),
        httpx.Response(200, json=f["subscribe_response"]["json"]),
    )
    client, _ = make_client(node)
    stop = threading.Event()
    try:
        it = client.events([CTX], stop=stop)
        assert next(it).kind == "StateMutation"
        threading.Timer(0.1, stop.set).start()
        t0 = time.monotonic()
        assert list(it) == []
        assert time.monotonic() - t0 < 1.5
    finally:
        release.set()


def test_sse_lost_session_on_subscribe_reconnects():
    f = fx("sse_stream")
    lost = httpx.Response(
        404, json={"error": "Session not found. Please reconnect to SSE endpoint first."}
    )
    node = Node(
        sse_response(f["first_connection"], f["stream_headers"]),
        lost,
        sse_response(f["second_connection"], f["stream_headers"]),
        httpx.Response(200, json=f["subscribe_response"]["json"]),
    )
    client, sleeps = make_client(node)
    stream = client.events([CTX])
    first = next(stream)
    stream.close()
    # the first stream was abandoned before any subscription was live, so the second one
    # is the first real subscription: no "reconnected" marker, just its events
    assert first.kind == "StateMutation" and first.event_id.endswith("-5")
    assert len(sleeps) == 1
    assert [r.url.path for r in node.requests] == ["/sse", "/sse/subscription"] * 2
