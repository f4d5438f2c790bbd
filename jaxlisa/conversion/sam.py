"""SAM v1 families.

`sam`:    the original `sam_vit_{b,l,h}.pth` names (`image_encoder.*`, `prompt_encoder.*`,
          `mask_decoder.*`), also under a prefix (LISA: `model.visual_model.`). A `.pth` has no
          config, so every size is read off the tensor shapes (`infer_config`).
`sam_hf`: transformers `SamModel` (`vision_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`,
          `shared_image_embedding.*`), configured from its config.json.

`sam_rules(config, prefix, dst_prefix)` and `infer_config(source, prefix)` are public so the
LISA converter can embed SAM under its own names. Unrolled layers are named inline
(`blocks_{i}`), so the rules convert the same whatever `scan` the caller uses; export them with
scan=False.
"""

from __future__ import annotations

import re
from typing import Sequence

from absl import logging

from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import CONV, CONV_TRANSPOSE, FLAT, LINEAR, LINEAR_IN2, Rule, linear_rules, norm_rules
from jaxlisa.conversion.family import Family, any_key
from jaxlisa.models.sam import Sam, SamConfig

# Non-persistent in segment_anything, but some re-saved checkpoints carry them.
BUFFERS = (r"(^|\.)pixel_(mean|std)$",)
_ANCHOR = "image_encoder.patch_embed.proj.weight"
_HF_ANCHOR = "vision_encoder.patch_embed.projection.weight"
# Heads of the published encoders, for checkpoints without rel-pos tables to read them from.
_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16}


def _attn(src: str, dst: str) -> list[Rule]:
  """q/k/v/out projections of a mask-decoder Attention (kernels [C, N, Dh] and [N, Dh, C])."""
  rules = [r for n in ("q_proj", "k_proj", "v_proj") for r in linear_rules(f"{src}.{n}", f"{dst}/{n}")]
  return rules + [Rule(f"{src}.out_proj.weight", f"{dst}/out_proj/kernel", LINEAR_IN2),
                  Rule(f"{src}.out_proj.bias", f"{dst}/out_proj/bias")]


def _conv(src: str, dst: str, bias: bool = True, t=CONV) -> list[Rule]:
  return [Rule(f"{src}.weight", f"{dst}/kernel", t)] + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def _block_common(src: str, dst: str) -> list[Rule]:
  """One image-encoder block's attention and MLP (identical names in both formats)."""
  return [Rule(f"{src}.attn.qkv.weight", f"{dst}/attn/qkv/kernel", LINEAR),
          Rule(f"{src}.attn.qkv.bias", f"{dst}/attn/qkv/bias", FLAT),
          Rule(f"{src}.attn.proj.weight", f"{dst}/attn/proj/kernel", LINEAR_IN2),
          Rule(f"{src}.attn.proj.bias", f"{dst}/attn/proj/bias"),
          Rule(f"{src}.attn.rel_pos_h", f"{dst}/attn/rel_pos_h"),
          Rule(f"{src}.attn.rel_pos_w", f"{dst}/attn/rel_pos_w"),
          *linear_rules(f"{src}.mlp.lin1", f"{dst}/mlp/lin1"), *linear_rules(f"{src}.mlp.lin2", f"{dst}/mlp/lin2")]


