"""Checks on the tensors a conversion reads: dtype (floats where floats are expected), finiteness,
range (values garbage bytes would give)."""

from __future__ import annotations

import numpy as np
from absl import logging

from jaxlisa.conversion.errors import CheckpointError


# A weight with |value| above this is reported as out of range (a warning; `strict` refuses):
# trained weights stay far below it, garbage bytes read as floats (up to ~3e38) do not.
MAX_ABS_WEIGHT = 1e4


class WeightCheck:
  """Reads tensors for `convert_state` through `source` and checks each one: an integer or bool
  tensor where a float parameter is expected is a CheckpointError at once; non-finite values are
  collected and refused at the end (allow_nonfinite: a warning), values beyond MAX_ABS_WEIGHT are
  a warning (strict: refused)."""

  def __init__(self, source, src: str, allow_nonfinite: bool = False, strict: bool = False):
    self.source, self.src, self.allow_nonfinite, self.strict = source, src, allow_nonfinite, strict
    self.nonfinite: list[str] = []
    self.out_of_range: list[str] = []

  def keys(self):
    return self.source.keys()

  def __len__(self):
    return len(self.source)

  def __contains__(self, k):
    return k in self.source

  def get(self, k: str) -> np.ndarray:
    x = np.asarray(self.source.get(k) if hasattr(self.source, "get") else self.source[k])
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
      raise CheckpointError(f"{self.src}: tensor {k} is {x.dtype}, where a floating-point weight is expected")
    if x.size:
      finite = np.isfinite(x)
      if not finite.all():
        self.nonfinite.append(f"{k} ({int(x.size - finite.sum())} of {x.size} values NaN/Inf)")
      else:
        amax = float(max(abs(float(x.max())), abs(float(x.min()))))
        if amax > MAX_ABS_WEIGHT:
          self.out_of_range.append(f"{k} (|max| {amax:.3g})")
    return x

  def finish(self) -> None:
    """Raise or warn for what `get` found (after every tensor was read)."""
    def listing(items):
      return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    if self.nonfinite:
      msg = f"{self.src}: non-finite weights in {len(self.nonfinite)} tensor(s): {listing(self.nonfinite)}"
      if not self.allow_nonfinite:
        raise CheckpointError(msg + " (--allow_nonfinite converts anyway)")
      logging.warning("%s", msg)
    if self.out_of_range:
      msg = (f"{self.src}: {len(self.out_of_range)} tensor(s) with values beyond {MAX_ABS_WEIGHT:g}, "
             f"possibly corrupt: {listing(self.out_of_range)}")
      if self.strict:
        raise CheckpointError(msg + " (refused by --strict)")
      logging.warning("%s (converted anyway; --strict refuses)", msg)
