"""LLaVA checkpoints -> `Llava` params: llava-hf (v1.5 `LlavaForConditionalGeneration`, v1.6
`LlavaNextForConditionalGeneration`) and the original LLaVA repo (`LlavaLlamaForCausalLM`).

Families and the key names each accepts:
  llava_hf / llava_next_hf (config.json with text_config / vision_config):
    transformers-5 save_pretrained: language_model.model.*, language_model.lm_head.*,
        vision_tower.*, multi_modal_projector.*, image_newline
    transformers-5 in-memory state_dict: model.language_model.*, lm_head.*, model.vision_tower.*,
        model.multi_modal_projector.*, model.image_newline
    transformers-4 llava-hf hub files: language_model.model.*, language_model.lm_head.*,
        vision_tower.vision_model.*, multi_modal_projector.*, image_newline
  llava_original: model.embed_tokens / model.layers.* / model.norm / lm_head,
    model.mm_projector.{0,2,..}.* (mlpNx_gelu) or model.mm_projector.* (linear),
    model.image_newline (v1.6), and the CLIP tower either inside
    (model.vision_tower.vision_tower.vision_model.*) or in a separate CLIP checkpoint: pass it as
    `convert_llava(src, clip=DIR)` / `loaders.load_llava(path, clip=DIR)` (LISA does the same with its
    `vision_tower` argument); a local directory named by config.json's `mm_vision_tower` is used
    when no tower is inside and none is passed.

Original configs give the pinpoints as LLaVA reads them, (width, height); they are swapped to the
(height, width) convention used here (see data/anyres.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

from absl import logging

from jaxlisa.constants import IMAGE_TOKEN_INDEX
from jaxlisa.conversion import llm as llm_conv
from jaxlisa.conversion import vision as vision_conv
from jaxlisa.conversion.checkpoint_io import CheckpointError, open_checkpoint, read_config_json
from jaxlisa.conversion.family import Converted, Family, abstract_params, any_key, np_dtype
from jaxlisa.conversion.keymap import LINEAR, Rule, convert_state
from jaxlisa.models import llava as llava_lib
from jaxlisa.models.clip import CLIPVisionConfig
from jaxlisa.models.llava import Llava, LlavaConfig

SKIP = llm_conv.BUFFERS + vision_conv.CLIP_SKIP
EXTERNAL_CLIP = "external_clip."  # key namespace of a separately passed CLIP checkpoint
# transformers defaults, for hub config.json files that store only non-default fields
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                    max_position_embeddings=32768, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                  max_position_embeddings=32768),
}
_LLAVA_VISION_DEFAULTS = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _under(rules: Sequence[Rule], prefix: str) -> list[Rule]:
  """The same rules with every destination moved under `prefix` (e.g. 'language_model/')."""
  def move(dst):
    return dst if isinstance(dst, tuple) and not dst else (
        prefix + dst if isinstance(dst, str) else tuple(prefix + d for d in dst))
  return [dataclasses.replace(r, dst=move(r.dst)) for r in rules]


def _text_config(tc: dict, tie: bool | None = None) -> Any:
  mt = tc.get("model_type", "llama")
  if mt not in _TEXT_DEFAULTS:
    raise CheckpointError(f"LLaVA language model {mt!r} is not supported (llama, mistral, qwen2)")
  text = llm_conv.config_from_hf({**_TEXT_DEFAULTS[mt], **tc, "model_type": mt})
  return text if tie is None else text.replace(tie_word_embeddings=bool(tie))


# ----------------------------------------------------------------------------- llava-hf
def hf_config(cfg: dict) -> LlavaConfig:
  """llava-hf config.json (model_type llava | llava_next) -> LlavaConfig."""
  mt = cfg.get("model_type")
  tc = cfg.get("text_config") or {}
  tie = cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings"))
  vc = cfg.get("vision_config") or _LLAVA_VISION_DEFAULTS
  layer = cfg.get("vision_feature_layer", -2)
  kw = dict(
      vision=vision_conv.clip_config_from_hf({**vc, "model_type": vc.get("model_type", "clip_vision_model")}),
      text=_text_config(tc, tie), projector_type="mlp2x_gelu",
      projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
      projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
      vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
      vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
      image_token_index=int(cfg.get("image_token_index", cfg.get("image_token_id", 32000))))
  if mt == "llava_next":
    pins = cfg.get("image_grid_pinpoints") or _NEXT_PINPOINTS
    kw.update(image_aspect_ratio="anyres", image_grid_pinpoints=tuple(tuple(p) for p in pins),
              mm_patch_merge_type="spatial_unpad")
  return LlavaConfig(**kw)


def _hf_names(keys: Sequence[str], export: bool = False) -> dict[str, str]:
  """Prefixes of the llava-hf naming scheme the keys use (see module docstring)."""
  if not export and any(k.startswith("model.language_model.") for k in keys):
    names = dict(lm="model.language_model.", head="lm_head.", proj="model.multi_modal_projector.",
                 newline="model.image_newline")
  else:
    names = dict(lm="language_model.model.", head="language_model.lm_head.", proj="multi_modal_projector.",
                 newline="image_newline")
  names["clip"] = "vision_tower." if export else vision_conv.find_clip_prefix(keys)
  return names


def hf_rules(c: LlavaConfig, keys: Sequence[str] = (), export: bool = False) -> list[Rule]:
  n = _hf_names(keys, export or not keys)
  rules = _under(llm_conv.llama_rules(c.text, n["lm"], n["head"]), "language_model/")
  rules += _under(vision_conv.clip_vision_rules(c.vision, n["clip"]), "vision_tower/")
  for k in range(1, c.projector_depth + 1):
    rules += [Rule(f"{n['proj']}linear_{k}.weight", f"multi_modal_projector/linear_{k}/kernel", LINEAR),
              Rule(f"{n['proj']}linear_{k}.bias", f"multi_modal_projector/linear_{k}/bias")]
  if c.has_image_newline:
    rules.append(Rule(n["newline"], "image_newline"))
  return rules


def _hf_detect(model_type: str):
  def detect(cfg, keys):
    if cfg is not None:
      return cfg.get("model_type") == model_type and ("text_config" in cfg or "vision_config" in cfg)
    proj = any_key(keys, r"(^|\.)multi_modal_projector\.linear_1\.weight$")
    return proj and any_key(keys, r"(^|\.)image_newline$") == (model_type == "llava_next")
  return detect


def _hf_config(cfg, src):
  del src
  if cfg is None:
    raise CheckpointError("converting a llava-hf checkpoint needs its config.json")
  return hf_config(cfg)


# ----------------------------------------------------------------------------- original LLaVA
_ORIG_CLIP = "model.vision_tower.vision_tower.vision_model."


def _is_original_config(cfg: dict) -> bool:
  archs = cfg.get("architectures") or []
  if "text_config" in cfg or any("LISA" in a.upper() for a in archs):
    return False
  return any(k in cfg for k in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type")) or \
      any(re.fullmatch(r"Llava\w*ForCausalLM", a) for a in archs)


def _original_detect(cfg, keys) -> bool:
  if any_key(keys, r"(^|\.)(visual_model|text_hidden_fcs)\."):
    return False  # LISA
  if cfg is not None:
    return _is_original_config(cfg)
  return any_key(keys, r"^model\.mm_projector\.") and any_key(keys, r"^model\.layers\.\d+\.")


def _vision_from_name(name: str | None) -> CLIPVisionConfig | None:
  m = re.search(r"clip-vit-large-patch14(-336)?$", name or "")
  if not m:
    return None
  return CLIPVisionConfig.vit_l14(336 if m.group(1) else 224)


def _original_vision_config(cfg: dict | None, src) -> CLIPVisionConfig:
  """Order: the CLIP checkpoint passed in (its config.json), a local `mm_vision_tower` directory,
  a known openai CLIP name, tensor shapes."""
  clip_cfg = getattr(src, "clip_config_json", None)
  if clip_cfg is not None:
    return vision_conv.clip_config_from_hf(clip_cfg)
  name = (cfg or {}).get("mm_vision_tower") or (cfg or {}).get("vision_tower")
  if name and os.path.isdir(name) and read_config_json(name) is not None:
    return vision_conv.clip_config_from_hf(read_config_json(name))
  known = _vision_from_name(name)
  if known is not None:
    return known
  try:
    return vision_conv._clip_config(None, src)  # pylint: disable=protected-access
  except CheckpointError as e:
    raise CheckpointError(f"cannot tell the CLIP vision tower of this LLaVA checkpoint "
                          f"(mm_vision_tower={name!r}); pass clip=<CLIP checkpoint dir>: {e}") from e


def _projector_depth_from_keys(keys) -> tuple[str, int]:
  idx = sorted({int(m.group(1)) for k in keys if (m := re.match(r"model\.mm_projector\.(\d+)\.weight$", k))})
  if idx:
    return f"mlp{len(idx)}x_gelu", len(idx)
  if "model.mm_projector.weight" in keys:
    return "linear", 1
  return "identity", 0


def original_config(cfg: dict | None, src) -> LlavaConfig:
  """Original LLaVA config.json (LlavaLlamaForCausalLM / LlavaMistralForCausalLM) -> LlavaConfig.
  Without config.json the architecture comes from tensor shapes."""
  keys = src.keys()
  if cfg is None:
    text = llm_conv._infer_from_keys(src)  # pylint: disable=protected-access
    cfg = {"mm_projector_type": _projector_depth_from_keys(keys)[0]}
    if "model.image_newline" in keys:
      cfg["mm_patch_merge_type"] = "spatial_unpad"
  else:
    mt = cfg.get("model_type", "llava")
    text_mt = "mistral" if "mistral" in mt else "qwen2" if "qwen" in mt else "llama"
    text = _text_config({k: v for k, v in cfg.items() if not k.startswith("mm_")} | {"model_type": text_mt})
  feature = cfg.get("mm_vision_select_feature", "patch")
  if feature not in ("patch", "cls_patch"):
    raise CheckpointError(f"mm_vision_select_feature {feature!r} is not supported")
  aspect = cfg.get("image_aspect_ratio") or "square"
  if aspect.startswith("anyres_max"):
    raise CheckpointError(f"image_aspect_ratio {aspect!r} (LLaVA-OneVision) is not supported")
  pins = cfg.get("image_grid_pinpoints")
  if isinstance(pins, str):
    raise CheckpointError(f"image_grid_pinpoints {pins!r} (range form) is not supported")
  merge = cfg.get("mm_patch_merge_type", "flat")
  if merge not in llava_lib.MERGE_TYPES:
    raise CheckpointError(f"mm_patch_merge_type {merge!r} is not supported ({llava_lib.MERGE_TYPES})")
  return LlavaConfig(
      vision=_original_vision_config(cfg, src), text=text,
      projector_type=cfg.get("mm_projector_type", "linear"), projector_hidden_act="gelu",
      projector_bias=True, vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
      vision_feature_select_strategy="default" if feature == "patch" else "full",
      image_token_index=IMAGE_TOKEN_INDEX, mm_use_im_start_end=bool(cfg.get("mm_use_im_start_end", False)),
      image_aspect_ratio=aspect if aspect in llava_lib.ASPECT_RATIOS else "square",
      image_grid_pinpoints=tuple((int(h), int(w)) for w, h in pins) if pins and aspect == "anyres" else None,
      mm_patch_merge_type=merge,
      tokenizer_model_max_length=cfg.get("tokenizer_model_max_length"))


def original_rules(c: LlavaConfig, keys: Sequence[str] = (), export: bool = False) -> list[Rule]:
  """Original LLaVA names -> Llava params. The CLIP prefix is read from the keys (tower inside, or
  a separately passed CLIP under EXTERNAL_CLIP); for export the tower goes inside."""
  if export or not keys:
    clip, flat_linear = _ORIG_CLIP, c.projector_depth == 1
  else:
    try:
      clip = vision_conv.find_clip_prefix(keys)
    except CheckpointError as e:
      raise CheckpointError("this LLaVA checkpoint holds no (single) CLIP vision tower; pass the CLIP "
                            f"checkpoint: jaxlisa.conversion.llava.convert_llava(src, clip=DIR) ({e})") from e
    flat_linear = "model.mm_projector.weight" in keys
  rules = _under(llm_conv.llama_rules(c.text, "model.", "lm_head."), "language_model/")
  rules += _under(vision_conv.clip_vision_rules(c.vision, clip), "vision_tower/")
  for k in range(1, c.projector_depth + 1):
    src = "model.mm_projector." if flat_linear else f"model.mm_projector.{2 * (k - 1)}."
    rules += [Rule(src + "weight", f"multi_modal_projector/linear_{k}/kernel", LINEAR),
              Rule(src + "bias", f"multi_modal_projector/linear_{k}/bias")]
  if c.has_image_newline:
    rules.append(Rule("model.image_newline", "image_newline"))
  return rules


# ----------------------------------------------------------------------------- a separate CLIP
class WithClip:
  """A TensorSource view: the LLaVA checkpoint's tensors plus a CLIP checkpoint's under
  EXTERNAL_CLIP. The passed CLIP replaces a tower inside the LLaVA checkpoint."""

  def __init__(self, base, clip, clip_config_json: dict | None):
    self.base, self.clip, self.clip_config_json = base, clip, clip_config_json
    inner = [k for k in base.keys() if re.search(r"(^|\.)vision_tower\.", k)]
    if inner:
      logging.warning("ignoring the %d vision tower tensors inside the LLaVA checkpoint: a CLIP "
                      "checkpoint was passed", len(inner))
    self._keys = [k for k in base.keys() if k not in set(inner)] + [EXTERNAL_CLIP + k for k in clip.keys()]

  def _split(self, k: str):
    return (self.clip, k[len(EXTERNAL_CLIP):]) if k.startswith(EXTERNAL_CLIP) else (self.base, k)

  def keys(self) -> list[str]:
    return list(self._keys)

  def __contains__(self, k) -> bool:
    src, kk = self._split(k)
    return kk in src

  def __len__(self) -> int:
    return len(self._keys)

  def shape(self, k):
    src, kk = self._split(k)
    return src.shape(kk)

  def dtype(self, k):
    src, kk = self._split(k)
    return src.dtype(kk)

  def get(self, k):
    src, kk = self._split(k)
    return src.get(kk)


def _has_tower(keys) -> bool:
  return any_key(keys, r"embeddings\.patch_embedding\.weight$")


def open_llava(src: str, clip: str | None = None):
  """The checkpoint at `src`, with a CLIP checkpoint added when passed (or when the original
  config's `mm_vision_tower` is a local directory and `src` holds no tower)."""
  source = open_checkpoint(src)
  if clip is None and not _has_tower(source.keys()):
    name = (read_config_json(src) or {}).get("mm_vision_tower")
    if name and os.path.isdir(name):
      logging.info("no vision tower in %s: using mm_vision_tower %s", src, name)
      clip = name
  if clip is None:
    return source
  return WithClip(source, open_checkpoint(clip), read_config_json(clip))


def _llava_family(src: str, name: str | None, cfg_json: dict | None, keys) -> Family:
  """The LLaVA family called `name`, else the one whose detector accepts the checkpoint."""
  by_name = {f.name: f for f in FAMILIES}
  if name is not None:
    if name not in by_name:
      raise CheckpointError(f"{src}: family {name!r} is not LLaVA; LLaVA families: {sorted(by_name)}")
    return by_name[name]
  for fam in sorted(FAMILIES, key=lambda f: -f.priority):
    if fam.detect(cfg_json, keys):
      return fam
  raise CheckpointError(f"{src} is not a LLaVA checkpoint (none of {sorted(by_name)} recognises it)")


def convert_llava(src: str, clip: str | None = None, family: str | None = None, dtype: str = "float32",
                  config_overrides: dict | None = None, progress=None):
  """`convert.convert_checkpoint` for LLaVA checkpoints, with the CLIP source as an argument.
  Returns Converted (family, LlavaConfig, numpy params)."""
  source = open_llava(src, clip)
  cfg_json = read_config_json(src)
  fam = _llava_family(src, family, cfg_json, source.keys())
  config = fam.config_from_hf(cfg_json, source)
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  expected = abstract_params(fam, config)
  params = convert_state(source, fam.rules(config, source.keys()), expected, scan=config.text.scan_layers,
                         dtype=np_dtype(dtype), skip=fam.skip,
                         keep_dtype=fam.keep_fp32, progress=progress)
  logging.info("converted %d tensors of %s (clip: %s) as family %s", len(source), src, clip, fam.name)
  return Converted(fam.name, config, params)


# ----------------------------------------------------------------------------- registration
_COMMON = dict(config_cls=LlavaConfig, build=Llava, skip=SKIP)
FAMILIES = (
    Family(name="llava_hf", detect=_hf_detect("llava"), config_from_hf=_hf_config, rules=hf_rules,
           export_rules=lambda c, keys=(): hf_rules(c, (), export=True), priority=1, **_COMMON),
    Family(name="llava_next_hf", detect=_hf_detect("llava_next"), config_from_hf=_hf_config,
           rules=hf_rules, export_rules=lambda c, keys=(): hf_rules(c, (), export=True), priority=1,
           **_COMMON),
    Family(name="llava_original", detect=_original_detect, config_from_hf=original_config,
           rules=original_rules, export_rules=lambda c, keys=(): original_rules(c, (), export=True),
           priority=2, **_COMMON),
)

__all__ = ["hf_config", "hf_rules", "original_config", "original_rules", "convert_llava",
           "open_llava", "WithClip", "EXTERNAL_CLIP"]
