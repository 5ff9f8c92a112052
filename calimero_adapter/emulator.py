"""An in-process *emulated merod*: a stand-in for Calimero nodes, for tests and local runs.

This is not a Calimero node and does not pretend to be one. It serves, over loopback HTTP,
only the endpoints :mod:`calimero_adapter.client` uses, with the same JSON shapes as merod
(sources listed in the docstring of :mod:`calimero_adapter.client`), and runs the stock
``kv-store`` application's semantics in Python:

* ``POST /jsonrpc``: ``execute`` (``set``/``get``/``entries``/``remove``/``len``) and
  ``sync_status``; errors as HTTP 200 with an ``error`` member.
* ``GET /admin-api/health``, ``POST /admin-api/contexts/{id}/join``,
  ``GET /admin-api/contexts/{id}/identities[-owned]``.
* ``PUT /admin-api/blobs`` and ``GET /admin-api/blobs/{id}`` (``X-Blob-Hash``; peers hand a
  blob only to context members, as merod's blob protocol does).
* ``GET /sse`` + ``POST /sse/subscription`` with ``StateMutation`` events.
* ``POST /auth/token`` and ``POST /auth/refresh`` (opaque tokens instead of JWTs).

State is a last-writer-wins map per context and node; a write reaches the other members
after ``delay_s`` unless a :meth:`EmulatedNetwork.partition` separates them, and
:meth:`EmulatedNetwork.heal` makes every member converge (greatest ``(logical timestamp,
node name)`` wins per key). Changes arriving by sync emit the same app events on the
receiving node as local writes do.

Command line (used by end-to-end tests that run site runners in other processes)::

    python -m calimero_adapter.emulator --nodes 3 --delay 0.05 --info-file /tmp/emu.json

writes ``{"nodes": {name: url}, "context_id": ..., "auth": null, ...}`` to the info file and
stdout, and serves until SIGTERM/SIGINT. Without ``--auth`` the nodes take requests without
tokens; with ``--auth`` the info file's ``auth`` member holds ``username``, ``password`` and
one ready access token per node (``tokens``, valid for ``--token-ttl`` seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import logging
import os
import queue
import random
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from calimero_adapter.client import b58encode

__all__ = ["APPLICATION", "EmulatedNetwork", "EmulatedNode", "main"]

log = logging.getLogger(__name__)

APPLICATION = "kv-store"
EMULATOR_NAME = "emulated merod (calimero_adapter.emulator)"
MAX_BLOB_BYTES = 1024 * 1024 * 1024
_BLOB_CHUNK = 1 << 20  # merod's blob store chunk size (crates/store/blobs/src/lib.rs)
_SSE_KEEPALIVE_S = 15.0
_PUBLIC_PATHS = ("/admin-api/health", "/admin-api/ready", "/admin-api/is-authed")
_RPC_FAULTS = (
    "GroupKeyPending",
    "UpgradeInProgress",
    "Uninitialized",
    "ContextNotFound",
    "Unauthorized",
    "FunctionCallError",
    "ParseError",
    "InternalError",
)

# ------------------------------------------------------------------ helpers

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _unb58_32(text: str) -> bytes | None:
    """Decode a base58 32-byte id as merod's ``FromStr`` does; ``None`` when invalid."""
    n = 0
    for c in text:
        i = _B58.find(c)
        if i < 0:
            return None
        n = n * 58 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + body
    return raw if len(raw) == 32 else None


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _blob_id(data: bytes) -> str:
    """Blob id as merod's blob store derives it: SHA-256 over the SHA-256s of 1 MiB chunks."""
    outer = hashlib.sha256()
    for i in range(0, len(data), _BLOB_CHUNK):
        outer.update(hashlib.sha256(data[i : i + _BLOB_CHUNK]).digest())
    return b58encode(outer.digest())


@dataclass(frozen=True)
class _Entry:
    value: str | None  # None: a tombstone left by ``remove``
    ts: int
    node: str

    def wins_over(self, other: _Entry | None) -> bool:
        return other is None or (self.ts, self.node) > (other.ts, other.node)


@dataclass
class _Replica:
    """One node's copy of one context's kv-store state."""

    identity: str
    initialized: bool
    entries: dict[str, _Entry] = field(default_factory=dict)

    def live(self) -> dict[str, str]:
        return {k: e.value for k, e in sorted(self.entries.items()) if e.value is not None}

    def get(self, key: str) -> str | None:
        e = self.entries.get(key)
        return None if e is None else e.value

    def root_hash(self) -> str:
        return b58encode(hashlib.sha256(_compact(self.live())).digest())


