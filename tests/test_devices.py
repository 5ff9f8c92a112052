"""`python -m sim` exposes one XLA CPU device per core before jax starts."""

import os
import subprocess
import sys


def test_cli_entry_sets_host_devices_before_jax_starts():
    code = (
        "import sys; from sim.cli import main; import sim.cli as c;"
        "import jax;"
        "c.parse = lambda argv=None: (_ for _ in ()).throw(SystemExit(0));"
        "\ntry:\n    main([])\nexcept SystemExit:\n    pass\n"
        "print(len(jax.devices()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == (os.cpu_count() or 1)
