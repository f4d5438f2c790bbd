"""`--verify`: run the PyTorch original and the converted model on the same random input and
report the largest logit difference. Families add their own checks with `register_verifier`."""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxlisa.conversion.checkpoint_io import CheckpointError

_VERIFIERS: dict[str, Callable] = {}


def register_verifier(family: str):
  def deco(fn):
    _VERIFIERS[family] = fn
    return fn
  return deco


def verify(src: str, family: str, module, params, config, seed: int = 0) -> dict[str, float]:
  """{'max_abs_logit_diff': ...} (or the family's own metrics) on a random input."""
  fn = _VERIFIERS.get(family, _verify_causal_lm if family in ("llama", "mistral", "qwen2", "opt") else None)
  if fn is None:
    raise CheckpointError(f"--verify is not available for family {family!r}")
  return fn(src, module, params, config, seed)


def _verify_causal_lm(src, module, params, config, seed):
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError("--verify needs torch and transformers") from e
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, config.vocab_size, (2, 16))
  mask = np.ones_like(ids)
  mask[1, 11:] = 0
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
  with jax.default_matmul_precision("highest"):
    p32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    got = type(module)(config.replace(dtype="float32")).apply(
        {"params": p32}, jnp.asarray(ids), jnp.asarray(mask)).logits
  diff = np.abs(np.asarray(got, np.float64) - want)[mask.astype(bool)]
  return {"max_abs_logit_diff": float(diff.max())}