@dataclass
class _Context:
    context_id: str
    application: str
    group_id: bytes
    members: dict[str, str] = field(default_factory=dict)  # node name -> identity public key
    invited: set[str] = field(default_factory=set)


@dataclass
class _Session:
    sid: int
    subscriptions: set[str] = field(default_factory=set)
    counter: int = 0
    conn: queue.Queue[bytes | None] | None = None


@dataclass
class _Token:
    subject: str
    expires_at: float
    refresh: str


@dataclass
class _Fault:
    key: str
    error: str
    remaining: int


class _Scheduler:
    """Runs delayed callbacks (sync deliveries) on one background thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._busy = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="emulated-merod-sync", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(delay, 0.0), next(self._seq), fn))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                if self._closed:
                    return
                _, _, fn = heapq.heappop(self._heap)
                self._busy += 1
            try:
                fn()
            except Exception:  # a failed delivery must not stop the bus
                log.exception("emulated sync delivery failed")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._heap and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)


# ------------------------------------------------------------------ the network


class EmulatedNetwork:
    """The shared bus of emulated merod nodes: contexts, sync with delay, partitions, auth.

    ``auth=True`` protects every node like merod's embedded auth (credentials ``users``,
    default ``{"admin": "emulated-merod-password"}``); ``auth=False`` is merod without auth.
    """

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        seed: int = 0,
        token_ttl_s: float = 3600.0,
        auth: bool = True,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.token_ttl_s = token_ttl_s
        self.auth = auth
        self.users = dict(users or {"admin": "emulated-merod-password"})
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._nodes: dict[str, EmulatedNode] = {}
        self._contexts: dict[str, _Context] = {}
        self._groups: dict[str, int] | None = None
        self._announced: dict[tuple[str, str], list[tuple[str, float]]] = {}
        self._scheduler = _Scheduler()
        self._closed = False

    # -------------------------------------------------------------- topology

    @property
    def nodes(self) -> dict[str, EmulatedNode]:
        """The nodes by name (a copy)."""
        with self._lock:
            return dict(self._nodes)

    def add_node(self, name: str) -> EmulatedNode:
        """Start an emulated node serving on 127.0.0.1 (a free port)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("network is closed")
            if name in self._nodes:
                raise ValueError(f"node {name!r} exists")
            node = EmulatedNode(self, name)
            self._nodes[name] = node
            return node

    def create_context(
        self, application: str = APPLICATION, *, members: Iterable[str | EmulatedNode] | None = None
    ) -> str:
        """Create a context; every node (or only ``members``) joins with its own identity."""
        if application != APPLICATION:
            raise ValueError(f"the emulated merod only runs {APPLICATION!r}, not {application!r}")
        with self._lock:
            names = [self._name(m) for m in members] if members is not None else list(self._nodes)
            ctx = _Context(b58encode(self._rand32()), application, self._rand32())
            self._contexts[ctx.context_id] = ctx
            for name in names:
                self._add_member(ctx, name, initialized=True)
            return ctx.context_id

    def invite(self, context_id: str, node: str | EmulatedNode) -> None:
        """Let ``node`` join the context later through ``POST .../join`` (like a group invite)."""
        with self._lock:
            self._context(context_id).invited.add(self._name(node))

    def join(self, context_id: str, node: str | EmulatedNode) -> str:
        """Add ``node`` to the context now; its state arrives by sync. Returns its identity."""
        with self._lock:
            ctx = self._context(context_id)
            name = self._name(node)
            if name in ctx.members:
                return ctx.members[name]
            identity = self._add_member(ctx, name, initialized=False)
            for other in ctx.members:
                if other != name:
                    self._schedule_sync(ctx.context_id, other, name)
            return identity

    def partition(self, *groups: Iterable[str | EmulatedNode]) -> None:
        """Split the nodes into groups that stop syncing state and blobs with each other.

        Nodes named in no group form one further group together.
        """
        with self._lock:
            assign: dict[str, int] = {}
            for i, group in enumerate(groups):
                for member in group:
                    name = self._name(member)
                    if name in assign:
                        raise ValueError(f"node {name!r} is in two groups")
                    assign[name] = i
            for name in self._nodes:
                assign.setdefault(name, len(groups))
            self._groups = assign

    def heal(self) -> None:
        """End the partition: every pair of members syncs (after ``delay_s``) and converges."""
        with self._lock:
            self._groups = None
            for ctx in self._contexts.values():
                for a in ctx.members:
                    for b in ctx.members:
                        if a != b:
                            self._schedule_sync(ctx.context_id, a, b)

    def connected(self, a: str | EmulatedNode, b: str | EmulatedNode) -> bool:
        """Whether two nodes can currently reach each other."""
        with self._lock:
            if self._groups is None:
                return True
            return self._groups.get(self._name(a)) == self._groups.get(self._name(b))

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until no sync delivery is pending or running; ``False`` on timeout."""
        return self._scheduler.idle(timeout)

    def close(self) -> None:
        """Stop every node and the sync bus."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            nodes = list(self._nodes.values())
        self._scheduler.close()
        for node in nodes:
            node.close()

    def __enter__(self) -> EmulatedNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _rand32(self) -> bytes:
        return self._rng.getrandbits(256).to_bytes(32, "big")

    def _name(self, node: str | EmulatedNode) -> str:
        name = node.name if isinstance(node, EmulatedNode) else node
        if name not in self._nodes:
            raise KeyError(f"no node {name!r}")
        return name

    def _context(self, context_id: str) -> _Context:
        if context_id not in self._contexts:
            raise KeyError(f"no context {context_id!r}")
        return self._contexts[context_id]

    def _add_member(self, ctx: _Context, name: str, *, initialized: bool) -> str:
        identity = b58encode(self._rand32())
        ctx.members[name] = identity
        ctx.invited.discard(name)
        self._nodes[name]._replicas[ctx.context_id] = _Replica(identity, initialized)
        return identity

    def _schedule_sync(self, context_id: str, src: str, dst: str) -> None:
        self._scheduler.call_later(self.delay_s, lambda: self._sync(context_id, src, dst))

    def _broadcast(self, context_id: str, src: str) -> None:
        for name in self._contexts[context_id].members:
            if name != src:
                self._schedule_sync(context_id, src, name)

    def _sync(self, context_id: str, src: str, dst: str) -> None:
        """Merge ``src``'s replica into ``dst``'s (state-based LWW), emitting app events."""
        with self._lock:
            if self._closed or not self.connected(src, dst):
                return
            a = self._nodes[src]._replicas.get(context_id)
            b = self._nodes[dst]._replicas.get(context_id)
            if a is None or b is None or not a.initialized:
                return
            events = []
            for key, entry in sorted(a.entries.items()):
                old = b.entries.get(key)
                if not entry.wins_over(old):
                    continue
                before = None if old is None else old.value
                b.entries[key] = entry
                if entry.value is None and before is not None:
                    events.append(("Removed", {"key": key}))
                elif entry.value is not None and before is None:
                    events.append(("Inserted", {"key": key, "value": entry.value}))
                elif entry.value is not None and entry.value != before:
                    events.append(("Updated", {"key": key, "value": entry.value}))
            target = self._nodes[dst]
            target._clock = max(target._clock, *(e.ts for e in a.entries.values()), 0)
            b.initialized = True
            if events:
                target._emit_mutation(context_id, b, events)

    def _holders(self, blob_id: str, context_id: str, reader: str) -> list[str]:
        now = time.monotonic()
        ctx = self._contexts.get(context_id)
        if ctx is None or reader not in ctx.members:
            return []  # peers refuse to serve a blob to a non-member (unsigned request)
        return [
            holder
            for holder, visible_at in self._announced.get((blob_id, context_id), [])
            if visible_at <= now and holder in ctx.members and self.connected(holder, reader)
        ]


