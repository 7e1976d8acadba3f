"""``python -m demhx``: the same command as the ``demhx`` console script."""

from demhx.cli import run

if __name__ == "__main__":
    run()
