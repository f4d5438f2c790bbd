"""Limits measured in the same run, and model FLOP / byte counts from config shapes.

`Roofline.measure()` times XLA's own dense matmul (the compute limit: `n`^3 in `dtype`, best of
`iters`) and a large array copy (the memory limit: bytes read + written per second), on the default
JAX device. `rate(...)` turns a model's FLOPs and a measured time into achieved FLOP/s and its
fraction of that matmul peak; `bandwidth_fraction(...)` does the same for bytes against the copy
bandwidth (decode's memory roofline).

FLOP conventions (model FLOPs, not executed FLOPs):
  - a matmul [m, k] x [k, n] is 2 m k n;
  - attention counts QK^T and PV over every (query, key) pair the kernel computes: full T x S for
    a causal prefill (XLA's dense attention computes the masked half too); windowed attention
    (SAM) over each window;
  - norms, activations, softmax, RoPE, rel-pos terms and the loss are not counted;
  - a train step is 3x the forward of what it differentiates through (fwd + bwd), remat
    recomputation not counted (MFU convention); frozen towers that no gradient flows into
    count their forward only.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

NOMINAL_PEAKS = {"H200 bf16 dense": 989e12}  # vendor figure, a reference line only


def _best_seconds(fn, iters: int) -> float:
  fn()  # compile / warm
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def matmul_peak(n: int = 2048, dtype=jnp.float32, iters: int = 10) -> float:
  """Best-of-`iters` FLOP/s of one jitted [n, n] x [n, n] matmul in `dtype` (default precision)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / _best_seconds(lambda: mm(a, b).block_until_ready(), iters)


