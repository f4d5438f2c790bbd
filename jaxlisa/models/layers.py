"""Shared building blocks: dense maps, embeddings, norms, MLPs, with logical axis names.

Every parameter is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec`
on an abstract init gives logical names that `jaxlisa.parallel` maps to mesh axes with the
rules in the config. Activations are tagged with `constrain`, a no-op without rules.

Parameter names follow flax (`kernel`, `bias`, `scale`, `embedding`); module names follow the
PyTorch originals (`q_proj`, `fc1`, `norm`, ...) so conversion maps stay obvious.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def constrain(x: jax.Array, names: Axes) -> jax.Array:
  """Logical sharding constraint on an activation (no-op outside `nn.logical_axis_rules`)."""
  return nn.with_logical_constraint(x, names)


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class DenseGeneral(nn.Module):
  """y = x @ W (+ b) over the trailing `len(in_axes)` axes of x, with optional LoRA.

  kernel: [*in_features, *features] with logical names `kernel_axes` (one per kernel dim).
  x: [..., *in_features] -> y: [..., *features].

  LoRA (`lora_rank > 0`): y += dropout(x) @ A @ B * (alpha / rank), A: [*in_features, r]
  (kaiming-uniform as PEFT), B: [r, *features] (zeros), so a fresh adapter is the identity.
  """

  features: int | Sequence[int]
  in_axes: int = 1  # how many trailing axes of x are contracted
  kernel_axes: Axes = ()
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    features = _as_tuple(self.features)
    in_features = x.shape[x.ndim - self.in_axes:]
    kshape = tuple(in_features) + features
    axes = self.kernel_axes or (None,) * len(kshape)
    assert len(axes) == len(kshape), (self.name, axes, kshape)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, axes), kshape,
                        self.param_dtype)
    x = x.astype(self.dtype)
    contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
    y = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, axes[self.in_axes:]),
                        features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank > 0:
      a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                in_axis=tuple(range(self.in_axes)),
                                                out_axis=-1)
      lora_a = self.param("lora_a", nn.with_logical_partitioning(a_init, axes[:self.in_axes] + (None,)),
                          tuple(in_features) + (self.lora_rank,), self.param_dtype)
      lora_b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 (None,) + axes[self.in_axes:]),
                          (self.lora_rank,) + features, self.param_dtype)
      xd = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic)
      h = jax.lax.dot_general(xd, lora_a.astype(self.dtype), (contract, ((), ())))
      h = jax.lax.dot_general(h, lora_b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
      y = y + h * (self.lora_alpha / self.lora_rank)
    return y


def Dense(features: int, kernel_axes: Axes = (), **kw) -> DenseGeneral:  # pylint: disable=invalid-name
  """A plain [in, out] linear layer (PyTorch `nn.Linear` with the kernel transposed)."""
  return DenseGeneral(features=features, kernel_axes=kernel_axes, **kw)


class Embed(nn.Module):
  """Token embedding table `embedding: [num_embeddings, features]` ('vocab', 'embed')."""

  num_embeddings: int
  features: int
  axes: Axes = ("vocab", "embed")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Callable = default_kernel_init

  def setup(self):
    self.embedding = self.param("embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [...] int -> [..., features]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x [..., features] -> logits [..., num_embeddings]."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: computed in fp32, cast back to the input dtype, then times `scale`."""

  eps: float = 1e-6
  axis_name: str = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with an explicit eps (PyTorch default 1e-5), stats in fp32."""

  eps: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  axis_name: str = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    if self.use_scale:
      y = y * self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                         (d,), self.param_dtype).astype(jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                         (d,), self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # PyTorch nn.GELU() is exact
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# Named remat policies (MaxText vocabulary). Layers tag tensors with `checkpoint_name`:
# query_proj/key_proj/value_proj (q, k, v), context (attention output before o_proj),
# out_proj, mlpwi (MLP input projections), mlpwo (MLP output).
def remat_policy(name: str):
  cp = jax.checkpoint_policies
  policies = {
      "full": cp.nothing_saveable,
      "minimal": cp.dots_with_no_batch_dims_saveable,
      "save_dot_except_mlp": cp.save_only_these_names("query_proj", "key_proj", "value_proj",
                                                      "context", "out_proj"),
      "save_qkv_proj": cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
      "save_out_proj": cp.save_only_these_names("out_proj"),
      "everything": cp.everything_saveable,
  }
  if name not in policies:
    raise ValueError(f"unknown remat_policy {name!r}; known: {sorted(policies) + ['none']}")
  return policies[name]


def maybe_remat(module_cls, policy: str, static_argnums: tuple[int, ...] = (), scanned: bool = True):
  """`nn.remat` the module class with a named policy; 'none' returns it unchanged."""
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(policy), prevent_cse=not scanned,
                  static_argnums=static_argnums)
