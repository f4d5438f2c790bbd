"""MiniGPT4-Qwen family: EVA ViT + Q-Former (BLIP-2 stage-1 names) + llm_proj + Qwen / Qwen2.

| family              | source names                                              | module       |
|---------------------|-----------------------------------------------------------|--------------|
| minigpt4qwen        | visual_encoder.*, ln_vision, Qformer.bert.*, query_tokens, llm_proj, llm_model.transformer.* (Qwen) or llm_model.model.* (Qwen2) | MiniGPT4Qwen |

A MiniGPT4Qwen release holds only `llm_proj`; the full model's state dict (what the `minigpt4qwen`
family reads) is that plus `blip2_pretrained_flant5xxl.pth` (ViT, ln_vision, Q-Former, queries) and
Qwen-7B-Chat under `llm_model.`: merge them into one dict (e.g. `torch.save({**a, **b, **c})`) first.
The vision and Q-Former maps are BLIP-2's (conversion/blip2.py); the LLM map is conversion/llm.py's.
"""

from __future__ import annotations

import re
from typing import Sequence

from jaxlisa.conversion import llm as llm_conv
from jaxlisa.conversion.blip2 import (SKIP, _extra_blocks, dropped_qformer_text_rules,
                                      lavis_qformer_config, lavis_vision_config, prefixed, qformer_rules)
from jaxlisa.conversion.family import Family, any_key
from jaxlisa.conversion.keymap import Rule, linear_rules
from jaxlisa.conversion.vision import eva_rules
from jaxlisa.models import minigpt4qwen as m4q_lib
from jaxlisa.models.llm import DecoderConfig


def _src_prefixed(rules: Sequence[Rule], src_prefix: str) -> list[Rule]:
  return [Rule(src_prefix + r.src, r.dst, r.t, r.split) for r in rules]


def m4q_llm_config(src, prefix: str = "llm_model.") -> DecoderConfig:
  """Qwen(1) (`transformer.*`) or Qwen2 (`model.*`) config from shapes; heads of 128 (Qwen's)."""
  keys = src.keys()
  if f"{prefix}transformer.wte.weight" in keys:
    t = f"{prefix}transformer."
    vocab, hidden = src.shape(f"{t}wte.weight")
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(re.escape(t) + r"h\.(\d+)\.", k)))
    return DecoderConfig(family="qwen", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=src.shape(f"{t}h.0.mlp.w1.weight")[0],
                         num_attention_heads=max(1, hidden // 128), max_position_embeddings=8192, norm_eps=1e-6,
                         attention_bias=True, tie_word_embeddings=f"{prefix}lm_head.weight" not in keys,
                         bos_token_id=None, eos_token_id=151643, pad_token_id=151643)
  t = f"{prefix}model."
  vocab, hidden = src.shape(f"{t}embed_tokens.weight")
  layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(re.escape(t) + r"layers\.(\d+)\.", k)))
  heads = max(1, hidden // 128)
  kv = src.shape(f"{t}layers.0.self_attn.k_proj.weight")[0] // (hidden // heads)
  return DecoderConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       intermediate_size=src.shape(f"{t}layers.0.mlp.up_proj.weight")[0], num_attention_heads=heads,
                       num_key_value_heads=kv, max_position_embeddings=32768, rope_theta=1e6, attention_bias=True,
                       tie_word_embeddings=f"{prefix}lm_head.weight" not in keys, bos_token_id=None,
                       eos_token_id=151643, pad_token_id=151643)


def m4q_config(src) -> m4q_lib.MiniGPT4QwenConfig:
  nq = src.shape("query_tokens")[1]
  return m4q_lib.MiniGPT4QwenConfig(vision=lavis_vision_config(src),
                                    qformer=lavis_qformer_config(src, nq).replace(use_text=False, lm_head=False),
                                    llm=m4q_llm_config(src))


def m4q_rules(c: m4q_lib.MiniGPT4QwenConfig, keys: Sequence[str] = ()) -> list[Rule]:
  rules = prefixed(eva_rules(c.vision, "visual_encoder.", "ln_vision."), "visual_encoder/")
  rules += _extra_blocks(c.vision, keys)
  rules.append(Rule("query_tokens", "query_tokens"))
  rules += qformer_rules(c.qformer, "Qformer.", "Qformer/")
  rules += dropped_qformer_text_rules("Qformer.", c.qformer.num_hidden_layers)
  rules += linear_rules("llm_proj", "llm_proj")
  llm = llm_conv.qwen1_rules(c.llm) if c.llm.family == "qwen" else llm_conv.llama_rules(c.llm, "model.")
  rules += prefixed(_src_prefixed(llm, "llm_model."), "llm_model/")
  return rules


def _detect_m4q(cfg, keys) -> bool:
  return cfg is None and "query_tokens" in keys and any_key(keys, r"^llm_proj\.weight$") and \
      any_key(keys, r"^llm_model\.(transformer|model)\.")


FAMILIES = (
    Family(name="minigpt4qwen", detect=_detect_m4q, config_from_hf=lambda cfg, src: m4q_config(src),
           config_cls=m4q_lib.MiniGPT4QwenConfig, rules=m4q_rules, build=m4q_lib.MiniGPT4Qwen,
           skip=SKIP, export_rules=m4q_rules, priority=5),
)
