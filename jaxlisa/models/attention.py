"""One attention entry point for every model, rotary embeddings and mask construction.

`dot_product_attention(..., impl=...)` is the single switch:
  - "xla":    `jax.nn.dot_product_attention(implementation="xla")`, any backend (CPU tests).
  - "cudnn":  the cuDNN fused flash kernel on NVIDIA GPUs (bf16/fp16 inputs).
  - "auto":   let JAX choose (cudnn where it applies, else xla).
TPU Pallas splash attention is not wired in: "splash" is refused with the others unknown (use
"xla" on TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "auto")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          *, bias: jax.Array | None = None, scale: float | None = None,
                          impl: str = "xla") -> jax.Array:
  """Softmax attention.

  q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (grouped-query attention);
  mask: bool, broadcastable to [B, N, T, S] (True = attend); bias: additive, same broadcast.
  Returns [B, T, N, H]. A query row with no allowed key gets a uniform softmax (as PyTorch
  does with a finite minimum), so padded queries stay finite.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
  implementation = None if impl == "auto" else impl
  if implementation == "xla" and mask is not None:
    # Fold the mask into an additive bias with a finite minimum: fully masked rows then give a
    # uniform distribution (like PyTorch/HF) instead of NaN.
    neg = jnp.asarray(jnp.finfo(jnp.float32).min, q.dtype) if q.dtype == jnp.float32 else \
        jnp.asarray(-1e9 if q.dtype == jnp.float16 else jnp.finfo(q.dtype).min, q.dtype)
    m_bias = jnp.where(mask, jnp.asarray(0, q.dtype), neg)
    bias = m_bias if bias is None else bias.astype(q.dtype) + m_bias
    mask = None
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=implementation)


def make_attention_mask(kv_mask: jax.Array, q_len: int, *, q_offset: jax.Array | int = 0,
                        causal: bool = True, sliding_window: int | None = None) -> jax.Array:
  """Boolean mask [B, 1, T, S] from a key padding mask.

  kv_mask: [B, S] (1 = real token) over key slots 0..S-1; query t sits at slot q_offset + t
  (q_offset is the KV-cache write index, 0 without a cache). Causal keeps keys at slots <= the
  query's; a sliding window of W keeps keys with (query slot - key slot) < W (Mistral).
  """
  s = kv_mask.shape[-1]
  q_slot = jnp.arange(q_len)[:, None] + q_offset
  k_slot = jnp.arange(s)[None, :]
  allowed = jnp.ones((q_len, s), bool)
  if causal:
    allowed &= k_slot <= q_slot
  if sliding_window is not None:
    allowed &= (q_slot - k_slot) < sliding_window
  return allowed[None, None] & kv_mask.astype(bool)[:, None, None, :]


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids from a padding mask [B, T]: cumsum - 1 over real tokens, 1 on padding
  (what HF `generate` builds), so left- and right-padded rows get the same positions."""
  mask = mask.astype(jnp.int32)
  pos = jnp.cumsum(mask, axis=-1) - 1
  return jnp.where(mask == 1, pos, 1)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 scaling_factor: float = 1.0, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Rotate-half RoPE tables: positions [B, T] -> cos, sin [B, T, head_dim] (HF layout:
  frequencies repeated over the two halves). `scaling_factor` is linear position scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  inv_freq = inv_freq / scaling_factor
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, H] rotated with cos/sin [B, T, H] (rotate-half convention, as HF LLaMA)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
