"""Tokenization and loss-target masking of LLaVA / LISA conversations (numpy, any HF tokenizer).

Reproduces, sample by sample:
  - `tokenizer_image_token` (llava/mm_utils.py): "<image>" becomes IMAGE_TOKEN_INDEX (-200).
  - LLaVA's `preprocess_v1`, `preprocess_llama_2`, `preprocess_mpt`, `preprocess_plain`
    (llava/train/train.py, c121f04) and the 'model_max_length' cut of its DataCollator.
  - LISA's `collate_fn` masking (utils/dataset.py): rounds split on "</s>", no tokenizer-legacy
    correction, and training-only truncation to `model_max_length - 255`.
  - the data half of `prepare_inputs_labels_for_multimodal`: each image id becomes N placeholder
    positions (labels IGNORE_INDEX) that the model fills with image features at fixed shapes.

The masking loops count tokens of each round tokenized on its own and must land exactly on the
length of the whole tokenized conversation. LLaVA then blanks the labels of a sample on mismatch
(and prints a warning); LISA asserts. Both are reported here as a warning plus `dropped=True` with
all labels IGNORE_INDEX, so the caller can skip the sample. Quirk kept from the originals: the
total counts tokens that differ from `pad_token_id`, so text that tokenizes to the pad id (LISA
pads with <unk>) counts as a mismatch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from absl import logging
import numpy as np



class TokenizerFileError(ValueError):
  """A saved tokenizer that cannot be read (a torn or hand-edited tokenizer.json)."""


def load_or_train(directory: str | None, train_fn: Callable, texts: Sequence[str], **kw):
  """The tokenizer saved in `directory` (a resumed run), else train_fn(texts, **kw), saved there
  atomically by save_tokenizer (directory None: trained, not saved). Every synthetic-data
  tokenizer goes through here."""
  import os  # pylint: disable=import-outside-toplevel
  if directory and os.path.exists(os.path.join(directory, "tokenizer.json")):
    return load_saved_tokenizer(directory)
  tok = train_fn(texts, **kw)
  if directory:
    save_tokenizer(tok, directory)
    logging.info("trained a %d-token tokenizer, saved to %s", len(tok), directory)
  return tok


def load_saved_tokenizer(directory: str):
  """PreTrainedTokenizerFast.from_pretrained(directory); a corrupt file gives TokenizerFileError
  naming it (one line) instead of the JSON/Rust parser's traceback."""
  import os  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  try:
    return PreTrainedTokenizerFast.from_pretrained(directory)
  except Exception as e:  # pylint: disable=broad-except  (json, tokenizers and OS errors alike)
    msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    raise TokenizerFileError(f"corrupt tokenizer file {os.path.join(directory, 'tokenizer.json')} ({msg}); "
                             "delete that folder to have the run regenerate it") from e


def save_tokenizer(tok, directory: str) -> None:
  """tok.save_pretrained(directory) as a whole: into a temporary sibling, then renamed, so a kill
  never leaves a half-written tokenizer.json (which would stop every later resume). A folder
  there without tokenizer.json (an older interrupted save) is replaced; one that has it (another
  process saved first) is kept."""
  import os  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  directory = os.path.normpath(directory)
  tmp = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tok.save_pretrained(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(directory) and not os.path.exists(os.path.join(directory, "tokenizer.json")):
    shutil.rmtree(directory)
  try:
    os.replace(tmp, directory)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
      raise


from jaxlisa.data.conversation import (DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN,
                                       DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX,
                                       Conversation, SepStyle)


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX
                          ) -> list[int]:
  """Token ids of `prompt` with each "<image>" as `image_token_index`.

  Every chunk between images is tokenized on its own; if the first chunk starts with BOS, one BOS
  is kept and the first token of every chunk is dropped (it is that chunk's BOS).
  """
  chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
  input_ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
    input_ids, offset = [chunks[0][0]], 1
  for k, chunk in enumerate(chunks):
    if k:
      input_ids.append(image_token_index)
    input_ids.extend(chunk[offset:])
  return input_ids


def replace_image_tokens(text: str, use_mm_start_end: bool) -> str:
  """LISA collate / LLaVA preprocess_multimodal: "<image>" -> "<im_start><image><im_end>"."""
  if not use_mm_start_end:
    return text
  return text.replace(DEFAULT_IMAGE_TOKEN,
                      DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)


