"""BLIP-2 families: HF `Blip2ForConditionalGeneration` / `Blip2Model` (OPT) and
`Blip2ForImageTextRetrieval`, LAVIS `.pth` files of stage 1 (`blip2`, `blip2_feature_extractor`)
and stage 2 with OPT (`blip2_opt`); plus the Q-Former key maps they share.

| family              | source names                                              | module       |
|---------------------|-----------------------------------------------------------|--------------|
| blip2_opt_hf        | vision_model.*, query_tokens, qformer.*, language_projection, language_model.* | Blip2OPT |
| blip2_retrieval_hf  | vision_model.*, query_tokens, embeddings.*, qformer.*, vision_projection, text_projection, itm_head | Blip2Qformer |
| blip2_lavis         | visual_encoder.*, ln_vision, Qformer.bert/cls.*, query_tokens, vision_proj, text_proj, itm_head, temp | Blip2Qformer |
| blip2_opt_lavis     | visual_encoder.*, ln_vision, Qformer.bert.*, query_tokens, opt_proj, opt_model.* | Blip2OPT |

HF's vision tower is LAVIS's EVA ViT under other names: `qkv.bias` is (q_bias, 0, v_bias) (the k
part is dropped: adding a constant to every key's bias leaves softmax unchanged) and
`post_layernorm` is `ln_vision` (with the vision eps, 1e-6, where LAVIS's ln_vision has 1e-5).
LAVIS files have no config: widths, depths and the Q-Former layout come from tensor shapes, head
counts from the width (EVA: heads of 88 at 1408; Q-Former: heads of 64; OPT: the released sizes).

The Q-Former's layers are unscanned (`encoder/layer_{i}`: cross-attention layers differ), so its
rules are written out per layer index: the same table then serves conversion and export whatever
the scan setting of the towers around it.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from absl import logging

from jaxlisa.conversion import llm as llm_conv
from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import CONV, FLAT, LINEAR, LINEAR_IN2, Rule, linear_rules, norm_rules
from jaxlisa.conversion.family import Family, any_key
from jaxlisa.conversion.vision import EVA_SKIP, POS_EMBED_RESIZE, eva_config_from_keys, eva_rules
from jaxlisa.models.blip2 import Blip2Config, Blip2OPT, Blip2Qformer
from jaxlisa.models.eva import EVAViTConfig
from jaxlisa.models.llm import DecoderConfig
from jaxlisa.models.qformer import QFormerConfig

QFORMER_SKIP = (r"(^|\.)position_ids$",)


def qformer_rules(c: QFormerConfig, src: str = "Qformer.", dst: str = "Qformer/", style: str = "lavis",
                  embeddings_src: str | None = None, query_ffn: bool = True) -> list[Rule]:
  """Q-Former names under `src` -> QFormer params under `dst`.

  style "lavis": `{src}bert.embeddings.*`, `{src}bert.encoder.layer.{i}.attention.self.query`,
  `{src}cls.predictions.*` (LAVIS `BertLMHeadModel`). style "hf": `{src}layernorm`,
  `{src}encoder.layer.{i}.attention.attention.query` (HF `Blip2QFormerModel`), the word/position
  embeddings under `embeddings_src` (HF `Blip2ForImageTextRetrieval`: "embeddings."). query_ffn=False
  for a plain BERT decoder (BLIP's text decoder: no `*_query` FFN).
  """
  d = f"{dst}bert/"
  if style == "lavis":
    e, enc, selfattn = f"{src}bert.embeddings.", f"{src}bert.encoder.layer.", "self"
    ln_src = f"{e}LayerNorm"
  elif style == "hf":
    e, enc, selfattn = embeddings_src or f"{src}embeddings.", f"{src}encoder.layer.", "attention"
    ln_src = f"{src}layernorm"
  else:
    raise ValueError(f"unknown Q-Former naming style {style!r}")
  rules = norm_rules(ln_src, f"{d}embeddings/LayerNorm")
  if c.use_text:
    rules += [Rule(f"{e}word_embeddings.weight", f"{d}embeddings/word_embeddings/embedding"),
              Rule(f"{e}position_embeddings.weight", f"{d}embeddings/position_embeddings/embedding")]
  for i in range(c.num_hidden_layers):
    s, t = f"{enc}{i}.", f"{d}encoder/layer_{i}/"
    blocks = ["attention"] + (["crossattention"] if c.has_cross_attention(i) else [])
    for blk in blocks:
      for n in ("query", "key", "value"):
        rules += linear_rules(f"{s}{blk}.{selfattn}.{n}", f"{t}{blk}/self/{n}")
      rules += [Rule(f"{s}{blk}.output.dense.weight", f"{t}{blk}/output/dense/kernel", LINEAR_IN2),
                Rule(f"{s}{blk}.output.dense.bias", f"{t}{blk}/output/dense/bias")]
      rules += norm_rules(f"{s}{blk}.output.LayerNorm", f"{t}{blk}/output/LayerNorm")
    for suffix in ("_query",) * query_ffn + ("",) * c.use_text:
      rules += linear_rules(f"{s}intermediate{suffix}.dense", f"{t}intermediate{suffix}/dense")
      rules += linear_rules(f"{s}output{suffix}.dense", f"{t}output{suffix}/dense")
      rules += norm_rules(f"{s}output{suffix}.LayerNorm", f"{t}output{suffix}/LayerNorm")
  if c.lm_head:
    p, q = f"{src}cls.predictions.", f"{dst}cls/predictions/"
    rules += linear_rules(f"{p}transform.dense", f"{q}transform/dense")
    rules += norm_rules(f"{p}transform.LayerNorm", f"{q}transform/LayerNorm")
    rules += [Rule(f"{p}bias", f"{q}bias"),
              Rule(f"{p}decoder.bias", ()),  # the same tensor as `bias` (LAVIS ties them)
              Rule(f"{p}decoder.weight", () if c.tie_word_embeddings else f"{q}decoder/kernel", LINEAR)]
  return rules


def dropped_qformer_text_rules(src: str = "Qformer.", n_layers: int = 12) -> list[Rule]:
  """LAVIS stage-2 files (blip2_opt, MiniGPT-4...) may still carry the text half of the Q-Former
  (word/position embeddings, text FFN, cls) that the model sets to None: known, dropped."""
  rules = [Rule(f"{src}bert.embeddings.word_embeddings.weight", ()),
           Rule(f"{src}bert.embeddings.position_embeddings.weight", ())]
  for i in range(n_layers):
    for n in ("intermediate.dense", "output.dense", "output.LayerNorm"):
      rules += [Rule(f"{src}bert.encoder.layer.{i}.{n}.weight", ()), Rule(f"{src}bert.encoder.layer.{i}.{n}.bias", ())]
  for n in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
            "transform.LayerNorm.bias", "bias", "decoder.weight", "decoder.bias"):
    rules.append(Rule(f"{src}cls.predictions.{n}", ()))
  return rules


# ----------------------------------------------------------------------------- shared pieces
def prefixed(rules: Sequence[Rule], dst_prefix: str) -> list[Rule]:
  """The same rules with every destination under `dst_prefix` (dropped parts stay dropped)."""
  def fix(d):
    if isinstance(d, str):
      return d and dst_prefix + d
    return tuple(x and dst_prefix + x for x in d)
  return [Rule(r.src, fix(r.dst), r.t, r.split) for r in rules]


def hf_vision_rules(c: EVAViTConfig, src: str = "vision_model.", dst: str = "visual_encoder/") -> list[Rule]:
  """HF `Blip2VisionModel` names -> EVA ViT params (+ ln_vision = post_layernorm)."""
  L, d = f"{src}encoder.layers.{{i}}.", f"{dst}blocks/{{i}}/"
  e = f"{src}embeddings."
  dim = c.hidden_size
  rules = [
      Rule(e + "patch_embedding.weight", f"{dst}patch_embed/proj/kernel", CONV),
      Rule(e + "patch_embedding.bias", f"{dst}patch_embed/proj/bias"),
      Rule(e + "class_embedding", f"{dst}cls_token"),
      Rule(e + "position_embedding", f"{dst}pos_embed", POS_EMBED_RESIZE),
      Rule(L + "self_attn.qkv.weight", d + "attn/qkv/kernel", LINEAR),
      Rule(L + "self_attn.projection.weight", d + "attn/proj/kernel", LINEAR_IN2),
      Rule(L + "self_attn.projection.bias", d + "attn/proj/bias"),
      Rule(f"{src}post_layernorm.weight", f"{dst}ln_vision/scale"),
      Rule(f"{src}post_layernorm.bias", f"{dst}ln_vision/bias"),
  ]
  if c.qkv_bias:
    rules.append(Rule(L + "self_attn.qkv.bias", (d + "attn/q_bias", "", d + "attn/v_bias"), FLAT,
                      split=(0, (dim, dim, dim))))
  for hf_n, n in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
    rules += norm_rules(L + hf_n, d + n)
  for n in ("fc1", "fc2"):
    rules += linear_rules(L + f"mlp.{n}", d + f"mlp/{n}")
  return rules


# ----------------------------------------------------------------------------- HF configs
_HF_VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
_HF_QFORMER = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=512,
                   cross_attention_frequency=2, encoder_hidden_size=1408, pad_token_id=0,
                   use_qformer_text_input=False)


def vision_config_from_hf(v: dict) -> EVAViTConfig:
  v = {k: v.get(k, d) for k, d in _HF_VISION.items()}
  return EVAViTConfig(image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
                      num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                      mlp_dim=v["intermediate_size"], qkv_bias=v["qkv_bias"], layer_norm_eps=v["layer_norm_eps"],
                      hidden_act=v["hidden_act"], use_ln_vision=True, ln_vision_eps=v["layer_norm_eps"])


def qformer_config_from_hf(q: dict, num_query_tokens: int, encoder_width: int, *, use_text: bool) -> QFormerConfig:
  q = {k: q.get(k, d) for k, d in _HF_QFORMER.items()}
  return QFormerConfig(vocab_size=q["vocab_size"], hidden_size=q["hidden_size"],
                       num_hidden_layers=q["num_hidden_layers"], num_attention_heads=q["num_attention_heads"],
                       intermediate_size=q["intermediate_size"], hidden_act=q["hidden_act"],
                       layer_norm_eps=q["layer_norm_eps"], max_position_embeddings=q["max_position_embeddings"],
                       cross_attention_freq=q["cross_attention_frequency"], encoder_hidden_size=encoder_width,
                       num_query_tokens=num_query_tokens, use_text=use_text, lm_head=False,
                       pad_token_id=q["pad_token_id"], hidden_dropout_prob=0.0)


def _is_retrieval(cfg: dict | None, keys) -> bool:
  archs = (cfg or {}).get("architectures") or []
  return "Blip2ForImageTextRetrieval" in archs or any_key(keys, r"^itm_head\.weight$")


def blip2_config_from_hf(cfg: dict, keys: Sequence[str] = ()) -> Blip2Config:
  if cfg.get("model_type") != "blip-2":
    raise CheckpointError(f"config.json model_type {cfg.get('model_type')!r} is not blip-2")
  vision = vision_config_from_hf(cfg.get("vision_config") or {})
  nq = cfg.get("num_query_tokens", 32)
  retrieval = _is_retrieval(cfg, keys)
  qformer = qformer_config_from_hf(cfg.get("qformer_config") or {}, nq, vision.hidden_size, use_text=retrieval)
  text = None
  if not retrieval:
    tc = cfg.get("text_config") or {}
    if tc.get("model_type", "opt") != "opt":
      raise CheckpointError(f"BLIP-2 with a {tc.get('model_type')!r} language model is not supported (OPT only)")
    text = llm_conv.config_from_hf({"model_type": "opt", **tc})
  return Blip2Config(vision=vision, qformer=qformer, text=text, embed_dim=cfg.get("image_text_hidden_size", 256),
                     learn_temp=False, image_token_index=cfg.get("image_token_index"))


def hf_rules(c: Blip2Config, keys: Sequence[str] = ()) -> list[Rule]:
  """HF BLIP-2 names -> Blip2OPT (text config set) or Blip2Qformer (retrieval) params."""
  rules = hf_vision_rules(c.vision)
  rules.append(Rule("query_tokens", "query_tokens"))
  if c.text is not None:
    rules += qformer_rules(c.qformer.replace(use_text=False, lm_head=False), "qformer.", "Qformer/", style="hf")
    rules += linear_rules("language_projection", "opt_proj")
    rules += prefixed(llm_conv.opt_rules(c.text, "language_model.model.decoder."), "opt_model/")
    rules.append(Rule("language_model.lm_head.weight", ()))  # tied to embed_tokens
  else:
    rules += qformer_rules(c.qformer, "qformer.", "Qformer/", style="hf", embeddings_src="embeddings.")
    rules += linear_rules("vision_projection", "vision_proj") + linear_rules("text_projection", "text_proj")
    rules += linear_rules("itm_head", "itm_head")
  return rules


# ----------------------------------------------------------------------------- LAVIS configs
# OPT head counts by width (facebook/opt-*): not readable from tensor shapes.
_OPT_HEADS = {768: 12, 1024: 16, 2048: 32, 2560: 32, 4096: 32, 5120: 40, 7168: 56, 9216: 72, 12288: 96}
EVA_G_DEPTH = 39  # LAVIS create_eva_vit_g keeps 39 of EVA-CLIP-g's 40 blocks


def lavis_qformer_config(src, num_query_tokens: int, prefix: str = "Qformer.") -> QFormerConfig:
  """QFormerConfig from the shapes of LAVIS `Qformer.*` tensors."""
  keys = src.keys()
  b = f"{prefix}bert.encoder.layer."
  layers = sorted({int(m.group(1)) for k in keys if (m := re.match(re.escape(b) + r"(\d+)\.", k))})
  if not layers:
    raise CheckpointError(f"no Q-Former layers under {b}")
  cross = [i for i in layers if f"{b}{i}.crossattention.self.key.weight" in keys]
  if not cross or cross[0] != 0:
    raise CheckpointError(f"Q-Former layer 0 has no cross-attention (cross layers: {cross})")
  freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
  hidden = src.shape(f"{b}0.attention.self.query.weight")[0]
  inter = src.shape(f"{b}0.intermediate_query.dense.weight")[0]
  width = src.shape(f"{b}0.crossattention.self.key.weight")[1]
  e = f"{prefix}bert.embeddings."
  use_text = f"{e}word_embeddings.weight" in keys and f"{b}0.intermediate.dense.weight" in keys
  vocab, max_pos = 30523, 512
  if use_text:
    vocab = src.shape(f"{e}word_embeddings.weight")[0]
    max_pos = src.shape(f"{e}position_embeddings.weight")[0]
  lm_head = use_text and f"{prefix}cls.predictions.transform.dense.weight" in keys
  tied = True
  dec = f"{prefix}cls.predictions.decoder.weight"
  if lm_head and dec in keys:
    tied = bool(np.array_equal(np.asarray(src.get(dec)), np.asarray(src.get(f"{e}word_embeddings.weight"))))
    if not tied:
      logging.info("Q-Former LM head decoder differs from the word embeddings: kept untied")
  return QFormerConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
                       num_attention_heads=max(1, hidden // 64), intermediate_size=inter,
                       max_position_embeddings=max_pos, cross_attention_freq=freq, encoder_hidden_size=width,
                       num_query_tokens=num_query_tokens, use_text=use_text, lm_head=lm_head,
                       tie_word_embeddings=tied, hidden_dropout_prob=0.0)


def lavis_vision_config(src) -> EVAViTConfig:
  v = eva_config_from_keys(src)
  if v.hidden_size == 1408 and v.num_hidden_layers > EVA_G_DEPTH:
    logging.info("EVA ViT-g with %d blocks: keeping %d as LAVIS create_eva_vit_g", v.num_hidden_layers, EVA_G_DEPTH)
    v = v.replace(num_hidden_layers=EVA_G_DEPTH)
  return v


def lavis_opt_config(src, prefix: str = "opt_model.") -> DecoderConfig:
  keys = src.keys()
  d = f"{prefix}model.decoder."
  vocab, emb = src.shape(f"{d}embed_tokens.weight")
  hidden = src.shape(f"{d}layers.0.self_attn.q_proj.weight")[0]
  n_layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(re.escape(d) + r"layers\.(\d+)\.", k)))
  heads = _OPT_HEADS.get(hidden)
  if heads is None:
    heads = max(1, hidden // 64)
    logging.warning("OPT width %d is not a released size: assuming %d heads of 64", hidden, heads)
  pre_ln = f"{d}final_layer_norm.weight" in keys
  return DecoderConfig(family="opt", vocab_size=vocab, hidden_size=hidden, intermediate_size=src.shape(
      f"{d}layers.0.fc1.weight")[0], num_hidden_layers=n_layers, num_attention_heads=heads,
                       max_position_embeddings=src.shape(f"{d}embed_positions.weight")[0] - 2, norm_eps=1e-5,
                       hidden_act="relu", attention_bias=True, o_proj_bias=True, mlp_bias=True,
                       word_embed_proj_dim=emb if emb != hidden else None, do_layer_norm_before=pre_ln,
                       final_layer_norm=pre_ln, tie_word_embeddings=True, bos_token_id=2, eos_token_id=2,
                       pad_token_id=1)


def lavis_config(src, stage: int) -> Blip2Config:
  keys = src.keys()
  nq = src.shape("query_tokens")[1]
  vision = lavis_vision_config(src)
  qformer = lavis_qformer_config(src, nq)
  if stage == 1:
    return Blip2Config(vision=vision, qformer=qformer, embed_dim=src.shape("vision_proj.weight")[0],
                       learn_temp="temp" in keys)
  return Blip2Config(vision=vision, qformer=qformer.replace(use_text=False, lm_head=False),
                     text=lavis_opt_config(src))


def _extra_blocks(c: EVAViTConfig, keys: Sequence[str], prefix: str = "visual_encoder.") -> list[Rule]:
  """Blocks beyond the configured depth (EVA-CLIP-g's 40th): known, dropped."""
  rx = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  return [Rule(k, ()) for k in keys if (m := rx.match(k)) and int(m.group(1)) >= c.num_hidden_layers]


def lavis_rules(c: Blip2Config, keys: Sequence[str] = ()) -> list[Rule]:
  """LAVIS BLIP-2 names -> Blip2Qformer (stage 1) or Blip2OPT (stage 2, c.text set) params."""
  rules = prefixed(eva_rules(c.vision, "visual_encoder.", "ln_vision."), "visual_encoder/")
  rules += _extra_blocks(c.vision, keys)
  rules.append(Rule("query_tokens", "query_tokens"))
  if c.text is None:
    rules += qformer_rules(c.qformer, "Qformer.", "Qformer/")
    rules += linear_rules("vision_proj", "vision_proj") + linear_rules("text_proj", "text_proj")
    rules += linear_rules("itm_head", "itm_head")
    rules.append(Rule("temp", "temp" if c.learn_temp else ()))
  else:
    rules += qformer_rules(c.qformer, "Qformer.", "Qformer/")
    rules += dropped_qformer_text_rules("Qformer.", c.qformer.num_hidden_layers)
    rules += linear_rules("opt_proj", "opt_proj")
    rules += prefixed(llm_conv.opt_rules(c.text, "opt_model.model.decoder."), "opt_model/")
    rules.append(Rule("opt_model.lm_head.weight", ()))
  return rules


# ----------------------------------------------------------------------------- families
SKIP = EVA_SKIP + QFORMER_SKIP + llm_conv.BUFFERS


def _build(c: Blip2Config):
  return Blip2Qformer(c) if c.text is None else Blip2OPT(c)


def _detect_hf(retrieval: bool):
  def detect(cfg, keys):
    return cfg is not None and cfg.get("model_type") == "blip-2" and _is_retrieval(cfg, keys) == retrieval
  return detect


def _detect_lavis(stage: int):
  def detect(cfg, keys):
    if cfg is not None or "query_tokens" not in keys or not any_key(keys, r"^Qformer\.bert\."):
      return False
    if stage == 1:
      return any_key(keys, r"^itm_head\.weight$") and not any_key(keys, r"^(opt_proj|opt_model)\.")
    return any_key(keys, r"^opt_proj\.weight$")
  return detect


FAMILIES = (
    Family(name="blip2_opt_hf", detect=_detect_hf(False),
           config_from_hf=lambda cfg, src: blip2_config_from_hf(cfg, src.keys()), config_cls=Blip2Config,
           rules=hf_rules, build=_build, skip=SKIP,
           export_rules=hf_rules, priority=5),
    Family(name="blip2_retrieval_hf", detect=_detect_hf(True),
           config_from_hf=lambda cfg, src: blip2_config_from_hf(cfg, src.keys()), config_cls=Blip2Config,
           rules=hf_rules, build=_build, skip=SKIP,
           export_rules=hf_rules, priority=5),
    Family(name="blip2_lavis", detect=_detect_lavis(1), config_from_hf=lambda cfg, src: lavis_config(src, 1),
           config_cls=Blip2Config, rules=lavis_rules, build=_build, skip=SKIP, export_rules=lavis_rules, priority=5),
    Family(name="blip2_opt_lavis", detect=_detect_lavis(2),
           config_from_hf=lambda cfg, src: lavis_config(src, 2), config_cls=Blip2Config, rules=lavis_rules,
           build=_build, skip=SKIP, export_rules=lavis_rules,
           priority=5),
)
