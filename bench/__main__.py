"""``python -m bench <name> [options]`` (see :mod:`bench.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
