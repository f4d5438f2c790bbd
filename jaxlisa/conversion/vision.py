"""Vision towers: CLIP (HF `CLIPVisionModel` / `CLIPModel`, and the tower inside LLaVA / LISA
checkpoints) and EVA ViT-g (LAVIS `eva_vit.py`, as BLIP-2 uses it, with optional `ln_vision`).

CLIP keys are found under any prefix: whatever precedes `embeddings.patch_embedding.weight`
(`vision_model.` in hub CLIPModel / CLIPVisionModel files, nothing in transformers-5
`CLIPVisionModel.save_pretrained`, `model.vision_tower.vision_tower.vision_model.` in original
LLaVA / LISA, `vision_tower.vision_model.` / `vision_tower.` / `model.vision_tower.` in llava-hf).
`clip_vision_rules(config, prefix)` is the table the LLaVA / LISA converters reuse.

EVA files from LAVIS have no config.json: width, depth, MLP size, patch and image size come from
tensor shapes; the head count from the width (1408 -> 16 heads of 88, as `create_eva_vit_g`;
otherwise heads of 64). A `pos_embed` whose grid differs from the configured image size is
resized bicubically at conversion (LAVIS `interpolate_pos_embed`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from absl import logging
import numpy as np

from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import CONV, FLAT, LINEAR, LINEAR_IN2, Rule, Transform, linear_rules, norm_rules
from jaxlisa.conversion.family import Family, any_key
from jaxlisa.models import clip as clip_lib
from jaxlisa.models.clip import CLIPVisionConfig, CLIPVisionModel
from jaxlisa.models.eva import EVAViTConfig, EVAVisionTransformer

# ----------------------------------------------------------------------------- CLIP
_CLIP_ANCHOR = "embeddings.patch_embedding.weight"
CLIP_SKIP = (r"(^|\.)text_model\.", r"(^|\.)(visual|text)_projection\.", r"(^|\.)logit_scale$",
             r"(^|\.)position_ids$")
# HF CLIPVisionConfig defaults, for config.json files that store only the non-default fields.
_HF_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)


def clip_config_from_hf(cfg: dict[str, Any]) -> CLIPVisionConfig:
  """HF config.json of a `CLIPVisionModel` (model_type clip_vision_model), a `CLIPModel` (its
  `vision_config`), or any config with a CLIP `vision_config` section (llava) -> CLIPVisionConfig."""
  if cfg.get("model_type") != "clip_vision_model" and isinstance(cfg.get("vision_config"), dict):
    cfg = cfg["vision_config"]
  mt = cfg.get("model_type", "clip_vision_model")
  if mt != "clip_vision_model":
    raise CheckpointError(f"vision config model_type {mt!r} is not a CLIP vision tower")
  v = {k: cfg.get(k, d) for k, d in _HF_CLIP_DEFAULTS.items()}
  return CLIPVisionConfig(**v)


def find_clip_prefix(keys: Sequence[str]) -> str:
  """The prefix in front of the CLIP vision tower's keys (see module docstring)."""
  prefixes = sorted({k[:-len(_CLIP_ANCHOR)] for k in keys if k.endswith(_CLIP_ANCHOR)
                     and (k == _CLIP_ANCHOR or k[-len(_CLIP_ANCHOR) - 1] == ".")})
  prefixes = [p for p in prefixes if "text_model" not in p]
  if len(prefixes) != 1:
    raise CheckpointError(f"expected one CLIP vision tower (a '...{_CLIP_ANCHOR}' key), found "
                          f"{len(prefixes)}: {prefixes[:5]}")
  return prefixes[0]


