"""MiniGPT4-Qwen (`Coobiw/MiniGPT4Qwen`, `lavis/models/minigpt4qwen_models/minigpt4qwen.py`).

EVA ViT-g + ln_vision -> BLIP-2 Q-Former (queries only, no text parts) -> `llm_proj` Linear(768 -> LLM
width) -> a Qwen chat model (jaxlisa DecoderLM, family qwen (Qwen-7B/14B-Chat) or qwen2). The
conversation is ChatML; every `<ImageHere>` in a user turn becomes `num_query_tokens` copies of the
placeholder `<|extra_0|>`, and the k-th placeholder of the batch (row-major, as the PyTorch masked
assignment) takes the k-th projected query embedding. The config's freeze switches say what trains
(by default only `llm_proj`; jaxlisa.tasks.minigpt4qwen.trainable_patterns reads them); optional LoRA
on the LLM's q_proj / v_proj (r 8, alpha 32, dropout 0.05). The ChatML preprocess lives in
jaxlisa.data.chatml, decoding in jaxlisa.inference.multimodal.minigpt4qwen_generate.

Parameter tree: visual_encoder/... (incl. ln_vision), Qformer/bert/..., query_tokens [1, Q, D],
llm_proj/{kernel,bias}, llm_model/... (DecoderLM tree).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxlisa.models.blip2 import _Blip2Base
from jaxlisa.models.eva import EVAViTConfig
from jaxlisa.models.layers import DenseGeneral
from jaxlisa.models.llm import DecoderConfig, DecoderLM
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models.losses import causal_lm_cross_entropy
from jaxlisa.models.qformer import IGNORE_INDEX, QFormerConfig


@dataclasses.dataclass(frozen=True)
class MiniGPT4QwenConfig(ConfigMixin):
  vision: EVAViTConfig = dataclasses.field(default_factory=EVAViTConfig.eva_vit_g)
  qformer: QFormerConfig = dataclasses.field(default_factory=lambda: QFormerConfig(use_text=False, lm_head=False))
  llm: DecoderConfig = dataclasses.field(default_factory=DecoderConfig.qwen_7b)
  image_token_id: int = 151646  # "<|extra_0|>" in Qwen-7B-Chat's tokenizer
  max_txt_len: int = 512
  # freeze switches (minigpt4qwen.yaml defaults)
  freeze_vit: bool = True
  unfreeze_pos_embed: bool = False
  freeze_qformer: bool = True  # Q-Former and ln_vision
  freeze_queries: bool = True
  freeze_proj: bool = False
  freeze_llm: bool = True  # LoRA adapters (llm.lora_rank > 0) train even when the LLM is frozen

  @property
  def num_query_tokens(self) -> int:
    return self.qformer.num_query_tokens

  @property
  def scan_layers(self) -> bool:
    if self.llm.scan_layers != self.vision.scan_layers:
      raise ValueError("vision and LLM towers must agree on scan_layers")
    return self.vision.scan_layers

  def with_lora(self, rank: int = 8, alpha: float = 32.0, dropout: float = 0.05,
                targets: tuple[str, ...] = ("q_proj", "v_proj")) -> "MiniGPT4QwenConfig":
    """The original `get_lora` settings (PEFT LoraConfig on q_proj / v_proj)."""
    return self.replace(llm=self.llm.replace(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                                             lora_targets=targets))

  def dummy_inputs(self) -> tuple:
    """(pixels [1, S, S, C], input_ids [1, 4], attention_mask [1, 4])."""
    v = self.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.zeros((1, 4), jnp.int32),
            jnp.ones((1, 4), jnp.int32))


@flax.struct.dataclass
class MiniGPT4QwenOutput:
  logits: jax.Array  # [B, T, V]
  loss: jax.Array | None = None


def merge_image_embeds(inputs_embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array,
                       image_token_id: int) -> jax.Array:
  """`inputs_embeds[ids == image_token] = image_embeds.view(-1, D)`: the k-th placeholder of the batch
  (row-major) takes row k of image_embeds [B_img, Q, D]. inputs_embeds [B, T, D], input_ids [B, T]."""
  b, t, d = inputs_embeds.shape
  is_img = (input_ids == image_token_id).reshape(-1)
  src = image_embeds.reshape(-1, d).astype(inputs_embeds.dtype)
  rank = jnp.clip(jnp.cumsum(is_img) - 1, 0, src.shape[0] - 1)
  merged = jnp.where(is_img[:, None], jnp.take(src, rank, axis=0), inputs_embeds.reshape(-1, d))
  return merged.reshape(b, t, d)


class MiniGPT4Qwen(_Blip2Base):
  """See the module docstring. __call__(pixels, input_ids, attention_mask, labels) -> logits, loss."""
  config: MiniGPT4QwenConfig

  def setup(self):
    c = self.config
    self._setup_image_path(c.qformer.replace(use_text=False, lm_head=False))
    self.llm_proj = DenseGeneral(c.llm.hidden_size, kernel_axes=(None, "embed"), use_bias=True,
                                 dtype=jnp.dtype(c.llm.dtype), param_dtype=jnp.dtype(c.llm.param_dtype))
    self.llm_model = DecoderLM(c.llm)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, 3] -> llm_proj(Q-Former queries) [B, Q, D_llm]."""
    q = self.query_output(self.image_embeds(pixels)).last_hidden_state
    return self.llm_proj(q.astype(jnp.dtype(self.config.llm.dtype)))

  def embed_inputs(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array):
    """Decoding entry: token embeddings with the placeholders replaced by the projected queries
    (inputs_embeds [B, T, D], attention_mask [B, T])."""
    emb = self.llm_model.embed(input_ids)
    return merge_image_embeds(emb, input_ids, self.encode_image(pixels), self.config.image_token_id), attention_mask

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               labels: jax.Array | None = None, deterministic: bool = True) -> MiniGPT4QwenOutput:
    """input_ids / attention_mask / labels [B, T] from `preprocess` (right padded, B_img * Q
    placeholders). Loss: next-token CE over labels != -100 (the HF causal-LM loss)."""
    embeds, attention_mask = self.embed_inputs(pixels, input_ids, attention_mask)
    out = self.llm_model(inputs_embeds=embeds, attention_mask=attention_mask, deterministic=deterministic)
    loss = None if labels is None else causal_lm_cross_entropy(out.logits, labels)
    return MiniGPT4QwenOutput(logits=out.logits, loss=loss)
