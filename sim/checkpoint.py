"""Orbax checkpoints of the server state (and per-client state) for exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Round-indexed checkpoints under ``<run>/checkpoints`` (keeps the newest ``max_to_keep``)."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
        )

    def latest(self) -> int | None:
        """Newest saved round, or None."""
        return self._mgr.latest_step()

    def save(self, rnd: int, tree: Any) -> None:
        """Save ``tree`` as round ``rnd`` and wait until it is on disk."""
        self._mgr.save(rnd, args=ocp.args.StandardSave(tree), force=True)
        self._mgr.wait_until_finished()

    def restore(self, rnd: int, like: Any) -> Any:
        """Restore round ``rnd`` into the structure (and dtypes) of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._mgr.restore(rnd, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Flush and release background threads."""
        self._mgr.close()