def clip_vision_rules(c: CLIPVisionConfig | None = None, prefix: str = "vision_model.") -> list[Rule]:
  """HF CLIP vision names under `prefix` -> CLIPVisionModel params (config unused: one table)."""
  del c
  e, L, d = f"{prefix}embeddings.", f"{prefix}encoder.layers.{{i}}.", "encoder/layers/{i}/"
  rules = [
      Rule(e + "class_embedding", "embeddings/class_embedding"),
      Rule(e + "patch_embedding.weight", "embeddings/patch_embedding/kernel", CONV),
      Rule(e + "position_embedding.weight", "embeddings/position_embedding/embedding"),
      Rule(L + "self_attn.out_proj.weight", d + "self_attn/out_proj/kernel", LINEAR_IN2),
      Rule(L + "self_attn.out_proj.bias", d + "self_attn/out_proj/bias"),
  ]
  for n in ("pre_layrnorm", "post_layernorm"):
    rules += norm_rules(prefix + n, n)
  for n in ("layer_norm1", "layer_norm2"):
    rules += norm_rules(L + n, d + n)
  for n in ("q_proj", "k_proj", "v_proj"):
    rules += linear_rules(L + f"self_attn.{n}", d + f"self_attn/{n}")
  for n in ("fc1", "fc2"):
    rules += linear_rules(L + f"mlp.{n}", d + f"mlp/{n}")
  return rules


def _clip_rules(c: CLIPVisionConfig, keys: Sequence[str] = ()) -> list[Rule]:
  return clip_vision_rules(c, find_clip_prefix(keys) if keys else "vision_model.")


def _clip_detect(cfg, keys) -> bool:
  if cfg is not None:
    return cfg.get("model_type") in ("clip_vision_model", "clip")
  # Only a bare CLIP file (tower at the top or under `vision_model.`); LLaVA files go elsewhere.
  return any_key(keys, r"^(vision_model\.)?embeddings\.patch_embedding\.weight$")


def _clip_config(cfg, src) -> CLIPVisionConfig:
  if cfg is not None:
    return clip_config_from_hf(cfg)
  keys = src.keys()
  p = find_clip_prefix(keys)
  hidden, ch, patch, _ = src.shape(p + _CLIP_ANCHOR)
  layers = 1 + max(int(m.group(1)) for k in keys
                   if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k)))
  inter = src.shape(p + "encoder.layers.0.mlp.fc1.weight")[0]
  n_pos = src.shape(p + "embeddings.position_embedding.weight")[0]
  grid = int(round((n_pos - 1) ** 0.5))
  heads = max(1, hidden // 64)
  logging.warning("no config.json for the CLIP checkpoint: inferred width %d, %d layers, %d heads "
                  "(head_dim 64 assumed), image %d", hidden, layers, heads, grid * patch)
  return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, image_size=grid * patch, patch_size=patch, num_channels=ch)


CLIP_FAMILIES = (
    Family(name="clip_vision", detect=_clip_detect, config_from_hf=_clip_config,
           config_cls=CLIPVisionConfig, rules=_clip_rules, build=CLIPVisionModel,
           skip=CLIP_SKIP,
           export_rules=lambda c, keys=(): clip_vision_rules(c, "vision_model.")),
)


