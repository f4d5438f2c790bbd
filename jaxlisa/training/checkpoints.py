"""Orbax checkpoints of a run: the latest train states, and the best trained params.

  workdir/checkpoints/<step>/{state, data}   latest `max_to_keep` states: step, trained params,
                                              optimizer state, rng (frozen params are rebuilt by
                                              the task's init) + the data iterator's JSON state
  workdir/best/<step>/params                 trained params at the best `best_metric`
  <step>/jaxlisa_checksum.json                sha256 of every file of the step's items, written once
                                              the save has finalized; restore verifies it and a
                                              corrupt step is moved to workdir/checkpoints.corrupt/
Uses only the orbax 0.12.8 calls measured to work (CheckpointManager + args.StandardSave/
StandardRestore/JsonSave/JsonRestore/Composite); restores straight into the target shardings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


CHECKSUM_FILE = "jaxlisa_checksum.json"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (does not fit the model, or none verifies)."""


def _item_files(step_dir: str) -> list[str]:
  """Relative paths of the files of a step's items (its subfolders), sorted."""
  out = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    if os.path.samefile(root, step_dir):
      continue  # top-level files are the manager's metadata (and ours)
    out += [os.path.relpath(os.path.join(root, f), step_dir) for f in sorted(files)]
  return out


def checksum(step_dir: str) -> dict[str, str]:
  """{relative path: sha256 hex} of every file in a step's item folders."""
  sums = {}
  for rel in _item_files(step_dir):
    h = hashlib.sha256()
    with open(os.path.join(step_dir, rel), "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 22), b""):
        h.update(chunk)
    sums[rel] = h.hexdigest()
  return sums


def write_checksum(step_dir: str) -> None:
  tmp = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
  with open(tmp, "w") as fh:
    json.dump({"sha256": checksum(step_dir)}, fh, indent=0, sort_keys=True)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))


def verify(step_dir: str) -> str | None:
  """None when the step's files match its checksum file (or it has none: a checkpoint saved
  before checksums, or killed between the save and the checksum); else what is wrong."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    logging.warning("checkpoint %s has no %s: not verified", step_dir, CHECKSUM_FILE)
    return None
  try:
    with open(path) as fh:
      expected = json.load(fh)["sha256"]
  except (OSError, ValueError, KeyError) as e:
    return f"unreadable {CHECKSUM_FILE} ({e})"
  actual = checksum(step_dir)
  bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
  if bad:
    return f"{len(bad)} file(s) differ from their checksum: {', '.join(bad[:3])}"
  return None


def _all_finite(tree: Any) -> bool:
  return all(bool(np.isfinite(np.asarray(jax.device_get(x), np.float32)).all())
             for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating))


def shape_problems(metadata: Any, target: Any) -> list[str]:
  """'path: checkpoint [shape] vs model [shape]' for leaves whose shapes differ or that only one
  side has (metadata: orbax's item metadata tree; target: the abstract restore target)."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
            tuple(getattr(v, "shape", ()) or ()) for path, v in leaves}
  a, b = flat(metadata), flat(target)
  out = []
  for k in sorted(set(a) | set(b)):
    if k not in a:
      out.append(f"{k}: not in the checkpoint")
    elif k not in b:
      out.append(f"{k}: not in the model")
    elif a[k] != b[k]:
      out.append(f"{k}: checkpoint {list(a[k])} vs model {list(b[k])}")
  return out


def item_problems(path: str, target: Any, partial: bool = False) -> list[str]:
  """shape_problems of the orbax item folder `path` (a StandardSave / PyTree item, read from its
  metadata only) against `target`; partial: only the top-level keys `target` has. [] when the
  metadata cannot be read (it is only a courtesy: restore decides)."""
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(path).item_metadata.tree
    if partial:
      tree = {k: tree[k] for k in target if k in tree}
    return shape_problems(tree, target)
  except Exception:  # pylint: disable=broad-except
    return []


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def parallel_sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


