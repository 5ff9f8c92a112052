"""A synchronous HTTP client for a Calimero node (merod): JSON-RPC, admin API, blobs, SSE, auth.

Every request and answer shape here was read off Calimero core's server source
(``calimero-network/core``, default branch at commit ``051f0848e0b8`` of 2026-08-22, one
commit after tag ``0.11.0-rc.25``; between rc.25 and that commit only ``admin/service.rs``
changed, to answer "not yet" with 503 instead of 500). Paths below are inside that repo.

Endpoints and where their shapes come from
------------------------------------------
* Default address ``127.0.0.1:2528``: ``crates/server/src/config.rs`` (``DEFAULT_PORT``) and
  ``crates/merod/src/cli/run.rs``.
* ``POST /jsonrpc``: ``crates/server/primitives/src/jsonrpc.rs`` (``Request``, ``Response``,
  ``RequestPayload``, ``ExecutionRequest``/``ExecutionResponse``, ``SyncStatusRequest``/
  ``SyncStatusResponse``, ``ServerResponseError``) and ``crates/server/src/jsonrpc.rs``
  (errors always come back with HTTP 200 and an ``error`` member; handler errors are the
  handler's error enum serialized as ``{"type": ..., "data": ...}``). Request:
  ``{"jsonrpc": "2.0", "id": N, "method": "execute", "params": {"contextId", "method",
  "argsJson"}}``; answer ``{"jsonrpc", "id", "result": {"output": ...}}``.
  Wire fixtures in ``crates/server/primitives/fixtures/wire/jsonrpc/execute.*.json``.
* ``execute`` error members: ``crates/server/primitives/src/jsonrpc.rs`` (``ExecutionError``:
  ``SerdeError``, ``FunctionCallError`` with a string, untagged ``ExecuteError``),
  ``crates/context/primitives/src/messages.rs`` (``ExecuteError``: ``ContextNotFound``,
  ``Unauthorized {context_id, public_key}``, ``Uninitialized``, ``ApplicationNotInstalled``,
  ``InternalError {kind}``, ``GroupKeyPending {context_id}``, ``UpgradeInProgress {group_id}``,
  ``XCallNotPermitted``) and ``crates/server/src/execute.rs`` (membership failures and a
  missing owned identity are ``FunctionCallError`` strings). ``ParseError`` is a
  ``ServerResponseError`` (bad params, failed validation).
* ``sync_status``: ``crates/server/src/jsonrpc/sync_status.rs`` and
  ``crates/primitives/src/sync_status.rs`` (``syncState`` is ``{"state": "idle" | ...}``).
* ``GET /admin-api/health`` -> ``{"data": {"status": "alive"}}`` (public route) and
  ``{"error": "..."}`` bodies for admin errors: ``crates/server/src/admin/service.rs``.
* ``POST /admin-api/contexts/{id}/join`` (no body) -> ``{"data": {"contextId",
  "memberPublicKey"}}``: ``crates/server/src/admin/handlers/context/join_context.rs`` and
  ``crates/server/primitives/src/admin/mod.rs`` (``JoinContextApiResponse``).
* ``GET /admin-api/contexts/{id}/identities[-owned]`` -> ``{"data": {"identities": [...]}}``:
  ``crates/server/src/admin/handlers/context/get_context_identities.rs``.
* Blobs: ``crates/server/src/admin/handlers/blob.rs``. ``PUT /admin-api/blobs?hash=..&
  context_id=..`` with the raw body, answer ``{"data": {"blob_id", "size"}}`` (snake_case
  ``BlobInfo`` from ``crates/primitives/src/blobs.rs``); upload capped at 1 GiB
  (``MAX_BLOB_UPLOAD_BYTES``). ``hash`` is the base58 of the SHA-256 of the whole content
  (``crates/primitives/src/hash.rs``, ``crates/store/blobs/src/lib.rs``,
  ``crates/node/primitives/src/client/blob.rs``: mismatch -> 500 "fatal: blob hash
  mismatch"). ``GET /admin-api/blobs/{id}?context_id=..`` streams the bytes with
  ``X-Blob-Hash`` = hex SHA-256; 404 ``"Blob not found locally or in network"`` when neither
  this node nor a peer that accepts this node as a context member has it.
* SSE: ``crates/server/src/sse/handlers.rs``, ``crates/server/primitives/src/sse.rs``,
  ``crates/server/src/sse/events.rs``. ``GET /sse`` opens the stream; the first frame is
  ``{"type": "connect", "session_id", "reconnect"}``; then ``POST /sse/subscription`` with
  ``{"id": session_id, "method": "subscribe", "params": {"contextIds": [...]}}``. Events are
  ``{"result": <NodeEvent>}`` (``crates/primitives/src/events.rs``: ``{"contextId", "type":
  "StateMutation", "data": {"newRoot", "events": [{"kind", "data": [bytes], "handler"}]}}``);
  ``{"type": "close", "reason"}`` frames end a stream. Events are not buffered across a
  disconnect ("skip-on-disconnect"), hence the synthetic ``reconnected`` event here.
* App events: the stock ``apps/kv-store/src/lib.rs`` emits ``Inserted {key, value}``,
  ``Updated {key, value}``, ``Removed {key}``; ``crates/sdk/macros/src/event.rs`` puts the
  JSON of the variant's fields in ``data`` as bytes.
* Auth (embedded mode): ``crates/auth/src/api/routes.rs`` (``/auth/token``, ``/auth/refresh``),
  ``crates/auth/src/api/handlers/auth.rs`` (snake_case bodies ``{"auth_method",
  "public_key", "client_name", "permissions", "timestamp", "provider_data"}`` and
  ``{"access_token", "refresh_token"}``; answers ``{"data": {"access_token",
  "refresh_token"}, "error": null}``; refresh only accepts an expired access token, a
  reused refresh token gets 401 ``X-Auth-Error: token_reuse``),
  ``crates/auth/src/providers/impls/user_password.rs`` (``provider_data`` =
  ``{"username", "password"}``), ``crates/server/src/auth.rs`` (the guard answers an expired
  token with an empty 401 and ``X-Auth-Error: token_expired``, a revoked one with 403
  ``token_revoked``; ``Authorization: Bearer`` or ``?token=``), and
  ``crates/client/src/connection.rs`` (how core's own client refreshes).

Choices between versions
------------------------
* ``executorPublicKey``: removed from ``ExecutionRequest`` before the 0.11.0-rc line (commit
  ``947d733b4``, April 2026); the node now always executes as its own identity for the
  context. Unknown fields are ignored by serde, so :meth:`CalimeroClient.execute` sends
  ``executorPublicKey`` only when the caller passes one (older 0.10 nodes honour it).
* ``InternalError``: a unit variant (``{"type": "InternalError"}``) in 0.11.0-rc.1,
  ``{"type": "InternalError", "data": {"kind": ...}}`` since; both map to :class:`RpcError`.
* ``sync_status`` exists since 0.11.0-rc.2; rc.1 answers it with ``ParseError``.
* Core's own client does not replay a non-idempotent request after a 401; this client does
  replay once after refreshing, because the guard rejects before any handler runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import mmap
import queue
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, TypeVar

import httpx

from calimero_adapter.errors import (
    RPC_ERRORS,
    AuthError,
    BlobHashMismatch,
    BlobNotFound,
    BlobTooLarge,
    CalimeroError,
    HttpStatusError,
    NodeTimeout,
    NodeUnavailable,
    ProtocolError,
    RpcError,
    TokenExpired,
)

__all__ = [
    "DEFAULT_URL",
    "MAX_BLOB_BYTES",
    "BlobRef",
    "CalimeroClient",
    "NodeEvent",
    "TokenAuth",
    "b58decode",
    "b58encode",
    "decode_app_event",
    "parse_sse_payload",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:2528"
#: merod's upload cap (``MAX_BLOB_UPLOAD_BYTES`` in crates/server/src/admin/handlers/blob.rs).
MAX_BLOB_BYTES = 1024 * 1024 * 1024
_CHUNK = 1 << 20
_SPOOL_IN_MEMORY = 16 << 20
_TRANSIENT_HTTP = (502, 503, 504)
_T = TypeVar("_T")

# ------------------------------------------------------------------ base58 (bs58, Bitcoin alphabet)

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(raw: bytes) -> str:
    """Base58 (Bitcoin alphabet) as merod prints ids, hashes and public keys."""
    n = int.from_bytes(raw, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    zeros = len(raw) - len(raw.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; ``ValueError`` on characters outside the alphabet."""
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + body


