"""`python -m jaxlisa ...` = `python main.py ...` (jaxlisa/cli.py)."""

from jaxlisa.cli import run

if __name__ == "__main__":
  run()