# ----------------------------------------------------------------------------- EVA ViT (LAVIS)
def _resize_pos_fwd(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """pos_embed [1, 1 + n, D] -> [1, 1 + m, D]: bicubic on the patch grid, CLS row kept
  (LAVIS `interpolate_pos_embed`), when the configured image size differs from the file's."""
  x = np.asarray(x)
  shape = tuple(shape)
  if x.shape == shape:
    return x
  if not (x.ndim == len(shape) == 3 and x.shape[0] == shape[0] == 1 and x.shape[2] == shape[2]):
    raise ValueError(f"cannot resize pos_embed {x.shape} to {shape}")
  side = int(round((shape[1] - 1) ** 0.5))
  logging.info("resizing pos_embed %s -> %s (bicubic)", x.shape, shape)
  return clip_lib.resize_pos_embed(x[0].astype(np.float32), (side, side))[None].astype(x.dtype)


POS_EMBED_RESIZE = Transform("pos_embed_resize", _resize_pos_fwd, lambda y: y)
EVA_SKIP = (r"(^|\.)relative_position_index$",)


def eva_rules(c: EVAViTConfig | None = None, prefix: str = "visual_encoder.",
              ln_prefix: str = "ln_vision.") -> list[Rule]:
  """LAVIS EVA ViT names under `prefix` (+ BLIP-2's `ln_vision`) -> EVAVisionTransformer params."""
  del c
  L, d = f"{prefix}blocks.{{i}}.", "blocks/{i}/"
  rules = [
      Rule(f"{prefix}patch_embed.proj.weight", "patch_embed/proj/kernel", CONV),
      Rule(f"{prefix}patch_embed.proj.bias", "patch_embed/proj/bias"),
      Rule(f"{prefix}cls_token", "cls_token"),
      Rule(f"{prefix}pos_embed", "pos_embed", POS_EMBED_RESIZE),
      Rule(L + "attn.qkv.weight", d + "attn/qkv/kernel", LINEAR),
      Rule(L + "attn.q_bias", d + "attn/q_bias", FLAT),
      Rule(L + "attn.v_bias", d + "attn/v_bias", FLAT),
      Rule(L + "attn.proj.weight", d + "attn/proj/kernel", LINEAR_IN2),
      Rule(L + "attn.proj.bias", d + "attn/proj/bias"),
      Rule(f"{ln_prefix}weight", "ln_vision/scale"),
      Rule(f"{ln_prefix}bias", "ln_vision/bias"),
  ]
  for n in ("norm1", "norm2"):
    rules += norm_rules(L + n, d + n)
  for n in ("fc1", "fc2"):
    rules += linear_rules(L + f"mlp.{n}", d + f"mlp/{n}")
  return rules


def find_eva_prefix(keys: Sequence[str]) -> str:
  anchor = "patch_embed.proj.weight"
  prefixes = sorted({k[:-len(anchor)] for k in keys if k.endswith(anchor)})
  if len(prefixes) != 1:
    raise CheckpointError(f"expected one EVA ViT (a '...{anchor}' key), found {len(prefixes)}: {prefixes[:5]}")
  return prefixes[0]


def _eva_rules(c: EVAViTConfig, keys: Sequence[str] = ()) -> list[Rule]:
  return eva_rules(c, find_eva_prefix(keys) if keys else "visual_encoder.")


def _eva_detect(cfg, keys) -> bool:
  if cfg is not None:
    return False
  return any_key(keys, r"^(visual_encoder\.)?blocks\.\d+\.attn\.q_bias$") and \
      not any_key(keys, r"^(Qformer|query_tokens|opt_proj|t5_proj|llm_proj|llama_proj)")


def eva_config_from_keys(src) -> EVAViTConfig:
  """EVAViTConfig from tensor shapes (LAVIS .pth files carry no config)."""
  keys = src.keys()
  p = find_eva_prefix(keys)
  width, ch, patch, _ = src.shape(p + "patch_embed.proj.weight")
  depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(re.escape(p) + r"blocks\.(\d+)\.", k)))
  mlp = src.shape(p + "blocks.0.mlp.fc1.weight")[0]
  n_pos = src.shape(p + "pos_embed")[-2] - 1
  grid = int(round(n_pos ** 0.5))
  if grid * grid != n_pos:
    raise CheckpointError(f"{p}pos_embed has {n_pos} patch positions, not a square grid")
  if any_key(keys, re.escape(p) + r"blocks\.\d+\.(gamma_1|attn\.relative_position_bias_table)$") or \
      p + "rel_pos_bias.relative_position_bias_table" in keys:
    raise CheckpointError("EVA checkpoints with layer scale (gamma_*) or relative position bias are not supported")
  heads = width // 88 if width % 88 == 0 and width >= 1408 else max(1, width // 64)
  return EVAViTConfig(image_size=grid * patch, patch_size=patch, num_channels=ch, hidden_size=width,
                      num_hidden_layers=depth, num_attention_heads=heads, mlp_dim=mlp,
                      qkv_bias=any_key(keys, re.escape(p) + r"blocks\.0\.attn\.q_bias$"),
                      use_ln_vision="ln_vision.weight" in keys)


EVA_FAMILIES = (
    Family(name="eva_vit", detect=_eva_detect, config_from_hf=lambda cfg, src: eva_config_from_keys(src),
           config_cls=EVAViTConfig, rules=_eva_rules, build=EVAVisionTransformer,
           skip=EVA_SKIP,
           export_rules=lambda c, keys=(): eva_rules(c, "visual_encoder.")),
)
FAMILIES = CLIP_FAMILIES + EVA_FAMILIES

__all__ = ["clip_config_from_hf", "clip_vision_rules", "find_clip_prefix", "eva_rules", "find_eva_prefix",
           "eva_config_from_keys", "CLIP_SKIP", "POS_EMBED_RESIZE"]
