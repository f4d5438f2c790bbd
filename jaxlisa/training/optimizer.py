"""Optimizer, learning-rate schedules, the trainable mask and gradient accumulation.

The official LISA recipe (DeepSpeed): AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0),
WarmupDecayLR (linear warmup 0 -> lr over 100 steps, then linear decay to 0 at the last step),
gradient clipping at global norm 1.0, 10 microbatches per step. All of it is `config.optim`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

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


# ----------------------------------------------------------------------------------------------
# Trainable mask: split params into a trained and a frozen subtree (disjoint leaves, nested dicts).

def path_str(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def trainable_mask(params: Any, trainable: Sequence[str] = (".*",), frozen: Sequence[str] = ()) -> Any:
  """Tree of bools like `params`: True where '/'-joined path fully matches a `trainable` regex and
  no `frozen` regex. A regex that matches no parameter is an error (it is almost always a typo)."""
  flat = traverse_util.flatten_dict(params)
  paths = {k: path_str(k) for k in flat}
  for pattern in (*trainable, *frozen):
    if not any(re.fullmatch(pattern, p) for p in paths.values()):
      sample = ", ".join(sorted(paths.values())[:8])
      raise ValueError(f"trainable/frozen regex {pattern!r} matches no parameter (paths look like: {sample}, ...)")
  def is_trained(p):
    return any(re.fullmatch(t, p) for t in trainable) and not any(re.fullmatch(f, p) for f in frozen)
  return traverse_util.unflatten_dict({k: is_trained(p) for k, p in paths.items()})


def split(params: Any, mask: Any) -> tuple[dict, dict]:
  """(trained, frozen) nested dicts holding the leaves where `mask` is True / False."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trained = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def merge(trained: Any, frozen: Any) -> dict:
  """Inverse of `split`."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trained))
  return traverse_util.unflatten_dict(flat)


def cast_floats(tree: Any, dtype: str | None) -> Any:
  """Cast floating leaves (boxed or not) to `dtype`; '' or None keeps them."""
  if not dtype:
    return tree
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))


# ----------------------------------------------------------------------------------------------
# Gradients over microbatches.

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def grads_and_metrics(loss_fn: LossFn, params: Any, batch: dict, rng: jax.Array,
                      num_microbatches: int = 1) -> tuple[Any, dict]:
  """Gradient of the weighted mean loss over `num_microbatches` slices of `batch`.

  loss_fn(params, batch, rng) -> (loss, aux); aux may hold 'weight' (e.g. the number of target
  tokens; default 1) and other scalar metrics. The objective is sum_i w_i loss_i / sum_i w_i, so
  token-weighted losses over k microbatches equal the loss over the whole batch; without weights
  each microbatch counts the same (DeepSpeed's gradient accumulation). Microbatch i holds rows
  i, i + k, i + 2k, ... so every batch shard contributes to every microbatch.
  Returns (grads in float32 like `params`, metrics {loss, weight, **aux} weighted means).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def one(mb, r):
    (loss, aux), g = grad_fn(params, mb, r)
    aux = dict(aux)
    w = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
    g = jax.tree.map(lambda x: x.astype(jnp.float32) * w, g)
    sums = {"loss": loss.astype(jnp.float32) * w, **{k: jnp.asarray(v, jnp.float32) * w for k, v in aux.items()}}
    return g, sums, w

  k = num_microbatches
  if k == 1:
    g, sums, w = one(batch, rng)
  else:
    def to_micro(x):
      if x.shape[0] % k:
        raise ValueError(f"batch dim {x.shape[0]} does not split into {k} microbatches")
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
    micro = jax.tree.map(to_micro, batch)
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), rng))

    def body(carry, xs):
      return jax.tree.map(jnp.add, carry, one(*xs)), None

    (g, sums, w), _ = jax.lax.scan(body, zeros, (micro, rngs))
  w_safe = jnp.maximum(w, 1e-12)
  grads = jax.tree.map(lambda x: x / w_safe, g)
  metrics = {name: v / w_safe for name, v in sums.items()}
  metrics["weight"] = w
  return grads, metrics