def sam_rules(c: SamConfig | None = None, prefix: str = "", dst_prefix: str = "") -> list[Rule]:
  """Original segment_anything names (under `prefix`, e.g. 'model.visual_model.') -> `Sam` params
  (under `dst_prefix`, e.g. 'visual_model/'). The table does not depend on the sizes."""
  del c
  ie, pe, md = f"{prefix}image_encoder", f"{prefix}prompt_encoder", f"{prefix}mask_decoder"
  die, dpe, dmd = f"{dst_prefix}image_encoder", f"{dst_prefix}prompt_encoder", f"{dst_prefix}mask_decoder"
  blk, dblk = f"{ie}.blocks.{{i}}", f"{die}/blocks_{{i}}"
  tl, dtl = f"{md}.transformer.layers.{{i}}", f"{dmd}/transformer/layers_{{i}}"
  rules = [
      *_conv(f"{ie}.patch_embed.proj", f"{die}/patch_embed/proj"),
      Rule(f"{ie}.pos_embed", f"{die}/pos_embed"),
      *norm_rules(f"{blk}.norm1", f"{dblk}/norm1"), *norm_rules(f"{blk}.norm2", f"{dblk}/norm2"),
      *_block_common(blk, dblk),
      *_conv(f"{ie}.neck.0", f"{die}/neck_0", bias=False), *norm_rules(f"{ie}.neck.1", f"{die}/neck_1"),
      *_conv(f"{ie}.neck.2", f"{die}/neck_2", bias=False), *norm_rules(f"{ie}.neck.3", f"{die}/neck_3"),
      Rule(f"{pe}.pe_layer.positional_encoding_gaussian_matrix",
           f"{dpe}/pe_layer/positional_encoding_gaussian_matrix"),
      Rule(f"{pe}.point_embeddings.{{i}}.weight", f"{dpe}/point_embeddings_{{i}}/embedding"),
      Rule(f"{pe}.not_a_point_embed.weight", f"{dpe}/not_a_point_embed/embedding"),
      Rule(f"{pe}.no_mask_embed.weight", f"{dpe}/no_mask_embed/embedding"),
      *_conv(f"{pe}.mask_downscaling.0", f"{dpe}/mask_downscaling_0"),
      *norm_rules(f"{pe}.mask_downscaling.1", f"{dpe}/mask_downscaling_1"),
      *_conv(f"{pe}.mask_downscaling.3", f"{dpe}/mask_downscaling_3"),
      *norm_rules(f"{pe}.mask_downscaling.4", f"{dpe}/mask_downscaling_4"),
      *_conv(f"{pe}.mask_downscaling.6", f"{dpe}/mask_downscaling_6"),
      Rule(f"{md}.iou_token.weight", f"{dmd}/iou_token/embedding"),
      Rule(f"{md}.mask_tokens.weight", f"{dmd}/mask_tokens/embedding"),
      *_attn(f"{tl}.self_attn", f"{dtl}/self_attn"),
      *_attn(f"{tl}.cross_attn_token_to_image", f"{dtl}/cross_attn_token_to_image"),
      *_attn(f"{tl}.cross_attn_image_to_token", f"{dtl}/cross_attn_image_to_token"),
      *[r for k in (1, 2, 3, 4) for r in norm_rules(f"{tl}.norm{k}", f"{dtl}/norm{k}")],
      *linear_rules(f"{tl}.mlp.lin1", f"{dtl}/mlp/lin1"), *linear_rules(f"{tl}.mlp.lin2", f"{dtl}/mlp/lin2"),
      *_attn(f"{md}.transformer.final_attn_token_to_image", f"{dmd}/transformer/final_attn_token_to_image"),
      *norm_rules(f"{md}.transformer.norm_final_attn", f"{dmd}/transformer/norm_final_attn"),
      *_conv(f"{md}.output_upscaling.0", f"{dmd}/output_upscaling_0", t=CONV_TRANSPOSE),
      *norm_rules(f"{md}.output_upscaling.1", f"{dmd}/output_upscaling_1"),
      *_conv(f"{md}.output_upscaling.3", f"{dmd}/output_upscaling_3", t=CONV_TRANSPOSE),
      *linear_rules(f"{md}.output_hypernetworks_mlps.{{m}}.layers.{{j}}",
               f"{dmd}/output_hypernetworks_mlps_{{m}}/layers_{{j}}"),
      *linear_rules(f"{md}.iou_prediction_head.layers.{{j}}", f"{dmd}/iou_prediction_head/layers_{{j}}"),
  ]
  return rules