def move_image_token_first(text: str) -> str:
  """LLaVA preprocess_multimodal: a message holding "<image>" becomes "<image>\\n" + the rest."""
  if DEFAULT_IMAGE_TOKEN not in text:
    return text
  return (DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  """One tokenized conversation.

  input_ids: [T] int32, IMAGE_TOKEN_INDEX where an image goes (not yet expanded).
  labels: [T] int32, IGNORE_INDEX where no loss is taken.
  dropped: the masking found a token-count mismatch; labels are then all IGNORE_INDEX.
  """
  prompt: str
  input_ids: np.ndarray
  labels: np.ndarray
  dropped: bool


def _mask_rounds(input_ids: np.ndarray, rounds: Sequence[str], sep: str,
                 count: Callable[[str], int], *, pad_token_id: int, max_length: int | None,
                 start: int, instruction_trim: int, later_round_shift: int = 0,
                 strict: bool = False) -> tuple[np.ndarray, bool]:
  """The target-masking loop shared by LLaVA's preprocess_* and LISA's collate.

  Each round "instruction{sep}answer" masks its instruction (`count(instruction + sep) -
  instruction_trim` tokens, the trim removing BOS and the trailing-space token) and advances by
  `count(round)` tokens; rounds after the first shift both counts by `later_round_shift`.
  Returns (labels [T], dropped).
  """
  labels = input_ids.copy()
  cur_len = start
  labels[:cur_len] = IGNORE_INDEX
  for i, rou in enumerate(rounds):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      if strict:
        raise ValueError(f"round {i} does not split in two on {sep!r}: {rou!r}")
      break
    round_len = count(rou)
    instruction_len = count(parts[0] + sep) - instruction_trim
    if i != 0:
      round_len += later_round_shift
      instruction_len += later_round_shift
    labels[cur_len:cur_len + instruction_len] = IGNORE_INDEX
    cur_len += round_len
  labels[cur_len:] = IGNORE_INDEX
  total_len = int(np.sum(input_ids != pad_token_id))
  dropped = (max_length is None or cur_len < max_length) and cur_len != total_len
  if dropped:
    logging.warning("tokenization mismatch: %d vs. %d (sample ignored)", cur_len, total_len)
    labels[:] = IGNORE_INDEX
  return labels, dropped


def _token_counter(tokenizer, has_image: bool) -> Callable[[str], int]:
  if has_image:
    return lambda text: len(tokenizer_image_token(text, tokenizer))
  return lambda text: len(tokenizer(text).input_ids)


def _encode(prompt: str, tokenizer, has_image: bool, max_length: int | None) -> np.ndarray:
  """Whole-conversation ids: tokenizer_image_token (never truncated) or the tokenizer with
  LLaVA's `truncation=True, max_length=model_max_length`."""
  if has_image:
    ids = tokenizer_image_token(prompt, tokenizer)
  elif max_length is None:
    ids = tokenizer(prompt).input_ids
  else:
    ids = tokenizer(prompt, max_length=max_length, truncation=True).input_ids
  return np.asarray(ids, np.int32)


def preprocess_conversation(source: Sequence[Mapping[str, str]], tokenizer,
                            template: Conversation, has_image: bool,
                            max_length: int | None = None,
                            legacy: bool | None = None) -> TokenizedConversation:
  """LLaVA's `preprocess` for one source [{"from": "human"|"gpt", "value": str}, ...].

  Dispatches like LLaVA: PLAIN -> preprocess_plain, LLAMA_2 -> preprocess_llama_2, version "v1*"
  -> preprocess_v1, version "mpt" -> preprocess_mpt. `max_length` is `tokenizer.model_max_length`
  (None: no limit); ids and labels are cut to it as LLaVA's DataCollator does (image tokens are
  not yet expanded; `expand_image_tokens(max_length=...)` does LLaVA's post-expansion cut).
  `legacy` is `tokenizer.legacy` (None: read it from the tokenizer, False when absent), used for
  LLaVA's correction of round lengths after the first (v1: -1 when not legacy; mpt: +1 when
  legacy); rounds are counted with tokenizers >= 0.14.
  """
  if template.sep_style is SepStyle.PLAIN:
    return _preprocess_plain(source, tokenizer, template)
  conv = template.with_source(source)
  prompt = conv.get_prompt()
  input_ids = _encode(prompt, tokenizer, has_image, max_length)
  count = _token_counter(tokenizer, has_image)
  legacy = getattr(tokenizer, "legacy", False) if legacy is None else legacy
  mask = dict(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
  if template.sep_style is SepStyle.LLAMA_2:
    labels, dropped = _mask_rounds(input_ids, prompt.split(conv.sep2), "[/INST] ", count,
                                   start=1, instruction_trim=2, **mask)
  elif template.version.startswith("v1"):
    labels, dropped = _mask_rounds(input_ids, prompt.split(conv.sep2),
                                   conv.sep + conv.roles[1] + ": ", count, start=1,
                                   instruction_trim=2, later_round_shift=0 if legacy else -1,
                                   **mask)
  elif template.version == "mpt":
    turns = prompt.split(conv.sep)
    rounds = [conv.sep.join(turns[:3])]  # system + user + assistant
    rounds += [conv.sep.join(turns[k:k + 2]) for k in range(3, len(turns), 2)]
    labels, dropped = _mask_rounds(input_ids, rounds, conv.sep + conv.roles[1], count, start=0,
                                   instruction_trim=1, later_round_shift=1 if legacy else 0,
                                   **mask)
  else:
    raise ValueError(f"no LLaVA preprocessing for template version {template.version!r}")
  return TokenizedConversation(prompt, input_ids[:max_length], labels[:max_length], dropped)


def _preprocess_plain(source, tokenizer, template: Conversation) -> TokenizedConversation:
  """LLaVA preprocess_plain (pretraining): "<image>" + caption + sep, loss on the caption only."""
  if len(source) != 2 or DEFAULT_IMAGE_TOKEN not in source[0]["value"]:
    raise ValueError("plain conversations are one image turn and one caption")
  prompt = DEFAULT_IMAGE_TOKEN + source[1]["value"] + template.sep
  input_ids = np.asarray(tokenizer_image_token(prompt, tokenizer), np.int32)
  labels = input_ids.copy()
  labels[:len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer))] = IGNORE_INDEX
  return TokenizedConversation(prompt, input_ids, labels, False)


