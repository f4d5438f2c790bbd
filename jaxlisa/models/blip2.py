"""BLIP-2: stage 1 (`Blip2Qformer`, LAVIS `blip2_qformer.py`) and stage 2 with OPT (`Blip2OPT`, LAVIS
`blip2_opt.py` / HF `Blip2ForConditionalGeneration`).

Image path (both stages): EVA ViT-g + `ln_vision` (jaxlisa.models.eva) -> image_embeds [B, Timg, Dv];
`query_tokens` [1, Q, D] -> Q-Former (queries only, cross-attending to image_embeds) -> [B, Q, D].

Stage 1 losses (LAVIS `Blip2Qformer.forward`), summed:
  ITC: image_feats = normalize(vision_proj(queries)) [B, Q, E], text_feat = normalize(text_proj(CLS))
       [B, E]; similarity = max over the Q query similarities, divided by the learnable `temp`
       (init 0.07); cross-entropy with label smoothing 0.1 against the diagonal, both directions,
       averaged. Under shard_map/pjit with `axis_name`, the features of every device are gathered
       (LAVIS `concat_all_gather`: no gradient through the gathered copies) and the targets are
       offset by the device index; without it, the local batch is the whole batch.
  ITM: for each text one hard negative image, for each image one hard negative text, drawn from
       softmax(similarities) with the positives masked (-10000), `jax.random.categorical`;
       Q-Former over [queries; text] bidirectional, itm_head averaged over query positions,
       cross-entropy on (pos, neg-image, neg-text) = (1, 0, 0). The image embeddings are gathered
       with gradient (LAVIS `all_gather_with_grad`).
  ITG: text with "[DEC]" as first token, causal after the cached query K/V of the ITC pass,
       next-token cross-entropy with label smoothing 0.1, pad tokens ignored.

Stage 2 (OPT): opt_proj(Q-Former output) [B, Q, D_opt] is put in front of the text embeddings of a
frozen OPT (jaxlisa DecoderLM, family opt); labels -100 on the query and prompt positions. Captions
(jaxlisa.inference.captioning) come from `generate_captions` (greedy / sampling from `embed_inputs`;
"\n" is LAVIS's eos) or `beam_captions` (HF beam search, LAVIS's default of 5 beams); stage 1 captions
with the Q-Former's own LM head: `qformer_captions` (LAVIS `Blip2Qformer.generate`).

Parameter tree (names mirror LAVIS): visual_encoder/... (incl. ln_vision), Qformer/{bert,cls}/...,
query_tokens [1, Q, D]; stage 1: vision_proj, text_proj, itm_head, temp []; stage 2: opt_proj,
opt_model/... (DecoderLM tree).
"""

from __future__ import annotations

import dataclasses
from typing import Any
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from absl import logging

from jaxlisa.constants import IGNORE_INDEX
from jaxlisa.models.eva import EVAViTConfig, EVAVisionTransformer
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models.layers import DenseGeneral, dtypes
from jaxlisa.models import llm as llm_lib
from jaxlisa.models.llm import DecoderConfig, DecoderLM
from jaxlisa.models.losses import causal_lm_cross_entropy, cross_entropy
from jaxlisa.models.qformer import IGNORE_INDEX, QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class Blip2Config(ConfigMixin):
  """vision: EVA ViT (+ ln_vision); qformer: the Q-Former (num_query_tokens lives there); text: the
  OPT decoder of stage 2 (None for stage 1)."""
  vision: EVAViTConfig = dataclasses.field(default_factory=EVAViTConfig.eva_vit_g)
  qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
  text: DecoderConfig | None = None
  embed_dim: int = 256  # ITC projection width
  temp: float = 0.07  # ITC temperature (initial value when learned)
  learn_temp: bool = True  # LAVIS has a `temp` parameter; HF retrieval checkpoints do not
  itc_label_smoothing: float = 0.1
  lm_label_smoothing: float = 0.1
  max_txt_len: int = 32
  prompt: str = ""
  image_token_index: int | None = None  # HF Blip2Config (informational)

  @property
  def num_query_tokens(self) -> int:
    return self.qformer.num_query_tokens

  @property
  def scan_layers(self) -> bool:
    """One scan setting for the converter: the Q-Former is unscanned and mapped per layer."""
    if self.text is not None and self.text.scan_layers != self.vision.scan_layers:
      raise ValueError("vision and text towers must agree on scan_layers")
    return self.vision.scan_layers

  def dummy_inputs(self) -> tuple:
    """(pixels [1, S, S, C], input_ids [1, 4], attention_mask [1, 4])."""
    v = self.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.zeros((1, 4), jnp.int32),
            jnp.ones((1, 4), jnp.int32))