def copy_bandwidth(nbytes: int = 256 << 20, iters: int = 10) -> float:
  """Best-of-`iters` bytes/s of a jitted elementwise pass over an `nbytes` fp32 array, read + write
  counted (2 * nbytes per call). The input is donated so the output reuses its buffer: a fresh
  256 MB output per call would time page faults, not memory (on CPU ~10x lower)."""
  box = [jnp.ones((nbytes // 4,), jnp.float32)]
  step = jax.jit(lambda v: v * 1.0001, donate_argnums=0)

  def run():
    box[0] = step(box[0])
    box[0].block_until_ready()
  return 2 * nbytes / _best_seconds(run, iters)


@dataclasses.dataclass
class Roofline:
  """The limits of this device, measured in this run."""
  peak_flops: float  # FLOP/s, XLA matmul
  bandwidth: float  # bytes/s, XLA copy
  matmul_n: int
  matmul_dtype: str

  @classmethod
  def measure(cls, *, n: int = 2048, dtype=jnp.float32, iters: int = 10, copy_bytes: int = 256 << 20,
              quiet: bool = False) -> "Roofline":
    r = cls(matmul_peak(n, dtype, iters), copy_bandwidth(copy_bytes, iters), n, jnp.dtype(dtype).name)
    if not quiet:
      print(f"roofline on {jax.devices()[0].device_kind} ({jax.default_backend()}): XLA {r.matmul_dtype} "
            f"matmul {n}^3 peak {r.peak_flops / 1e9:.1f} GFLOP/s, copy bandwidth {r.bandwidth / 1e9:.1f} GB/s")
    return r

  def as_dict(self) -> dict:
    return {"peak_gflops": self.peak_flops / 1e9, "copy_gbps": self.bandwidth / 1e9,
            "matmul": f"{self.matmul_n}^3 {self.matmul_dtype}", "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend()}

  def rate(self, name: str, flops: float, seconds: float, quiet: bool = False) -> dict:
    """Achieved FLOP/s of `flops` done in `seconds`, and its fraction of the matmul peak."""
    achieved = flops / seconds
    out = {"model_gflop": flops / 1e9, "achieved_gflops": achieved / 1e9,
           "fraction_of_peak": achieved / self.peak_flops}
    if not quiet:
      print(f"  {name}: {flops / 1e9:.1f} GFLOP in {seconds:.4g} s = {achieved / 1e9:.1f} GFLOP/s, "
            f"{100 * out['fraction_of_peak']:.1f}% of the measured {self.matmul_dtype} matmul peak")
    return out

  def bandwidth_fraction(self, name: str, nbytes: float, seconds: float, quiet: bool = False) -> dict:
    """Bytes that must be read in `seconds` (e.g. per decode step) vs the copy bandwidth."""
    achieved = nbytes / seconds
    out = {"bytes_read_mb": nbytes / 1e6, "achieved_gbps": achieved / 1e9,
           "fraction_of_bandwidth": achieved / self.bandwidth}
    if not quiet:
      print(f"  {name}: {nbytes / 1e6:.1f} MB read in {seconds * 1e3:.3g} ms = {achieved / 1e9:.2f} GB/s, "
            f"{100 * out['fraction_of_bandwidth']:.1f}% of the measured copy bandwidth")
    return out


# ----------------------------------------------------------------------------- FLOP counts
def decoder_flops(c, batch: int, seq: int, kv_len: int | None = None, logits_rows: int | None = None) -> float:
  """Forward FLOPs of a DecoderLM (jaxlisa.models.llm.DecoderConfig `c`) on [batch, seq] tokens
  attending to kv_len keys (default seq); lm_head on logits_rows rows per sequence (default seq)."""
  d, f, v, n_layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
  n, k, h = c.num_attention_heads, c.kv_heads, c.dim_per_head
  s = seq if kv_len is None else kv_len
  tokens = batch * seq
  proj = 2 * d * (n * h + 2 * k * h) + 2 * n * h * d  # q, k, v, o
  mlp = 2 * d * f * (2 if c.family == "opt" else 3)  # fc1/fc2, or gate/up/down
  attn = 4 * n * h * s  # QK^T + PV per query token
  head = 2 * batch * (seq if logits_rows is None else logits_rows) * c.embed_dim * v
  return tokens * n_layers * (proj + mlp + attn) + head


def vit_flops(tokens: int, width: int, mlp: int, layers: int, span: int | list[int]) -> float:
  """Forward FLOPs of `layers` pre-norm ViT blocks on `tokens` tokens; span: keys each query
  attends to (one int, or one per layer)."""
  spans = [span] * layers if isinstance(span, int) else list(span)
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp)
  return sum(per_layer + 4 * tokens * width * sp for sp in spans)


def clip_vision_flops(c, images: int = 1) -> float:
  """CLIP vision tower (jaxlisa.models.clip.CLIPVisionConfig) forward, all layers, incl. patch embedding."""
  patches = (c.image_size // c.patch_size) ** 2
  t = patches + 1
  embed = 2 * patches * c.num_channels * c.patch_size ** 2 * c.hidden_size
  return images * (embed + vit_flops(t, c.hidden_size, c.intermediate_size, c.num_hidden_layers, t))


def sam_encoder_flops(c, images: int = 1) -> float:
  """SAM image encoder (jaxlisa.models.sam.SamConfig) forward: patch embedding, blocks (windowed
  attention over window_size^2 keys, global over the whole grid), neck (1x1 + 3x3 convs)."""
  g = c.img_size // c.patch_size
  t, w = g * g, c.embed_dim
  mlp = c.mlp_dim or int(w * c.mlp_ratio)
  spans = [t if i in c.global_attn_indexes else c.window_size ** 2 for i in range(c.depth)]
  embed = 2 * t * c.in_chans * c.patch_size ** 2 * w
  neck = 2 * t * (w * c.out_chans + 9 * c.out_chans * c.out_chans)
  return images * (embed + vit_flops(t, w, mlp, c.depth, spans) + neck)


# ----------------------------------------------------------------------------- decode bytes
def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def decode_step_bytes(c, params, batch: int, cache_len: int, cache_dtype=None) -> dict:
  """Bytes one decode step must read: every weight except the embedding table (one row per token;
  a tied table is read whole as lm_head) and the whole preallocated KV cache
  (jaxlisa.models.llm.init_cache: [L, B, cache_len, K, H] for k and v; dense attention reads it all)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  weights = 0
  for path, x in flat:
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if "embed_tokens" in name and not c.tie_word_embeddings:
      continue
    weights += x.size * jnp.dtype(x.dtype).itemsize
  itemsize = jnp.dtype(cache_dtype or c.dtype).itemsize
  kv = 2 * c.num_hidden_layers * batch * cache_len * c.kv_heads * c.dim_per_head * itemsize
  return {"weights": weights, "kv_cache": kv, "total": weights + kv}
