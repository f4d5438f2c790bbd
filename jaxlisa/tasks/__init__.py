"""Tasks: what a training job supplies to the generic trainer (jaxlisa/training/trainer.py), under
the `Task` protocol of jaxlisa/training/task.py (pure model config / init / loss / data, and a
`prepare()` for the run's I/O).

`config.task = 'lm'` selects `jaxlisa.tasks.lm.Task`; the command line (jaxlisa/cli.py) and the
tools look tasks up here, the trainer only receives one.
"""

from __future__ import annotations

import importlib

from jaxlisa.training.task import Task

# Task names whose module has another name (jaxlisa/tasks/<module>.py).
MODULES = {"blip2_stage1": "blip2"}


def get_task(config, workdir: str) -> Task:
  """The task config.task names, built without I/O (call its prepare() before training)."""
  name = MODULES.get(config.task, config.task)
  try:
    module = importlib.import_module(f"jaxlisa.tasks.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"jaxlisa.tasks.{name}":
      raise
    raise ValueError(f"unknown task {config.task!r}: no module jaxlisa/tasks/{name}.py") from None
  return module.Task(config, workdir)


def prepared_task(config, workdir: str) -> Task:
  """get_task, then its prepare(): the task a training run starts from."""
  task = get_task(config, workdir)
  task.prepare()
  return task