@flax.struct.dataclass
class Blip2Stage1Output:
  loss: jax.Array  # loss_itc + loss_itm + loss_lm
  loss_itc: jax.Array
  loss_itm: jax.Array
  loss_lm: jax.Array
  sim_i2t: jax.Array  # [B, B_all] / temp
  sim_t2i: jax.Array  # [B, B_all] / temp
  neg_image_idx: jax.Array  # [B] index into the gathered batch: hard negative image of each text
  neg_text_idx: jax.Array  # [B] hard negative text of each image
  itm_logits: jax.Array  # [3B, 2] (pos, neg image, neg text)


@flax.struct.dataclass
class Blip2Features:
  """LAVIS `BlipOutputFeatures` (fields of the modes not asked for are None)."""
  image_embeds: jax.Array | None = None  # [B, Q, D] Q-Former query outputs
  image_embeds_proj: jax.Array | None = None  # [B, Q, E] normalized
  text_embeds: jax.Array | None = None  # [B, T, D]
  text_embeds_proj: jax.Array | None = None  # [B, T, E] normalized (every position, as LAVIS)
  multimodal_embeds: jax.Array | None = None  # [B, Q, D] query outputs of [queries; text]


@flax.struct.dataclass
class Blip2OPTOutput:
  logits: jax.Array  # [B, Q + T, V]
  loss: jax.Array | None = None


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """F.normalize(x, dim=-1): x / max(||x||, eps)."""
  n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(n, eps)).astype(x.dtype)


def gather(x: jax.Array, axis_name: str | None, grad: bool) -> jax.Array:
  """Concatenate x [B, ...] over the devices of `axis_name` -> [B * n, ...] (identity without one).
  grad=False is LAVIS `concat_all_gather` (no gradient through the gathered tensor), grad=True its
  `all_gather_with_grad` (gradients summed back to the owning device)."""
  if axis_name is None:
    return x
  y = jax.lax.all_gather(x, axis_name, tiled=True)
  return y if grad else jax.lax.stop_gradient(y)


def _device_index(axis_name: str | None):
  return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def label_smoothed_ce(logits: jax.Array, targets: jax.Array, eps: float) -> jax.Array:
  """F.cross_entropy(logits [B, C], targets [B], label_smoothing=eps), mean."""
  return cross_entropy(logits, targets, eps, ignore_index=-(2 ** 30))


