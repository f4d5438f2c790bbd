"""Parameters for inference (eval, segment, serving): a task's params from the latest or best
checkpoint of a workdir, over its init and init.pretrained, with no Trainer, optimizer state or
data iterator.

  mesh, rules = setup(config)
  params, step = task_params(task, config, workdir, mesh, rules)   # sharded full param tree
  metrics = evaluate(task, params, config, mesh, rules)            # the trainer's eval pass
"""

from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax import traverse_util

from jaxlisa import parallel
from jaxlisa.training import checkpoints as ckpt_lib
from jaxlisa.training import partition


class NoWeightsError(RuntimeError):
  """No checkpoint in the workdir, no init.pretrained / init.compose, and random init not allowed."""


def has_pretrained(config) -> bool:
  init = config.get("init", {})
  compose = init.get("compose", {}) if hasattr(init, "get") else {}
  return bool(init.get("pretrained", "") if hasattr(init, "get") else "") or bool(compose and compose.get("llava"))


def check_weights(config, workdir: str, which: str = "latest", config_spec: str = "<config.py>") -> None:
  """Raise NoWeightsError (its message names the workdir and how to get weights) unless the run has
  a checkpoint, pretrained weights, or config.allow_random_init."""
  if ckpt_lib.find_params(workdir, which) is not None or has_pretrained(config):
    return
  if config.get("allow_random_init", False):
    logging.warning("no checkpoint in %s and no init.pretrained: RANDOM weights (allow_random_init)", workdir)
    return
  raise NoWeightsError(
      f"no checkpoint in {workdir} and no --config.init.pretrained: nothing to {config.get('mode', 'run')}. "
      f"Train one first (python main.py --config {config_spec} --workdir {workdir}), or convert a model "
      "(python tools/convert_torch_weights.py --src HF_DIR --dst DIR) and pass --config.init.pretrained=DIR; "
      "--config.allow_random_init=True runs on random weights (smoke tests only)")


def setup(config):
  """(mesh, logical axis rules) of config.mesh / config.logical_axis_rules."""
  return parallel.make_mesh(config.mesh.to_dict()), parallel.axis_rules(config.logical_axis_rules)


def task_params(task, config, workdir: str, mesh, rules, which: str = "latest") -> tuple[Any, int]:
  """(params, step): the full param tree of `task`, sharded over `mesh` by its logical axes, in the
  trainer's dtypes (trained: config.master_dtype, frozen: config.frozen_dtype): init, then
  task.pretrained(), then the trained params of the workdir's latest (or best) checkpoint.
  step is the checkpoint's (0 without one). Call check_weights first to refuse random weights."""
  rng = jax.random.PRNGKey(config.seed)
  with parallel.use(mesh, rules):
    boxed = jax.eval_shape(task.init, rng)
  abstract = nn.meta.unbox(boxed)
  mask = task.trainable_mask(abstract)
  shardings = parallel.logical_shardings(boxed, mesh, rules)

  def init(r):
    params = nn.meta.unbox(task.init(jax.random.split(r)[0]))  # the trainer's init key
    trained, frozen = partition.split(params, mask)
    return partition.merge(partition.cast_floats(trained, config.master_dtype),
                           partition.cast_floats(frozen, config.frozen_dtype))

  with parallel.use(mesh, rules):
    params = jax.jit(init, out_shardings=shardings)(rng)
  pretrained = task.pretrained()
  if pretrained:
    params = place(params, pretrained)
  found = ckpt_lib.find_params(workdir, which)
  step = 0
  if found is not None and found[1] > 0:
    trained, _ = partition.split(params, mask)
    restored, step = ckpt_lib.restore_params(workdir, ckpt_lib.abstract(trained), which=which)
    params = place(params, restored)
  return params, step


def place(params: Any, update: dict) -> Any:
  """`params` with the leaves of the (partial) nested dict `update` put in their dtypes and
  shardings; every given leaf must exist with the same shape."""
  flat, new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(update)
  problems = [f"{'/'.join(map(str, k))}: " + ("no such parameter" if k not in flat else
                                                f"shape {np.shape(v)} != {flat[k].shape}")
              for k, v in new.items() if k not in flat or np.shape(v) != flat[k].shape]
  if problems:
    raise ValueError("params do not fit the model:\n  " + "\n  ".join(problems[:20]))
  for k, v in new.items():
    flat[k] = jax.device_put(np.asarray(v).astype(flat[k].dtype) if not isinstance(v, jax.Array)
                             else v.astype(flat[k].dtype), flat[k].sharding)
  return traverse_util.unflatten_dict(flat)


def evaluate(task, params, config, mesh, rules, progress: Callable[[int], None] | None = None) -> dict[str, float]:
  """The trainer's evaluation (weighted means of task.eval_step over one pass of task.eval_data(),
  then task.eval_summary) on `params`; {} when the task has no eval data. progress(n) after each batch."""
  batches = task.eval_data()
  if batches is None:
    return {}
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))
  step = jax.jit(task.eval_step)
  rng = jax.random.PRNGKey(config.seed)
  sums, total = {}, 0.0
  with parallel.use(mesh, rules):
    for i, batch in enumerate(batches):
      batch = parallel.distributed.global_batch(batch, batch_sh, int(config.batch_size))
      out = jax.device_get(step(params, batch, rng))
      w = float(out.pop("weight", 1.0))
      total += w
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v) * w
      if progress is not None:
        progress(i + 1)
  means = {k: v / max(total, 1e-12) for k, v in sums.items()}
  return {f"eval/{k}": float(v) for k, v in task.eval_summary(means).items()}