class Checkpoints:
  """Latest-k train states and the best trained params of one workdir."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2, best_metric: str = "eval/loss",
               best_mode: str = "min", async_save: bool = False):
    if best_mode not in ("min", "max"):
      raise ValueError(f"ckpt.best_mode must be 'min' or 'max', got {best_mode!r}")
    self.best_metric, self.best_mode = best_metric, best_mode
    self.workdir = workdir
    self._unsummed: list[tuple[ocp.CheckpointManager, int]] = []  # saved, checksum not yet written
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
    self._write_checksums()  # of the previous (async) save, before orbax may rotate it away
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state or {})), force=True)
    self._unsummed.append((self.latest, step))
    if not self.latest._options.enable_async_checkpointing:  # pylint: disable=protected-access
      self._write_checksums()
    logging.info("saved checkpoint at step %d", step)

  def _write_checksums(self) -> None:
    """Checksum files for the saves that have finalized (waits for an async one)."""
    if not self._unsummed:
      return
    for manager in {id(m): m for m, _ in self._unsummed}.values():
      manager.wait_until_finished()
    if jax.process_index() == 0:
      for manager, step in self._unsummed:
        step_dir = os.path.join(str(manager.directory), str(step))
        if os.path.isdir(step_dir):
          write_checksum(step_dir)
    self._unsummed = []

  def _quarantine(self, step: int, why: str) -> None:
    """Move a corrupt step out of the manager's folder (workdir/checkpoints.corrupt/<step>-<time>)."""
    src = os.path.join(str(self.latest.directory), str(step))
    dst = os.path.join(self.workdir, "checkpoints.corrupt", f"{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    parallel_sync("jaxlisa_quarantine")
    self.latest.reload()
    logging.warning("checkpoint at step %d is corrupt (%s): moved to %s", step, why, dst)

  def restore(self, step: int, target: dict) -> tuple[dict, dict]:
    """(state, data_state) at `step`; `target` gives shapes, dtypes and shardings (see `abstract`).
    Raises CheckpointError naming the parameters when the checkpoint does not fit `target`."""
    problems = item_problems(os.path.join(str(self.latest.directory), str(step), "state"), target)
    problems.sort(key=lambda p: p.startswith("opt_state"))  # parameters first, their moments after
    if problems:
      raise CheckpointError(
          f"checkpoint {self.latest.directory}/{step} does not fit the model ({len(problems)} difference"
          f"{'s' if len(problems) > 1 else ''}: {'; '.join(problems[:3])}); use another --workdir, or "
          "--config.fresh_start=True to move the old run aside")
    r = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          data=ocp.args.JsonRestore()))
    logging.info("restored checkpoint at step %d", step)
    return r["state"], dict(r["data"] or {})

  def restore_latest(self, target: dict) -> tuple[int, dict, dict] | None:
    """(step, state, data_state) of the newest checkpoint that verifies (checksum, finite
    trained params); corrupt newer ones are moved aside with a warning. None when there is none."""
    steps = sorted(self.latest.all_steps(), reverse=True)
    for step in steps:
      step_dir = os.path.join(str(self.latest.directory), str(step))
      why = verify(step_dir)
      if why is None:
        try:
          state, data_state = self.restore(step, target)
        except CheckpointError:
          raise
        except Exception as e:  # pylint: disable=broad-except  (unreadable bytes)
          first = str(e).splitlines()[0][:200] if str(e) else ""
          if os.path.exists(os.path.join(step_dir, CHECKSUM_FILE)):
            # its bytes are those saved: the model or the program differs, not the checkpoint
            raise CheckpointError(f"cannot restore the checkpoint {step_dir}, whose checksum verifies: "
                                  f"{type(e).__name__}: {first}") from e
          why = f"restore failed: {type(e).__name__}: {first}"
        else:
          if _all_finite(state["trainable"]):
            return step, state, data_state
          why = "non-finite parameters"
      self._quarantine(step, why)
      remaining = self.latest.all_steps()
      if remaining:
        logging.warning("falling back to the checkpoint at step %d", max(remaining))
    if steps:
      logging.warning("no checkpoint in %s verifies: starting from step 0 (the corrupt ones are in %s)",
                      self.latest.directory, os.path.join(self.workdir, "checkpoints.corrupt"))
    return None

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
    if not math.isfinite(value):
      logging.warning("%s=%s at step %d is not finite: not a best checkpoint", self.best_metric, value, step)
      return False
    if not self.is_better(value) or step in self.best.all_steps():
      return False
    self._write_checksums()
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   metrics={self.best_metric: value}, force=True)
    self._unsummed.append((self.best, step))
    if not self.best._options.enable_async_checkpointing:  # pylint: disable=protected-access
      self._write_checksums()
    logging.info("new best %s=%.5f at step %d", self.best_metric, value, step)
    return True

  def restore_best(self, target: Any | None = None) -> tuple[int, Any]:
    step = self.best.best_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint in {self.best.directory}")
    why = verify(os.path.join(str(self.best.directory), str(step)))
    if why is not None:
      raise CheckpointError(f"best checkpoint {self.best.directory}/{step} is corrupt: {why}")
    args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
    return step, self.best.restore(step, args=ocp.args.Composite(params=args))["params"]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self._write_checksums()

  def close(self) -> None:
    self._write_checksums()
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
  # a checkpoint of another model: name the parameters (orbax's error names none)
  problems = [p for p in item_problems(path, item, partial=True)
              if not p.endswith("not in the model")]  # a partial restore reads a subset
  if problems:
    raise CheckpointError(
        f"checkpoint {path} does not fit the model ({len(problems)} difference{'s' if len(problems) > 1 else ''}:"
        f" {'; '.join(problems[:3])}); check --config.model.* against {workdir}/config.json")
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                          partial_restore=True))
  logging.info("restored params from %s (step %d)", path, step)
  return (out["trainable"] if latest else out), step
