"""A task's model config from config.model and its tokenizer (the one rule the LISA, BLIP-2 and
MiniGPT4-Qwen tasks share): a vocabulary size of -1 is the tokenizer's size, a tokenizer larger
than the vocabulary is an error, and each family fills in its other tokenizer-given fields.
"""

from __future__ import annotations

from typing import Any, Callable


def from_tokenizer(config, tokenizer, config_cls: type, vocab_at: str,
                   resolve: Callable[[dict, Any], None] | None = None) -> Any:
  """config_cls.from_dict(config.model) where the sub-config at the dotted path `vocab_at`
  ('llava.text', 'qformer', 'llm') gets vocab_size = len(tokenizer) when it says -1 (ValueError
  when the tokenizer has more tokens than the vocabulary). resolve(d, tokenizer) then edits the
  nested dict d in place for the family's other fields (special-token ids, widths)."""
  d = config.model.to_dict()
  *parents, leaf = vocab_at.split(".")
  node = d
  for name in parents:  # copy the path down to the vocabulary's sub-config
    node[name] = dict(node[name])
    node = node[name]
  sub = node[leaf] = dict(node[leaf])
  if sub.get("vocab_size", -1) == -1:
    sub["vocab_size"] = len(tokenizer)
  if len(tokenizer) > sub["vocab_size"]:
    raise ValueError(f"tokenizer has {len(tokenizer)} tokens > model.{vocab_at}.vocab_size {sub['vocab_size']}")
  if resolve is not None:
    resolve(d, tokenizer)
  return config_cls.from_dict(d)
