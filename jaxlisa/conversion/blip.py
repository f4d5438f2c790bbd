"""BLIP captioning families: HF `BlipForConditionalGeneration` (`blip_hf`) and LAVIS / salesforce BLIP
`blip_caption` `.pth` files (`blip_lavis`: timm ViT `visual_encoder.*` + `text_decoder.*`).

The ViT becomes jaxlisa's EVA module: HF `vision_model.*` through the BLIP-2 vision map; timm names
(`blocks.{i}.attn.qkv` with a full bias, final `norm`) through `timm_vit_rules`. Both drop the key part
of the fused qkv bias (no effect on attention; exported back as zeros). The text decoder uses the
Q-Former's BERT names without the `*_query` FFN. LAVIS files carry no config: sizes come from tensor
shapes, head counts from widths (heads of 64, as ViT-B/L and BERT-base).
"""

from __future__ import annotations

import re
from typing import Sequence

from jaxlisa.conversion.blip2 import QFORMER_SKIP, hf_vision_rules, qformer_rules, vision_config_from_hf
from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import CONV, FLAT, LINEAR, LINEAR_IN2, Rule, linear_rules, norm_rules
from jaxlisa.conversion.family import Family, any_key
from jaxlisa.conversion.vision import POS_EMBED_RESIZE
from jaxlisa.models.blip import BlipConfig, BlipForConditionalGeneration, blip_text_config
from jaxlisa.models.eva import EVAViTConfig

_HF_TEXT = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=512, hidden_act="gelu",
                layer_norm_eps=1e-12, bos_token_id=30522, pad_token_id=0, sep_token_id=102, tie_word_embeddings=True,
                label_smoothing=0.0)
_HF_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5, qkv_bias=True)


def config_from_hf(cfg: dict) -> BlipConfig:
  if cfg.get("model_type") != "blip":
    raise CheckpointError(f"config.json model_type {cfg.get('model_type')!r} is not blip")
  v = {**_HF_VISION, **(cfg.get("vision_config") or {})}
  t = {**_HF_TEXT, **(cfg.get("text_config") or {})}
  text = blip_text_config(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                          num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                          intermediate_size=t["intermediate_size"], hidden_act=t["hidden_act"],
                          layer_norm_eps=t["layer_norm_eps"], max_position_embeddings=t["max_position_embeddings"],
                          encoder_hidden_size=t["encoder_hidden_size"], bos_token_id=t["bos_token_id"],
                          pad_token_id=t["pad_token_id"], sep_token_id=t["sep_token_id"],
                          tie_word_embeddings=bool(t["tie_word_embeddings"]))
  return BlipConfig(vision=vision_config_from_hf(v), text=text, label_smoothing=float(t["label_smoothing"]))


def text_decoder_rules(c: BlipConfig, src: str = "text_decoder.", dst: str = "text_decoder/") -> list[Rule]:
  return qformer_rules(c.text, src, dst, style="lavis", query_ffn=False)


def hf_rules(c: BlipConfig, keys: Sequence[str] = ()) -> list[Rule]:
  """HF BlipForConditionalGeneration names -> BlipForConditionalGeneration params."""
  del keys
  return hf_vision_rules(c.vision, "vision_model.", "visual_encoder/") + text_decoder_rules(c)


def timm_vit_rules(c: EVAViTConfig, src: str = "visual_encoder.", dst: str = "visual_encoder/") -> list[Rule]:
  """timm / BLIP `VisionTransformer` names -> EVA module params (final `norm` = ln_vision)."""
  L, d = f"{src}blocks.{{i}}.", f"{dst}blocks/{{i}}/"
  w = c.hidden_size
  rules = [
      Rule(f"{src}patch_embed.proj.weight", f"{dst}patch_embed/proj/kernel", CONV),
      Rule(f"{src}patch_embed.proj.bias", f"{dst}patch_embed/proj/bias"),
      Rule(f"{src}cls_token", f"{dst}cls_token"),
      Rule(f"{src}pos_embed", f"{dst}pos_embed", POS_EMBED_RESIZE),
      Rule(L + "attn.qkv.weight", d + "attn/qkv/kernel", LINEAR),
      Rule(L + "attn.qkv.bias", (d + "attn/q_bias", "", d + "attn/v_bias"), FLAT, split=(0, (w, w, w))),
      Rule(L + "attn.proj.weight", d + "attn/proj/kernel", LINEAR_IN2),
      Rule(L + "attn.proj.bias", d + "attn/proj/bias"),
  ] + norm_rules(f"{src}norm", f"{dst}ln_vision")
  for n in ("norm1", "norm2"):
    rules += norm_rules(L + n, d + n)
  for n in ("fc1", "fc2"):
    rules += linear_rules(L + f"mlp.{n}", d + f"mlp/{n}")
  return rules


def lavis_config(src) -> BlipConfig:
  keys = src.keys()
  width, ch, patch, _ = src.shape("visual_encoder.patch_embed.proj.weight")
  depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k)))
  grid = int(round((src.shape("visual_encoder.pos_embed")[1] - 1) ** 0.5))
  vision = EVAViTConfig(image_size=grid * patch, patch_size=patch, num_channels=ch, hidden_size=width,
                        num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
                        mlp_dim=src.shape("visual_encoder.blocks.0.mlp.fc1.weight")[0], layer_norm_eps=1e-6,
                        ln_vision_eps=1e-6)
  b = "text_decoder.bert."
  layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(re.escape(b) + r"encoder\.layer\.(\d+)\.", k)))
  vocab, hidden = src.shape(f"{b}embeddings.word_embeddings.weight")
  text = blip_text_config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 64),
                          intermediate_size=src.shape(f"{b}encoder.layer.0.intermediate.dense.weight")[0],
                          max_position_embeddings=src.shape(f"{b}embeddings.position_embeddings.weight")[0],
                          encoder_hidden_size=src.shape(f"{b}encoder.layer.0.crossattention.self.key.weight")[1],
                          bos_token_id=vocab - 2)  # [DEC] = len(bert-base-uncased) when [ENC] is added after it
  return BlipConfig(vision=vision, text=text)


def lavis_rules(c: BlipConfig, keys: Sequence[str] = ()) -> list[Rule]:
  del keys
  return timm_vit_rules(c.vision) + text_decoder_rules(c)


def _detect_hf(cfg, keys) -> bool:
  if cfg is None or cfg.get("model_type") != "blip":
    return False
  archs = cfg.get("architectures") or []
  return "BlipForConditionalGeneration" in archs or any_key(keys, r"^text_decoder\.")


def _detect_lavis(cfg, keys) -> bool:
  return cfg is None and any_key(keys, r"^text_decoder\.bert\.") and any_key(keys, r"^visual_encoder\.blocks\.0\.attn\.qkv\.weight$")


_SKIP = QFORMER_SKIP + (r"^text_decoder\.bert\.pooler\.",)
FAMILIES = (
    Family(name="blip_hf", detect=_detect_hf, config_from_hf=lambda cfg, src: config_from_hf(cfg),
           config_cls=BlipConfig, rules=hf_rules, build=BlipForConditionalGeneration,
           skip=_SKIP, export_rules=hf_rules, priority=5),
    Family(name="blip_lavis", detect=_detect_lavis, config_from_hf=lambda cfg, src: lavis_config(src),
           config_cls=BlipConfig, rules=lavis_rules, build=BlipForConditionalGeneration,
           skip=_SKIP, export_rules=lavis_rules, priority=5),
)
