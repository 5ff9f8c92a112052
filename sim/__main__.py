"""``python -m sim``: parse flags and run a simulation."""

import sys

from sim.devices import use_host_cores

use_host_cores()

from sim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
