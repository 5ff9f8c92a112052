"""The update codec shared by simulation and the real mode: a pytree of arrays <-> bytes.

Layout (deterministic: the same tree always gives the same bytes, so its SHA-256 names it)::

    b"MCTR" | uint32 big-endian header length H | header (canonical JSON) | leaf bytes ...

The header lists every leaf in flattening order as ``{"path", "dtype", "shape"}``; leaf bytes
are the arrays in C order, little-endian, concatenated. Decoding checks the header against a
template tree (what a hospital and the coordinator both know: the model's structure), so a
payload of the wrong model, shape or dtype is rejected with the leaf it concerns.
"""

from __future__ import annotations

import hashlib
import json
import struct

import jax
import numpy as np

from medichain_jax.types import PyTree

MAGIC = b"MCTR"


class CodecError(ValueError):
    """A payload does not decode into the expected tree; the message names the leaf."""


def _leaves(tree: PyTree) -> tuple[list[str], list[np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    return paths, [np.asarray(v) for _, v in flat]


def encode_tree(tree: PyTree) -> bytes:
    """Serialize ``tree`` (arrays as leaves) deterministically."""
    paths, arrays = _leaves(tree)
    header = [
        {"path": p, "dtype": a.dtype.str.lstrip("<>|="), "shape": list(a.shape)}
        for p, a in zip(paths, arrays, strict=True)
    ]
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in arrays)
    return MAGIC + struct.pack(">I", len(head)) + head + body


def decode_tree(blob: bytes, like: PyTree) -> PyTree:
    """Rebuild a tree shaped like ``like`` from :func:`encode_tree` bytes (numpy leaves)."""
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise CodecError("payload is not an encoded tree (bad magic)")
    (h,) = struct.unpack(">I", blob[4:8])
    try:
        header = json.loads(blob[8 : 8 + h])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CodecError(f"payload header is not JSON: {err}") from err
    paths, templates = _leaves(like)
    if not isinstance(header, list) or [e.get("path") for e in header] != paths:
        raise CodecError(f"payload leaves {[e.get('path') for e in header]} != expected {paths}")
    out, pos = [], 8 + h
    for entry, tmpl in zip(header, templates, strict=True):
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        shape = tuple(entry["shape"])
        if shape != tmpl.shape or dtype != tmpl.dtype.newbyteorder("<"):
            raise CodecError(
                f"leaf {entry['path']}: payload {dtype.name}{list(shape)} != expected "
                f"{tmpl.dtype.name}{list(tmpl.shape)}"
            )
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if pos + n > len(blob):
            raise CodecError(f"leaf {entry['path']}: payload truncated")
        out.append(np.frombuffer(blob, dtype, count=n // dtype.itemsize, offset=pos).reshape(shape))
        pos += n
    if pos != len(blob):
        raise CodecError(f"payload has {len(blob) - pos} trailing bytes")
    return jax.tree.unflatten(
        jax.tree.structure(like), [a.astype(a.dtype.newbyteorder("=")) for a in out]
    )


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tree_digest(tree: PyTree) -> str:
    """SHA-256 of the tree's encoding: names a model (e.g. the base model of a round)."""
    return sha256_hex(encode_tree(tree))
