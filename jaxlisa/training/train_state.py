"""The training state pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

from jaxlisa.training import partition


@flax.struct.dataclass
class TrainState:
  """step int32 []; trainable / frozen: disjoint nested param dicts; opt_state: the optimizer's
  state for `trainable` only; rng: uint32 [2] base key (folded with the step each update)."""
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array

  @property
  def params(self) -> dict:
    """The full parameter tree."""
    return partition.merge(self.trainable, self.frozen)

  def saved(self) -> dict:
    """What a checkpoint holds: everything but the frozen params (the task's init rebuilds those)."""
    return {"step": self.step, "trainable": self.trainable, "opt_state": self.opt_state, "rng": self.rng}

  def with_saved(self, saved: dict) -> "TrainState":
    return self.replace(step=saved["step"], trainable=saved["trainable"], opt_state=saved["opt_state"],
                        rng=saved["rng"])