# ------------------------------------------------------------------ value types


@dataclass(frozen=True)
class BlobRef:
    """A blob stored on a node: its id (base58), SHA-256 of the content (hex) and size."""

    blob_id: str
    sha256: str
    size: int


@dataclass(frozen=True)
class NodeEvent:
    """One event from a node's SSE stream, or the synthetic ``reconnected`` marker."""

    kind: str
    context_id: str | None
    events: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] | None = None
    event_id: str | None = None


def decode_app_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Decode one ``ExecutionEvent``: its ``data`` byte array as UTF-8 JSON when possible."""
    data = event.get("data")
    value: Any = data
    if isinstance(data, list) and all(isinstance(b, int) and 0 <= b < 256 for b in data):
        raw = bytes(data)
        if not raw:
            value = None
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = raw
            else:
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text
    return {"kind": event.get("kind"), "data": value, "handler": event.get("handler")}


def parse_sse_payload(payload: Mapping[str, Any], event_id: str | None = None) -> NodeEvent:
    """Turn the JSON of one SSE ``message`` frame (not ``connect``) into a :class:`NodeEvent`."""
    if "result" in payload and isinstance(payload["result"], Mapping):
        body = dict(payload["result"])
        kind = str(body.get("type", "unknown"))
        events: list[dict[str, Any]] = []
        data = body.get("data")
        if kind == "StateMutation" and isinstance(data, Mapping):
            events = [
                decode_app_event(e) for e in data.get("events") or [] if isinstance(e, Mapping)
            ]
        return NodeEvent(kind, body.get("contextId"), events, body, event_id)
    if "error" in payload:
        return NodeEvent("error", None, [], dict(payload), event_id)
    return NodeEvent(str(payload.get("type", "unknown")), None, [], dict(payload), event_id)


# ------------------------------------------------------------------ auth


class TokenAuth:
    """JWT credentials for a node's embedded auth: login at /auth/token, refresh at /auth/refresh.

    Either ``base_url`` with ``username``/``password`` (the ``user_password`` provider), or a
    ``access_token`` (optionally with ``refresh_token`` and ``base_url`` to refresh it);
    :meth:`static` wraps a token that can never be refreshed.
    """

    def __init__(
        self,
        base_url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        *,
        access_token: str | None = None,
        refresh_token: str | None = None,
        client_name: str = "medichain",
        permissions: Sequence[str] = ("admin",),
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if access_token is None and (base_url is None or username is None or password is None):
            raise ValueError("TokenAuth needs base_url + username + password, or an access_token")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.username = username
        self._password = password
        self._access = access_token
        self._refresh = refresh_token
        self.client_name = client_name
        self.permissions = list(permissions)
        self._clock = clock
        self._lock = threading.Lock()
        self._http = (
            httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
            if self.base_url
            else None
        )

    @classmethod
    def static(cls, token: str) -> TokenAuth:
        """A fixed bearer token; a ``token_expired`` answer then raises :class:`TokenExpired`."""
        return cls(access_token=token)

    @property
    def can_refresh(self) -> bool:
        """Whether an expired token can be replaced (refresh token or credentials known)."""
        return self._http is not None and (self._refresh is not None or self._password is not None)

    def token(self) -> str:
        """The current access token, logging in first if there is none yet."""
        with self._lock:
            if self._access is None:
                self._login()
            assert self._access is not None
            return self._access

    def refresh(self, stale: str | None = None) -> str:
        """Replace the access token ``stale`` (refresh token first, then a fresh login)."""
        with self._lock:
            if stale is not None and self._access is not None and self._access != stale:
                return self._access  # another thread refreshed already
            if not self.can_refresh:
                raise TokenExpired(
                    "access token expired and this TokenAuth cannot refresh it",
                    status=401,
                    reason="token_expired",
                    node_url=self.base_url,
                    endpoint="POST /auth/refresh",
                )
            if self._refresh is not None and self._access is not None:
                try:
                    self._post_refresh()
                    assert self._access is not None
                    return self._access
                except AuthError:
                    if self._password is None:
                        raise
                    log.info("refresh at %s failed; logging in again", self.base_url)
            self._login()
            assert self._access is not None
            return self._access

    def close(self) -> None:
        """Close the HTTP connection pool used for /auth calls."""
        if self._http is not None:
            self._http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._http is not None
        where = {"node_url": self.base_url, "endpoint": f"POST {path}"}
        try:
            resp = self._http.post(path, json=body)
        except httpx.TimeoutException as e:
            raise NodeTimeout(f"auth request timed out ({type(e).__name__})", **where) from e
        except httpx.TransportError as e:
            raise NodeUnavailable(f"auth request failed: {e}", **where) from e
        try:
            payload = resp.json()
        except ValueError:
            payload = {}
        if resp.status_code != 200:
            msg = payload.get("error") if isinstance(payload, dict) else None
            raise AuthError(
                f"{path} refused: HTTP {resp.status_code} {msg or resp.text[:200]}",
                status=resp.status_code,
                reason=resp.headers.get("X-Auth-Error", ""),
                **where,
            )
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict) or not data.get("access_token"):
            raise ProtocolError(f"{path} answer lacks data.access_token: {payload!r}", **where)
        return data

    def _login(self) -> None:
        data = self._post(
            "/auth/token",
            {
                "auth_method": "user_password",
                "public_key": self.username,
                "client_name": self.client_name,
                "permissions": self.permissions,
                "timestamp": int(self._clock()),
                "provider_data": {"username": self.username, "password": self._password},
            },
        )
        self._access = data["access_token"]
        self._refresh = data.get("refresh_token")

    def _post_refresh(self) -> None:
        data = self._post(
            "/auth/refresh", {"access_token": self._access, "refresh_token": self._refresh}
        )
        self._access = data["access_token"]
        self._refresh = data.get("refresh_token", self._refresh)


# ------------------------------------------------------------------ blob bodies


class _BlobBody:
    """A blob body that can be hashed once and replayed for each upload attempt."""

    def __init__(self, data: bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO) -> None:
        self._view: memoryview | None = None
        self._file: IO[bytes] | None = None
        self._start = 0
        self._owned: IO[bytes] | None = None
        if isinstance(data, str):
            raise TypeError("upload_blob takes bytes, an iterable of bytes or a binary file")
        if isinstance(data, bytes | bytearray | memoryview | mmap.mmap):
            view = memoryview(data).cast("B")
            if view.nbytes > MAX_BLOB_BYTES:
                raise BlobTooLarge(view.nbytes, MAX_BLOB_BYTES)
            self._view = view
            self.size = view.nbytes
            self.sha256 = hashlib.sha256(view).hexdigest()
            return
        if hasattr(data, "read") and _seekable(data):
            f: IO[bytes] = data  # type: ignore[assignment]
            self._start = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(self._start)
            self.size = end - self._start
            if self.size > MAX_BLOB_BYTES:
                raise BlobTooLarge(self.size, MAX_BLOB_BYTES)
            self._file = f
            digest = hashlib.sha256()
            for chunk in self._read_file():
                digest.update(chunk)
            self.sha256 = digest.hexdigest()
            return
        chunks: Iterable[bytes]
        if hasattr(data, "read"):
            reader: IO[bytes] = data  # type: ignore[assignment]
            chunks = iter(lambda: reader.read(_CHUNK), b"")
        else:
            chunks = data  # type: ignore[assignment]
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
        digest = hashlib.sha256()
        total = 0
        try:
            for chunk in chunks:
                n = memoryview(chunk).nbytes
                if total + n > MAX_BLOB_BYTES:  # checked before touching the chunk's bytes
                    raise BlobTooLarge(total + n, MAX_BLOB_BYTES)
                digest.update(chunk)
                spool.write(chunk)
                total += n
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        self._file = self._owned = spool
        self.size = total
        self.sha256 = digest.hexdigest()

    def _read_file(self) -> Iterator[bytes]:
        assert self._file is not None
        self._file.seek(self._start)
        left = self.size
        while left > 0:
            chunk = self._file.read(min(_CHUNK, left))
            if not chunk:
                raise ProtocolError("blob file shrank while uploading")
            left -= len(chunk)
            yield chunk

    def iter_body(self) -> Iterator[bytes]:
        """The content again, in 1 MiB pieces, for one upload attempt."""
        if self._view is not None:
            for i in range(0, self.size, _CHUNK):
                yield bytes(self._view[i : i + _CHUNK])
        else:
            yield from self._read_file()

    def close(self) -> None:
        """Release the spool file, if the body had to be spooled."""
        if self._owned is not None:
            self._owned.close()


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


# ------------------------------------------------------------------ SSE


@dataclass
class _Frame:
    event: str
    data: str
    id: str | None


class _SseParser:
    """Incremental parser for ``text/event-stream`` lines (WHATWG rules, no reconnection)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, line: str) -> _Frame | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            frame = _Frame(self._event or "message", "\n".join(self._data), self._id)
            self._data, self._event = [], ""
            return frame
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


