"""`python bench/<script>.py` (how the README runs them, from a checkout without an install) puts
bench/ on sys.path, not the repository root; importing this module adds the root once, so the
scripts import jaxlisa, configs, bench and tests as packages; tests/ too, for the shared PyTorch
references (`import torch_refs`, as the tests import them)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(ROOT, "tests"), ROOT):
  if _p not in sys.path:
    sys.path.insert(0, _p)
