"""jaxlisa command line; see jaxlisa/cli.py (also `python -m jaxlisa`, or `jaxlisa` once installed).

  python main.py                                             # the default job: the LISA demo (configs/lisa_tiny.py)
  python main.py --config configs/lisa_tiny.py:runlocal --workdir /tmp/lisa   # its smoke version
  python main.py --help                                      # modes and the config's main fields
"""

from jaxlisa.cli import run

if __name__ == "__main__":
  run()
