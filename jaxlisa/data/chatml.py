"""MiniGPT4-Qwen's ChatML text side (`Coobiw/MiniGPT4Qwen` `preprocess`, Qwen's chatml `make_context`).

`preprocess` reproduces the original `preprocess` exactly (target masking, padding, truncation; its
`content.replace("<|extra_0|>", "")` discards its result, so a literal placeholder in user text is
kept, and so it is here); `chat_prompt` is Qwen's chatml `make_context` text and `chat_ids` its tokens (each part tokenized
apart, as make_context and `preprocess` do), `<ImageHere>` expanded; `check_placeholders` says when
a batch does not hold one run of image placeholders per image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlisa.constants import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TOKEN = "<|extra_0|>"
SYSTEM_MESSAGE = "You are a helpful assistant."


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


def chat_ids(tokenizer, query: str, image_len: int, history: Sequence[tuple[str, str]] = (),
             system: str = SYSTEM_MESSAGE, image_token: str = IMAGE_TOKEN) -> list[int]:
  """The tokens of `chat_prompt(query, history, system)` as Qwen's chatml `make_context` builds them
  (role and content tokenized apart, joined by the newline's ids; the same pieces `preprocess`
  trains on), `<ImageHere>` in the query expanded to image_len placeholders. A query without
  `<ImageHere>` gets MiniGPT4-Qwen's "<Img><ImageHere></Img> " in front (its chat demo's form)."""
  if IMAGE_PLACEHOLDER not in query:
    query = f"<Img>{IMAGE_PLACEHOLDER}</Img> {query}"
  query = query.replace(IMAGE_PLACEHOLDER, image_token * image_len)
  im_start = _token_id(tokenizer, "im_start_id", "<|im_start|>")
  im_end = _token_id(tokenizer, "im_end_id", "<|im_end|>")
  nl = _ids(tokenizer, "\n")

  def turn(role: str, content: str) -> list[int]:
    return [im_start] + _ids(tokenizer, role) + nl + _ids(tokenizer, content) + [im_end]

  ids = turn("system", system)
  for q, r in history:
    ids += nl + turn("user", q) + nl + turn("assistant", r)
  return ids + nl + turn("user", query) + nl + [im_start] + _ids(tokenizer, "assistant") + nl
