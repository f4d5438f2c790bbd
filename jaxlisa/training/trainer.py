"""The generic training loop: a task (the `Task` protocol of training/task.py; jaxlisa/tasks has
them) supplies model init, loss, data and the trainable mask; the trainer does mesh, sharded init,
the jitted step, eval, checkpoints, resume.

  task = jaxlisa.tasks.prepared_task(config, workdir)   # the caller picks and prepares the task
  trainer = Trainer(config, workdir, task)  # mesh, optimizer, shardings, jitted functions
  result = trainer.fit(hooks)               # restore-or-init, train to config.total_steps

The train step is `jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
donate_argnums=0)`, compiled ahead of time so the run summary can report its memory per device.
Metrics go to workdir/metrics.jsonl (one JSON object per line); progress reporting is the
caller's (hooks), the library only logs.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlisa import config as cfg_lib
from jaxlisa import parallel
from jaxlisa.training import checkpoints as ckpt_lib
from jaxlisa.training import optimizer as optim_lib
from jaxlisa.training.task import Task
from jaxlisa.training.train_state import TrainState


class Hooks:
  """Progress callbacks for the caller (the CLI draws its progress bar with these)."""

  def on_start(self, step: int, total_steps: int, info: dict[str, Any]) -> None:
    pass

  def on_step(self, step: int) -> None:
    """After update `step` has been dispatched (not waited for)."""

  def on_log(self, step: int, metrics: dict[str, float]) -> None:
    pass

  def on_eval(self, step: int, metrics: dict[str, float]) -> None:
    pass

  def on_checkpoint(self, step: int) -> None:
    pass

  def close(self) -> None:
    pass


class MetricWriter:
  """Append-only workdir/metrics.jsonl: {"step": s, "train/loss": ..., ...} per line (process 0
  writes; the others' calls do nothing)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def truncate(self, step: int) -> None:
    """Drop rows after `step` (logged by a run that died before its next checkpoint) and lines a
    kill tore; the file is rewritten atomically (temp file + rename)."""
    if not parallel.is_primary():
      return
    rows, torn = _read_rows(self.path)
    if torn or any(r["step"] > step for r in rows):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
      os.replace(tmp, self.path)
      if torn:
        logging.warning("%s: dropped %d torn or unreadable line(s)", self.path, torn)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not parallel.is_primary():
      return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
    with open(self.path, "a") as fh:  # one write per row: a kill leaves at most a torn last line
      fh.write(line)


def _read_rows(path: str) -> tuple[list[dict], int]:
  """(rows, number of lines that are not a JSON object with a step: a torn last line)."""
  if not os.path.exists(path):
    return [], 0
  rows, torn = [], 0
  with open(path, errors="replace") as fh:
    for line in fh:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
          raise ValueError("no step")
      except ValueError:
        torn += 1
        continue
      rows.append(row)
  return rows, torn


def read_metrics(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl (lines a kill tore are left out)."""
  return _read_rows(os.path.join(workdir, "metrics.jsonl"))[0]


class NonFiniteError(RuntimeError):
  """Training stopped: loss or gradients were not finite for optim.max_consecutive_nonfinite steps."""


class SkipCounter:
  """Host-side count of skipped (non-finite) steps from the train step's per-step 'skipped' flag.

  Flags stay on device until `flush` (at log steps, or when `limit` are pending), so the loop
  does not wait on every step."""

  def __init__(self, limit: int):
    self.limit, self.pending, self.total, self.consecutive = int(limit), [], 0, 0

  def add(self, flag) -> None:
    self.pending.append(flag)

  def due(self) -> bool:
    return self.limit > 0 and len(self.pending) >= self.limit

  def flush(self, step: int) -> None:
    """Count the pending flags (the last one belongs to `step`); raise NonFiniteError at the limit."""
    flags, self.pending = jax.device_get(self.pending), []
    for f in flags:
      if float(f) > 0:
        self.total += 1
        self.consecutive += 1
      else:
        self.consecutive = 0
    if self.limit > 0 and self.consecutive >= self.limit:
      raise NonFiniteError(
          f"training stopped at step {step}: loss or gradients not finite for {self.consecutive} consecutive "
          f"steps ({self.total} skipped in all; parameters are those of the last finite step); lower "
          "optim.lr or raise optim.max_consecutive_nonfinite (0 = never stop)")


def check_optim(config) -> None:
  """Reject learning rates no run can use (non-finite, or not positive) with a ConfigError."""
  o = config.optim
  for key in ("lr", "min_lr", "grad_clip", "weight_decay", "eps", "b1", "b2"):
    if key in o and not math.isfinite(float(o[key])):
      raise cfg_lib.ConfigError(f"config.optim.{key} must be finite, got {o[key]!r}")
  if not float(o.lr) > 0:
    raise cfg_lib.ConfigError(f"config.optim.lr must be > 0, got {o.lr!r}")
  if float(o.min_lr) < 0 or float(o.min_lr) > float(o.lr):
    raise cfg_lib.ConfigError(f"config.optim.min_lr must be in [0, optim.lr={o.lr:g}], got {o.min_lr!r}")
  if int(o.get("max_consecutive_nonfinite", 0)) < 0:
    raise cfg_lib.ConfigError("config.optim.max_consecutive_nonfinite must be >= 0 (0 = never stop), "
                              f"got {o.max_consecutive_nonfinite!r}")


def _every(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


class Trainer:
  """Owns the mesh, the task, the optimizer, the shardings and the jitted init/train/eval."""

  def __init__(self, config, workdir: str, task: Task, devices=None):
    """task: what to train (prepared: its data and tokenizer written); devices: the mesh's devices
    (default jax.devices()); e.g. an AOT topology's (tools/plan.py)."""
    self.config, self.workdir = config, workdir
    check_optim(config)
    os.makedirs(workdir, exist_ok=True)
    self.mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
    self.rules = parallel.axis_rules(config.logical_axis_rules)
    self.task = task
    self.tx, self.schedule = optim_lib.make_optimizer(config)
    self.num_microbatches = int(config.grad_accum)
    shards = parallel.num_batch_shards(self.mesh)
    if config.batch_size % (self.num_microbatches * shards):
      raise ValueError(f"batch_size {config.batch_size} must divide by grad_accum {self.num_microbatches} "
                       f"x batch shards (data*fsdp) {shards}")
    self.rng = jax.random.PRNGKey(config.seed)
    self._build_shardings()
    self.init_state = jax.jit(self._init_state, out_shardings=self.state_sharding)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, None), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding, self.batch_sharding))
    self.checkpoints = ckpt_lib.Checkpoints(
        workdir, max_to_keep=config.ckpt.max_to_keep, best_metric=config.ckpt.best_metric,
        best_mode=config.ckpt.best_mode, async_save=config.ckpt.async_save)
    self.writer = MetricWriter(workdir)
    self.compile_info: dict[str, Any] = {}

  # ---------------------------------------------------------------------------------------------
  # Shardings and pure functions.

  def _build_shardings(self):
    with parallel.use(self.mesh, self.rules):
      boxed = jax.eval_shape(self.task.init, self.rng)
    abstract = nn.meta.unbox(boxed)
    self.mask = self.task.trainable_mask(abstract)
    param_sh = parallel.logical_shardings(boxed, self.mesh, self.rules)
    train_sh, frozen_sh = optim_lib.split(param_sh, self.mask)
    abs_train, _ = optim_lib.split(abstract, self.mask)
    abs_train = jax.eval_shape(lambda t: optim_lib.cast_floats(t, self.config.master_dtype), abs_train)
    repl = parallel.replicated(self.mesh)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abs_train), train_sh,
                                   transform_non_params=lambda _: repl,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    self.state_sharding = TrainState(step=repl, trainable=train_sh, frozen=frozen_sh, opt_state=opt_sh, rng=repl)
    self.batch_sharding = NamedSharding(self.mesh, P(parallel.BATCH_AXES))  # a prefix for every batch leaf
    self.num_params = optim_lib.count_params(abstract)
    self.num_trainable = optim_lib.count_params(abs_train)

  def _init_state(self, rng) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    params = nn.meta.unbox(self.task.init(init_rng))
    trained, frozen = optim_lib.split(params, self.mask)
    trained = optim_lib.cast_floats(trained, self.config.master_dtype)
    frozen = optim_lib.cast_floats(frozen, self.config.frozen_dtype)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trained, frozen=frozen,
                      opt_state=self.tx.init(trained), rng=train_rng)

  def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(trained, mb, r):  # gradients w.r.t. the trained subtree only
      return self.task.loss(optim_lib.merge(trained, state.frozen), mb, r, True)

    grads, metrics = optim_lib.grads_and_metrics(loss_fn, state.trainable, batch, rng, self.num_microbatches)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
    trained = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.global_norm(grads)
    metrics.update(lr=self.schedule(state.step), grad_norm=grad_norm)
    if self.config.optim.skip_nonfinite:
      # A non-finite loss or gradient skips the update: params and optimizer state stay as they
      # were (the batch is consumed and the step counter moves on, so data and schedule do too).
      ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
      trained, opt_state = keep(trained, state.trainable), keep(opt_state, state.opt_state)
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return state.replace(step=state.step + 1, trainable=trained, opt_state=opt_state), metrics

  def _eval_step(self, state: TrainState, batch: dict) -> dict:
    return self.task.eval_step(state.params, batch, state.rng)

  # ---------------------------------------------------------------------------------------------
  # Host side.

  def device_batch(self, batch: dict) -> dict:
    """Host numpy batch (this process's rows, or on several processes the whole global batch of
    config.batch_size rows) -> global arrays sharded over (data, fsdp)."""
    return parallel.distributed.global_batch(batch, self.batch_sharding, int(self.config.batch_size))

  def load_params(self, state: TrainState, params: dict) -> TrainState:
    """Place a (partial) nested dict of host arrays over the state's params, in their dtypes and
    shardings. Every given leaf must exist with the same shape."""
    flat = traverse_util.flatten_dict(params)
    trained, frozen = traverse_util.flatten_dict(state.trainable), traverse_util.flatten_dict(state.frozen)
    problems = []
    for k, v in flat.items():
      target = trained.get(k, frozen.get(k))
      if target is None:
        problems.append(f"{'/'.join(map(str, k))}: no such parameter")
      elif np.shape(v) != target.shape:
        problems.append(f"{'/'.join(map(str, k))}: shape {np.shape(v)} != {target.shape}")
    if problems:
      raise ValueError("pretrained params do not fit the model:\n  " + "\n  ".join(problems[:20]))
    for k, v in flat.items():
      tree = trained if k in trained else frozen
      tree[k] = jax.device_put(np.asarray(v).astype(tree[k].dtype), tree[k].sharding)
    logging.info("loaded %d pretrained tensors (%d trained, %d frozen)", len(flat),
                 sum(k in trained for k in flat), sum(k in frozen for k in flat))
    return state.replace(trainable=traverse_util.unflatten_dict(trained), frozen=traverse_util.unflatten_dict(frozen))

  def restore_or_init(self):
    """(state, data iterator, start step): init, the task's pretrained weights (frozen ones are
    not checkpointed), then the latest checkpoint when there is one."""
    with parallel.use(self.mesh, self.rules):
      state = self.init_state(self.rng)
    pretrained = self.task.pretrained()
    if pretrained:
      state = self.load_params(state, pretrained)
    data = self.task.train_data()
    restored = self.checkpoints.restore_latest(ckpt_lib.abstract(state.saved()))
    if restored is not None:
      step, saved, data_state = restored
      state = state.with_saved(saved)
      if data_state:
        data.set_state(data_state)
      logging.info("resumed from %s at step %d", self.checkpoints.latest.directory, step)
    return state, data, int(state.step)

  def evaluate(self, state: TrainState, batches: Iterable[dict] | None = None) -> dict[str, float]:
    """The task's eval_summary of the weighted means of its eval_step over one pass of eval data."""
    batches = self.task.eval_data() if batches is None else batches
    if batches is None:
      return {}
    sums, total = {}, 0.0
    with parallel.use(self.mesh, self.rules):
      for batch in batches:
        out = jax.device_get(self.eval_step(state, self.device_batch(batch)))
        w = float(out.pop("weight", 1.0))
        total += w
        for k, v in out.items():
          sums[k] = sums.get(k, 0.0) + float(v) * w
    means = {k: v / max(total, 1e-12) for k, v in sums.items()}
    return {f"eval/{k}": float(v) for k, v in self.task.eval_summary(means).items()}

  def describe(self) -> dict[str, Any]:
    c = self.config
    info = {
        "task": c.task,
        "params": f"{self.num_params:,} ({self.num_trainable:,} trained, "
                  f"{self.num_params - self.num_trainable:,} frozen)",
        "mesh": parallel.describe(self.mesh),
        "batch": f"{c.batch_size} per step ({self.num_microbatches} microbatch"
                 f"{'es' if self.num_microbatches > 1 else ''})",
        "steps": c.total_steps,
        "optimizer": f"adamw lr={c.optim.lr:g} {c.optim.schedule} warmup={c.optim.warmup_steps} "
                     f"b=({c.optim.b1:g},{c.optim.b2:g}) wd={c.optim.weight_decay:g} clip={c.optim.grad_clip:g}",
    }
    info.update(self.task.describe())
    info.update(self.compile_info)
    return info

  def _compile(self, state, batch):
    t = time.time()
    with parallel.use(self.mesh, self.rules):
      compiled = self.train_step.lower(state, batch).compile()
    self.compile_info["compile"] = f"{time.time() - t:.1f} s"
    try:
      mem = compiled.memory_analysis()
      peak = getattr(mem, "peak_memory_in_bytes", 0) or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                         + mem.temp_size_in_bytes)
      self.compile_info["memory"] = f"{peak / 2**20:,.1f} MiB peak per device"
    except Exception:  # pylint: disable=broad-except
      pass
    return compiled

  def fit(self, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train from the latest checkpoint (or from scratch) to config.total_steps (or stop_after).

    Returns {'start_step', 'step', 'train': last train metrics, 'eval': last eval metrics,
    'seconds'}."""
    c, hooks = self.config, hooks or Hooks()
    t_start = time.time()
    state, data, start = self.restore_or_init()
    self.writer.truncate(start)
    end = c.total_steps if c.stop_after < 0 else min(c.total_steps, start + c.stop_after)
    result = {"start_step": start, "step": start, "train": {}, "eval": {}}
    if start >= end:
      logging.info("nothing to do: at step %d of %d", start, c.total_steps)
      hooks.on_start(start, c.total_steps, self.describe())
      result["seconds"] = time.time() - t_start
      return result
    batch = self.device_batch(next(data))
    executables = {}  # one AOT-compiled step per batch shape (sequence / mask buckets)

    def executable(state, batch):
      key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch))
      if key not in executables:
        if executables:
          logging.info("compiling the train step for a new batch shape (%d so far)", len(executables))
        executables[key] = self._compile(state, batch)
      return executables[key]

    def step_fn(state, batch):
      return executable(state, batch)(state, batch)

    executable(state, batch)  # compile before the summary, which reports compile time and memory
    info = self.describe()
    logging.info("training %s", "; ".join(f"{k}: {v}" for k, v in info.items()))
    hooks.on_start(start, c.total_steps, info)
    t_log, step_log = time.time(), start
    step = start
    skips = SkipCounter(c.optim.max_consecutive_nonfinite)
    while True:
      state, metrics = step_fn(state, batch)
      step += 1
      if "skipped" in metrics:
        skips.add(metrics["skipped"])
      hooks.on_step(step)
      last = step == end
      log_now = _every(step, c.log_every) or last or step == start + 1
      if log_now or skips.due():
        try:
          skips.flush(step)
        except NonFiniteError:
          self.writer.write(step, {"train/skipped_steps": skips.total})
          self.checkpoints.wait()
          raise
      if log_now:
        m = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items() if k not in ("weight", "skipped")}
        if "skipped" in metrics:
          m["train/skipped_steps"] = float(skips.total)
        now = time.time()
        m["train/step_time"] = (now - t_log) / (step - step_log)
        t_log, step_log = now, step
        self.writer.write(step, m)
        hooks.on_log(step, m)
        result["train"] = m
      if (_every(step, c.eval_every) or (last and c.eval_every >= 0)):
        ev = self.evaluate(state)
        if ev:
          self.writer.write(step, ev)
          hooks.on_eval(step, ev)
          self.checkpoints.maybe_save_best(step, state.trainable, ev)
          result["eval"] = ev
        t_log = time.time()  # eval time is not step time
      if _every(step, c.ckpt_every) or (last and c.ckpt_every >= 0):
        self.checkpoints.save(step, state.saved(), data.get_state())
        hooks.on_checkpoint(step)
        t_log = time.time()
      if last:
        break
      batch = self.device_batch(next(data))
    self.checkpoints.wait()
    result.update(step=step, seconds=time.time() - t_start, state=state)
    if not math.isfinite(result["train"].get("train/loss", 0.0)):
      logging.error("training loss is not finite: %s", result["train"])
    return result

  def close(self):
    self.checkpoints.close()