def sample_hard_negatives(rng: jax.Array, sim_t2i: jax.Array, sim_i2t: jax.Array,
                          positive: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LAVIS ITM negatives: for each text an image index, for each image a text index [B], drawn from
  softmax(similarities [B, B_all]) with the positives set to -10000 (no gradient)."""
  k1, k2 = jax.random.split(rng)
  logits_t2i = jnp.where(positive, -10000.0, jax.lax.stop_gradient(sim_t2i))
  logits_i2t = jnp.where(positive, -10000.0, jax.lax.stop_gradient(sim_i2t))
  return jax.random.categorical(k1, logits_t2i, axis=-1), jax.random.categorical(k2, logits_i2t, axis=-1)


class _Blip2Base(nn.Module):
  """Shared image path: visual_encoder (+ ln_vision), query_tokens, Qformer."""
  config: Blip2Config

  def _setup_image_path(self, qformer_config: QFormerConfig):
    c = self.config
    self.visual_encoder = EVAVisionTransformer(c.vision)
    self.Qformer = QFormer(qformer_config)  # pylint: disable=invalid-name
    init = nn.initializers.normal(0.02)
    self.query_tokens = self.param("query_tokens", nn.with_logical_partitioning(init, (None, None, "embed")),
                                   (1, c.num_query_tokens, c.qformer.hidden_size), jnp.dtype(c.qformer.param_dtype))

  def image_embeds(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, 3] (normalized, NHWC) -> ln_vision(ViT(pixels)) [B, 1 + P, Dv]."""
    return self.visual_encoder(pixels).image_embeds

  def query_output(self, image_embeds: jax.Array, deterministic: bool = True):
    """image_embeds [B, Timg, Dv] -> QFormerOutput (queries only; last_hidden_state [B, Q, D], query_kv)."""
    b = image_embeds.shape[0]
    q = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    return self.Qformer(query_embeds=q, encoder_hidden_states=image_embeds, deterministic=deterministic)


class Blip2Qformer(_Blip2Base):
  """BLIP-2 stage 1 (LAVIS `blip2` / `blip2_feature_extractor`; HF `Blip2ForImageTextRetrieval`)."""

  def setup(self):
    c = self.config
    self._setup_image_path(c.qformer)
    kw = dict(use_bias=True, **dtypes(c.qformer))
    self.vision_proj = DenseGeneral(c.embed_dim, kernel_axes=("embed", None), **kw)
    self.text_proj = DenseGeneral(c.embed_dim, kernel_axes=("embed", None), **kw)
    self.itm_head = DenseGeneral(2, kernel_axes=("embed", None), **kw)
    if c.learn_temp:
      self.temp = self.param("temp", nn.with_logical_partitioning(nn.initializers.constant(c.temp), ()), (),
                             jnp.float32)

  def temperature(self) -> jax.Array:
    return self.temp if self.config.learn_temp else jnp.float32(self.config.temp)

  def text_embeds(self, input_ids, attention_mask, deterministic: bool = True) -> jax.Array:
    """Unimodal text encoder: [B, T] -> [B, T, D]."""
    return self.Qformer(input_ids, attention_mask, deterministic=deterministic).last_hidden_state

  def itm_logits(self, image_embeds, input_ids, attention_mask, deterministic: bool = True) -> jax.Array:
    """Queries + text (bidirectional) over image_embeds [B, Timg, Dv]: itm_head averaged over the
    query positions -> [B, 2] (LAVIS `compute_itm` takes [:, 1] of the per-query logits first)."""
    b = input_ids.shape[0]
    q = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    out = self.Qformer(input_ids, attention_mask, q, image_embeds, deterministic=deterministic)
    return jnp.mean(self.itm_head(out.last_hidden_state[:, :q.shape[1]]), axis=1)

  def itc_scores(self, pixels, input_ids, attention_mask) -> jax.Array:
    """Image-text similarity [B_img, B_txt] = max over queries of <image_feat_q, text_feat> (no
    temperature; HF `Blip2ForImageTextRetrieval(use_image_text_matching_head=False)`)."""
    image_feats = normalize(self.vision_proj(self.query_output(self.image_embeds(pixels)).last_hidden_state))
    text_feat = normalize(self.text_proj(self.text_embeds(input_ids, attention_mask)[:, 0]))
    return jnp.max(jnp.einsum("bqe,te->btq", image_feats, text_feat), axis=-1)

  def itm_scores(self, pixels, input_ids, attention_mask) -> jax.Array:
    """[B, 2] ITM logits for (image b, text b) (HF `use_image_text_matching_head=True`)."""
    return self.itm_logits(self.image_embeds(pixels), input_ids, attention_mask)

  def extract_features(self, pixels=None, input_ids=None, attention_mask=None, mode: str = "multimodal"):
    """LAVIS `extract_features` (mode image | text | multimodal)."""
    if mode == "image":
      emb = self.query_output(self.image_embeds(pixels)).last_hidden_state
      return Blip2Features(image_embeds=emb, image_embeds_proj=normalize(self.vision_proj(emb)))
    if mode == "text":
      emb = self.text_embeds(input_ids, attention_mask)
      return Blip2Features(text_embeds=emb, text_embeds_proj=normalize(self.text_proj(emb)))
    if mode == "multimodal":
      img = self.image_embeds(pixels)
      b = input_ids.shape[0]
      q = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
      out = self.Qformer(input_ids, attention_mask, q, img)
      return Blip2Features(multimodal_embeds=out.last_hidden_state[:, :q.shape[1]])
    raise ValueError(f"mode must be 'image', 'text' or 'multimodal', not {mode!r}")

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
               rng: jax.Array | None = None, image_ids: jax.Array | None = None,
               neg_image_idx: jax.Array | None = None, neg_text_idx: jax.Array | None = None,
               axis_name: str | None = None, deterministic: bool = True) -> Blip2Stage1Output:
    """Stage-1 losses. pixels [B, H, W, 3]; input_ids / attention_mask [B, T] (BERT tokens, [CLS]
    first, padded to max_txt_len). rng draws the hard negatives (folded with the device index);
    neg_image_idx / neg_text_idx [B] (indices into the gathered batch) replace the draw.
    image_ids [B] switches ITC to LAVIS's COCO-finetuning targets (same image id = positive)."""
    c = self.config
    qc = c.qformer
    input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    b = pixels.shape[0]
    rank = _device_index(axis_name)
    image_embeds = self.image_embeds(pixels)
    query_out = self.query_output(image_embeds, deterministic)
    image_feats = normalize(self.vision_proj(query_out.last_hidden_state))  # [B, Q, E]
    text_feat = normalize(self.text_proj(self.text_embeds(input_ids, attention_mask, deterministic)[:, 0]))

    # ---- ITC
    temp = self.temperature()
    image_feats_all = gather(image_feats, axis_name, grad=False)  # [B_all, Q, E]
    text_feat_all = gather(text_feat, axis_name, grad=False)  # [B_all, E]
    sim_i2t = jnp.max(jnp.einsum("bqe,ce->bcq", image_feats, text_feat_all), axis=-1) / temp
    sim_t2i = jnp.max(jnp.einsum("be,cqe->bcq", text_feat, image_feats_all), axis=-1) / temp
    n_all = sim_i2t.shape[1]
    if image_ids is None:
      targets = rank * b + jnp.arange(b)
      loss_itc = (label_smoothed_ce(sim_i2t, targets, c.itc_label_smoothing) +
                  label_smoothed_ce(sim_t2i, targets, c.itc_label_smoothing)) / 2
      positive = jnp.arange(n_all)[None, :] == targets[:, None]
    else:
      ids_all = gather(image_ids, axis_name, grad=False)
      positive = image_ids[:, None] == ids_all[None, :]
      soft = positive / jnp.sum(positive, axis=1, keepdims=True)
      soft = 0.9 * soft + 0.1 / n_all
      loss_itc = (-jnp.mean(jnp.sum(jax.nn.log_softmax(sim_t2i, axis=1) * soft, axis=1)) -
                  jnp.mean(jnp.sum(jax.nn.log_softmax(sim_i2t, axis=1) * soft, axis=1))) / 2

    # ---- ITM with hard negatives
    ids_world = gather(input_ids, axis_name, grad=False)
    mask_world = gather(attention_mask, axis_name, grad=False)
    image_embeds_world = gather(image_embeds, axis_name, grad=True)
    if neg_image_idx is None or neg_text_idx is None:
      if rng is None:
        if not self.is_initializing():
          logging.warning("Blip2Qformer: no rng for the ITM hard negatives; using PRNGKey(0)")
        rng = jax.random.PRNGKey(0)
      if axis_name is not None:
        rng = jax.random.fold_in(rng, rank)
      neg_image_idx, neg_text_idx = sample_hard_negatives(rng, sim_t2i, sim_i2t, positive)
    image_embeds_neg = jnp.take(image_embeds_world, neg_image_idx, axis=0)
    text_ids_all = jnp.concatenate([input_ids, input_ids, jnp.take(ids_world, neg_text_idx, axis=0)], axis=0)
    text_atts_all = jnp.concatenate([attention_mask, attention_mask, jnp.take(mask_world, neg_text_idx, axis=0)], 0)
    image_embeds_all = jnp.concatenate([image_embeds, image_embeds_neg, image_embeds], axis=0)
    itm_logits = self.itm_logits(image_embeds_all, text_ids_all, text_atts_all, deterministic)
    itm_labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    loss_itm = label_smoothed_ce(itm_logits, itm_labels, 0.0)

    # ---- ITG
    if qc.lm_head:
      dec = input_ids.at[:, 0].set(qc.bos_token_id)
      labels = jnp.where(input_ids == qc.pad_token_id, IGNORE_INDEX, dec)
      loss_lm, _ = self.Qformer.lm_loss(dec, attention_mask, query_out.query_kv, labels, c.lm_label_smoothing,
                                        deterministic)
    else:
      loss_lm = jnp.float32(0.0)
    return Blip2Stage1Output(loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm,
                             loss_lm=loss_lm, sim_i2t=sim_i2t, sim_t2i=sim_t2i, neg_image_idx=neg_image_idx,
                             neg_text_idx=neg_text_idx, itm_logits=itm_logits)