# ------------------------------------------------------------------ one node


class EmulatedNode:
    """One emulated merod node: an HTTP server on 127.0.0.1 plus fault injection."""

    def __init__(self, network: EmulatedNetwork, name: str) -> None:
        self.network = network
        self.name = name
        self._replicas: dict[str, _Replica] = {}
        self._blobs: dict[str, bytes] = {}
        self._sessions: dict[int, _Session] = {}
        self._tokens: dict[str, _Token] = {}
        self._refresh: dict[str, tuple[str, bool]] = {}  # refresh token -> (subject, used)
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._clock = 0
        self._closed = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._server.node = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"emulated-merod-{name}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"EmulatedNode({self.name!r}, {self.url})"

    # -------------------------------------------------------------- fault injection

    def fail_next(
        self, method_or_path: str, error: str = "GroupKeyPending", times: int = 1
    ) -> None:
        """Fail the next ``times`` matching requests with ``error``.

        ``method_or_path`` is an application method (``"set"``), a JSON-RPC method
        (``"execute"``, ``"sync_status"``) or a path prefix (``"/admin-api/blobs"``).
        ``error`` is a JSON-RPC error type (``GroupKeyPending``, ``UpgradeInProgress``,
        ``Uninitialized``, ``ContextNotFound``, ``Unauthorized``, ``FunctionCallError``,
        ``ParseError``, ``InternalError``) or ``"http<status>"`` such as ``"http503"``.
        """
        if error not in _RPC_FAULTS and not (error.startswith("http") and error[4:].isdigit()):
            raise ValueError(f"unknown fault {error!r}")
        with self.network._lock:
            self._faults.append(_Fault(method_or_path, error, times))

    def expire_tokens(self) -> None:
        """Make every access token issued by this node expired (401 ``token_expired`` next)."""
        with self.network._lock:
            for token in self._tokens.values():
                token.expires_at = min(token.expires_at, time.time() - 1.0)

    def set_delay(self, seconds: float) -> None:
        """Delay every request to this node by ``seconds`` before handling it."""
        self._delay = seconds

    def drop_sse(self) -> None:
        """Close every open SSE stream of this node (sessions survive, as on merod)."""
        with self.network._lock:
            for session in self._sessions.values():
                if session.conn is not None:
                    session.conn.put(None)
                    session.conn = None

    # -------------------------------------------------------------- introspection

    def kv(self, context_id: str) -> dict[str, str]:
        """This node's current key/values for the context (empty if not a member)."""
        with self.network._lock:
            replica = self._replicas.get(context_id)
            return replica.live() if replica else {}

    def identity(self, context_id: str) -> str | None:
        """This node's identity public key in the context, if it is a member."""
        with self.network._lock:
            replica = self._replicas.get(context_id)
            return replica.identity if replica else None

    def close(self) -> None:
        """Stop serving (SSE streams end)."""
        if self._closed:
            return
        self._closed = True
        self.drop_sse()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    # -------------------------------------------------------------- internals

    def _take_fault(self, keys: Iterable[str | None], *, rpc: bool) -> str | None:
        wanted = [k for k in keys if k]
        with self.network._lock:
            for fault in self._faults:
                if fault.error in _RPC_FAULTS and not rpc:
                    continue  # JSON-RPC error members only exist on /jsonrpc
                hit = any(
                    k == fault.key or (fault.key.startswith("/") and k.startswith(fault.key))
                    for k in wanted
                )
                if hit:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault.error
        return None

    def _emit_mutation(
        self, context_id: str, replica: _Replica, events: Sequence[tuple[str, dict[str, Any]]]
    ) -> None:
        """Queue a ``StateMutation`` node event for this node's SSE subscribers (lock held)."""
        body = {
            "result": {
                "contextId": context_id,
                "type": "StateMutation",
                "data": {
                    "newRoot": replica.root_hash(),
                    "events": [
                        {"kind": kind, "data": list(_compact(data)), "handler": None}
                        for kind, data in events
                    ],
                },
            }
        }
        payload = json.dumps(body, separators=(",", ":"))
        for session in self._sessions.values():
            if context_id in session.subscriptions and session.conn is not None:
                session.counter += 1
                session.conn.put(
                    f"event: message\nid: {session.sid}-{session.counter}\ndata: {payload}\n\n".encode()
                )

    def _issue_tokens(self, subject: str) -> dict[str, Any]:
        access, refresh = f"emu-at-{secrets.token_hex(16)}", f"emu-rt-{secrets.token_hex(16)}"
        self._tokens[access] = _Token(subject, time.time() + self.network.token_ttl_s, refresh)
        self._refresh[refresh] = (subject, False)
        return {"access_token": access, "refresh_token": refresh, "error": None}

    def _kv_execute(
        self, ctx_id: str, method: str, args: Any
    ) -> tuple[Any, list[tuple[str, dict[str, Any]]]] | dict[str, Any]:
        """Run one kv-store method; returns (output, events) or an error member (lock held)."""
        replica = self._replicas[ctx_id]

        def arg(name: str) -> str:
            value = args.get(name) if isinstance(args, dict) else None
            if not isinstance(value, str):
                raise _BadArgs(f"method `{method}`: argument `{name}` must be a string")
            return value

        try:
            if method == "set":
                key, value = arg("key"), arg("value")
                kind = "Updated" if replica.get(key) is not None else "Inserted"
                self._write(replica, key, value)
                return None, [(kind, {"key": key, "value": value})]
            if method == "get":
                return replica.get(arg("key")), []
            if method == "entries":
                return replica.live(), []
            if method == "len":
                return len(replica.live()), []
            if method == "remove":
                key = arg("key")
                old = replica.get(key)
                if old is None:
                    return None, []
                self._write(replica, key, None)
                return old, [("Removed", {"key": key})]
        except _BadArgs as e:
            return {"type": "FunctionCallError", "data": str(e)}
        return {"type": "FunctionCallError", "data": f'method "{method}" not found'}

    def _write(self, replica: _Replica, key: str, value: str | None) -> None:
        self._clock += 1
        replica.entries[key] = _Entry(value, self._clock, self.name)


