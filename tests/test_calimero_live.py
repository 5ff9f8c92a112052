"""The real-mode flow against real merod nodes: runs only where MEDICHAIN_MEROD_URLS names them
(comma-separated, the coordinator's node first, then one per hospital) and MEDICHAIN_CONTEXT_ID
the context they share (e.g. from calimero_adapter/workflows/medichain.yml)."""

import os

import pytest

from calimero_adapter.demo import run_demo

URLS = os.environ.get("MEDICHAIN_MEROD_URLS", "")
CONTEXT = os.environ.get("MEDICHAIN_CONTEXT_ID", "")


@pytest.mark.skipif(
    not URLS or not CONTEXT,
    reason="no live Calimero nodes: set MEDICHAIN_MEROD_URLS and MEDICHAIN_CONTEXT_ID",
)
def test_live_nodes_end_at_the_simulations_params(tmp_path):
    nodes = URLS.split(",")
    s = run_demo(len(nodes) - 1, 2, tmp_path / "live", nodes=nodes, context=CONTEXT)
    assert s["mode"] == "live nodes"
    assert set(s["exit_codes"].values()) == {0}, s
    assert s["max_abs_diff_vs_simulation"] <= 1e-6
    assert all(a["only_manifests_and_updates"] for a in s["audit"].values())
