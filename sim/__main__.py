"""``python -m sim``: parse flags and run a simulation."""

import sys

from sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