def preprocess_lisa(conversation: str, tokenizer, template: Conversation,
                    max_length: int | None = None, truncate_len: int | None = None,
                    use_mm_start_end: bool = True) -> TokenizedConversation:
  """LISA `collate_fn` for one rendered conversation (`template` is its `--conv_type` template).

  "<image>" -> "<im_start><image><im_end>" when `use_mm_start_end`; tokenized with
  tokenizer_image_token; rounds split on sep2 ("</s>") and split in two on " ASSISTANT: " (TWO
  style) or "[/INST] " (llava_llama_2), else ValueError (LISA asserts); the length check runs when
  the counted length is below `max_length` (model_max_length). `truncate_len` is LISA's training
  cut, `model_max_length - 255` (not applied at inference).
  """
  prompt = replace_image_tokens(conversation, use_mm_start_end)
  has_image = DEFAULT_IMAGE_TOKEN in prompt
  input_ids = np.asarray(tokenizer_image_token(prompt, tokenizer), np.int32)
  two = template.sep_style is SepStyle.TWO
  sep = template.sep + template.roles[1] + ": " if two else "[/INST] "
  labels, dropped = _mask_rounds(input_ids, prompt.split(template.sep2), sep,
                                 _token_counter(tokenizer, has_image),
                                 pad_token_id=tokenizer.pad_token_id, max_length=max_length,
                                 start=1, instruction_trim=2, strict=True)
  return TokenizedConversation(prompt, input_ids[:truncate_len], labels[:truncate_len], dropped)


@dataclasses.dataclass(frozen=True)
class ExpandedTokens:
  """input_ids, labels: [T'] int32; image_positions: [T'] bool, True where image features go
  (in image order); labels is None when none were given."""
  input_ids: np.ndarray
  labels: np.ndarray | None
  image_positions: np.ndarray


def expand_image_tokens(input_ids: Sequence[int], labels: Sequence[int] | None,
                        num_image_tokens: int | Sequence[int], placeholder_id: int = 0,
                        max_length: int | None = None) -> ExpandedTokens:
  """Replace each IMAGE_TOKEN_INDEX in input_ids [T] by N placeholder positions.

  num_image_tokens: N for every image, or one N per image in order (anyres images differ).
  The placeholders carry `placeholder_id` (any valid id: the model overwrites their embeddings
  with the image features) and label IGNORE_INDEX. `max_length` is LLaVA's
  `tokenizer_model_max_length` cut after expansion.
  """
  input_ids = np.asarray(input_ids, np.int32)
  is_image = input_ids == IMAGE_TOKEN_INDEX
  counts = np.asarray(num_image_tokens, np.int64)
  if counts.ndim and counts.shape != (is_image.sum(),):
    raise ValueError(f"{counts.size} image token counts for {is_image.sum()} images")
  repeats = np.ones(input_ids.shape, np.int64)
  repeats[is_image] = counts
  image_positions = np.repeat(is_image, repeats)[:max_length]
  new_ids = np.where(image_positions, placeholder_id, np.repeat(input_ids, repeats)[:max_length])
  new_labels = None
  if labels is not None:
    new_labels = np.repeat(np.asarray(labels, np.int32), repeats)[:max_length]
    new_labels = np.where(image_positions, IGNORE_INDEX, new_labels)
  return ExpandedTokens(new_ids, new_labels, image_positions)
