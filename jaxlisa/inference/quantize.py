"""int8 weight-only inference: dense kernels stored as int8 + a float32 scale per output channel,
dequantized inside the jitted forward (HBM / host memory holds int8; compute stays in the model's dtype).

  params = quantize_params(params, where=("llava", "language_model"))   # the LLM's dense kernels
  logits = module.apply({"params": params}, ...)                        # unchanged model code

A quantized kernel is an `Int8Kernel` pytree (leaves q int8 [...kernel shape], scale float32 with the
kernel's rank, 1 on the reduced axes). The models' DenseGeneral reads its kernel as
`kernel.astype(dtype)` (jaxlisa/models/layers.py), which for an Int8Kernel is `q * scale` in `dtype`:
no model code changes, and the dequantize is traced into whichever jit runs the model.

Granularity: symmetric, per channel of the kernel's last axis (for [in, out] kernels: per output
feature; for attention's [embed, heads, head_dim] q/k/v kernels: per head_dim column shared by the
heads; for o_proj [heads, head_dim, embed]: per output feature), with a leading scanned-layers axis
kept (one scale set per layer). Embedding tables and norms stay as they are.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MODES = ("", "none", "int8")


@jax.tree_util.register_pytree_node_class
class Int8Kernel:
  """q int8 [*shape], scale float32 [*shape with reduced axes = 1]; behaves as the float kernel
  where the models read kernels (`.shape`, `.ndim`, `.dtype`, `.astype`)."""

  def __init__(self, q, scale):
    self.q, self.scale = q, scale

  def tree_flatten(self):
    return (self.q, self.scale), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  @property
  def shape(self):
    return self.q.shape

  @property
  def ndim(self):
    return len(self.q.shape)

  @property
  def dtype(self):
    return self.scale.dtype

  def astype(self, dtype):
    """The dequantized kernel q * scale, in `dtype`."""
    return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

  def __jax_array__(self):
    return self.astype(jnp.float32)


def quantize_kernel(kernel, layer_axis: bool) -> Int8Kernel:
  """float [*shape] -> Int8Kernel: scale = max |kernel| / 127 over every axis but the last (and the
  leading layer axis when `layer_axis`), q = round(kernel / scale)."""
  k = jnp.asarray(kernel, jnp.float32)
  axes = tuple(range(1 if layer_axis else 0, k.ndim - 1))
  scale = jnp.max(jnp.abs(k), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(k / scale), -127, 127).astype(jnp.int8)
  return Int8Kernel(q, scale.astype(jnp.float32))


def quantize_params(params: dict, where: Sequence[str] = (), scanned: str = "layers") -> dict:
  """params with every `kernel` leaf under the path `where` (a prefix of keys; () = everywhere) as an
  Int8Kernel. Kernels under a module named `scanned` keep their leading (layers) axis unreduced."""
  flat = traverse_util.flatten_dict(params)
  where = tuple(where)
  out = {}
  for path, leaf in flat.items():
    if path[:len(where)] == where and path[-1] == "kernel" and np.ndim(leaf) >= 2:
      out[path] = quantize_kernel(leaf, layer_axis=scanned in path[len(where):-1] and np.ndim(leaf) >= 3)
    else:
      out[path] = leaf
  return traverse_util.unflatten_dict(out)


def param_bytes(params) -> int:
  """Bytes of every array leaf (an Int8Kernel counts its int8 q and float32 scale)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