class _Dropped:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _SseStream:
    """Reads one SSE response on a helper thread so that a ``stop`` event is noticed promptly."""

    def __init__(self, response: httpx.Response) -> None:
        self._resp = response
        self._queue: queue.Queue[_Frame | _Dropped] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="calimero-sse", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        parser = _SseParser()
        try:
            for line in self._resp.iter_lines():
                if self._closed:
                    break
                frame = parser.feed(line)
                if frame is not None:
                    self._queue.put(frame)
        except Exception as e:  # any failure means the stream is gone
            self._queue.put(_Dropped(e))
        else:
            self._queue.put(_Dropped(None))

    def frames(self, stop: threading.Event | None) -> Iterator[_Frame]:
        while True:
            if stop is not None and stop.is_set():
                return
            try:
                item = self._queue.get(timeout=0.05 if stop is not None else None)
            except queue.Empty:
                continue
            if isinstance(item, _Dropped):
                if item.error is not None and not self._closed:
                    log.info("SSE stream dropped: %r", item.error)
                return
            yield item

    def close(self) -> None:
        self._closed = True
        stream = self._resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):  # wakes the helper thread blocked in recv()
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):  # closing a broken stream may fail; nothing to do
            self._resp.close()
        self._thread.join(timeout=2.0)


# ------------------------------------------------------------------ the client


