"""Cross entropy as PyTorch computes it, the one written for every family.

`cross_entropy` is `torch.nn.CrossEntropyLoss(label_smoothing=eps, ignore_index=-100)`: mean over
the targets that are not ignored of (1 - eps) * NLL + eps * mean_c(-log p_c), fp32 math.
`causal_lm_cross_entropy` is the HF causal-LM loss built on it: position t's logits predict
labels[t + 1]. Both are pure functions, so models (BLIP, BLIP-2, MiniGPT4-Qwen) and training
(LISA, the LM task) share them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlisa.constants import IGNORE_INDEX


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """logits [..., V], labels [...] int -> scalar mean CE over labels != ignore_index (0 if none)."""
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_index
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))  # NLL
  if label_smoothing:
    smooth = -jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)
    per_token = (1.0 - label_smoothing) * per_token + label_smoothing * smooth
  n = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(n, 1)


def causal_lm_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                            ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """logits [..., T, V], labels [..., T] -> mean CE of logits[..., :-1] against labels[..., 1:]."""
  return cross_entropy(logits[..., :-1, :], labels[..., 1:], label_smoothing, ignore_index)
