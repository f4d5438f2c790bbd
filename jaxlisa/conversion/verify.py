"""`--verify`: run the PyTorch original and the converted model on the same random input and
report the largest logit difference. Families add their own checks with `register_verifier`.

What to expect (fp32, both sides): the difference is float32 rounding through the depth of the
network, so it scales with the logits' magnitude and the depth. Tiny test models agree within
1e-5; SmolLM2-135M (30 layers, |logit| up to ~40) within ~1.5e-4, about 3.6e-6 of the largest logit,
where transformers itself differs from itself by ~7e-5 between a batched and an unbatched run of
the same row. The causal-LM report therefore gives that noise floor and the relative difference
next to the absolute one.
"""

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


CAUSAL_LM_FAMILIES = ("llama", "mistral", "qwen2", "opt")


def _verifier(family: str) -> Callable | None:
  return _VERIFIERS.get(family, _verify_causal_lm if family in CAUSAL_LM_FAMILIES else None)


def check_available(src: str, family: str) -> None:
  """CheckpointError (before anything is written) when --verify cannot run for this source: a
  family without a verifier, or a causal LM that transformers cannot load from `src` (it needs a
  HF directory with config.json, or a .gguf file)."""
  if _verifier(family) is None:
    have = sorted(set(_VERIFIERS) | set(CAUSAL_LM_FAMILIES))
    raise CheckpointError(f"--verify is not available for family {family!r} (only for {', '.join(have)}); "
                          "run without --verify")
  if family in CAUSAL_LM_FAMILIES and family not in _VERIFIERS:
    import os  # pylint: disable=import-outside-toplevel
    if not (src.endswith(".gguf") and os.path.isfile(src)) and not os.path.isfile(os.path.join(src, "config.json")):
      raise CheckpointError(f"--verify needs a HF directory with config.json (or a .gguf file) to build the "
                            f"PyTorch reference; {src} is not one: run without --verify")


def verify(src: str, family: str, module, params, config, seed: int = 0) -> dict[str, float]:
  """Causal LMs: {'max_abs_logit_diff', 'max_abs_logit', 'rel_logit_diff' (= diff / max |logit|),
  'ref_batched_vs_unbatched' (the reference's own variation)}; other families their own metrics."""
  check_available(src, family)
  return _verifier(family)(src, module, params, config, seed)


def _verify_causal_lm(src, module, params, config, seed):
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError("--verify needs torch and transformers") from e
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if src.endswith(".gguf"):
    from jaxlisa.conversion import gguf_io  # pylint: disable=import-outside-toplevel
    ref = gguf_io.reference_model(src, torch.float32)  # the same dequantized weights
  else:
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, config.vocab_size, (2, 16))
  mask = np.ones_like(ids)
  mask[1, 11:] = 0
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    alone = ref(torch.tensor(ids[1:, :11])).logits.float().numpy()
  with jax.default_matmul_precision("highest"):
    p32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    got = type(module)(config.replace(dtype="float32")).apply(
        {"params": p32}, jnp.asarray(ids), jnp.asarray(mask)).logits
  diff = np.abs(np.asarray(got, np.float64) - want)[mask.astype(bool)]
  scale = float(np.abs(want[mask.astype(bool)]).max())
  return {"max_abs_logit_diff": float(diff.max()), "max_abs_logit": scale,
          "rel_logit_diff": float(diff.max()) / max(scale, 1e-30),
          "ref_batched_vs_unbatched": float(np.abs(want[1, :11] - alone[0]).max())}
