"""A plain decoder-LM train step for the benchmarks (bench/llm.py, bench/gpu.py): next-token
cross-entropy over every position, jax.value_and_grad, one optax update. Self-contained on
purpose, so the measured program is the model's forward + backward + AdamW and nothing else."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(module, params, ids: jax.Array) -> jax.Array:
  """ids [B, T] -> mean cross-entropy of logits[:, :-1] (fp32) against ids[:, 1:]."""
  logits = module.apply({"params": params}, ids).logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def make_train_step(module, tx: optax.GradientTransformation):
  """(params, opt_state, ids [B, T]) -> (params, opt_state, loss), jitted with params and
  opt_state donated."""
  def step(params, opt_state, ids):
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(module, p, ids))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))
