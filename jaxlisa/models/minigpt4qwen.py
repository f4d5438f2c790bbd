"""MiniGPT4-Qwen (`Coobiw/MiniGPT4Qwen`, `lavis/models/minigpt4qwen_models/minigpt4qwen.py`).

EVA ViT-g + ln_vision -> BLIP-2 Q-Former (queries only, no text parts) -> `llm_proj` Linear(768 -> LLM
width) -> a Qwen chat model (jaxlisa DecoderLM, family qwen (Qwen-7B/14B-Chat) or qwen2). The
conversation is ChatML; every `<ImageHere>` in a user turn becomes `num_query_tokens` copies of the
placeholder `<|extra_0|>`, and the k-th placeholder of the batch (row-major, as the PyTorch masked
assignment) takes the k-th projected query embedding. Only `llm_proj` trains by default (ViT,
Q-Former, queries and LLM frozen); optional LoRA on the LLM's q_proj / v_proj (r 8, alpha 32, dropout 0.05).

`preprocess` reproduces the original `preprocess` exactly (target masking, padding, truncation; its
`content.replace("<|extra_0|>", "")` discards its result, so a literal placeholder in user text is
kept, and so it is here); `chat_prompt` is Qwen's chatml `make_context` text.

Parameter tree: visual_encoder/... (incl. ln_vision), Qformer/bert/..., query_tokens [1, Q, D],
llm_proj/{kernel,bias}, llm_model/... (DecoderLM tree).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlisa.inference import generate as gen_lib
from jaxlisa.models.blip2 import _Blip2Base
from jaxlisa.models.eva import EVAViTConfig
from jaxlisa.models.layers import DenseGeneral
from jaxlisa.models.llm import DecoderConfig, DecoderLM
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models.losses import causal_lm_cross_entropy
from jaxlisa.models.qformer import IGNORE_INDEX, QFormerConfig

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TOKEN = "<|extra_0|>"
SYSTEM_MESSAGE = "You are a helpful assistant."


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

  def embed(self, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] with the placeholders replaced by the projected queries."""
    emb = self.llm_model.embed(input_ids)
    return merge_image_embeds(emb, input_ids, self.encode_image(pixels), self.config.image_token_id)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               labels: jax.Array | None = None, deterministic: bool = True) -> MiniGPT4QwenOutput:
    """input_ids / attention_mask / labels [B, T] from `preprocess` (right padded, B_img * Q
    placeholders). Loss: next-token CE over labels != -100 (the HF causal-LM loss)."""
    embeds = self.embed(pixels, input_ids)
    out = self.llm_model(inputs_embeds=embeds, attention_mask=attention_mask, deterministic=deterministic)
    loss = None if labels is None else causal_lm_cross_entropy(out.logits, labels)
    return MiniGPT4QwenOutput(logits=out.logits, loss=loss)


# ----------------------------------------------------------------------------- freezing
def trainable_patterns(c: MiniGPT4QwenConfig) -> list[str]:
  """Regexes (full match on '/'-joined param paths) of what trains under the freeze switches."""
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


def trainable_mask(params: Any, c: MiniGPT4QwenConfig) -> Any:
  """Tree of bools like params (True = trained) from the freeze switches; the same paths and regex
  semantics as jaxlisa.training.partition.trainable_mask (pass `trainable_patterns(c)` there)."""
  pats = trainable_patterns(c)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: any(re.fullmatch(p, "/".join(map(str, k))) for p in pats) for k in flat})


# ----------------------------------------------------------------------------- text
def _token_id(tokenizer, attr: str, token: str) -> int:
  v = getattr(tokenizer, attr, None)
  return int(v) if v is not None else int(tokenizer.convert_tokens_to_ids(token))


def _ids(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text).input_ids)


