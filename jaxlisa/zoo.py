"""LAVIS-style model zoo: `load_model_and_preprocess(name, model_type)` -> (module, params, vis_processors,
txt_processors), with the architectures of the released LAVIS / MiniGPT4Qwen models and tiny ones for tests.

    module, params, vis, txt = load_model_and_preprocess("blip_caption", "base_coco", checkpoint=path)
    pixels = vis["eval"](image)[None]           # uint8 RGB [H, W, 3] -> float32 [S, S, 3]
    captions = jaxlisa.inference.captioning.blip_captions(module, params, pixels, prompt_ids)

Weights come from `checkpoint` (a LAVIS .pth, a HF directory or a converted jaxlisa directory, through
jaxlisa.conversion); nothing is downloaded. Without one the parameters are randomly initialised (the
architecture is still the released one; use the "tiny" types in tests).

Processors (LAVIS `lavis/processors/blip_processors.py`): "eval" images are resized to S x S
(bicubic) and normalised with the OpenAI CLIP mean/std; "train" images take a random resized crop
(scale 0.5-1, bicubic) and a random horizontal flip first. Text: `blip_caption` (lower case, `.!"()*#:;~`
-> space, spaces collapsed, at most max_words words, the prompt in front) and `blip_question`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from absl import logging

from jaxlisa.data.lavis_processors import (CaptionProcessor, ImageEvalProcessor, ImageTrainProcessor,  # noqa: F401
                                           QuestionProcessor, pre_caption, pre_question)
from jaxlisa.models import blip as blip_lib
from jaxlisa.models import blip2 as blip2_lib
from jaxlisa.models import minigpt4qwen as m4q_lib
from jaxlisa.models.eva import EVAViTConfig
from jaxlisa.models.llm import DecoderConfig
from jaxlisa.models.qformer import QFormerConfig


# ----------------------------------------------------------------------------- zoo
def _opt(hidden: int, layers: int, heads: int, ffn: int) -> DecoderConfig:
  return DecoderConfig(family="opt", vocab_size=50272, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=2048,
                       norm_eps=1e-5, hidden_act="relu", attention_bias=True, o_proj_bias=True, mlp_bias=True,
                       tie_word_embeddings=True, bos_token_id=2, eos_token_id=50118, pad_token_id=1)  # eos "\n"


_TINY_VISION = EVAViTConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=4, mlp_dim=48)
_TINY_QFORMER = QFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=48, encoder_hidden_size=32, num_query_tokens=4,
                              max_position_embeddings=32, bos_token_id=63, hidden_dropout_prob=0.0)
_TINY_LM = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _blip2(image_size: int = 224, **kw) -> blip2_lib.Blip2Config:
  return blip2_lib.Blip2Config(vision=EVAViTConfig.eva_vit_g(image_size), qformer=QFormerConfig(), **kw)


def _blip2_opt(opt: DecoderConfig, image_size: int = 224, prompt: str = "") -> blip2_lib.Blip2Config:
  return blip2_lib.Blip2Config(vision=EVAViTConfig.eva_vit_g(image_size),
                               qformer=QFormerConfig(use_text=False, lm_head=False), text=opt, prompt=prompt)


def _blip_vit(large: bool, image_size: int = 384) -> EVAViTConfig:
  w, d, h = (1024, 24, 16) if large else (768, 12, 12)
  return EVAViTConfig(image_size=image_size, patch_size=16, hidden_size=w, num_hidden_layers=d, num_attention_heads=h,
                      mlp_dim=4 * w, layer_norm_eps=1e-6, ln_vision_eps=1e-6)


# name -> model_type -> (config factory, module class, family name for conversion, image size, prompt)
MODEL_ZOO: dict[str, dict[str, tuple[Callable[[], Any], type, str, int, str]]] = {
    "blip2": {
        "pretrain": (_blip2, blip2_lib.Blip2Qformer, "blip2_lavis", 224, ""),
        "coco": (lambda: _blip2(364), blip2_lib.Blip2Qformer, "blip2_lavis", 364, ""),
        "tiny": (lambda: blip2_lib.Blip2Config(vision=_TINY_VISION, qformer=_TINY_QFORMER, embed_dim=16),
                 blip2_lib.Blip2Qformer, "blip2_lavis", 28, ""),
    },
    "blip2_opt": {
        "pretrain_opt2.7b": (lambda: _blip2_opt(_opt(2560, 32, 32, 10240)), blip2_lib.Blip2OPT, "blip2_opt_lavis",
                             224, ""),
        "pretrain_opt6.7b": (lambda: _blip2_opt(_opt(4096, 32, 32, 16384)), blip2_lib.Blip2OPT, "blip2_opt_lavis",
                             224, ""),
        "caption_coco_opt2.7b": (lambda: _blip2_opt(_opt(2560, 32, 32, 10240), 364, "a photo of"),
                                 blip2_lib.Blip2OPT, "blip2_opt_lavis", 364, "a photo of"),
        "caption_coco_opt6.7b": (lambda: _blip2_opt(_opt(4096, 32, 32, 16384), 364, "a photo of"),
                                 blip2_lib.Blip2OPT, "blip2_opt_lavis", 364, "a photo of"),
        "tiny": (lambda: blip2_lib.Blip2Config(
            vision=_TINY_VISION, qformer=_TINY_QFORMER.replace(use_text=False, lm_head=False),
            text=DecoderConfig(family="opt", **_TINY_LM, max_position_embeddings=64, norm_eps=1e-5, hidden_act="relu",
                               attention_bias=True, o_proj_bias=True, mlp_bias=True, tie_word_embeddings=True,
                               bos_token_id=2, eos_token_id=2, pad_token_id=1)),
                 blip2_lib.Blip2OPT, "blip2_opt_lavis", 28, ""),
    },
    "blip_caption": {
        "base_coco": (lambda: blip_lib.BlipConfig(vision=_blip_vit(False)), blip_lib.BlipForConditionalGeneration,
                      "blip_lavis", 384, "a picture of "),
        "large_coco": (lambda: blip_lib.BlipConfig(vision=_blip_vit(True), text=blip_lib.blip_text_config(
            encoder_hidden_size=1024)), blip_lib.BlipForConditionalGeneration, "blip_lavis", 384, "a picture of "),
        "tiny": (lambda: blip_lib.BlipConfig(vision=_TINY_VISION, text=blip_lib.blip_text_config(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            encoder_hidden_size=32, max_position_embeddings=32, bos_token_id=62)),
                 blip_lib.BlipForConditionalGeneration, "blip_lavis", 28, "a picture of "),
    },
    "minigpt4qwen": {
        "qwen7b_chat": (m4q_lib.MiniGPT4QwenConfig, m4q_lib.MiniGPT4Qwen, "minigpt4qwen", 224, ""),
        "tiny": (lambda: m4q_lib.MiniGPT4QwenConfig(
            vision=_TINY_VISION, qformer=_TINY_QFORMER.replace(use_text=False, lm_head=False),
            llm=DecoderConfig(family="qwen", **_TINY_LM, attention_bias=True, bos_token_id=None, eos_token_id=0,
                              pad_token_id=0), image_token_id=3), m4q_lib.MiniGPT4Qwen, "minigpt4qwen", 28, ""),
    },
}
MODEL_ZOO["blip2_feature_extractor"] = MODEL_ZOO["blip2"]


def model_types(name: str) -> list[str]:
  if name not in MODEL_ZOO:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_ZOO)}")
  return sorted(MODEL_ZOO[name])


def load_model_and_preprocess(name: str, model_type: str = "tiny", *, checkpoint: str | None = None,
                              config_overrides: dict | None = None, seed: int = 0):
  """(module, params, vis_processors {"train", "eval"}, txt_processors {"train", "eval"}).

  checkpoint: converted from the PyTorch names of this model (LAVIS .pth / HF dir / jaxlisa dir); when
  absent the parameters are random (logged). config_overrides: fields of the model config replaced
  (e.g. dtype="bfloat16")."""
  types = MODEL_ZOO.get(name)
  if types is None:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_ZOO)}")
  if model_type not in types:
    raise ValueError(f"unknown model_type {model_type!r} for {name}; known: {sorted(types)}")
  make, cls, family, size, prompt = types[model_type]
  config = make()
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  if checkpoint is not None:
    from jaxlisa.conversion import convert as convert_lib  # pylint: disable=import-outside-toplevel
    if checkpoint.endswith((".pth", ".pt", ".bin")):
      # LAVIS files carry no config: the zoo's architecture replaces what shapes suggest (head counts)
      whole = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
      conv = convert_lib.convert_checkpoint(checkpoint, family=family, config_overrides=whole)
      module, params = cls(conv.config), conv.params
    else:  # a HF directory (config.json) or a converted jaxlisa directory
      pre = convert_lib.load_pretrained(checkpoint, config_overrides=config_overrides, with_tokenizer=False)
      module, params = pre.module, pre.params
  else:
    logging.warning("%s/%s: no checkpoint given, parameters are randomly initialised", name, model_type)
    module = cls(config)
    variables = jax.jit(module.init)(jax.random.PRNGKey(seed), *config.dummy_inputs())
    params = nn.meta.unbox(variables["params"])
  vis = {"eval": ImageEvalProcessor(size), "train": ImageTrainProcessor(size, seed=seed)}
  if name == "minigpt4qwen":
    txt = {"eval": lambda s: s, "train": lambda s: s}
  else:
    txt = {"eval": CaptionProcessor(prompt), "train": CaptionProcessor(prompt)}
  return module, params, vis, txt


__all__ = ["load_model_and_preprocess", "model_types", "MODEL_ZOO", "ImageEvalProcessor", "ImageTrainProcessor",
           "CaptionProcessor", "QuestionProcessor", "pre_caption", "pre_question"]
