"""Orbax checkpoints of a run: the latest train states, and the best trained params.

  workdir/checkpoints/<step>/{state, data}   latest `max_to_keep` states: step, trained params,
                                              optimizer state, rng (frozen params are rebuilt by
                                              the task's init) + the data iterator's JSON state
  workdir/best/<step>/params                 trained params at the best `best_metric`
Uses only the orbax 0.12.8 calls measured to work (CheckpointManager + args.StandardSave/
StandardRestore/JsonSave/JsonRestore/Composite); restores straight into the target shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """Latest-k train states and the best trained params of one workdir."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2, best_metric: str = "eval/loss",
               best_mode: str = "min", async_save: bool = False):
    if best_mode not in ("min", "max"):
      raise ValueError(f"ckpt.best_mode must be 'min' or 'max', got {best_mode!r}")
    self.best_metric, self.best_mode = best_metric, best_mode
    self.latest = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))
    self.best = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "best")),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=async_save,
                                             best_fn=lambda m: m[best_metric], best_mode=best_mode,
                                             keep_checkpoints_without_metrics=False))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: dict, data_state: dict | None = None) -> None:
    """Save the train state (TrainState.saved()) and the data iterator state at `step`."""
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state or {})), force=True)
    logging.info("saved checkpoint at step %d", step)

  def restore(self, step: int, target: dict) -> tuple[dict, dict]:
    """(state, data_state) at `step`; `target` gives shapes, dtypes and shardings (see `abstract`)."""
    r = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          data=ocp.args.JsonRestore()))
    logging.info("restored checkpoint at step %d", step)
    return r["state"], dict(r["data"] or {})

  def best_value(self) -> float | None:
    step = self.best.best_step()
    return None if step is None else float(self.best.metrics(step)[self.best_metric])

  def is_better(self, value: float) -> bool:
    best = self.best_value()
    return best is None or (value < best if self.best_mode == "min" else value > best)

  def maybe_save_best(self, step: int, params: Any, metrics: dict) -> bool:
    """Save `params` when metrics[best_metric] beats the best so far; returns whether it did."""
    if self.best_metric not in metrics:
      return False
    value = float(metrics[self.best_metric])
    if not self.is_better(value) or step in self.best.all_steps():
      return False
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   metrics={self.best_metric: value}, force=True)
    logging.info("new best %s=%.5f at step %d", self.best_metric, value, step)
    return True

  def restore_best(self, target: Any | None = None) -> tuple[int, Any]:
    step = self.best.best_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint in {self.best.directory}")
    args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
    return step, self.best.restore(step, args=ocp.args.Composite(params=args))["params"]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


# ------------------------------------------------------------------------------------------------
# Params-only reading (eval, segment, serving): no CheckpointManager, nothing created on disk.

def _steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def find_params(workdir: str, which: str = "latest") -> tuple[str, int] | None:
  """(orbax item directory, step) of the trained params in `workdir`, or None when it has none.

  which='latest': workdir/checkpoints/<max step>/state (its 'trainable' subtree); which='best':
  workdir/best/<step>/params. A converted directory (jaxlisa_config.json + params/) gives
  (its params/, 0). Reads the directory listing only."""
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  if os.path.isfile(os.path.join(workdir, "jaxlisa_config.json")) and os.path.isdir(os.path.join(workdir, "params")):
    return os.path.abspath(os.path.join(workdir, "params")), 0
  sub, item = ("checkpoints", "state") if which == "latest" else ("best", "params")
  root = os.path.join(workdir, sub)
  for step in reversed(_steps(root)):  # an unfinished save has no item directory yet
    path = os.path.join(root, str(step), item)
    if os.path.isdir(path):
      return os.path.abspath(path), step
  return None


def restore_params(workdir: str, abstract_params: Any, shardings: Any = None,
                   which: str = "latest") -> tuple[Any, int]:
  """(params, step): the trained params of the latest (or best) checkpoint of `workdir`, read
  straight into `shardings`, nothing else (no optimizer state, no data state).

  abstract_params: a (possibly partial) nested dict of ShapeDtypeStruct-likes (e.g. the trained
  subset of jax.eval_shape(task.init)); only those leaves are read. shardings: a matching tree
  of jax.sharding.Sharding (default: each leaf's .sharding, else one device).
  Raises FileNotFoundError when `workdir` holds no checkpoint (see find_params)."""
  found = find_params(workdir, which)
  if found is None:
    raise FileNotFoundError(f"no {which} checkpoint in {workdir}")
  path, step = found
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_params)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings)
  latest = path.endswith(os.sep + "state")
  item = {"trainable": target} if latest else target
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                          partial_restore=True))
  logging.info("restored params from %s (step %d)", path, step)
  return (out["trainable"] if latest else out), step
