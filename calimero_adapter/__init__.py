"""Real deployment mode through Calimero nodes (site runner, coordinator); see issue 7."""