def hf_rules(c: SamConfig, prefix: str = "", dst_prefix: str = "") -> list[Rule]:
  """transformers SamModel names -> `Sam` params. HF's SamFeedForward names its linears
  proj_in, layers.{j}, proj_out (ours: layers_0 .. layers_{L-1}), so those rules depend on depth."""
  ve, pe, md = f"{prefix}vision_encoder", f"{prefix}prompt_encoder", f"{prefix}mask_decoder"
  die, dpe, dmd = f"{dst_prefix}image_encoder", f"{dst_prefix}prompt_encoder", f"{dst_prefix}mask_decoder"
  blk, dblk = f"{ve}.layers.{{i}}", f"{die}/blocks_{{i}}"
  tl, dtl = f"{md}.transformer.layers.{{i}}", f"{dmd}/transformer/layers_{{i}}"
  gauss = f"{dpe}/pe_layer/positional_encoding_gaussian_matrix"

  def feed_forward(src: str, dst: str, depth: int) -> list[Rule]:
    out = linear_rules(f"{src}.proj_in", f"{dst}/layers_0") + linear_rules(f"{src}.proj_out", f"{dst}/layers_{depth - 1}")
    for j in range(depth - 2):
      out += linear_rules(f"{src}.layers.{j}", f"{dst}/layers_{j + 1}")
    return out

  rules = [
      *_conv(f"{ve}.patch_embed.projection", f"{die}/patch_embed/proj"),
      Rule(f"{ve}.pos_embed", f"{die}/pos_embed"),
      *norm_rules(f"{blk}.layer_norm1", f"{dblk}/norm1"), *norm_rules(f"{blk}.layer_norm2", f"{dblk}/norm2"),
      *_block_common(blk, dblk),
      *_conv(f"{ve}.neck.conv1", f"{die}/neck_0", bias=False), *norm_rules(f"{ve}.neck.layer_norm1", f"{die}/neck_1"),
      *_conv(f"{ve}.neck.conv2", f"{die}/neck_2", bias=False), *norm_rules(f"{ve}.neck.layer_norm2", f"{die}/neck_3"),
      # Tied in SamModel: the saved file may hold either name, or both.
      Rule(f"{prefix}shared_image_embedding.positional_embedding", gauss),
      Rule(f"{pe}.shared_embedding.positional_embedding", gauss),
      Rule(f"{pe}.point_embed.{{i}}.weight", f"{dpe}/point_embeddings_{{i}}/embedding"),
      Rule(f"{pe}.not_a_point_embed.weight", f"{dpe}/not_a_point_embed/embedding"),
      Rule(f"{pe}.no_mask_embed.weight", f"{dpe}/no_mask_embed/embedding"),
      *_conv(f"{pe}.mask_embed.conv1", f"{dpe}/mask_downscaling_0"),
      *norm_rules(f"{pe}.mask_embed.layer_norm1", f"{dpe}/mask_downscaling_1"),
      *_conv(f"{pe}.mask_embed.conv2", f"{dpe}/mask_downscaling_3"),
      *norm_rules(f"{pe}.mask_embed.layer_norm2", f"{dpe}/mask_downscaling_4"),
      *_conv(f"{pe}.mask_embed.conv3", f"{dpe}/mask_downscaling_6"),
      Rule(f"{md}.iou_token.weight", f"{dmd}/iou_token/embedding"),
      Rule(f"{md}.mask_tokens.weight", f"{dmd}/mask_tokens/embedding"),
      *_attn(f"{tl}.self_attn", f"{dtl}/self_attn"),
      *_attn(f"{tl}.cross_attn_token_to_image", f"{dtl}/cross_attn_token_to_image"),
      *_attn(f"{tl}.cross_attn_image_to_token", f"{dtl}/cross_attn_image_to_token"),
      *[r for k in (1, 2, 3, 4) for r in norm_rules(f"{tl}.layer_norm{k}", f"{dtl}/norm{k}")],
      *linear_rules(f"{tl}.mlp.lin1", f"{dtl}/mlp/lin1"), *linear_rules(f"{tl}.mlp.lin2", f"{dtl}/mlp/lin2"),
      *_attn(f"{md}.transformer.final_attn_token_to_image", f"{dmd}/transformer/final_attn_token_to_image"),
      *norm_rules(f"{md}.transformer.layer_norm_final_attn", f"{dmd}/transformer/norm_final_attn"),
      *_conv(f"{md}.upscale_conv1", f"{dmd}/output_upscaling_0", t=CONV_TRANSPOSE),
      *norm_rules(f"{md}.upscale_layer_norm", f"{dmd}/output_upscaling_1"),
      *_conv(f"{md}.upscale_conv2", f"{dmd}/output_upscaling_3", t=CONV_TRANSPOSE),
      *feed_forward(f"{md}.iou_prediction_head", f"{dmd}/iou_prediction_head", c.iou_head_depth),
  ]
  for m in range(c.num_mask_tokens):
    rules += feed_forward(f"{md}.output_hypernetworks_mlps.{m}", f"{dmd}/output_hypernetworks_mlps_{m}", 3)
  return rules


def hf_export_rules(c: SamConfig) -> list[Rule]:
  """Export map to HF names: the tied Gaussian matrix goes out once, as shared_image_embedding."""
  return [r for r in hf_rules(c) if r.src != "prompt_encoder.shared_embedding.positional_embedding"]


