"""`python -m jaxlisa ...` = `python main.py ...` (jaxlisa/cli.py)."""

import sys

from jaxlisa.cli import run

if __name__ == "__main__":
  sys.argv[0] = "python -m jaxlisa"  # the program name usage and error lines show (not __main__.py)
  run()
