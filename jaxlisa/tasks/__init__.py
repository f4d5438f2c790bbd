"""Tasks: what a training job supplies to the generic trainer (jaxlisa/training/trainer.py).

`config.task = 'lm'` selects `jaxlisa.tasks.lm.Task`. A task builds its model and data from the
config and implements:

  init(rng) -> params              the full param tree; leaves may carry logical axis names
                                   (nn.LogicallyPartitioned); traced under jit, so pure
  pretrained() -> dict | None      host arrays (a partial param tree) placed over the init, e.g.
                                   from load_pretrained; loaded on every start, since frozen
                                   params are not checkpointed
  loss(params, batch, rng, train) -> (loss [], aux {name: []})
                                   aux['weight'] (optional) weighs microbatches and eval batches
  train_data() -> iterator         endless global batches {name: np [B, ...]} with JSON-able
                                   get_state() / set_state() (resumable)
  eval_data() -> iterable | None   one finite pass of eval batches of the same shapes
  eval_step(params, batch, rng)    -> {name: []} per eval batch (default: loss and aux);
                                   the trainer takes 'weight'-weighted means over the pass
  eval_summary(means) -> metrics   final metrics from those means (e.g. cIoU = I / U)
  trainable_mask(params)           bools like params; default: config.trainable / config.frozen
  describe() -> {name: value}      extra lines for the run summary
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable

import jax

from jaxlisa.training import optimizer as optim_lib


class Task:
  """Base class; see the module docstring for the contract."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir

  def init(self, rng: jax.Array) -> Any:
    raise NotImplementedError

  def pretrained(self) -> dict | None:
    return None

  def loss(self, params: Any, batch: dict, rng: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def train_data(self):
    raise NotImplementedError

  def eval_data(self) -> Iterable[dict] | None:
    return None

  def eval_step(self, params: Any, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
    loss, aux = self.loss(params, batch, rng, False)
    return {"loss": loss, **aux}

  def eval_summary(self, means: dict[str, float]) -> dict[str, float]:
    return means

  def trainable_mask(self, params: Any) -> Any:
    return optim_lib.trainable_mask(params, tuple(self.config.trainable), tuple(self.config.frozen))

  def describe(self) -> dict[str, Any]:
    return {}


# Task names whose module has another name (jaxlisa/tasks/<module>.py).
MODULES = {"blip2_stage1": "blip2"}


def get_task(config, workdir: str) -> Task:
  name = MODULES.get(config.task, config.task)
  try:
    module = importlib.import_module(f"jaxlisa.tasks.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"jaxlisa.tasks.{name}":
      raise
    raise ValueError(f"unknown task {config.task!r}: no module jaxlisa/tasks/{name}.py") from None
  return module.Task(config, workdir)
