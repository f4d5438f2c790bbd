"""Shared building blocks: dense maps, embeddings, norms, MLPs, with logical axis names.

Every parameter is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec`
on an abstract init gives logical names that `jaxlisa.parallel` maps to mesh axes with the
rules in the config. Activations are tagged with `constrain`, a no-op without rules.

Parameter names follow flax (`kernel`, `bias`, `scale`, `embedding`); module names follow the
PyTorch originals (`q_proj`, `fc1`, `norm`, ...) so conversion maps stay obvious.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlisa.models import attention as attn_lib

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def dtypes(config) -> dict[str, Any]:
  """`dict(dtype=..., param_dtype=...)` from a config's `dtype` / `param_dtype` names ("float32")."""
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


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


# Named remat policies. Layers tag tensors with `checkpoint_name` (MaxText's names):
# query_proj/key_proj/value_proj (q, k, v), context (attention output before o_proj),
# out_proj, mlpwi (MLP input projections), mlpwo (MLP output).
# "save_dots_no_batch_dims" is jax's dots_with_no_batch_dims_saveable: every matmul without batch
# dimensions is saved (the projections and MLP), attention's batched einsums are recomputed.
# It was called "minimal", which is not MaxText's "minimal"; that name is refused.
RENAMED_REMAT_POLICIES = {"minimal": "save_dots_no_batch_dims"}


def remat_policy(name: str):
  cp = jax.checkpoint_policies
  if name in RENAMED_REMAT_POLICIES:
    raise ValueError(f"remat_policy {name!r} is now called {RENAMED_REMAT_POLICIES[name]!r} "
                     "(jax's dots_with_no_batch_dims_saveable)")
  policies = {
      "full": cp.nothing_saveable,
      "save_dots_no_batch_dims": cp.dots_with_no_batch_dims_saveable,
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


def layer_stack(layer_cls, layer_args: tuple, carry, *xs, length: int, scan: bool, remat_policy: str,
                name: str, in_axes: tuple = (), split_rngs: tuple[str, ...] = ("params",)):
  """`length` layers `layer_cls(*layer_args)` applied in turn to `carry` (call from a compact method).

  The layer is scan-compatible: `(carry, *xs) -> (carry, y)`. `xs[i]` is given whole to every layer
  (`in_axes[i] = nn.broadcast`) or sliced per layer on its leading axis (`in_axes[i] = 0`; a pytree,
  None allowed). `scan=True`: one `nn.scan` named `name`, parameters stacked on a leading 'layers'
  axis; `scan=False`: modules `{name}_0`, `{name}_1`, ... in a Python loop. Returns
  (carry, ys stacked [length, ...] leaf by leaf; None leaves stay None).
  """
  layer = maybe_remat(layer_cls, remat_policy, scanned=scan)
  if scan:
    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={r: True for r in split_rngs},
                      in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(*layer_args, name=name)(carry, *xs)
  ys = []
  for i in range(length):
    args = [x if ax is nn.broadcast else jax.tree.map(lambda a, i=i: a[i], x) for x, ax in zip(xs, in_axes)]
    carry, y = layer(*layer_args, name=f"{name}_{i}")(carry, *args)
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


# ----------------------------------------------------------------------------- ViT blocks
BATCH_LEN_EMBED = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class ViTBlockSpec:
  """One pre-norm ViT block's sizes, numerics and PyTorch module names (CLIP and EVA differ only here).

  names: (first norm, attention, second norm, MLP, attention output projection).
  fused_qkv: one `qkv` kernel [D, 3, N, H] with separate q/v biases [N, H] and none on k (LAVIS
  EVA); otherwise q_proj/k_proj/v_proj [D, N, H] each with a bias [N, H] (HF CLIP).
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  hidden_act: str
  eps: float
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  fused_qkv: bool = False
  qkv_bias: bool = True
  names: tuple[str, str, str, str, str] = ("layer_norm1", "self_attn", "layer_norm2", "mlp", "out_proj")


class ViTSelfAttention(nn.Module):
  """Bidirectional multi-head self-attention, x [B, T, D] -> [B, T, D] (no mask)."""
  spec: ViTBlockSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    kw = dtypes(s)
    n, h = s.num_heads, s.head_dim
    if s.fused_qkv:
      qkv = DenseGeneral((3, n, h), kernel_axes=("embed", None, "heads", "head_dim"), name="qkv", **kw)(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      if s.qkv_bias:
        bias = lambda name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                                       (n, h), kw["param_dtype"]).astype(kw["dtype"])
        q = q + bias("q_bias")
        v = v + bias("v_bias")
    else:
      proj = lambda name: DenseGeneral((n, h), kernel_axes=("embed", "heads", "head_dim"), use_bias=s.qkv_bias,
                                       name=name, **kw)(x)
      q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    out = attn_lib.dot_product_attention(q, k, v, None, scale=h ** -0.5, impl=s.attention_impl)
    out = checkpoint_name(out, "context")
    out = DenseGeneral(x.shape[-1], in_axes=2, kernel_axes=("heads", "head_dim", "embed"), use_bias=True,
                       name=s.names[4], **kw)(out)
    return checkpoint_name(out, "out_proj")


class FeedForward(nn.Module):
  """fc1 -> activation -> fc2: x [B, T, D] -> [B, T, D] through [B, T, mlp_dim]."""
  mlp_dim: int
  hidden_act: str
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
              kernel_init=self.kernel_init)
    y = DenseGeneral(self.mlp_dim, kernel_axes=("embed", "mlp"), name="fc1", **kw)(x)
    y = checkpoint_name(activation(self.hidden_act)(y), "mlpwi")
    y = constrain(y, ("activation_batch", "activation_length", "activation_mlp"))
    y = DenseGeneral(x.shape[-1], kernel_axes=("mlp", "embed"), name="fc2", **kw)(y)
    return checkpoint_name(y, "mlpwo")


class ViTBlock(nn.Module):
  """h = h + attn(norm1(h)); h = h + mlp(norm2(h)). Scan-compatible: h [B, T, D] -> (h, h | None)."""
  spec: ViTBlockSpec
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, _=None):
    s = self.spec
    norm1, attn, norm2, mlp, _out = s.names
    kw = dtypes(s)
    h = constrain(h, BATCH_LEN_EMBED)
    h = h + ViTSelfAttention(s, name=attn)(LayerNorm(eps=s.eps, name=norm1, **kw)(h))
    h = h + FeedForward(s.mlp_dim, s.hidden_act, name=mlp, **kw)(LayerNorm(eps=s.eps, name=norm2, **kw)(h))
    h = constrain(h, BATCH_LEN_EMBED)
    return h, (h if self.collect_hidden else None)


def vit_encoder(spec: ViTBlockSpec, h: jax.Array, *, num_layers: int, scan: bool, remat_policy: str,
                name: str, collect: bool = False):
  """`num_layers` ViT blocks over h [B, T, D] -> (h, stacked block outputs [L, B, T, D] | None)."""
  return layer_stack(ViTBlock, (spec, collect), h, length=num_layers, scan=scan,
                     remat_policy=remat_policy, name=name)
