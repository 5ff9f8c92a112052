"""`python -m sim` exposes one XLA CPU device per core before jax starts."""

import os
import subprocess
import sys

# main() must set the flag before parsing flags (which imports the jax-using modules)
CODE = """
import jax
from sim.cli import main
try:
    main(["--hospitals", "0"])
except SystemExit:
    pass
print(len(jax.devices()))
"""


def test_cli_entry_sets_host_devices_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == (os.cpu_count() or 1)
