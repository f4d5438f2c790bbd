"""MiniGPT4-Qwen instruction tuning: EVA ViT + Q-Former -> llm_proj -> Qwen, ChatML next-token loss on
the assistant turns (jaxlisa.data.chatml.preprocess target masking).

config.model      MiniGPT4QwenConfig fields: vision, qformer, llm {DecoderConfig}, image_token_id,
                  max_txt_len, freeze_vit / unfreeze_pos_embed / freeze_qformer / freeze_queries /
                  freeze_proj / freeze_llm. llm.vocab_size -1 = the tokenizer's size;
                  image_token_id -1 = the id of "<|extra_0|>"; llm pad / eos = the tokenizer's pad
                  ("<|endoftext|>"); qformer.encoder_hidden_size -1 = vision.hidden_size.
config.trainable  () = the freeze switches decide (minus config.frozen); regexes = those instead.
config.init       pretrained: a whole MiniGPT4-Qwen checkpoint (.pth / converted directory);
                  vision: an EVA ViT checkpoint; qformer: a BLIP-2 stage-1 checkpoint (its ViT,
                  Q-Former and queries; text parts left out, as LAVIS's load_from_pretrained);
                  llm: a Qwen / Qwen2 checkpoint; tokenizer: a Qwen chat tokenizer directory
                  ('' everywhere = from scratch with a byte-level BPE ChatML tokenizer trained on the
                  data's texts).
config.data       as the blip2_stage1 task, with MiniGPT4-Qwen InstructionDataset annotations
                  (train_ann / val_ann: [{"image", "instruction", "output"}], one image per row).
Validation: loss and next-token accuracy over the supervised (assistant) tokens.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxlisa.constants import IGNORE_INDEX
from jaxlisa.data import chatml, image_text, synthetic_captions, tokenization
from jaxlisa.models import minigpt4qwen as m4q
from jaxlisa.tasks import model_config
from jaxlisa.tasks.captions import CaptionDataTask, convert_part, convert_whole, fit_to
from jaxlisa.training import partition


def _resolve_ids(d: dict, tokenizer) -> None:
  llm, q = d["llm"], d["qformer"]
  llm.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id, bos_token_id=None)
  if q.get("encoder_hidden_size", -1) == -1:
    q["encoder_hidden_size"] = d["vision"]["hidden_size"]
  if q.get("vocab_size", -1) == -1:
    q["vocab_size"] = 1  # no text parts (use_text=False): unused
  if d.get("image_token_id", -1) == -1:
    d["image_token_id"] = int(tokenizer.convert_tokens_to_ids(chatml.IMAGE_TOKEN))


def model_config_from(config, tokenizer) -> m4q.MiniGPT4QwenConfig:
  return model_config.from_tokenizer(config, tokenizer, m4q.MiniGPT4QwenConfig, "llm", _resolve_ids)


def trainable_patterns(c: m4q.MiniGPT4QwenConfig) -> list[str]:
  """Regexes (full match on '/'-joined param paths, for jaxlisa.training.partition.trainable_mask) of what
  trains under the model config's freeze switches (minigpt4qwen.yaml defaults: only llm_proj)."""
  pats = []
  if not c.freeze_vit:
    pats.append(r"visual_encoder/(?!ln_vision/).*")
  elif c.unfreeze_pos_embed:
    pats.append(r"visual_encoder/pos_embed")
  if not c.freeze_qformer:
    pats += [r"Qformer/.*", r"visual_encoder/ln_vision/.*"]
  if not c.freeze_queries:
    pats.append(r"query_tokens")
  if not c.freeze_proj:
    pats.append(r"llm_proj/.*")
  if not c.freeze_llm:
    pats.append(r"llm_model/.*")
  elif c.llm.lora_rank > 0:
    pats.append(r"llm_model/.*/lora_[ab]")
  return pats


def stage1_parts(path: str, c: m4q.MiniGPT4QwenConfig) -> dict:
  """visual_encoder, Qformer and query_tokens of a BLIP-2 stage-1 checkpoint (LAVIS .pth or a
  converted directory), read with this model's vision / Q-Former architecture (a .pth has no
  config) and the checkpoint's own text vocabulary; the text parts come along (fit_to drops them)."""
  from jaxlisa.conversion import convert as convert_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import families  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.checkpoint_io import open_checkpoint  # pylint: disable=import-outside-toplevel
  if convert_lib.is_converted(path):
    params = convert_lib.load_params(path)
  else:
    found = families.get_family("blip2_lavis").config_from_hf(None, open_checkpoint(path))
    q = c.qformer.replace(use_text=True, lm_head=True, vocab_size=found.qformer.vocab_size,
                          max_position_embeddings=found.qformer.max_position_embeddings)
    params = convert_lib.convert_checkpoint(path, family="blip2_lavis",
                                            config_overrides={"vision": c.vision, "qformer": q}).params
  return {k: params[k] for k in ("visual_encoder", "Qformer", "query_tokens") if k in params}


