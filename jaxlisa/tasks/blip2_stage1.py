"""BLIP-2 stage 1 (LAVIS `blip2` pretraining: ITC + ITM + ITG, summed) on image-caption data.

config.model      Blip2Config fields: vision {EVAViTConfig}, qformer {QFormerConfig}, embed_dim, temp,
                  learn_temp, itc/lm_label_smoothing, max_txt_len. qformer.vocab_size -1 = the
                  tokenizer's size, qformer.encoder_hidden_size -1 = vision.hidden_size; the
                  Q-Former's pad / bos ("[DEC]") / sep ids always come from the tokenizer.
config.init       pretrained: a whole stage-1 checkpoint (LAVIS .pth, HF Blip2ForImageTextRetrieval
                  directory or converted jaxlisa directory); vision: an EVA ViT checkpoint (LAVIS
                  eva_vit_g.pth) for visual_encoder; tokenizer: a BERT tokenizer directory
                  ("[DEC]" is added as bos, as LAVIS) ('' everywhere = from scratch, with a
                  WordPiece tokenizer trained on the data's texts).
config.data       base_dir ('' = the synthetic shapes captions, written to workdir/data once),
                  image_root ('' = base_dir), train_ann / val_ann (LAVIS caption json: [{"image",
                  "caption"}]), max_words (LAVIS blip_caption processor), vocab_size (trained
                  tokenizer), synthetic {num_train, num_val, image_size, max_shapes,
                  captions_per_image, seed}.
Images: LAVIS's eval transform (resize to vision.image_size, bicubic, CLIP mean/std); no
RandomResizedCrop / flip (they would cut shapes out of the synthetic captions).
Validation: the losses (hard negatives drawn with a fixed key) and in-batch retrieval recall@1
(image -> text `i2t_r1`, text -> image `t2i_r1`, among the batch's config.batch_size candidates;
a candidate with the same caption tokens counts as correct).

ITC under the trainer's jit sees the global batch, so the similarities span the whole mesh as
LAVIS's `concat_all_gather`; unlike LAVIS, gradients also flow through the other devices' features
(the gradient of the global loss; values are the same).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxlisa.data import image_text, synthetic_captions, tokenization
from jaxlisa.data.lavis_processors import pre_caption
from jaxlisa.models import blip2 as blip2_lib
from jaxlisa.tasks import model_config
from jaxlisa.tasks.captions import CaptionDataTask, convert_part, convert_whole


# ----------------------------------------------------------------------------- config
def _resolve_qformer(d: dict, tokenizer) -> None:
  q = d["qformer"]
  if q.get("encoder_hidden_size", -1) == -1:
    q["encoder_hidden_size"] = d["vision"]["hidden_size"]
  q.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
           sep_token_id=tokenizer.sep_token_id)


def model_config_from(config, tokenizer) -> blip2_lib.Blip2Config:
  return model_config.from_tokenizer(config, tokenizer, blip2_lib.Blip2Config, "qformer", _resolve_qformer)


def _touch_params(model: blip2_lib.Blip2Qformer, pixels):
  """Creates every parameter with one queries-only pass (the Q-Former builds its text parts and LM
  head when initializing) instead of tracing the three losses: a much smaller init program."""
  q = model.query_output(model.image_embeds(pixels)).last_hidden_state
  return model.vision_proj(q), model.text_proj(q[:, 0]), model.itm_head(q), model.temperature()


class Task(CaptionDataTask):
  """BLIP-2 stage 1: ITC + ITM + ITG; losses and in-batch retrieval recall@1 on validation."""

  TEXT_KEYS = ("caption",)
  MODEL = blip2_lib.Blip2Qformer
  model_config_from = staticmethod(model_config_from)

  def _pretrained_tokenizer(self, path: str):
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})  # LAVIS Blip2Base.init_tokenizer
    return tok

  def _train_tokenizer(self, texts):
    texts = [pre_caption(t, self.config.data.max_words) for t in texts]
    return tokenization.load_or_train(self.tokenizer_dir, synthetic_captions.train_bert_tokenizer, texts,
                                      vocab_size=self.config.data.vocab_size)

  def _source(self, anns, root, split):
    """Captions through LAVIS's blip_caption processor, tokenized as LAVIS (padding to max_txt_len)."""
    texts = [pre_caption(a["caption"], self.config.data.max_words) for a in anns]
    enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.model_config.max_txt_len)
    arrays = {"input_ids": np.asarray(enc["input_ids"], np.int32),
              "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    cut = int((arrays["attention_mask"][:, -1] == 1).sum())
    if cut:
      logging.info("%d of %d captions reach max_txt_len %d", cut, len(texts), self.model_config.max_txt_len)
    return image_text.ImageTextSource([os.path.join(root, a["image"]) for a in anns], arrays, self.processor)

  # ---------------------------------------------------------------------------------- model
  def init(self, rng):
    pixels = self.model_config.dummy_inputs()[0]
    return self.model.init(rng, pixels, method=_touch_params)["params"]

  def pretrained(self):
    init = self.config.init
    out = {}
    if init.vision:
      c = self.model_config.vision
      vit = convert_part(init.vision, "eva_vit", {f.name: getattr(c.replace(use_ln_vision=False), f.name)
                                                  for f in dataclasses.fields(c)})
      out["visual_encoder"] = vit
    if init.pretrained:
      out.update(convert_whole(init.pretrained, self.model_config))
    return out or None

  def forward(self, params, batch, rng, train):
    r_neg, r_drop = jax.random.split(rng)
    return self.model.apply({"params": params}, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                            rng=r_neg, deterministic=not train, rngs={"dropout": r_drop} if train else None)

  def loss(self, params, batch, rng, train=True):
    out = self.forward(params, batch, rng, train)
    return out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm,
                      "weight": jnp.float32(batch["input_ids"].shape[0])}

  def eval_step(self, params, batch, rng):
    out = self.forward(params, batch, rng, False)
    ids = batch["input_ids"]
    same_text = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)  # [B, B] caption i == caption j
    i2t = jnp.argmax(out.sim_i2t, axis=1)
    t2i = jnp.argmax(out.sim_t2i, axis=1)
    rows = jnp.arange(ids.shape[0])
    return {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm,
            "i2t_r1": jnp.mean(same_text[rows, i2t].astype(jnp.float32)),
            "t2i_r1": jnp.mean(same_text[t2i, rows].astype(jnp.float32)),
            "weight": jnp.float32(ids.shape[0])}

  def describe(self):
    c = self.model_config
    v, q = c.vision, c.qformer
    return {"model": f"BLIP-2 stage 1: EVA ViT {v.num_hidden_layers}x{v.hidden_size}@{v.image_size}px/{v.patch_size}, "
                     f"Q-Former {q.num_hidden_layers}x{q.hidden_size} ({c.num_query_tokens} queries, cross-attn every "
                     f"{q.cross_attention_freq}), ITC dim {c.embed_dim}",
            "data": f"{len(self.train_source)} train / {len(self.val_source) if self.val_source else 0} val captions "
                    f"from {self.base_dir}",
            "tokenizer": f"{len(self.tokenizer)} tokens ([DEC] = {q.bos_token_id}), max_txt_len {c.max_txt_len}"}