def preprocess(sources: Sequence[Sequence[dict]], tokenizer, max_len: int, image_len: int = 32,
               system_message: str = SYSTEM_MESSAGE, pad_token_id: int | None = None,
               image_token: str = IMAGE_TOKEN) -> dict[str, np.ndarray]:
  """ChatML tokens and targets of MiniGPT4Qwen's `preprocess` (host side, numpy).

  sources: conversations, each a list of {"from": "user" | "assistant", "value": str} (a first turn
  not from the user is dropped). Per conversation: system turn, then each turn as
  `<|im_start|>{role}\\n{content}<|im_end|>\\n`, `<ImageHere>` in user turns expanded to image_len
  placeholders. Targets: -100 everywhere except <|im_start|>, <|im_end|> and the newline after it in
  every turn, and the assistant's content. Padded with pad_token_id (Qwen: <|endoftext|>) and cut to
  max_len. Returns input_ids, labels, attention_mask (ids != pad) [N, max_len].
  """
  im_start = _token_id(tokenizer, "im_start_id", "<|im_start|>")
  im_end = _token_id(tokenizer, "im_end_id", "<|im_end|>")
  pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
  roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
  nl = _ids(tokenizer, "\n")
  system_part = _ids(tokenizer, "system") + nl
  all_ids, all_targets = [], []
  for source in sources:
    if roles[source[0]["from"]] != roles["user"]:
      source = source[1:]
    system = [im_start] + system_part + _ids(tokenizer, system_message) + [im_end] + nl
    ids = list(system)
    target = [im_start] + [IGNORE_INDEX] * (len(system) - 3) + [im_end] + nl
    for turn in source:
      role = roles[turn["from"]]
      content = turn["value"]
      if IMAGE_PLACEHOLDER in content and role == roles["user"]:
        content = content.replace(IMAGE_PLACEHOLDER, image_token * image_len)
      role_ids = _ids(tokenizer, role)
      turn_ids = role_ids + nl + _ids(tokenizer, content) + [im_end] + nl
      ids += turn_ids
      if role == roles["user"]:
        target += [im_start] + [IGNORE_INDEX] * (len(turn_ids) - 3) + [im_end] + nl
      else:
        target += [im_start] + [IGNORE_INDEX] * len(role_ids) + turn_ids[len(role_ids) + 1:-2] + [im_end] + nl
    if len(ids) != len(target):
      raise ValueError(f"target length {len(target)} != input length {len(ids)} (newline is not one token?)")
    ids = (ids + [pad] * (max_len - len(ids)))[:max_len]
    target = (target + [IGNORE_INDEX] * (max_len - len(target)))[:max_len]
    all_ids.append(ids)
    all_targets.append(target)
  input_ids = np.asarray(all_ids, np.int64)
  return dict(input_ids=input_ids, labels=np.asarray(all_targets, np.int64),
              attention_mask=(input_ids != pad).astype(np.int64))


def check_placeholders(input_ids: np.ndarray, num_images: int, image_len: int, image_token_id: int):
  """The PyTorch masked assignment needs exactly num_images * image_len placeholders in the batch
  (truncation to max_len can cut some); fail here with a clear message instead."""
  n = int((np.asarray(input_ids) == image_token_id).sum())
  if n != num_images * image_len:
    raise ValueError(f"the batch holds {n} image placeholders, expected {num_images} images x {image_len}; "
                     "was a conversation cut by max_len, or does its text contain the placeholder token?")


def chat_prompt(query: str, history: Sequence[tuple[str, str]] = (), system: str = SYSTEM_MESSAGE) -> str:
  """Qwen chatml `make_context` text (the string MiniGPT4Qwen.chat tokenizes)."""
  text = f"<|im_start|>system\n{system}<|im_end|>"
  for q, r in history:
    text += f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>"
  return text + f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"


def generate(model: MiniGPT4Qwen, params, pixels, input_ids, attention_mask, *, max_new_tokens: int = 64,
             stop_ids: Sequence[int] = (), pad_token_id: int | None = None, **kw) -> gen_lib.GenerateOutput:
  """Answers: prompt ids [B, P] left-padded, with B * Q placeholders (`<ImageHere>` expanded) ->
  jaxlisa.inference.generate on the merged inputs_embeds (greedy; sampling options in kw). stop_ids:
  <|im_end|> and <|im_start|> as the original."""
  c = model.config.llm
  embeds = _embed_fn(model)(params, pixels, input_ids)
  pad = c.pad_token_id if pad_token_id is None else pad_token_id
  return gen_lib.generate(DecoderLM(c), params["llm_model"], None, attention_mask, inputs_embeds=embeds,
                          max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), pad_token_id=pad or 0, **kw)


@functools.lru_cache(maxsize=8)
def _embed_fn(model: MiniGPT4Qwen):
  return jax.jit(lambda p, x, i: model.apply({"params": p}, x, i, method=MiniGPT4Qwen.embed))


def dummy_inputs(c: MiniGPT4QwenConfig):
  v = c.vision
  return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.zeros((1, 4), jnp.int32),
          jnp.ones((1, 4), jnp.int32))
