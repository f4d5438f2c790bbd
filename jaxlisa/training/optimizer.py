"""Optimizer and learning-rate schedules (the trainable mask is in partition.py, gradient
accumulation in accumulation.py).

The official LISA recipe (DeepSpeed): AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0),
WarmupDecayLR (linear warmup 0 -> lr over 100 steps, then linear decay to 0 at the last step),
gradient clipping at global norm 1.0, 10 microbatches per step. All of it is `config.optim`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_decay", "cosine", "constant")


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules. `step` is the number of updates already applied (optax's count), so
# update t uses the rate DeepSpeed's scheduler gives at last_batch_iteration = t.

def warmup_decay_lr(step, *, peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
                    warmup_type: str = "linear"):
  """DeepSpeed WarmupDecayLR: min + (peak - min) * gamma(step), with W = max(2, warmup_steps):
  gamma = step / W (linear) or log(step + 1) / log(W) (log) while step < W, then
  max(0, (total - step) / max(1, total - W))."""
  w = max(2, warmup_steps)
  step = jnp.asarray(step, jnp.float32)
  if warmup_type == "linear":
    warm = step / w
  elif warmup_type == "log":
    warm = jnp.log(step + 1.0) / math.log(w)
  else:
    raise ValueError(f"unknown warmup_type {warmup_type!r}; expected 'linear' or 'log'")
  decay = jnp.maximum(0.0, (total_steps - step) / max(1.0, total_steps - w))
  gamma = jnp.where(step < w, warm, decay)
  return min_lr + (peak - min_lr) * gamma


def _warmup(step, peak, warmup_steps):
  return peak * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(1, warmup_steps))


def lr_schedule(optim, total_steps: int) -> optax.Schedule:
  """Schedule from `config.optim` (schedule, lr, warmup_steps, warmup_type, min_lr)."""
  name, peak, warm, min_lr = optim.schedule, optim.lr, optim.warmup_steps, optim.min_lr
  if name == "warmup_decay":
    return lambda s: warmup_decay_lr(s, peak=peak, total_steps=total_steps, warmup_steps=warm,
                                     min_lr=min_lr, warmup_type=optim.get("warmup_type", "linear"))
  if name == "cosine":  # linear warmup 0 -> peak, cosine peak -> min_lr at total_steps
    def cosine(s):
      frac = jnp.clip((jnp.asarray(s, jnp.float32) - warm) / max(1, total_steps - warm), 0.0, 1.0)
      cos = min_lr + 0.5 * (peak - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
      return jnp.where(s < warm, _warmup(s, peak, warm), cos)
    return cosine
  if name == "constant":
    return lambda s: _warmup(s, peak, warm) if warm > 0 else jnp.full((), peak, jnp.float32)
  raise ValueError(f"unknown lr schedule {name!r}; expected one of {SCHEDULES}")


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + global-norm clipping from `config.optim`; returns (tx, schedule)."""
  o = config.optim
  schedule = lr_schedule(o, config.total_steps)
  decay_mask = None if o.decay_vectors else (lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule


# Moved to partition.py / accumulation.py; still read here by trainer.py and tasks/__init__.py.
from jaxlisa.training.accumulation import grads_and_metrics  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
from jaxlisa.training.partition import cast_floats, count_params, merge, split, trainable_mask  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