class Task(CaptionDataTask):
  """MiniGPT4-Qwen: next-token loss on the assistant turns of image conversations."""

  TEXT_KEYS = ("instruction", "output")
  MODEL = m4q.MiniGPT4Qwen
  model_config_from = staticmethod(model_config_from)

  def _pretrained_tokenizer(self, path: str):
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)

  def _train_tokenizer(self, texts):
    return tokenization.load_or_train(self.tokenizer_dir, synthetic_captions.train_chatml_tokenizer, texts,
                                      vocab_size=self.config.data.vocab_size)

  def _source(self, anns, root, split):
    """ChatML ids / labels of every conversation (MiniGPT4Qwen.preprocess), one image each."""
    c = self.model_config
    convs = [synthetic_captions.conversations(a) for a in anns]
    arrays = chatml.preprocess(convs, self.tokenizer, c.max_txt_len, image_len=c.num_query_tokens)
    ids = arrays["input_ids"]
    counts = (ids == c.image_token_id).sum(1)
    bad = np.flatnonzero(counts != c.num_query_tokens)
    if len(bad):
      raise ValueError(f"{split} row {int(bad[0])} ({anns[bad[0]]['image']}) holds {int(counts[bad[0]])} image "
                       f"placeholders, expected {c.num_query_tokens}: one <ImageHere> per conversation, not cut "
                       f"by max_txt_len {c.max_txt_len}")
    full = int((arrays["attention_mask"][:, -1] == 1).sum())
    logging.info("%s: %d conversations, %.1f tokens on average, %d reach max_txt_len %d", split, len(ids),
                 arrays["attention_mask"].sum(1).mean(), full, c.max_txt_len)
    arrays = {k: v.astype(np.int32) for k, v in arrays.items()}
    return image_text.ImageTextSource([os.path.join(root, a["image"]) for a in anns], arrays, self.processor)

  # ---------------------------------------------------------------------------------- model
  def init(self, rng):
    return self.model.init(rng, *self.model_config.dummy_inputs())["params"]

  def trainable_mask(self, params):
    pats = tuple(self.config.trainable) or tuple(trainable_patterns(self.model_config))
    return partition.trainable_mask(params, pats, tuple(self.config.frozen))

  def pretrained(self):
    init, c = self.config.init, self.model_config
    if not (init.pretrained or init.vision or init.qformer or init.llm):
      return None
    abstract = nn.meta.unbox(jax.eval_shape(self.init, jax.random.PRNGKey(0)))
    out = {}
    if init.vision:
      over = {f.name: getattr(c.vision.replace(use_ln_vision=False), f.name) for f in dataclasses.fields(c.vision)}
      out["visual_encoder"] = convert_part(init.vision, "eva_vit", over)
    if init.qformer:  # a BLIP-2 stage-1 checkpoint: ViT (+ ln_vision), Q-Former, queries
      out.update(fit_to(stage1_parts(init.qformer, c), abstract, f"init.qformer {init.qformer}"))
    if init.llm:
      llm = convert_part(init.llm, None)
      out["llm_model"] = fit_to(llm, abstract["llm_model"], f"init.llm {init.llm}")
    if init.pretrained:
      out.update(convert_whole(init.pretrained, c, family="minigpt4qwen"))
    return out

  def _forward(self, params, batch, rng, train):
    return self.model.apply({"params": params}, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                            batch["labels"], deterministic=not train,
                            rngs={"dropout": rng} if (train and rng is not None) else None)

  def loss(self, params, batch, rng, train=True):
    out = self._forward(params, batch, rng, train)
    targets = batch["labels"][:, 1:]
    valid = (targets != IGNORE_INDEX).astype(jnp.float32)
    n = valid.sum()
    acc = ((jnp.argmax(out.logits[:, :-1], -1) == targets) * valid).sum() / jnp.maximum(n, 1.0)
    return out.loss, {"accuracy": acc, "weight": n}

  def describe(self):
    c = self.model_config
    v, q, t = c.vision, c.qformer, c.llm
    frozen = [k for k in ("freeze_vit", "freeze_qformer", "freeze_queries", "freeze_proj", "freeze_llm")
              if getattr(c, k)]
    return {"model": f"MiniGPT4-Qwen: EVA ViT {v.num_hidden_layers}x{v.hidden_size}@{v.image_size}px, Q-Former "
                     f"{q.num_hidden_layers}x{q.hidden_size} ({c.num_query_tokens} queries), LLM {t.family} "
                     f"{t.num_hidden_layers}x{t.hidden_size} (vocab {t.vocab_size}, lora r{t.lora_rank})",
            "trainable": ", ".join(self.config.trainable) if self.config.trainable
                         else "freeze switches: " + (", ".join(frozen) or "none set"),
            "data": f"{len(self.train_source)} train / {len(self.val_source) if self.val_source else 0} val "
                    f"conversations from {self.base_dir}",
            "tokenizer": f"{len(self.tokenizer)} tokens, <|extra_0|> = {c.image_token_id}, "
                         f"max_txt_len {c.max_txt_len}"}
