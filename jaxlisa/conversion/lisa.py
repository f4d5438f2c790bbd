"""LISA checkpoints -> `Lisa` params and back, and a fresh LISA composed from its parts.

Family `lisa`: the official checkpoint format, i.e. what `merge_lora_weights_and_save_hf_model.py`
writes (`model.safetensors`, sharded safetensors or `pytorch_model*.bin`, HF `save_pretrained`):

  model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight   LLaMA
  model.mm_projector.{weight,bias}            linear projector (LISA); also model.mm_projector.{0,2}.*
  model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*   SAM, any size (read off shapes)
  model.text_hidden_fcs.0.{0,2}.{weight,bias}                        Linear - ReLU - Linear

The CLIP vision tower is not in these files: the merge script drops every key containing
"vision_tower" and LISA reloads CLIP from `config.vision_tower` at run time. It comes, in this
order, from `clip_src` (a CLIP checkpoint directory), from the checkpoint itself when it has one
(`model.vision_tower.vision_tower.vision_model.*`, pre-merge files), or from config.json's
`mm_vision_tower` / `vision_tower` when that is a local directory. Without any of them conversion
stops with an error naming `clip_src`. `rotary_emb.inv_freq` buffers are skipped.

`LisaConfig` comes from config.json (the LLaVA / LLaMA fields, `mm_use_im_start_end`,
`mm_vision_select_layer`; LISA forces the "patch" feature and "square" images), the tensor shapes
(vocabulary, projector, SAM, `out_dim`), and the [SEG] id from the tokenizer files next to the
weights (`added_tokens.json`, `tokenizer.json` or `tokenizer_config.json`), or `seg_token_idx=`.

  convert_lisa(src, clip_src=None, seg_token_idx=None)  -> family.Converted(family "lisa", ...)
  export_lisa(params, config)                           -> {official name: array}, CLIP excluded, LoRA merged
  conversion/loaders.py: load_lisa (-> convert.Pretrained, module Lisa) and compose_lisa (a fresh
  LISA from its parts); jaxlisa.load_pretrained(path) loads through the family table
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from jaxlisa.conversion import llava as llava_conv
from jaxlisa.conversion import sam as sam_conv
from jaxlisa.conversion.checkpoint_io import CheckpointError, open_checkpoint, read_config_json
from jaxlisa.conversion.family import Converted, Family, abstract_params, any_key, np_dtype
from jaxlisa.conversion.keymap import FLAT, LINEAR, Rule, convert_state, export_state, flatten_tree
from jaxlisa.conversion.weight_check import WeightCheck
from jaxlisa.data.conversation import (DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_SEG_TOKEN,
                                       IMAGE_TOKEN_INDEX)
from jaxlisa.models.lisa import Lisa, LisaConfig
from jaxlisa.models.lora import merge_lora
from jaxlisa.models.llava import LlavaConfig

LISA_CLIP = "model.vision_tower.vision_tower.vision_model."  # pre-merge checkpoints only
SAM_PREFIX = "model.visual_model."
FCS_PREFIX = "model.text_hidden_fcs.0."
SKIP = llava_conv.SKIP + sam_conv.BUFFERS
KEEP_FP32 = (r"positional_encoding_gaussian_matrix$",)
NEW_TOKEN_INITS = ("hf", "mean", "normal")


# ----------------------------------------------------------------------------- key maps
def _move(rules: Sequence[Rule], prefix: str) -> list[Rule]:
  def move(dst):
    if isinstance(dst, str):
      return prefix + dst
    return tuple(prefix + d if d else d for d in dst)
  return [dataclasses.replace(r, dst=move(r.dst)) for r in rules]


def fcs_rules(prefix: str = FCS_PREFIX, dst: str = "text_hidden_fcs/") -> list[Rule]:
  """`text_hidden_fcs[0]` = Sequential(Linear, ReLU, Linear, Dropout): modules 0 and 2."""
  return [Rule(f"{prefix}{k}.weight", f"{dst}layers_{k}/kernel", LINEAR) for k in (0, 2)] + \
      [Rule(f"{prefix}{k}.bias", f"{dst}layers_{k}/bias", FLAT) for k in (0, 2)]


def _llava_rules(c: LisaConfig, keys: Sequence[str] = (), export: bool = False, clip: bool = True) -> list[Rule]:
  rules = _move(llava_conv.original_rules(c.llava, keys, export), "llava/")
  if not clip:
    rules = [r for r in rules if not any(d.startswith("llava/vision_tower/") for d in r.dsts)]
  return rules


def lisa_rules(c: LisaConfig, keys: Sequence[str] = (), export: bool = False, clip: bool = True) -> list[Rule]:
  """Official LISA names -> `Lisa` params. `keys` locate the CLIP tower (inside, or a separate
  CLIP under llava.EXTERNAL_CLIP); for export (or without keys) it goes under the pre-merge names;
  clip=False leaves it out (the merge script's output)."""
  return (_llava_rules(c, keys, export, clip) + sam_conv.sam_rules(c.sam, SAM_PREFIX, "visual_model/")
          + fcs_rules())


def export_lisa(params: dict, config: LisaConfig, include_clip: bool = False) -> dict[str, np.ndarray]:
  """`Lisa` params -> {official name: numpy array} as the merge script saves them (no CLIP
  tower; include_clip=True adds it under the pre-merge names). LLaMA layers are exported with
  the config's scan setting, SAM's unrolled blocks and text_hidden_fcs on their own. LoRA
  adapters (config.llava.text.lora_rank > 0) are merged into their kernels first, as the merge
  script's `merge_and_unload` does."""
  t = config.llava.text
  if t.lora_rank:
    params = merge_lora(params, t.lora_alpha, t.lora_rank)
  llava_params = dict(params["llava"])
  if not include_clip:
    llava_params.pop("vision_tower", None)
  state = export_state({"llava": llava_params}, _llava_rules(config, export=True, clip=include_clip),
                       scan=config.llava.text.scan_layers)
  state.update(export_state({"visual_model": params["visual_model"]},
                            sam_conv.sam_rules(config.sam, SAM_PREFIX, "visual_model/"), scan=False))
  state.update(export_state({"text_hidden_fcs": params["text_hidden_fcs"]}, fcs_rules(), scan=False))
  extra = sorted(set(params) - {"llava", "visual_model", "text_hidden_fcs"})
  if extra:
    raise CheckpointError(f"parameters with no export rule: {extra}")
  return state


# ----------------------------------------------------------------------------- sources
def _has_tower(keys: Sequence[str]) -> bool:
  return any_key(keys, r"(^|\.)embeddings\.patch_embedding\.weight$")


def _tower_name(cfg: dict | None) -> str | None:
  cfg = cfg or {}
  return cfg.get("mm_vision_tower") or cfg.get("vision_tower")


def _no_clip_error(src: str, cfg: dict | None) -> CheckpointError:
  return CheckpointError(
      f"the LISA checkpoint {src} holds no CLIP vision tower (LISA's merge script drops every "
      f"'vision_tower' key) and config.json's vision_tower {_tower_name(cfg)!r} is not a local "
      "directory: pass the CLIP checkpoint directory, jaxlisa.conversion.lisa.convert_lisa(src, "
      "clip_src=DIR) / jaxlisa.conversion.loaders.load_lisa(src, clip_src=DIR), or point config.json's vision_tower / "
      "mm_vision_tower at it")


def open_lisa(src: str, clip_src: str | None = None):
  """The LISA checkpoint at `src` with its CLIP tower attached (see the module docstring)."""
  source = open_checkpoint(src)
  cfg = read_config_json(src)
  if clip_src is None:
    if _has_tower(source.keys()):
      return source
    name = _tower_name(cfg)
    if not (name and os.path.isdir(name)):
      raise _no_clip_error(src, cfg)
    logging.info("no vision tower in %s: using the local vision_tower %s", src, name)
    clip_src = name
  return llava_conv.WithClip(source, open_checkpoint(clip_src), read_config_json(clip_src))


def _source_dir(source) -> str | None:
  base = getattr(source, "base", source)
  files = getattr(base, "files", None)
  return os.path.dirname(os.path.abspath(files[0])) if files else None


def seg_token_from_tokenizer(path: str | None) -> int | None:
  """The [SEG] id recorded in the tokenizer files of directory `path`, or None."""
  if not path or not os.path.isdir(path):
    return None
  f = os.path.join(path, "added_tokens.json")
  if os.path.exists(f):
    with open(f) as fh:
      added = json.load(fh)
    if DEFAULT_SEG_TOKEN in added:
      return int(added[DEFAULT_SEG_TOKEN])
  f = os.path.join(path, "tokenizer.json")
  if os.path.exists(f):
    with open(f) as fh:
      for tok in json.load(fh).get("added_tokens") or []:
        if tok.get("content") == DEFAULT_SEG_TOKEN:
          return int(tok["id"])
  f = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(f):
    with open(f) as fh:
      for idx, tok in (json.load(fh).get("added_tokens_decoder") or {}).items():
        if tok.get("content") == DEFAULT_SEG_TOKEN:
          return int(idx)
  return None


def _seg_token_idx(directory: str | None, given: int | None) -> int:
  found = seg_token_from_tokenizer(directory)
  if given is not None:
    if found is not None and found != given:
      logging.warning("seg_token_idx=%d given, the tokenizer files in %s say [SEG] is %d: using %d",
                      given, directory, found, given)
    return int(given)
  if found is None:
    raise CheckpointError(f"cannot tell the [SEG] token id: no tokenizer file in {directory} "
                          "(added_tokens.json, tokenizer.json, tokenizer_config.json) names "
                          f"{DEFAULT_SEG_TOKEN!r}; pass seg_token_idx=")
  return found


# ----------------------------------------------------------------------------- config
def lisa_llava(c: LlavaConfig, *, use_mm_start_end: bool, select_layer: int) -> LlavaConfig:
  """What LisaModel forces on its LLaVA: "patch" features, square images, the -200 placeholder."""
  return c.replace(vision_feature_layer=int(select_layer), vision_feature_select_strategy="default",
                   image_token_index=IMAGE_TOKEN_INDEX, mm_use_im_start_end=bool(use_mm_start_end),
                   image_aspect_ratio="square", image_grid_pinpoints=None, mm_patch_merge_type="flat")


def lisa_config(cfg: dict | None, source, seg_token_idx: int | None = None,
                sam_overrides: dict | None = None) -> LisaConfig:
  """LisaConfig from config.json (may be None) and the tensors of `source` (CLIP attached)."""
  keys = source.keys()
  if not _has_tower(keys):
    raise _no_clip_error(_source_dir(source) or "?", cfg)
  for need in ("model.embed_tokens.weight", FCS_PREFIX + "2.weight",
               SAM_PREFIX + "image_encoder.patch_embed.proj.weight"):
    if need not in keys:
      raise CheckpointError(f"not a LISA checkpoint: no {need!r}")
  proj_type, _ = llava_conv._projector_depth_from_keys(keys)  # pylint: disable=protected-access
  llava_cfg = dict(cfg) if cfg else None
  if llava_cfg is not None:
    llava_cfg["mm_projector_type"] = proj_type
  base = llava_conv.original_config(llava_cfg, source)
  vocab, hidden = source.shape("model.embed_tokens.weight")
  text = base.text.replace(vocab_size=int(vocab), tie_word_embeddings="lm_head.weight" not in keys)
  if text.hidden_size != hidden:
    raise CheckpointError(f"config.json hidden_size {text.hidden_size} != embed_tokens width {hidden}")
  llava = lisa_llava(base.replace(text=text, projector_type=proj_type),
                      use_mm_start_end=(cfg or {}).get("mm_use_im_start_end", True),
                      select_layer=(cfg or {}).get("mm_vision_select_layer", -2))
  sam = sam_conv.infer_config(source, SAM_PREFIX, **(sam_overrides or {}))
  out_dim = int(source.shape(FCS_PREFIX + "2.weight")[0])
  if cfg and cfg.get("out_dim") not in (None, out_dim):
    raise CheckpointError(f"config.json out_dim {cfg['out_dim']} != text_hidden_fcs output {out_dim}")
  seg = _seg_token_idx(_source_dir(source), seg_token_idx)
  if not 0 <= seg < vocab:
    raise CheckpointError(f"[SEG] id {seg} is outside the vocabulary ({vocab})")
  return LisaConfig(llava=llava, sam=sam, seg_token_idx=seg, out_dim=out_dim)


# ----------------------------------------------------------------------------- convert / load
def _detect(cfg, keys) -> bool:
  if any_key(keys, r"(^|\.)text_hidden_fcs\.") or \
      (any_key(keys, r"(^|\.)visual_model\.") and any_key(keys, r"^model\.layers\.\d+\.")):
    return True
  return cfg is not None and any("LISA" in a.upper() for a in cfg.get("architectures") or [])


def _config(cfg, source) -> LisaConfig:
  return lisa_config(cfg, source)


def _rules(c: LisaConfig, keys: Sequence[str] = ()) -> list[Rule]:
  return lisa_rules(c, keys)


def convert_lisa(src: str, clip_src: str | None = None, seg_token_idx: int | None = None,
                 dtype: str = "float32", sam_overrides: dict | None = None,
                 config_overrides: dict | None = None, progress=None, *, allow_nonfinite: bool = False,
                 strict: bool = False):
  """Official LISA checkpoint (file or directory) -> family.Converted("lisa", LisaConfig, params).
  Tensors are checked as convert_checkpoint checks them (weight_check.WeightCheck).

  clip_src: CLIP checkpoint directory (HF CLIPVisionModel / CLIPModel); needed unless the
  checkpoint holds a tower or config.json's vision_tower is a local directory.
  seg_token_idx: overrides the id read from the tokenizer files. sam_overrides: SamConfig fields
  the shapes cannot tell (decoder_num_heads, 8 by default). config_overrides: LisaConfig fields."""
  source = open_lisa(src, clip_src)
  cfg_json = read_config_json(src)
  config = lisa_config(cfg_json, source, seg_token_idx, sam_overrides)
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  expected = abstract_params(LISA_FAMILY, config)
  checked = WeightCheck(source, src, allow_nonfinite=allow_nonfinite, strict=strict)
  params = convert_state(checked, lisa_rules(config, source.keys()), expected, scan=config.llava.text.scan_layers,
                         dtype=np_dtype(dtype), skip=SKIP,
                         keep_dtype=KEEP_FP32, progress=progress)
  checked.finish()
  logging.info("converted %d tensors of %s (clip: %s) as LISA", len(source), src, clip_src)
  return Converted("lisa", config, params)


# ----------------------------------------------------------------------------- compose from parts
def torch_linear_init(rng: np.random.Generator, n_in: int, n_out: int, dtype) -> dict[str, np.ndarray]:
  """PyTorch nn.Linear's default init (kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(in)), bias the
  same bound), as kernel [in, out]."""
  bound = 1.0 / np.sqrt(n_in)
  return {"kernel": rng.uniform(-bound, bound, (n_in, n_out)).astype(dtype),
          "bias": rng.uniform(-bound, bound, (n_out,)).astype(dtype)}


def new_rows(old: np.ndarray, n: int, how: str = "hf", rng: np.random.Generator | None = None,
             std: float = 0.02) -> np.ndarray:
  """Rows for `n` added tokens of an embedding-like matrix old [V, D].

  "hf": transformers 5 `resize_token_embeddings` (mean_resizing=True): a sample of
        N(mean, 1e-9 * covariance) of the old rows when that covariance is positive definite,
        else the mean (modeling_utils._init_added_embeddings_weights_with_mean);
  "mean": the mean of the old rows;
  "normal": N(0, std) (transformers <= 4.45 `_init_weights`, what LISA's own training saw with
        transformers 4.31 and initializer_range 0.02)."""
  if how not in NEW_TOKEN_INITS:
    raise ValueError(f"new token init {how!r}: expected one of {NEW_TOKEN_INITS}")
  rng = rng or np.random.default_rng(0)
  w = np.asarray(old, np.float32)
  if how == "normal":
    return (std * rng.standard_normal((n, w.shape[1]))).astype(old.dtype)
  mean = w.mean(0)
  if how == "mean":
    return np.repeat(mean[None], n, 0).astype(old.dtype)
  centered = w - mean
  cov = (centered.T @ centered / w.shape[0]).astype(np.float32)
  try:
    chol = np.linalg.cholesky(1e-9 * cov.astype(np.float64))
  except np.linalg.LinAlgError:
    return np.repeat(mean[None], n, 0).astype(old.dtype)
  z = rng.standard_normal((n, w.shape[1]))
  return (mean[None] + z @ chol.T).astype(old.dtype)


def resize_vocab(text_params: dict, tied: bool, new_vocab: int, how: str, rng) -> dict:
  """HF resize_token_embeddings on DecoderLM params: rows kept / cut, new rows per `new_rows`."""
  p = dict(text_params)
  emb = np.asarray(p["embed_tokens"]["embedding"])
  old = emb.shape[0]
  if new_vocab <= old:
    p["embed_tokens"] = {"embedding": emb[:new_vocab]}
    if not tied:
      p["lm_head"] = {"kernel": np.asarray(p["lm_head"]["kernel"])[:, :new_vocab]}
    return p
  p["embed_tokens"] = {"embedding": np.concatenate([emb, new_rows(emb, new_vocab - old, how, rng)])}
  if not tied:
    head = np.asarray(p["lm_head"]["kernel"])  # [D, V]: rows of the torch weight are columns
    p["lm_head"] = {"kernel": np.concatenate([head, new_rows(head.T, new_vocab - old, how, rng).T], axis=1)}
  return p


def add_lisa_tokens(tokenizer, use_mm_start_end: bool = True) -> int:
  """train_ds.py's tokenizer setup, in place: right padding, pad = unk, "[SEG]" added (not
  special), then "<im_start>", "<im_end>" as special tokens. Returns the [SEG] id.

  train_ds.py reads the id as tokenizer("[SEG]", add_special_tokens=False).input_ids[0], which
  is a "▁" piece for some LLaMA-2 tokenizers (LISA issue #55); the token's own id is used here
  and a warning says when the two differ."""
  tokenizer.padding_side = "right"
  if getattr(tokenizer, "unk_token", None) is not None:
    tokenizer.pad_token = tokenizer.unk_token
  tokenizer.add_tokens(DEFAULT_SEG_TOKEN)
  if use_mm_start_end:
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
  seg = int(tokenizer.convert_tokens_to_ids(DEFAULT_SEG_TOKEN))
  official = tokenizer(DEFAULT_SEG_TOKEN, add_special_tokens=False).input_ids
  if official and official[0] != seg:
    logging.warning("tokenizer('[SEG]') gives %s: train_ds.py would take %d as the [SEG] id; using %d",
                    official, official[0], seg)
  return seg


def check_tree(params: dict, config: LisaConfig) -> None:
  """Raise CheckpointError unless `params` has exactly the model's leaves and shapes."""
  want = {k: tuple(v.shape) for k, v in flatten_tree(abstract_params(LISA_FAMILY, config)).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten_tree(params).items()}
  bad = [f"{'/'.join(k)}: {got.get(k)} != {want.get(k)}" for k in sorted(set(want) | set(got))
         if got.get(k) != want.get(k)]
  if bad:
    raise CheckpointError(f"composed LISA params do not match the model ({len(bad)}): {bad[:20]}")


# ----------------------------------------------------------------------------- registration
LISA_FAMILY = Family(name="lisa", detect=_detect, config_from_hf=_config, config_cls=LisaConfig, rules=_rules,
                     build=Lisa, skip=SKIP, keep_fp32=KEEP_FP32,
                     export_rules=lambda c, keys=(): lisa_rules(c, export=True), priority=6,
                     open_source=open_lisa)
FAMILIES = (LISA_FAMILY,)

__all__ = ["convert_lisa", "export_lisa", "lisa_config", "lisa_rules", "fcs_rules",
           "open_lisa", "add_lisa_tokens", "new_rows", "seg_token_from_tokenizer", "check_tree", "LISA_FAMILY"]
