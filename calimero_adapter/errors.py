"""Exceptions raised by :mod:`calimero_adapter.client`, one class per error shape of merod.

Every exception carries where it happened (``node_url``, ``endpoint``, ``context_id``,
``method``) and says so in its message, so a failure in a multi-hospital run names the node
and the call that failed. ``transient`` tells the client's retry loop whether the same call
may succeed if repeated unchanged.

The JSON-RPC error shapes (``{"type": ..., "data": ...}`` inside the ``error`` member of an
HTTP 200 answer) are listed in the docstring of :mod:`calimero_adapter.client`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "BlobHashMismatch",
    "BlobNotFound",
    "BlobTooLarge",
    "CalimeroError",
    "ContextNotFound",
    "FunctionCallError",
    "GroupKeyPending",
    "HttpStatusError",
    "NodeTimeout",
    "NodeUnavailable",
    "ParseError",
    "ProtocolError",
    "RPC_ERRORS",
    "RpcError",
    "TokenExpired",
    "Unauthorized",
    "Uninitialized",
    "UpgradeInProgress",
]


class CalimeroError(Exception):
    """Base class: a call to a merod node (or the emulated one) failed."""

    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        node_url: str | None = None,
        endpoint: str | None = None,
        context_id: str | None = None,
        method: str | None = None,
        transient: bool | None = None,
    ) -> None:
        self.message = message
        self.node_url = node_url
        self.endpoint = endpoint
        self.context_id = context_id
        self.method = method
        if transient is not None:
            self.transient = transient
        super().__init__(self._render())

    def _render(self) -> str:
        where = (
            f"node={self.node_url or '?'} endpoint={self.endpoint or '?'} "
            f"context={self.context_id or '-'} method={self.method or '-'}"
        )
        return f"{self.message} [{where}]"

    def where(self) -> dict[str, str | None]:
        """The location fields as a dict (for copying onto a follow-up error)."""
        return {
            "node_url": self.node_url,
            "endpoint": self.endpoint,
            "context_id": self.context_id,
            "method": self.method,
        }


# ------------------------------------------------------------------ JSON-RPC error members


class RpcError(CalimeroError):
    """The node answered a JSON-RPC call with an ``error`` member (HTTP 200)."""

    rpc_type: str = ""

    def __init__(self, message: str, *, rpc_type: str = "", data: Any = None, **where: Any):
        self.rpc_type = rpc_type or type(self).rpc_type or type(self).__name__
        self.data = data
        super().__init__(f"{self.rpc_type}: {message}", **where)


class ParseError(RpcError):
    """The node could not parse or validate the request (``ParseError``)."""

    rpc_type = "ParseError"


class FunctionCallError(RpcError):
    """The application method failed, or the caller may not run it (``FunctionCallError``)."""

    rpc_type = "FunctionCallError"


class Uninitialized(RpcError):
    """The context exists but its state has not been synced to this node yet."""

    rpc_type = "Uninitialized"


class ContextNotFound(RpcError):
    """The node does not know the context (``ContextNotFound``)."""

    rpc_type = "ContextNotFound"


class Unauthorized(RpcError):
    """The executing identity may not act on the context (``Unauthorized``)."""

    rpc_type = "Unauthorized"


class GroupKeyPending(RpcError):
    """Transient: the group key for the context has not been delivered to this node yet."""

    rpc_type = "GroupKeyPending"
    transient = True


class UpgradeInProgress(RpcError):
    """Transient: the context's group is migrating; writes are refused until it completes."""

    rpc_type = "UpgradeInProgress"
    transient = True


#: JSON-RPC ``error.type`` -> exception class; other types raise a plain :class:`RpcError`.
RPC_ERRORS: dict[str, type[RpcError]] = {
    cls.rpc_type: cls
    for cls in (
        ParseError,
        FunctionCallError,
        Uninitialized,
        ContextNotFound,
        Unauthorized,
        GroupKeyPending,
        UpgradeInProgress,
    )
}


# ------------------------------------------------------------------ HTTP-level errors


class HttpStatusError(CalimeroError):
    """The node answered with an HTTP error status (admin API ``{"error": ...}`` bodies)."""

    def __init__(self, status: int, body: str | bytes = "", *, message: str = "", **where: Any):
        self.status = status
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        self.body = body[:500]
        text = message or f"HTTP {status}"
        if self.body:
            text = f"{text}: {self.body}"
        super().__init__(text, **where)


class BlobNotFound(HttpStatusError):
    """404 for a blob: not stored here and not fetchable (e.g. this node is no context member)."""


class AuthError(CalimeroError):
    """Authentication failed: a 401/403 from the auth guard, or /auth/token refused us."""

    def __init__(self, message: str, *, status: int | None = None, reason: str = "", **where: Any):
        self.status = status
        self.reason = reason
        if reason:
            message = f"{message} (X-Auth-Error: {reason})"
        super().__init__(message, **where)


class TokenExpired(AuthError):
    """The access token expired and could not be refreshed (or is a static token)."""


# ------------------------------------------------------------------ blobs


class BlobHashMismatch(CalimeroError):
    """Downloaded blob bytes do not hash to the expected SHA-256."""

    def __init__(self, expected: str, got: str, **where: Any) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"blob SHA-256 mismatch: expected {expected}, got {got}", **where)


class BlobTooLarge(CalimeroError):
    """The blob exceeds merod's upload cap (1 GiB); nothing was sent."""

    def __init__(self, size: int, limit: int, **where: Any) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"blob of at least {size} bytes exceeds the {limit}-byte cap", **where)


# ------------------------------------------------------------------ transport


class NodeTimeout(CalimeroError):
    """The node did not answer within the client's timeout."""


class NodeUnavailable(CalimeroError):
    """Connection refused/reset or HTTP 502/503/504, still so after the client's retries."""

    transient = True

    def __init__(self, message: str, *, status: int | None = None, **where: Any) -> None:
        self.status = status
        super().__init__(message, **where)


class ProtocolError(CalimeroError):
    """The node's answer does not have the documented shape (bad JSON, missing members)."""
