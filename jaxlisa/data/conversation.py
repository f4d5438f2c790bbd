"""Conversation templates of LLaVA / LISA and LISA's question/answer phrasings.

`Conversation.get_prompt()` renders exactly like `llava/conversation.py:Conversation.get_prompt`
(haotian-liu/LLaVA c121f04; LISA vendors the same code) for the separator styles LLaVA and LISA
train with: TWO (vicuna_v1, llava_v1), LLAMA_2 (llama_2, llava_llama_2, mistral_instruct),
MPT (chatml_direct, mpt) and PLAIN. Messages are plain strings; an empty or None message is an
open turn (the prompt then ends with the role, ready for generation), as in LLaVA.

Registry keys follow LLaVA's `conv_templates`: `llama_2` is Meta's Llama-2 chat system prompt,
`llava_llama_2` is the LLaVA system prompt that LISA's `--conv_type llava_llama_2` uses.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Mapping, Sequence

from jaxlisa.constants import (DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN,  # noqa: F401  (re-exported)
                               DEFAULT_IMAGE_PATCH_TOKEN, DEFAULT_IMAGE_TOKEN, DEFAULT_SEG_TOKEN,
                               IGNORE_INDEX, IMAGE_TOKEN_INDEX)

# LISA utils/utils.py: question and answer phrasings sampled by the segmentation datasets.
SHORT_QUESTION_LIST = [
    DEFAULT_IMAGE_TOKEN + "\n" + "Can you segment the {class_name} in this image?",
    DEFAULT_IMAGE_TOKEN + "\n" + "Please segment the {class_name} in this image.",
    DEFAULT_IMAGE_TOKEN + "\n"
    + "What is {class_name} in this image? Please respond with segmentation mask.",
    DEFAULT_IMAGE_TOKEN + "\n"
    + "What is {class_name} in this image? Please output segmentation mask.",
]
LONG_QUESTION_LIST = [
    DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Please respond with segmentation mask.",
    DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Please output segmentation mask.",
]
EXPLANATORY_QUESTION_LIST = [
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
]
ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]


class SepStyle(enum.Enum):
  """How turns are joined (LLaVA's `SeparatorStyle`, minus the v0-only SINGLE)."""
  TWO = "two"          # "{system}{sep}USER: q{sep}ASSISTANT: a{sep2}..."
  MPT = "mpt"          # "{system}{sep}{role}q{sep}{role}a{sep}..." (chatml)
  LLAMA_2 = "llama_2"  # "[INST] <<SYS>>\n{system}\n<</SYS>>\n\nq [/INST] a {sep2}{sep}[INST] ..."
  PLAIN = "plain"      # "{system}q{sep}a{sep2}..."


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A template plus the messages so far; `append` returns a new conversation.

  messages: ((role, text | None), ...); roles alternate roles[0] (user), roles[1] (assistant).
  """
  system: str
  roles: tuple[str, str]
  sep_style: SepStyle
  sep: str
  sep2: str | None = None
  version: str = "Unknown"
  messages: tuple[tuple[str, str | None], ...] = ()

  def append(self, role: str, message: str | None) -> Conversation:
    return dataclasses.replace(self, messages=self.messages + ((role, message),))

  def with_source(self, source: Sequence[Mapping[str, str]]) -> Conversation:
    """Messages from a LLaVA-format source [{"from": "human"|"gpt", "value": str}, ...].

    As LLaVA's preprocess_*: a leading assistant turn is dropped; turns must alternate.
    """
    roles = {"human": self.roles[0], "gpt": self.roles[1]}
    if roles[source[0]["from"]] != self.roles[0]:
      source = source[1:]
    conv = dataclasses.replace(self, messages=())
    for j, sentence in enumerate(source):
      role = roles[sentence["from"]]
      if role != self.roles[j % 2]:
        raise ValueError(f"turn {j} is from {sentence['from']!r}; roles must alternate")
      conv = conv.append(role, sentence["value"])
    return conv

  def get_prompt(self) -> str:
    msgs = self.messages
    if self.sep_style is SepStyle.TWO:
      seps = (self.sep, self.sep2)
      ret = self.system + seps[0]
      for i, (role, message) in enumerate(msgs):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
      return ret
    if self.sep_style is SepStyle.MPT:
      ret = self.system + self.sep
      for role, message in msgs:
        ret += role + message + self.sep if message else role
      return ret
    if self.sep_style is SepStyle.LLAMA_2:
      if msgs and (not msgs[0][1] or msgs[0][0] != self.roles[0]):
        raise ValueError("the first message must be a non-empty user message")
      ret = ""
      for i, (_, message) in enumerate(msgs):
        if not message:
          continue
        if i == 0 and self.system:
          message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}"
        if i % 2 == 0:
          ret += f"{self.sep}[INST] {message} [/INST]"
        else:
          ret += " " + message + " " + self.sep2
      return ret.lstrip(self.sep)  # a character-set strip, as LLaVA's `ret.lstrip(self.sep)`
    if self.sep_style is SepStyle.PLAIN:
      seps = (self.sep, self.sep2)
      return self.system + "".join(
          message + seps[i % 2] for i, (_, message) in enumerate(msgs) if message)
    raise ValueError(f"unknown separator style {self.sep_style}")


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                  "assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased "
    "and positive in nature.\n\nIf a question does not make any sense, or is not factually "
    "coherent, explain why instead of answering something not correct. If you don't know the "
    "answer to a question, please don't share false information.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. "
                         "You are able to understand the visual content that the user provides, "
                         "and assist the user with a variety of tasks using natural language.")

vicuna_v1 = Conversation(_VICUNA_SYSTEM, ("USER", "ASSISTANT"), SepStyle.TWO, " ", "</s>", "v1")
llava_v1 = Conversation(_LLAVA_V1_SYSTEM, ("USER", "ASSISTANT"), SepStyle.TWO, " ", "</s>", "v1")
llama_2 = Conversation(_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), SepStyle.LLAMA_2, "<s>", "</s>",
                       "llama_v2")
llava_llama_2 = Conversation(_LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), SepStyle.LLAMA_2, "<s>",
                             "</s>", "llama_v2")
mistral_instruct = Conversation("", ("USER", "ASSISTANT"), SepStyle.LLAMA_2, "", "</s>", "llama_v2")
chatml_direct = Conversation("<|im_start|>system\nAnswer the questions.",
                             ("<|im_start|>user\n", "<|im_start|>assistant\n"), SepStyle.MPT,
                             "<|im_end|>", None, "mpt")
mpt = Conversation(
    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    ("<|im_start|>user\n", "<|im_start|>assistant\n"), SepStyle.MPT, "<|im_end|>", None, "mpt")
plain = Conversation("", ("", ""), SepStyle.PLAIN, "\n")

CONV_TEMPLATES: dict[str, Conversation] = {
    "v1": vicuna_v1,
    "vicuna_v1": vicuna_v1,
    "llava_v1": llava_v1,
    "llama_2": llama_2,
    "llava_llama_2": llava_llama_2,
    "mistral_instruct": mistral_instruct,
    "chatml_direct": chatml_direct,
    "mistral_direct": chatml_direct,
    "mpt": mpt,
    "plain": plain,
    "v0_plain": plain,
}


def get_template(name: str) -> Conversation:
  """A fresh (message-free) template by its LLaVA/LISA name, e.g. "llava_v1"."""
  if name not in CONV_TEMPLATES:
    raise KeyError(f"unknown conversation template {name!r}; known: {sorted(CONV_TEMPLATES)}")
  return CONV_TEMPLATES[name]
