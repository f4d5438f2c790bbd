"""Tasks: what a training job supplies to the generic trainer (jaxlisa/training/trainer.py), under
the `Task` protocol of jaxlisa/training/task.py (pure model config / init / loss / data, and a
`prepare()` for the run's I/O).

`config.task = 'lm'` selects `jaxlisa.tasks.lm.Task`; the command line (jaxlisa/cli.py) and the
tools look tasks up here, the trainer only receives one.
"""

from __future__ import annotations

import importlib

from jaxlisa.training.task import Task

# config.task -> the module (jaxlisa/tasks/<name>.py) whose `Task` it is; imported when asked for.
TASKS = ("lm", "lisa", "blip2_stage1", "minigpt4qwen")


def get_task(config, workdir: str) -> Task:
  """The task config.task names, built without I/O (call its prepare() before training)."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r}; known tasks: {', '.join(TASKS)}")
  return importlib.import_module(f"jaxlisa.tasks.{config.task}").Task(config, workdir)


def prepared_task(config, workdir: str) -> Task:
  """get_task, then its prepare(): the task a training run starts from."""
  task = get_task(config, workdir)
  task.prepare()
  return task