# ----------------------------------------------------------------------------- configs
def _indices(keys: Sequence[str], pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def find_prefix(keys: Sequence[str], anchor: str = _ANCHOR) -> str:
  """The prefix in front of the SAM names ('' for a plain sam_vit_*.pth)."""
  found = sorted({k[:-len(anchor)] for k in keys if k.endswith(anchor)})
  if not found:
    raise CheckpointError(f"no SAM image encoder in the checkpoint (looked for *{anchor})")
  if len(found) > 1:
    raise CheckpointError(f"several SAM image encoders in the checkpoint: prefixes {found}")
  return found[0]


def infer_config(src, prefix: str | None = None, **overrides) -> SamConfig:
  """SamConfig read off the tensor shapes of an original-format SAM state dict.

  Heads come from the rel-pos tables ([2 s - 1, head_dim]); a block is global when its table
  spans the whole grid (2 g - 1), windowed otherwise (window = (L + 1) / 2). The decoder's head
  count cannot be read off shapes; it is SAM's 8 unless overridden (`decoder_num_heads`), with a
  warning when assumed. The converted directory's jaxlisa_config.json records the value used."""
  keys = src.keys()
  p = find_prefix(keys) if prefix is None else prefix
  ie, pe, md = f"{p}image_encoder.", f"{p}prompt_encoder.", f"{p}mask_decoder."
  shape = src.shape
  embed, _, patch, _ = shape(ie + "patch_embed.proj.weight")
  depth = len(_indices(keys, re.escape(ie) + r"blocks\.(\d+)\."))
  use_abs = ie + "pos_embed" in keys
  use_rel = ie + "blocks.0.attn.rel_pos_h" in keys
  grid = shape(ie + "pos_embed")[1] if use_abs else 1024 // patch
  if use_rel:
    head_dim = shape(ie + "blocks.0.attn.rel_pos_h")[1]
    sizes = [shape(f"{ie}blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    glob = tuple(i for i, n in enumerate(sizes) if n == 2 * grid - 1)
    windowed = [n for n in sizes if n != 2 * grid - 1]
    if len(set(windowed)) > 1:
      raise CheckpointError(f"image-encoder blocks have different window sizes: {sorted(set(windowed))}")
    window = (windowed[0] + 1) // 2 if windowed else 0
    heads = embed // head_dim
  else:
    if embed not in _KNOWN_HEADS:
      raise CheckpointError(f"cannot infer the encoder's heads without rel-pos tables (embed {embed}); "
                            "pass num_heads in the config overrides")
    heads, glob, window = _KNOWN_HEADS[embed], (), 0
  n_masks, prompt_dim = shape(md + "mask_tokens.weight")
  q_out = shape(md + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
  cfg = dict(
      img_size=grid * patch, patch_size=patch, in_chans=shape(ie + "patch_embed.proj.weight")[1],
      embed_dim=embed, depth=depth, num_heads=heads, mlp_dim=shape(ie + "blocks.0.mlp.lin1.weight")[0],
      out_chans=shape(ie + "neck.0.weight")[0], window_size=window, global_attn_indexes=glob,
      use_rel_pos=use_rel, use_abs_pos=use_abs, qkv_bias=ie + "blocks.0.attn.qkv.bias" in keys,
      prompt_embed_dim=prompt_dim, mask_in_chans=shape(pe + "mask_downscaling.3.weight")[0],
      decoder_depth=len(_indices(keys, re.escape(md) + r"transformer\.layers\.(\d+)\.")),
      decoder_mlp_dim=shape(md + "transformer.layers.0.mlp.lin1.weight")[0],
      attention_downsample_rate=prompt_dim // q_out, num_multimask_outputs=n_masks - 1,
      iou_head_depth=len(_indices(keys, re.escape(md) + r"iou_prediction_head\.layers\.(\d+)\.")),
      iou_head_hidden_dim=shape(md + "iou_prediction_head.layers.0.weight")[0])
  if "decoder_num_heads" not in overrides:
    logging.warning("SAM checkpoint (keys under %r): a .pth cannot say its mask decoder's head count; assuming %d (every "
                    "released SAM). If yours differs, pass decoder_num_heads in the overrides (converter "
                    "--override decoder_num_heads=N, main.py --config.init.sam_decoder_num_heads=N)",
                    p, SamConfig.decoder_num_heads)
  cfg.update(overrides)
  return SamConfig(**cfg)


def config_from_hf(cfg: dict) -> SamConfig:
  """transformers SamConfig (config.json) -> SamConfig."""
  if cfg.get("model_type") != "sam":
    raise CheckpointError(f"config.json model_type {cfg.get('model_type')!r} is not 'sam'")
  v = cfg.get("vision_config") or {}
  p = cfg.get("prompt_encoder_config") or {}
  m = cfg.get("mask_decoder_config") or {}
  img, patch = v.get("image_size", 1024), v.get("patch_size", 16)
  if p.get("image_size", img) != img or p.get("patch_size", patch) != patch:
    raise CheckpointError(f"vision and prompt-encoder image sizes differ: {img}/{patch} vs "
                          f"{p.get('image_size')}/{p.get('patch_size')}")
  hidden = v.get("hidden_size", 768)
  prompt_dim = p.get("hidden_size", 256)
  if v.get("num_pos_feats", 128) * 2 != prompt_dim:
    raise CheckpointError(f"vision_config.num_pos_feats {v.get('num_pos_feats')} must be half the prompt "
                          f"encoder's hidden size {prompt_dim}")
  for key, want in ((v.get("hidden_act", "gelu"), "gelu"), (p.get("hidden_act", "gelu"), "gelu"),
                    (m.get("hidden_act", "relu"), "relu")):
    if key != want:
      raise CheckpointError(f"SAM activation {key!r} is not supported (expected {want!r})")
  if m.get("hidden_size", prompt_dim) != prompt_dim:
    raise CheckpointError("mask decoder and prompt encoder widths differ")
  return SamConfig(
      img_size=img, patch_size=patch, in_chans=v.get("num_channels", 3), embed_dim=hidden,
      depth=v.get("num_hidden_layers", 12), num_heads=v.get("num_attention_heads", 12),
      mlp_ratio=v.get("mlp_ratio", 4.0), mlp_dim=v.get("mlp_dim"), out_chans=v.get("output_channels", 256),
      window_size=v.get("window_size", 14), global_attn_indexes=tuple(v.get("global_attn_indexes", (2, 5, 8, 11))),
      use_rel_pos=v.get("use_rel_pos", True), use_abs_pos=v.get("use_abs_pos", True),
      qkv_bias=v.get("qkv_bias", True), encoder_norm_eps=v.get("layer_norm_eps", 1e-6),
      prompt_embed_dim=prompt_dim, mask_in_chans=p.get("mask_input_channels", 16),
      decoder_depth=m.get("num_hidden_layers", 2), decoder_mlp_dim=m.get("mlp_dim", 2048),
      decoder_num_heads=m.get("num_attention_heads", 8),
      attention_downsample_rate=m.get("attention_downsample_rate", 2),
      num_multimask_outputs=m.get("num_multimask_outputs", 3), iou_head_depth=m.get("iou_head_depth", 3),
      iou_head_hidden_dim=m.get("iou_head_hidden_dim", 256),
      decoder_norm_eps=m.get("layer_norm_eps", 1e-6))  # HF: blocks use layer_norm_eps, final norm 1e-5


# ----------------------------------------------------------------------------- families
def _detect_sam(cfg, keys) -> bool:
  if cfg is not None and cfg.get("model_type") == "sam":
    return False
  return any_key(keys, r"(^|\.)image_encoder\.patch_embed\.proj\.weight$") and \
      not any_key(keys, r"text_hidden_fcs|(^|\.)model\.layers\.\d+\.|vision_tower|mm_projector")


def _detect_hf(cfg, keys) -> bool:
  if cfg is not None:
    return cfg.get("model_type") == "sam"
  return any_key(keys, r"^vision_encoder\.patch_embed\.projection\.weight$") and \
      any_key(keys, r"^mask_decoder\.")


def _sam_config(cfg, src, overrides: dict | None = None) -> SamConfig:
  """overrides: the caller's SamConfig fields, seen before the shapes are read (decoder_num_heads)."""
  del cfg
  return infer_config(src, **(overrides or {}))


def _hf_config(cfg, src) -> SamConfig:
  del src
  if cfg is None:
    raise CheckpointError("converting a transformers SamModel checkpoint needs its config.json")
  return config_from_hf(cfg)


def _sam_rules(c: SamConfig, keys: Sequence[str] = ()) -> list[Rule]:
  return sam_rules(c, find_prefix(keys) if keys else "")


def _hf_rules(c: SamConfig, keys: Sequence[str] = ()) -> list[Rule]:
  return hf_rules(c, find_prefix(keys, _HF_ANCHOR) if keys else "")


FAMILIES = (
    Family(name="sam", detect=_detect_sam, config_from_hf=_sam_config, config_cls=SamConfig,
           rules=_sam_rules, build=Sam, skip=BUFFERS,
           keep_fp32=(r"positional_encoding_gaussian_matrix$",),
           export_rules=lambda c, keys=(): sam_rules(c)),
    Family(name="sam_hf", detect=_detect_hf, config_from_hf=_hf_config, config_cls=SamConfig,
           rules=_hf_rules, build=Sam, skip=BUFFERS,
           keep_fp32=(r"positional_encoding_gaussian_matrix$",),
           export_rules=lambda c, keys=(): hf_export_rules(c)),
)

__all__ = ["sam_rules", "hf_rules", "infer_config", "config_from_hf", "find_prefix"]