@dataclass
class _Req:
    method: str
    path: str
    endpoint: str
    where: dict[str, Any]
    params: dict[str, str] | None = None
    json: Any = None
    content: Callable[[], Iterator[bytes]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    idempotent: bool = False
    timeout: httpx.Timeout | None = None


class CalimeroClient:
    """Synchronous client for one merod node (or an emulated one) at ``base_url``.

    Transient failures (``GroupKeyPending``, ``UpgradeInProgress``, HTTP 502/503/504,
    refused connections) are retried up to ``retries`` times with exponential backoff and
    jitter from a ``random.Random(seed)``; ``sleep`` is injectable for tests.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        auth: TokenAuth | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        seed: int = 0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._http = httpx.Client(
            base_url=self.base_url, timeout=httpx.Timeout(timeout), transport=transport
        )

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the connection pool (the :class:`TokenAuth` stays open; it is the caller's)."""
        self._http.close()

    def __enter__(self) -> CalimeroClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- public API

    def health(self) -> dict[str, Any]:
        """``GET /admin-api/health``: ``{"status": "alive"}`` while the node's store answers."""
        req = self._req("GET", "/admin-api/health", idempotent=True)
        return self._data(self._with_retries(lambda: self._json(self._attempt(req), req)), req)

    def execute(
        self,
        context_id: str,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        executor_public_key: str | None = None,
    ) -> Any:
        """Call application ``method`` in the context via JSON-RPC ``execute``; returns ``output``."""
        params: dict[str, Any] = {
            "contextId": context_id,
            "method": method,
            "argsJson": dict(args or {}),
        }
        if executor_public_key is not None:
            params["executorPublicKey"] = executor_public_key
        result = self._rpc("execute", params, context_id=context_id, method=method)
        if not isinstance(result, Mapping):
            raise ProtocolError(
                f"execute result is not an object: {result!r}",
                **self._where(context_id, method, "POST /jsonrpc (execute)"),
            )
        return result.get("output")

    def sync_status(self, context_id: str) -> dict[str, Any]:
        """JSON-RPC ``sync_status``: ``isInitialized``, ``syncState``, ``failureCount``..."""
        result = self._rpc(
            "sync_status", {"contextId": context_id}, context_id=context_id, method="sync_status"
        )
        if not isinstance(result, dict):
            raise ProtocolError(
                f"sync_status result is not an object: {result!r}",
                **self._where(context_id, "sync_status", "POST /jsonrpc (sync_status)"),
            )
        return result

    def join_context(self, context_id: str) -> dict[str, Any]:
        """``POST /admin-api/contexts/{id}/join`` (via group membership): ``contextId``, key."""
        req = self._req(
            "POST", f"/admin-api/contexts/{context_id}/join", context_id=context_id, idempotent=True
        )
        return self._data(self._with_retries(lambda: self._json(self._attempt(req), req)), req)

    def context_identities(self, context_id: str, *, owned: bool = False) -> list[str]:
        """Public keys of the context's members (``owned=True``: only this node's own)."""
        suffix = "identities-owned" if owned else "identities"
        req = self._req(
            "GET",
            f"/admin-api/contexts/{context_id}/{suffix}",
            context_id=context_id,
            idempotent=True,
        )
        data = self._data(self._with_retries(lambda: self._json(self._attempt(req), req)), req)
        identities = data.get("identities")
        if not isinstance(identities, list):
            raise ProtocolError(f"no identities list in {data!r}", **req.where)
        return [str(i) for i in identities]

    def upload_blob(
        self, context_id: str, data: bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO
    ) -> BlobRef:
        """Stream ``data`` to ``PUT /admin-api/blobs`` (hash checked by the node, > 1 GiB refused)."""
        where = self._where(context_id, None, "PUT /admin-api/blobs")
        try:
            body = _BlobBody(data)
        except BlobTooLarge as e:
            raise BlobTooLarge(e.size, e.limit, **where) from None
        try:
            req = self._req(
                "PUT",
                "/admin-api/blobs",
                context_id=context_id,
                params={"context_id": context_id, "hash": b58encode(bytes.fromhex(body.sha256))},
                content=body.iter_body,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(body.size),
                },
                idempotent=True,
            )
            payload = self._data(
                self._with_retries(lambda: self._json(self._attempt(req), req)), req
            )
        finally:
            body.close()
        blob_id, size = payload.get("blob_id"), payload.get("size")
        if not isinstance(blob_id, str) or size != body.size:
            raise ProtocolError(
                f"unexpected upload answer {payload!r} for {body.size} bytes", **where
            )
        return BlobRef(blob_id=blob_id, sha256=body.sha256, size=body.size)

    def download_blob(
        self, context_id: str, blob_id: str, *, expected_sha256: str | None = None
    ) -> bytes:
        """Stream ``GET /admin-api/blobs/{id}``, checking SHA-256 against ``X-Blob-Hash``/expected."""
        req = self._req(
            "GET",
            f"/admin-api/blobs/{blob_id}",
            context_id=context_id,
            params={"context_id": context_id},
            stream=True,
            idempotent=True,
        )

        def once() -> tuple[bytes, str, str | None]:
            resp = self._attempt(req)
            digest = hashlib.sha256()
            buf = bytearray()
            try:
                for chunk in resp.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    buf += chunk
            except httpx.TimeoutException as e:
                raise NodeTimeout(f"blob download timed out: {e!r}", **req.where) from e
            except httpx.TransportError as e:
                raise NodeUnavailable(f"blob download broke off: {e!r}", **req.where) from e
            finally:
                resp.close()
            return bytes(buf), digest.hexdigest(), resp.headers.get("X-Blob-Hash")

        content, got, header_hash = self._with_retries(once)
        if expected_sha256 is not None and got != expected_sha256.lower():
            raise BlobHashMismatch(expected_sha256.lower(), got, **req.where)
        if header_hash and got != header_hash.lower():
            raise BlobHashMismatch(header_hash.lower(), got, **req.where)
        return content

    def events(
        self,
        context_ids: Sequence[str],
        *,
        stop: threading.Event | None = None,
        max_reconnects: int | None = None,
    ) -> Iterator[NodeEvent]:
        """Node events for ``context_ids`` over SSE, reconnecting with backoff after drops.

        After every reconnect a ``NodeEvent(kind="reconnected")`` is yielded once the
        subscription is live again: events missed in the gap are not replayed by merod, so
        the caller must re-read the state it cares about. Ends when ``stop`` is set, or
        raises after ``max_reconnects`` failed attempts in a row (default: never gives up).
        """
        last_event_id: str | None = None
        connected_before = False
        failures = 0
        while stop is None or not stop.is_set():
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            req = self._req(
                "GET",
                "/sse",
                headers=headers,
                stream=True,
                idempotent=True,
                timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 60.0)),
            )
            req.where["context_id"] = ",".join(context_ids)
            stream: _SseStream | None = None
            try:
                stream = _SseStream(self._attempt(req))
                for frame in stream.frames(stop):
                    if frame.id:
                        last_event_id = frame.id
                    try:
                        payload = json.loads(frame.data)
                    except ValueError:
                        log.warning("ignoring non-JSON SSE frame %r", frame.data[:200])
                        continue
                    if not isinstance(payload, dict):
                        continue
                    if payload.get("type") == "connect":
                        self._subscribe(str(payload.get("session_id")), context_ids)
                        failures = 0
                        if connected_before:
                            yield NodeEvent("reconnected", None, [], payload, frame.id)
                        connected_before = True
                    elif payload.get("type") == "close":
                        log.info("node closed the SSE stream: %s", payload.get("reason"))
                        break
                    else:
                        yield parse_sse_payload(payload, frame.id)
            except CalimeroError as e:
                lost_session = (
                    isinstance(e, HttpStatusError) and e.endpoint == "POST /sse/subscription"
                )
                if not (e.transient or lost_session):
                    raise
                log.info("SSE connection to %s failed: %s", self.base_url, e)
            finally:
                if stream is not None:
                    stream.close()
            if stop is not None and stop.is_set():
                return
            if max_reconnects is not None and failures >= max_reconnects:
                raise NodeUnavailable(
                    f"SSE stream lost and {failures} reconnects failed", **req.where
                )
            delay = self._backoff(failures)
            failures += 1
            if stop is not None:
                if stop.wait(delay):
                    return
            else:
                self._sleep(delay)

    # -------------------------------------------------------------- internals

    def _where(
        self, context_id: str | None, method: str | None, endpoint: str | None = None
    ) -> dict[str, Any]:
        return {
            "node_url": self.base_url,
            "endpoint": endpoint,
            "context_id": context_id,
            "method": method,
        }

    def _req(
        self,
        method: str,
        path: str,
        *,
        context_id: str | None = None,
        **kw: Any,
    ) -> _Req:
        endpoint = f"{method} {path}"
        return _Req(method, path, endpoint, self._where(context_id, None, endpoint), **kw)

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (1.0 + 0.5 * self._rng.random())

    def _with_retries(self, fn: Callable[[], _T]) -> _T:
        attempt = 0
        while True:
            try:
                return fn()
            except CalimeroError as e:
                if not e.transient:
                    raise
                if attempt >= self.retries:
                    e.add_note(f"gave up after {attempt + 1} attempts")
                    raise
                delay = self._backoff(attempt)
                log.info("transient failure (%s); retry %d in %.2fs", e, attempt + 1, delay)
                self._sleep(delay)
                attempt += 1

    def _attempt(self, req: _Req) -> httpx.Response:
        """Send one request; refresh an expired token once; map failures to exceptions."""
        refreshed = False
        while True:
            headers = dict(req.headers)
            token = None
            if self.auth is not None:
                token = self.auth.token()
                headers["Authorization"] = f"Bearer {token}"
            request = self._http.build_request(
                req.method,
                req.path,
                params=req.params,
                json=req.json,
                content=req.content() if req.content is not None else None,
                headers=headers,
                timeout=req.timeout or httpx.USE_CLIENT_DEFAULT,
            )
            try:
                resp = self._http.send(request, stream=True)
            except httpx.ConnectTimeout as e:
                raise NodeTimeout(
                    f"connect timed out after {self.timeout}s", transient=True, **req.where
                ) from e
            except httpx.TimeoutException as e:
                raise NodeTimeout(
                    f"no answer within {self.timeout}s ({type(e).__name__})", **req.where
                ) from e
            except httpx.ConnectError as e:
                raise NodeUnavailable(f"cannot connect: {e}", **req.where) from e
            except httpx.TransportError as e:
                raise NodeUnavailable(
                    f"connection lost: {e!r}", transient=req.idempotent, **req.where
                ) from e
            status = resp.status_code
            if status < 400:
                if not req.stream:
                    self._read(resp, req)
                return resp
            try:
                body = self._read(resp, req)
            finally:
                resp.close()
            reason = resp.headers.get("X-Auth-Error", "")
            if status == 401:
                if (
                    self.auth is not None
                    and reason == "token_expired"
                    and not refreshed
                    and self.auth.can_refresh
                ):
                    self.auth.refresh(stale=token)
                    refreshed = True
                    continue
                cls = TokenExpired if reason == "token_expired" else AuthError
                what = "rejected the token" if self.auth is not None else "requires a token"
                raise cls(f"node {what}: HTTP 401", status=401, reason=reason, **req.where)
            if status == 403 and reason:
                raise AuthError(
                    "node refused access: HTTP 403", status=403, reason=reason, **req.where
                )
            text = body.decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error") or text
            except (ValueError, AttributeError):
                message = text
            if status in _TRANSIENT_HTTP:
                raise NodeUnavailable(
                    f"HTTP {status}: {str(message)[:300]}", status=status, **req.where
                )
            if status == 404 and req.path.startswith("/admin-api/blobs/"):
                raise BlobNotFound(status, str(message), **req.where)
            raise HttpStatusError(status, str(message), **req.where)

    def _read(self, resp: httpx.Response, req: _Req) -> bytes:
        try:
            return resp.read()
        except httpx.TimeoutException as e:
            raise NodeTimeout(f"answer not complete within {self.timeout}s", **req.where) from e
        except httpx.TransportError as e:
            raise NodeUnavailable(
                f"connection lost while reading: {e!r}", transient=req.idempotent, **req.where
            ) from e
        finally:
            if not req.stream:
                resp.close()

    def _json(self, resp: httpx.Response, req: _Req) -> Any:
        try:
            return json.loads(resp.content)
        except ValueError as e:
            raise ProtocolError(f"answer is not JSON: {resp.content[:200]!r}", **req.where) from e

    def _data(self, payload: Any, req: _Req) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            raise ProtocolError(f"answer lacks a data object: {payload!r}"[:400], **req.where)
        return payload["data"]

    def _rpc(self, rpc_method: str, params: dict[str, Any], *, context_id: str, method: str) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": rpc_method, "params": params}
        req = _Req(
            "POST",
            "/jsonrpc",
            f"POST /jsonrpc ({rpc_method})",
            self._where(context_id, method, f"POST /jsonrpc ({rpc_method})"),
            json=body,
            idempotent=rpc_method != "execute",
        )

        def once() -> Any:
            payload = self._json(self._attempt(req), req)
            if not isinstance(payload, dict):
                raise ProtocolError(f"JSON-RPC answer is not an object: {payload!r}", **req.where)
            if payload.get("error") is not None:
                raise _rpc_error(payload["error"], req.where)
            if "result" not in payload:
                raise ProtocolError(f"JSON-RPC answer lacks result: {payload!r}", **req.where)
            return payload["result"]

        return self._with_retries(once)

    def _subscribe(self, session_id: str, context_ids: Sequence[str]) -> None:
        req = self._req("POST", "/sse/subscription", idempotent=True)
        req.json = {
            "id": session_id,
            "method": "subscribe",
            "params": {"contextIds": list(context_ids)},
        }
        req.where["context_id"] = ",".join(context_ids)
        payload = self._with_retries(lambda: self._json(self._attempt(req), req))
        if not isinstance(payload, dict) or "result" not in payload:
            raise ProtocolError(f"subscribe answer lacks result: {payload!r}", **req.where)


def _rpc_error(error: Any, where: Mapping[str, Any]) -> RpcError:
    """Map a JSON-RPC ``error`` member to its exception class."""
    if isinstance(error, Mapping) and "type" in error:
        rpc_type = str(error["type"])
        data = error.get("data")
    else:
        rpc_type, data = "HandlerError", error
    cls = RPC_ERRORS.get(rpc_type, RpcError)
    if isinstance(data, str):
        message = data
    elif data is None:
        message = {
            "Uninitialized": "context state not initialized, awaiting state sync",
            "ContextNotFound": "context not found",
        }.get(rpc_type, "no details")
    else:
        message = json.dumps(data, separators=(",", ":"))[:300]
    return cls(message, rpc_type=rpc_type, data=data, **dict(where))
