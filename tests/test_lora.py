"""LoRA: a fresh adapter is the identity; merging folds a trained adapter into the kernel exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import max_abs_diff
from jaxlisa.models import llm
from jaxlisa.models.lora import merge_lora


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


def test_lora_lisa_export_merges_adapters():
  """A LoRA-trained tiny LISA exported in the official format (adapters merged, as the official
  merge script does) and read back with the family's rules gives the adapter model's forward."""
  from configs import lisa_tiny  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import lisa as lisa_conv  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.keymap import convert_state  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import lisa as lisa_lib  # pylint: disable=import-outside-toplevel

  d = lisa_tiny.get_config().model.to_dict()
  d["llava"] = {**d["llava"], "text": {**d["llava"]["text"], "vocab_size": 64, "lora_rank": 4, "lora_alpha": 16.0}}
  cfg = lisa_lib.LisaConfig.from_dict({**d, "seg_token_idx": 63})
  plain_cfg = cfg.replace(llava=cfg.llava.replace(text=cfg.llava.text.replace(lora_rank=0)))
  inputs = cfg.dummy_inputs()
  params = nn.meta.unbox(jax.jit(lisa_lib.Lisa(cfg).init)(jax.random.PRNGKey(0), *inputs)["params"])
  params = jax.tree.map(np.asarray, params)
  rs = np.random.RandomState(2)
  attn = params["llava"]["language_model"]["layers"]["self_attn"]
  for n in cfg.llava.text.lora_targets:  # a trained adapter: B != 0
    attn[n]["lora_b"] = rs.randn(*attn[n]["lora_b"].shape).astype(np.float32) * 0.1
  state = lisa_conv.export_lisa(params, cfg, include_clip=True)
  assert not [k for k in state if "lora" in k]
  expected = jax.eval_shape(lisa_lib.Lisa(plain_cfg).init, jax.random.PRNGKey(0), *inputs)["params"]
  back = convert_state(state, lisa_conv.lisa_rules(plain_cfg, list(state)), nn.meta.unbox(expected),
                       skip=lisa_conv.SKIP)

  ids = np.asarray(inputs[0]).copy()
  n = cfg.num_image_tokens
  ids[0, 0, n + 1:] = [5, 63, 7]  # text after the image, a [SEG]
  rng = np.random.RandomState(3)
  pixels = [jnp.asarray(rng.randn(*x.shape).astype(np.float32)) for x in inputs[2:]]
  run = lambda c, p: lisa_lib.Lisa(c).apply({"params": p}, jnp.asarray(ids), jnp.ones_like(ids), *pixels)
  adapter, exported = run(cfg, params), run(plain_cfg, back)
  assert max_abs_diff(exported.logits, adapter.logits) <= 1e-5
  assert max_abs_diff(exported.low_res_masks, adapter.low_res_masks) <= 1e-5
  dropped = run(plain_cfg, merge_lora(params, 0.0, 4))  # the adapters left out instead of merged
  assert max_abs_diff(dropped.logits, adapter.logits) > 1e-3
