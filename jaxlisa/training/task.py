"""What the trainer needs from a task (the `Task` protocol), and `TaskBase` with its defaults.

The tasks themselves live above training/ (jaxlisa/tasks/; `config.task` names one and
jaxlisa.tasks.get_task builds it); the trainer, inference_params and tools/plan.py see only this
protocol. A task has two parts:

  pure (the constructor and everything below except prepare; no file is written, no tokenizer
  trained; the tokenizer, model config and data are read lazily, when first used):
    config, workdir
    model_config                     the model's config dataclass
    init(rng) -> params              the full param tree; leaves may carry logical axis names
                                     (nn.LogicallyPartitioned); traced under jit, so pure
    loss(params, batch, rng, train) -> (loss [], aux {name: []})
                                     aux['weight'] (optional) weighs microbatches and eval batches
    pretrained() -> dict | None      host arrays (a partial param tree) placed over the init, e.g.
                                     from load_pretrained; loaded on every start, since frozen
                                     params are not checkpointed
    trainable_mask(params)           bools like params; default: config.trainable / config.frozen
    train_data() -> iterator         endless global batches {name: np [B, ...]} with JSON-able
                                     get_state() / set_state() (resumable)
    eval_data() -> iterable | None   one finite pass of eval batches of the same shapes
    eval_step(params, batch, rng)    -> {name: []} per eval batch (default: loss and aux);
                                     the trainer takes 'weight'-weighted means over the pass
    eval_summary(means) -> metrics   final metrics from those means (e.g. cIoU = I / U)
    describe() -> {name: value}      extra lines for the run summary

  prepare() -> None                  the I/O a run needs first: write the synthetic dataset, train
                                     and save the tokenizer (each only when missing; idempotent).
                                     Called before training and validation, never by segment /
                                     serve on a trained workdir or on pretrained weights.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import jax

from jaxlisa.training import optimizer as optim_lib


class Task(Protocol):
  """The contract between a task and the trainer (see the module docstring)."""

  config: Any
  workdir: str

  @property
  def model_config(self) -> Any: ...

  def prepare(self) -> None: ...

  def init(self, rng: jax.Array) -> Any: ...

  def pretrained(self) -> dict | None: ...

  def loss(self, params: Any, batch: dict, rng: jax.Array, train: bool = True) -> tuple[jax.Array, dict]: ...

  def trainable_mask(self, params: Any) -> Any: ...

  def train_data(self): ...

  def eval_data(self) -> Iterable[dict] | None: ...

  def eval_step(self, params: Any, batch: dict, rng: jax.Array) -> dict[str, jax.Array]: ...

  def eval_summary(self, means: dict[str, float]) -> dict[str, float]: ...

  def describe(self) -> dict[str, Any]: ...


class TaskBase:
  """The defaults of the Task protocol; a task subclasses this and fills in the rest."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir

  def prepare(self) -> None:
    pass

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
