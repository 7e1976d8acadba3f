"""``python -m demhx``: the same command as the ``demhx`` console script."""

from demhx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
