"""LoRA merge: kernel += A @ B * (alpha / r), then the adapters are dropped (the export of a
LoRA-trained model; `conversion.lisa.export_lisa` and `conversion.convert.export_checkpoint` call it).

Adapters live next to their kernel (`.../q_proj/{kernel, lora_a, lora_b}`, see
models/layers.DenseGeneral): lora_a [*S, *in, r], lora_b [*S, r, *out], kernel [*S, *in, *out],
where *S are stacked (scanned) layer axes.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def merge_lora(params: Mapping[str, Any], alpha: float, rank: int) -> dict:
  """A copy of `params` with every LoRA adapter folded into its kernel (numpy, float32 math), so
  the plain layer computes what `DenseGeneral` computes with the adapter (dropout off)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      out[k] = merge_lora(v, alpha, rank)
    elif k not in ("lora_a", "lora_b"):
      out[k] = v
  if "lora_a" in params and "lora_b" in params:
    kernel = np.asarray(params["kernel"])
    a = np.asarray(params["lora_a"], np.float32)
    b = np.asarray(params["lora_b"], np.float32)
    stacked = a.ndim + b.ndim - 2 - kernel.ndim
    s_shape = a.shape[:stacked]
    n_in = int(np.prod(a.shape[stacked:-1]))
    a2 = a.reshape((int(np.prod(s_shape)), n_in, rank))
    b2 = b.reshape((int(np.prod(s_shape)), rank, -1))
    delta = np.einsum("sir,sro->sio", a2, b2).reshape(kernel.shape) * (alpha / rank)
    out["kernel"] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
  return out
