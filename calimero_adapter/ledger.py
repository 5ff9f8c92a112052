"""The minimal ledger the round protocol needs, over a Calimero context: ``set`` / ``get`` /
``entries`` by prefix, values JSON. Runs on the stock ``kv-store`` app (``entries()`` then a
prefix filter here) or on ours (``app/``: ``entries_with_prefix`` on the node)."""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

# method -> argument names, as the adapter calls them (tests/test_calimero_app.py checks that
# app/src/lib.rs declares exactly these)
APP_METHODS: dict[str, list[str]] = {
    "set": ["key", "value"],
    "get": ["key"],
    "entries": [],
    "remove": ["key"],
    "entries_with_prefix": ["prefix"],
    "init": ["coordinator"],
    "open_round": ["run", "round", "manifest"],
    "publish_global": ["run", "round", "manifest"],
    "register_site": ["run", "site", "public_key"],
}
APPS = ("kv-store", "medichain")


class Executes(Protocol):
    """What the ledger needs of a node client."""

    def execute(
        self, context_id: str, method: str, args: dict, *, executor_public_key: str | None = None
    ) -> Any: ...


class Ledger:
    """JSON values under string keys in one context, through one node."""

    def __init__(
        self,
        client: Executes,
        context_id: str,
        *,
        app: str = "kv-store",
        executor_public_key: str | None = None,
    ):
        if app not in APPS:
            raise ValueError(f"app must be one of {APPS}, got {app!r}")
        self.client = client
        self.context_id = context_id
        self.app = app
        self.executor = executor_public_key

    def _call(self, method: str, **args: Any) -> Any:
        assert list(args) == APP_METHODS[method], (method, list(args))
        return self.client.execute(self.context_id, method, args, executor_public_key=self.executor)

    def set(self, key: str, value: Any) -> None:
        """Write ``value`` (JSON-encoded, sorted keys) at ``key``."""
        self._call("set", key=key, value=json.dumps(value, sort_keys=True, separators=(",", ":")))

    def get(self, key: str) -> Any:
        """The JSON value at ``key``, or None."""
        raw = self._call("get", key=key)
        return None if raw is None else _decode(key, raw)

    def entries(self, prefix: str) -> dict[str, Any]:
        """Every key starting with ``prefix`` and its JSON value."""
        if self.app == "medichain":
            raw = self._call("entries_with_prefix", prefix=prefix)
        else:
            raw = self._call("entries")
        items = raw.items() if isinstance(raw, dict) else _pairs(raw)
        return {k: _decode(k, v) for k, v in items if k.startswith(prefix)}


def _pairs(raw: Any) -> list[tuple[str, Any]]:
    """kv-store versions return entries as a map or as a list of [key, value] / {key, value}."""
    out = []
    for item in raw or []:
        if isinstance(item, dict):
            out.append((item["key"], item["value"]))
        else:
            out.append((item[0], item[1]))
    return out


def _decode(key: str, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"_malformed": raw, "_key": key}


class LedgerWatcher:
    """Wakes a waiting participant when its node reports a state change in the context (SSE
    events, reconnecting on its own; a ``reconnected`` marker also wakes it, since events in
    the gap are not replayed). Callers still re-read the ledger after waking, and wait with a
    timeout, so a lost event costs one poll interval, never correctness."""

    def __init__(self, client: Any, context_id: str):
        self.changed = threading.Event()
        self.failed: BaseException | None = None
        self.events = 0  # node events seen
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._pump, args=(client, context_id), name="ledger-events", daemon=True
        )
        self._thread.start()

    def _pump(self, client: Any, context_id: str) -> None:
        try:
            for _event in client.events([context_id], stop=self._stop):
                self.events += 1
                self.changed.set()
        except Exception as err:  # noqa: BLE001  (falls back to polling; kept for the caller)
            self.failed = err

    def wait(self, timeout: float) -> bool:
        """Block until a change is reported or ``timeout`` passes; True when woken early."""
        woke = self.changed.wait(timeout)
        self.changed.clear()
        return woke

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