class _BadArgs(Exception):
    pass


# ------------------------------------------------------------------ HTTP


class _Reply(Exception):
    """Raised inside a handler to answer immediately."""

    def __init__(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server_version = "emulated-merod/0.1"
    timeout = 60

    # -------------------------------------------------------------- plumbing

    @property
    def node(self) -> EmulatedNode:
        return self.server.node  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.node.name, format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _body_chunks(self, limit: int) -> Iterator[bytes]:
        """The request body, de-chunked, in pieces; raises ``_Reply(413)`` past ``limit``."""
        self._body_consumed = True
        total = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                total += size
                if total > limit:
                    self.close_connection = True
                    raise _Reply(413, {"error": "request body too large"})
                yield self.rfile.read(size)
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        if left > limit:
            self.close_connection = True
            raise _Reply(413, {"error": "request body too large"})
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                raise ConnectionError("client went away mid-body")
            left -= len(chunk)
            yield chunk

    def _body(self, limit: int = 64 << 20) -> bytes:
        return b"".join(self._body_chunks(limit))

    def _json_body(self) -> Any:
        if "application/json" not in self.headers.get("Content-Type", ""):
            raise _Reply(415, "Expected request with `Content-Type: application/json`")
        raw = self._body()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise _Reply(400, f"Failed to parse the request body as JSON: {e}") from None

    def _send(
        self, status: int, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        if not self._body_consumed:
            try:  # drain so a keep-alive connection stays usable
                for _ in self._body_chunks(MAX_BLOB_BYTES + _BLOB_CHUNK):
                    pass
            except _Reply:
                pass
        if body is None:
            data, ctype = b"", None
        elif isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = _compact(body), "application/json"
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self) -> None:
        self._body_consumed = self.command in ("GET", "DELETE") and not (
            self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")
        )
        node = self.node
        url = urlsplit(self.path)
        path, query = url.path.rstrip("/") or "/", parse_qs(url.query)
        try:
            if node._closed:
                raise _Reply(503, {"error": "emulated merod node is shutting down"})
            if node._delay > 0:
                time.sleep(node._delay)
            if not path.startswith("/auth/") and path not in _PUBLIC_PATHS:
                self._check_token(query)
            if path != "/jsonrpc":
                self._fault(node._take_fault([path], rpc=False), None, None)
            self._route(path, query)
        except _Reply as r:
            self._send(r.status, r.body, r.headers)
        except (BrokenPipeError, ConnectionError):
            self.close_connection = True

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        cmd, parts = self.command, path.strip("/").split("/")
        if path == "/auth/token" and cmd == "POST" and self.node.network.auth:
            return self._auth_token()
        if path == "/auth/refresh" and cmd == "POST" and self.node.network.auth:
            return self._auth_refresh()
        if path == "/admin-api/health" and cmd == "GET":
            return self._send(200, {"data": {"status": "alive"}})
        if path == "/jsonrpc" and cmd == "POST":
            return self._jsonrpc()
        if parts[:2] == ["admin-api", "contexts"] and len(parts) == 4:
            if parts[3] == "join" and cmd == "POST":
                return self._join(parts[2])
            if parts[3] in ("identities", "identities-owned") and cmd == "GET":
                return self._identities(parts[2], owned=parts[3] == "identities-owned")
        if path == "/admin-api/blobs" and cmd == "PUT":
            return self._blob_put(query)
        if parts[:2] == ["admin-api", "blobs"] and len(parts) == 3 and cmd == "GET":
            return self._blob_get(parts[2], query)
        if path == "/sse" and cmd == "GET":
            return self._sse()
        if path == "/sse/subscription" and cmd == "POST":
            return self._sse_subscription()
        raise _Reply(404)

    def _fault(self, fault: str | None, context_id: str | None, rpc_id: Any) -> None:
        if fault is None:
            return
        if fault.startswith("http"):
            raise _Reply(int(fault[4:]), {"error": f"emulated fault: HTTP {fault[4:]}"})
        ctx = self.node.network._contexts.get(context_id or "")
        data: Any = {
            "GroupKeyPending": {"context_id": context_id},
            "UpgradeInProgress": {"group_id": list(ctx.group_id if ctx else bytes(32))},
            "Unauthorized": {"context_id": context_id, "public_key": b58encode(bytes(32))},
            "FunctionCallError": "emulated fault injected by fail_next",
            "ParseError": "emulated fault injected by fail_next",
            "InternalError": {"kind": "other"},
        }.get(fault)
        error = {"type": fault} if data is None else {"type": fault, "data": data}
        raise _Reply(200, {"jsonrpc": "2.0", "id": rpc_id, "error": error})

    # -------------------------------------------------------------- auth

    def _check_token(self, query: dict[str, list[str]]) -> None:
        network = self.node.network
        if not network.auth:
            return
        header = self.headers.get("Authorization", "")
        if header:
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        else:
            token = (query.get("token") or [""])[0]
        if not token:
            raise _Reply(401)
        with network._lock:
            entry = self.node._tokens.get(token)
            if entry is None:
                raise _Reply(401)
            if entry.expires_at <= time.time():
                raise _Reply(401, None, {"X-Auth-Error": "token_expired"})

    def _auth_error(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> _Reply:
        return _Reply(status, {"data": None, "error": message}, headers)

    def _auth_token(self) -> None:
        body = self._json_body()
        required = ("auth_method", "public_key", "client_name", "timestamp", "provider_data")
        if not isinstance(body, dict) or any(k not in body for k in required):
            raise self._auth_error(422, f"token request needs fields {', '.join(required)}")
        node = self.node
        if body["auth_method"] != "user_password":
            raise self._auth_error(
                401, f"Authentication failed: unknown provider {body['auth_method']}"
            )
        data = body["provider_data"] if isinstance(body["provider_data"], dict) else {}
        user, password = data.get("username"), data.get("password")
        if not isinstance(user, str) or node.network.users.get(user) != password:
            raise self._auth_error(401, "Authentication failed: Invalid credentials")
        with node.network._lock:
            tokens = node._issue_tokens(user)
        self._send(200, {"data": tokens, "error": None})

    def _auth_refresh(self) -> None:
        body = self._json_body()
        if (
            not isinstance(body, dict)
            or not body.get("access_token")
            or not body.get("refresh_token")
        ):
            raise self._auth_error(422, "access_token and refresh_token are required")
        node = self.node
        with node.network._lock:
            access = node._tokens.get(body["access_token"])
            if access is None:
                raise self._auth_error(401, "Invalid access token: unknown token")
            if access.expires_at > time.time():
                raise self._auth_error(401, "Access token still valid")
            refresh = node._refresh.get(body["refresh_token"])
            if refresh is None:
                raise self._auth_error(401, "Invalid refresh token: unknown token")
            subject, used = refresh
            if subject != access.subject:
                raise self._auth_error(
                    401, "Access and refresh tokens do not belong to the same subject"
                )
            if used:
                raise self._auth_error(
                    401,
                    "Refresh token reuse detected; re-authentication required",
                    {"X-Auth-Error": "token_reuse"},
                )
            node._refresh[body["refresh_token"]] = (subject, True)
            del node._tokens[body["access_token"]]
            tokens = node._issue_tokens(subject)
        self._send(200, {"data": tokens, "error": None})

    # -------------------------------------------------------------- JSON-RPC

    def _jsonrpc(self) -> None:
        body = self._json_body()
        if not isinstance(body, dict) or body.get("jsonrpc") != "2.0" or "id" not in body:
            raise _Reply(
                422, "Failed to deserialize the JSON body into the target type: bad JSON-RPC"
            )
        rpc_id, rpc_method, params = body["id"], body.get("method"), body.get("params")

        def reply(member: str, value: Any) -> None:
            self._send(200, {"jsonrpc": "2.0", "id": rpc_id, member: value})

        def parse_error(message: str) -> None:
            reply("error", {"type": "ParseError", "data": message})

        if rpc_method not in ("execute", "sync_status"):
            return parse_error(
                f"unknown variant `{rpc_method}`, expected one of "
                "`execute`, `sync_status`, `set_ephemeral`"
            )
        if not isinstance(params, dict):
            return parse_error("invalid type: expected struct params")
        ctx_id = params.get("contextId")
        if not isinstance(ctx_id, str) or _unb58_32(ctx_id) is None:
            return parse_error("invalid value for `contextId`")
        app_method = params.get("method") if rpc_method == "execute" else None
        if rpc_method == "execute":
            if not isinstance(app_method, str) or not app_method:
                return parse_error("missing field `method`")
            if "argsJson" not in params:
                return parse_error("missing field `argsJson`")
        node = self.node
        self._fault(
            node._take_fault([app_method, rpc_method, "/jsonrpc"], rpc=True), ctx_id, rpc_id
        )
        network = node.network
        with network._lock:
            ctx = network._contexts.get(ctx_id)
            replica = node._replicas.get(ctx_id)
            if rpc_method == "sync_status":
                if ctx is None or replica is None:
                    return reply("error", {"type": "ContextNotFound"})
                peers = [
                    m for m in ctx.members if m != node.name and network.connected(m, node.name)
                ]
                state = "idle" if replica.initialized else "waitingForPeers"
                status: dict[str, Any] = {
                    "contextId": ctx_id,
                    "isInitialized": replica.initialized,
                    "syncState": {"state": state},
                    "failureCount": 0,
                }
                if not peers and len(ctx.members) > 1:
                    status["lastError"] = "No peers to sync with"
                return reply("result", status)
            if ctx is None:
                return reply("error", {"type": "ContextNotFound"})
            if replica is None:
                return reply(
                    "error",
                    {
                        "type": "FunctionCallError",
                        "data": "No owned identity found for this context",
                    },
                )
            if not replica.initialized:
                return reply("error", {"type": "Uninitialized"})
            outcome = node._kv_execute(ctx_id, app_method, params["argsJson"])
            if isinstance(outcome, dict):
                return reply("error", outcome)
            output, events = outcome
            if events:
                node._emit_mutation(ctx_id, replica, events)
                network._broadcast(ctx_id, node.name)
        reply("result", {"output": output})

    # -------------------------------------------------------------- contexts

    def _join(self, context_id: str) -> None:
        node, network = self.node, self.node.network
        if _unb58_32(context_id) is None:
            raise _Reply(400, {"error": "Invalid context id format"})
        with network._lock:
            ctx = network._contexts.get(context_id)
            if ctx is None or (node.name not in ctx.members and node.name not in ctx.invited):
                raise _Reply(403, {"error": f"node is not a member of the group of {context_id}"})
            identity = network.join(context_id, node.name)
        self._send(200, {"data": {"contextId": context_id, "memberPublicKey": identity}})

    def _identities(self, context_id: str, *, owned: bool) -> None:
        node, network = self.node, self.node.network
        with network._lock:
            ctx = network._contexts.get(context_id)
            replica = node._replicas.get(context_id)
            if ctx is None or replica is None:
                raise _Reply(404, {"error": "Context not found"})
            ids = [replica.identity] if owned else list(ctx.members.values())
        self._send(200, {"data": {"identities": ids}})

    # -------------------------------------------------------------- blobs

    def _blob_put(self, query: dict[str, list[str]]) -> None:
        node, network = self.node, self.node.network
        hash_param = (query.get("hash") or [None])[0]
        ctx_param = (query.get("context_id") or [None])[0]
        expected = None
        if hash_param is not None:
            expected = _unb58_32(hash_param)
            if expected is None:
                raise _Reply(400, {"error": "The provided hash is not a valid format"})
        if ctx_param is not None and _unb58_32(ctx_param) is None:
            raise _Reply(400, {"error": "The provided context_id is not a valid format"})
        try:
            data = self._body(MAX_BLOB_BYTES)
        except _Reply:
            raise _Reply(
                500, {"error": "Failed to store blob: blob upload exceeds maximum allowed size"}
            ) from None
        digest = hashlib.sha256(data).digest()
        if expected is not None and digest != expected:
            raise _Reply(500, {"error": "Failed to store blob: fatal: blob hash mismatch"})
        blob_id = _blob_id(data)
        with network._lock:
            node._blobs[blob_id] = data
            if ctx_param is not None and ctx_param in node._replicas:
                holders = network._announced.setdefault((blob_id, ctx_param), [])
                holders.append((node.name, time.monotonic() + network.delay_s))
        self._send(200, {"data": {"blob_id": blob_id, "size": len(data)}})

    def _blob_get(self, blob_id: str, query: dict[str, list[str]]) -> None:
        node, network = self.node, self.node.network
        if _unb58_32(blob_id) is None:
            raise _Reply(400, {"error": "Invalid blob ID format"})
        ctx_param = (query.get("context_id") or [None])[0]
        if ctx_param is not None and _unb58_32(ctx_param) is None:
            raise _Reply(400, {"error": "Invalid context ID format"})
        with network._lock:
            data = node._blobs.get(blob_id)
            if data is None and ctx_param is not None:
                for holder in network._holders(blob_id, ctx_param, node.name):
                    data = network._nodes[holder]._blobs.get(blob_id)
                    if data is not None:
                        node._blobs[blob_id] = data
                        break
        if data is None:
            raise _Reply(404, {"error": "Blob not found locally or in network"})
        digest = hashlib.sha256(data).hexdigest()
        self.send_response(200)
        for k, v in (
            ("Content-Length", str(len(data))),
            ("Content-Type", "application/octet-stream"),
            ("ETag", f'"{digest}"'),
            ("Cache-Control", "private, no-cache"),
            ("X-Blob-ID", blob_id),
            ("X-Blob-Hash", digest),
            ("X-Blob-MIME-Type", "application/octet-stream"),
        ):
            self.send_header(k, v)
        self.end_headers()
        view = memoryview(data)
        for i in range(0, len(data), 1 << 16):
            self.wfile.write(view[i : i + (1 << 16)])

    # -------------------------------------------------------------- SSE

    def _sse(self) -> None:
        node, network = self.node, self.node.network
        last = self.headers.get("Last-Event-ID", "").split("-")[0]
        conn: queue.Queue[bytes | None] = queue.Queue()
        with network._lock:
            session = node._sessions.get(int(last)) if last.isdigit() else None
            reconnect = session is not None
            if session is None:
                sid = network._rng.getrandbits(63)
                while sid in node._sessions:
                    sid = network._rng.getrandbits(63)
                session = node._sessions[sid] = _Session(sid)
            if session.conn is not None:
                session.conn.put(None)  # one live connection per session
            session.conn = conn
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-SSE-Session-ID", str(session.sid))
        self.send_header("X-SSE-Reconnect", "true" if reconnect else "false")
        self.send_header("Connection", "close")
        self.end_headers()
        connect = {"type": "connect", "session_id": str(session.sid), "reconnect": reconnect}
        try:
            self.wfile.write(
                f"event: message\nid: {session.sid}-0\nretry: 3000\n"
                f"data: {json.dumps(connect)}\n\n".encode()
            )
            self.wfile.flush()
            while not node._closed:
                try:
                    frame = conn.get(timeout=_SSE_KEEPALIVE_S)
                except queue.Empty:
                    frame = b":\n\n"
                if frame is None:
                    break
                self.wfile.write(frame)
                self.wfile.flush()
        finally:
            with network._lock:
                if session.conn is conn:
                    session.conn = None

    def _sse_subscription(self) -> None:
        node = self.node
        body = self._json_body()
        if not isinstance(body, dict) or not str(body.get("id", "")).isdigit():
            raise _Reply(400, {"error": "Invalid Session Id"})
        method, params = body.get("method"), body.get("params")
        ids = params.get("contextIds", []) if isinstance(params, dict) else None
        if method not in ("subscribe", "unsubscribe") or not isinstance(ids, list):
            raise _Reply(400, {"error": {"type": "ParseError", "data": "invalid subscription"}})
        if any(not isinstance(i, str) or _unb58_32(i) is None for i in ids):
            raise _Reply(400, {"error": {"type": "ParseError", "data": "invalid context id"}})
        with node.network._lock:
            session = node._sessions.get(int(body["id"]))
            if session is None:
                raise _Reply(
                    404, {"error": "Session not found. Please reconnect to SSE endpoint first."}
                )
            if method == "subscribe":
                session.subscriptions.update(ids)
                result = {"status": "subscribed", "contexts": ids, "groups": []}
            else:
                gone = [i for i in ids if i in session.subscriptions]
                session.subscriptions.difference_update(ids)
                result = {"status": "unsubscribed", "unsubscribed": gone, "requested": ids}
        self._send(200, {"result": result})


# ------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    """Start N emulated merod nodes sharing one kv-store context; serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m calimero_adapter.emulator",
        description=f"Run {EMULATOR_NAME} nodes on 127.0.0.1 (not a real Calimero node).",
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes (>= 1)")
    parser.add_argument("--delay", type=float, default=0.0, help="sync delay between nodes, s")
    parser.add_argument("--info-file", help="write the node URLs and context id here (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require tokens like merod's embedded auth (credentials and one token per node "
        "go into the info file); default: no auth, like merod behind no proxy",
    )
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password", default="emulated-merod-password")
    parser.add_argument("--token-ttl", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    network = EmulatedNetwork(
        delay_s=args.delay,
        seed=args.seed,
        token_ttl_s=args.token_ttl,
        auth=args.auth,
        users={args.username: args.password},
    )
    try:
        nodes = [network.add_node(f"node{i}") for i in range(args.nodes)]
        context_id = network.create_context(APPLICATION)
        info = {
            "emulator": EMULATOR_NAME,
            "nodes": {n.name: n.url for n in nodes},
            "context_id": context_id,
            "application": APPLICATION,
            "identities": {n.name: n.identity(context_id) for n in nodes},
            "auth": None,
            "pid": os.getpid(),
        }
        if args.auth:
            with network._lock:
                tokens = {n.name: n._issue_tokens(args.username)["access_token"] for n in nodes}
            info["auth"] = {"username": args.username, "password": args.password, "tokens": tokens}
        text = json.dumps(info, indent=2)
        if args.info_file:
            tmp = f"{args.info_file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, args.info_file)  # readers never see a half-written file
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        network.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
