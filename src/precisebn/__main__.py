"""``python -m precisebn``: the command line (see :mod:`precisebn._cli`)."""

from precisebn._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
