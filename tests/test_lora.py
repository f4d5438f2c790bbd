"""LoRA: a fresh adapter is the identity; merging folds a trained adapter into the kernel exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import max_abs_diff
from jaxlisa.models import llm
from jaxlisa.training.lora import merge_lora


def test_lora_merge_matches_adapter_forward():
  base = llm.DecoderConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  lora_cfg = base.replace(lora_rank=4, lora_alpha=16.0, lora_targets=("q_proj", "v_proj", "o_proj"))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)))
  params = nn.meta.unbox(llm.DecoderLM(lora_cfg).init(jax.random.PRNGKey(0), ids)["params"])
  attn = params["layers"]["self_attn"]
  assert attn["q_proj"]["lora_a"].shape == (2, 32, 4) and attn["q_proj"]["lora_b"].shape == (2, 4, 4, 8)
  assert "lora_a" not in attn["k_proj"]
  plain = llm.DecoderLM(base)
  merged0 = merge_lora(params, 16.0, 4)
  fresh = llm.DecoderLM(lora_cfg).apply({"params": params}, ids).logits
  assert max_abs_diff(fresh, plain.apply({"params": merged0}, ids).logits) <= 1e-6  # B = 0: identity
  rs = np.random.RandomState(1)
  params = jax.tree.map(np.asarray, params)
  for n in ("q_proj", "v_proj", "o_proj"):
    attn = params["layers"]["self_attn"][n]
    attn["lora_b"] = rs.randn(*attn["lora_b"].shape).astype(np.float32) * 0.1
  with_adapter = llm.DecoderLM(lora_cfg).apply({"params": params}, ids).logits
  merged = merge_lora(params, 16.0, 4)
  assert not any("lora" in "/".join(map(str, p)) for p in jax.tree_util.tree_flatten_with_path(merged)[0])
  assert max_abs_diff(plain.apply({"params": merged}, ids).logits, with_adapter) <= 1e-4
  assert max_abs_diff(plain.apply({"params": merged0}, ids).logits, with_adapter) > 1e-3  # the adapter matters
