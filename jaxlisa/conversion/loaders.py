"""Loaders above the family table (conversion/families.py) and convert.py: LLaVA and LISA
checkpoints loaded with their extra sources, and a fresh LISA composed from its parts.

  load_llava(path, clip=None, ...)      -> convert.Pretrained (module Llava); raw original LLaVA files
                                           with a separate CLIP directory
  load_lisa(path, clip_src=None, ...)   -> convert.Pretrained (module Lisa); official LISA checkpoints
  compose_lisa(llm_or_llava_src, clip_src, sam_pth, tokenizer) -> (LisaConfig, params, tokenizer)
"""

from __future__ import annotations

import os

import numpy as np

from jaxlisa.conversion import convert, families
from jaxlisa.conversion import lisa as lisa_conv
from jaxlisa.conversion import llava as llava_conv
from jaxlisa.conversion.checkpoint_io import CheckpointError, open_checkpoint, read_config_json
from jaxlisa.models.lisa import Lisa, LisaConfig
from jaxlisa.models.llava import Llava, LlavaConfig
from jaxlisa.models.llm import DecoderConfig


def load_llava(path: str, clip: str | None = None, *, family: str | None = None, dtype: str | None = None,
               config_overrides: dict | None = None, with_tokenizer: bool = True):
  """`convert.load_pretrained` with the CLIP source as an argument (raw original LLaVA files)."""
  if convert.is_converted(path) or (clip is None and family not in (None, "llava_original")):
    return convert.load_pretrained(path, family=family, dtype=dtype, config_overrides=config_overrides,
                                   with_tokenizer=with_tokenizer)
  conv = llava_conv.convert_llava(path, clip=clip, family=family, dtype=dtype or "float32",
                       config_overrides=config_overrides)
  tok = convert.load_tokenizer(path if os.path.isdir(path) else os.path.dirname(path)) if with_tokenizer else None
  return convert.Pretrained(Llava(conv.config), conv.params, conv.config, conv.family, tok)


def load_lisa(path: str, clip_src: str | None = None, seg_token_idx: int | None = None, *,
              dtype: str | None = None, sam_overrides: dict | None = None,
              config_overrides: dict | None = None, with_tokenizer: bool = True):
  """`convert.load_pretrained` for LISA, with the CLIP directory and [SEG] id as arguments.
  A converted jaxlisa directory loads as it is."""
  if convert.is_converted(path):
    return convert.load_pretrained(path, dtype=dtype, config_overrides=config_overrides,
                                   with_tokenizer=with_tokenizer)
  conv = lisa_conv.convert_lisa(path, clip_src, seg_token_idx, dtype or "float32", sam_overrides, config_overrides)
  tok = convert.load_tokenizer(path if os.path.isdir(path) else os.path.dirname(path)) if with_tokenizer else None
  return convert.Pretrained(Lisa(conv.config), conv.params, conv.config, "lisa", tok)


def _load_tokenizer(tokenizer):
  if not isinstance(tokenizer, str):
    return tokenizer
  tok = convert.load_tokenizer(tokenizer)  # LLaMA SentencePiece dirs: the 4.31 slow tokenizer
  if tok is None:
    raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer.model) in {tokenizer}")
  return tok


def compose_lisa(llm_or_llava_src: str, clip_src: str | None, sam_pth: str, tokenizer, *,
                 use_mm_start_end: bool = True, vision_select_layer: int = -2, new_token_init: str = "hf",
                 seed: int = 0, dtype: str = "float32", sam_overrides: dict | None = None,
                 max_seg_per_conversation: int = 1):
  """A fresh LISA as train_ds.py builds one -> (LisaConfig, params, tokenizer).

  llm_or_llava_src: an original LLaVA checkpoint (LISA's `--version`, e.g. LLaVA-Lightning-7B),
    a llava-hf checkpoint, or a plain LLaMA / Mistral / Qwen2 checkpoint (then the linear
    mm_projector is new, with PyTorch's nn.Linear init).
  clip_src: the CLIP checkpoint directory (LISA: openai/clip-vit-large-patch14); optional for
    LLaVA checkpoints that carry their tower.
  sam_pth: an original segment_anything .pth (LISA: sam_vit_h_4b8939.pth; any size works).
  tokenizer: a transformers tokenizer or its directory; "[SEG]" (and "<im_start>", "<im_end>")
    are added in place (`add_lisa_tokens`), and the embeddings and lm_head resized to
    len(tokenizer) as `model.resize_token_embeddings(len(tokenizer))` (`new_rows`: "hf" =
    transformers 5, "mean", "normal" = transformers 4.31).
  text_hidden_fcs: PyTorch nn.Linear default init (LISA creates them after from_pretrained, so
    no HF _init_weights touches them). Random draws use numpy's generator seeded with `seed`.
  """
  rng = np.random.default_rng(seed)
  np_dtype = convert.np_dtype(dtype)
  tokenizer = _load_tokenizer(tokenizer)
  seg = lisa_conv.add_lisa_tokens(tokenizer, use_mm_start_end)

  fam = families.detect_family(read_config_json(llm_or_llava_src), open_checkpoint(llm_or_llava_src).keys())
  if fam.config_cls is LlavaConfig:
    conv = llava_conv.convert_llava(llm_or_llava_src, clip=clip_src, family=fam.name, dtype=dtype)
    llava, llava_params = conv.config, dict(conv.params)
    llava_params.pop("image_newline", None)
  elif fam.config_cls is DecoderConfig:
    if clip_src is None:
      raise CheckpointError(f"{llm_or_llava_src} is a plain {fam.name} checkpoint: pass clip_src=<CLIP dir>")
    text = convert.convert_checkpoint(llm_or_llava_src, family=fam.name, dtype=dtype)
    clip = convert.convert_checkpoint(clip_src, dtype=dtype)
    if clip.family != "clip_vision":
      raise CheckpointError(f"clip_src {clip_src} is a {clip.family} checkpoint, not CLIP")
    llava = LlavaConfig(vision=clip.config, text=text.config, projector_type="linear")
    proj = lisa_conv.torch_linear_init(rng, llava.mm_hidden_size, text.config.hidden_size, np_dtype)
    llava_params = {"vision_tower": clip.params, "language_model": text.params,
                    "multi_modal_projector": {"linear_1": proj}}
  else:
    raise CheckpointError(f"{llm_or_llava_src} is a {fam.name} checkpoint, not LLaVA or a decoder LM")
  llava = lisa_conv.lisa_llava(llava, use_mm_start_end=use_mm_start_end, select_layer=vision_select_layer)

  vocab = len(tokenizer)
  t = llava.text
  llava_params["language_model"] = lisa_conv.resize_vocab(llava_params["language_model"], t.tie_word_embeddings,
                                                          vocab, new_token_init, rng)
  llava = llava.replace(text=t.replace(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))

  sam = convert.convert_checkpoint(sam_pth, family="sam", dtype=dtype, config_overrides=sam_overrides)
  d, out_dim = t.hidden_size, sam.config.prompt_embed_dim
  fcs = {"layers_0": lisa_conv.torch_linear_init(rng, d, d, np_dtype),
         "layers_2": lisa_conv.torch_linear_init(rng, d, out_dim, np_dtype)}
  config = LisaConfig(llava=llava, sam=sam.config, seg_token_idx=seg, out_dim=out_dim,
                      max_seg_per_conversation=max_seg_per_conversation)
  params = {"llava": llava_params, "visual_model": sam.params, "text_hidden_fcs": fcs}
  lisa_conv.check_tree(params, config)
  return config, params, tokenizer