class Blip2OPT(_Blip2Base):
  """BLIP-2 stage 2 with OPT (LAVIS `blip2_opt`; HF `Blip2ForConditionalGeneration`, `Blip2Model`).
  The Q-Former has no text parts (LAVIS sets them to None)."""

  def setup(self):
    c = self.config
    if c.text is None or c.text.family != "opt":
      raise ValueError("Blip2OPT needs an OPT text config (config.text.family == 'opt')")
    self._setup_image_path(c.qformer.replace(use_text=False, lm_head=False))
    self.opt_proj = DenseGeneral(c.text.embed_dim, kernel_axes=(None, "embed"), use_bias=True,
                                 **dtypes(c.text))
    self.opt_model = DecoderLM(c.text)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, 3] -> query embeddings in OPT's input space [B, Q, D_opt]."""
    q = self.query_output(self.image_embeds(pixels)).last_hidden_state
    return self.opt_proj(q.astype(jnp.dtype(self.config.text.dtype)))

  def embed_inputs(self, pixels, input_ids, attention_mask):
    """Decoding entry: [opt_proj(queries); embed(input_ids)] [B, Q + T, D_opt] and its mask [B, Q + T]."""
    inputs_opt = self.encode_image(pixels)
    emb = self.opt_model.embed(input_ids)
    mask = jnp.concatenate([jnp.ones(inputs_opt.shape[:2], attention_mask.dtype), attention_mask], axis=1)
    return jnp.concatenate([inputs_opt.astype(emb.dtype), emb], axis=1), mask

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               labels: jax.Array | None = None, deterministic: bool = True) -> Blip2OPTOutput:
    """pixels [B, H, W, 3]; input_ids / attention_mask [B, T] OPT tokens (right padded); labels [B, T]
    for the text positions (-100 ignored; see `opt_targets`). Returns logits [B, Q + T, V] and the
    next-token loss (mean over real targets, no label smoothing: OPTForCausalLM's)."""
    embeds, mask = self.embed_inputs(pixels, input_ids, attention_mask)
    out = self.opt_model(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic)
    loss = None
    if labels is not None:
      q = embeds.shape[1] - input_ids.shape[1]
      full = jnp.concatenate([jnp.full((labels.shape[0], q), IGNORE_INDEX, labels.dtype), labels], axis=1)
      loss = causal_lm_cross_entropy(out.logits, full)
    return Blip2OPTOutput(logits=out.logits, loss=loss)


def opt_targets(input_ids: jax.Array, attention_mask: jax.Array, prompt_length: int = 0) -> jax.Array:
  """LAVIS blip2_opt targets: padding and the first `prompt_length` tokens (BOS + prompt) -> -100."""
  t = jnp.where(attention_mask.astype(bool), input_ids, IGNORE_INDEX)
  return jnp.where(jnp.arange(input_ids.shape[1])[None] < prompt_length, IGNORE_INDEX, t)
