"""Gradients over microbatches (gradient accumulation with `lax.scan`, weighted by token counts)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


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
