"""A deterministic synthetic text corpus, a tokenizer trained on it, and fixed-shape LM batches.

Documents are facts about coloured shapes, each followed by its converse:
  "the small red circle is left of the blue square . so the blue square is right of the small red circle ."
The first clause of a fact is random (a floor on the loss); the converse is fully determined by it,
so a model that learns to attend and copy drives its loss towards zero. Document i depends only on
(seed, i), so any slice of the corpus can be rebuilt anywhere.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np
from absl import logging

SIZES = ("small", "big", "tiny", "large")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
            "in front of": "behind", "behind": "in front of", "next to": "next to", "far from": "far from"}
RELATIONS = tuple(CONVERSE)


def _thing(rng: np.random.Generator) -> str:
  size = f"{SIZES[rng.integers(len(SIZES))]} " if rng.random() < 0.5 else ""
  return f"the {size}{COLORS[rng.integers(len(COLORS))]} {SHAPES[rng.integers(len(SHAPES))]}"


def document(index: int, seed: int = 0, max_facts: int = 3) -> str:
  """Document `index` of the corpus `seed`: 1..max_facts facts, each with its converse."""
  rng = np.random.default_rng([seed, index])
  facts = []
  for _ in range(int(rng.integers(1, max_facts + 1))):
    a = _thing(rng)
    b = _thing(rng)
    while b == a:
      b = _thing(rng)
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    facts.append(f"{a} is {rel} {b} . so {b} is {CONVERSE[rel]} {a} .")
  return " ".join(facts)


def corpus(start: int, count: int, seed: int = 0, max_facts: int = 3) -> list[str]:
  return [document(i, seed, max_facts) for i in range(start, start + count)]


# ----------------------------------------------------------------------------------------------
# Tokenizer (stack_notes.md section 6): SentencePiece-style BPE trained in-process, LLaMA specials.

def train_tokenizer(texts: Sequence[str], vocab_size: int):
  """A fast tokenizer with <unk>=0 (also pad), <s>=1 (prepended), </s>=2. Deterministic."""
  from tokenizers import SentencePieceBPETokenizer, processors  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  sp = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
  sp.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                         special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  sp.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                    special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",  # pylint: disable=protected-access
                                 unk_token="<unk>", pad_token="<unk>")


def load_or_train_tokenizer(directory: str | None, texts: Sequence[str], vocab_size: int):
  """Reuse the tokenizer saved in `directory` (a resumed run), else train one and save it there."""
  from jaxlisa.data.tokenization import load_or_train  # pylint: disable=import-outside-toplevel
  return load_or_train(directory, train_tokenizer, texts, vocab_size=vocab_size)


def tokenize(tok, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
  """texts -> {'input_ids', 'attention_mask'}: int32 [N, seq_len], '<s> text </s>' right-padded."""
  ids = tok(list(texts), add_special_tokens=True)["input_ids"]
  out = np.full((len(ids), seq_len), tok.pad_token_id, np.int32)
  mask = np.zeros((len(ids), seq_len), np.int32)
  cut = 0
  for i, row in enumerate(ids):
    row = list(row) + [tok.eos_token_id]
    cut += len(row) > seq_len
    row = row[:seq_len]
    out[i, :len(row)] = row
    mask[i, :len(row)] = 1
  if cut:
    logging.warning("%d of %d texts were longer than seq_len=%d and were cut", cut, len(ids), seq_len)
  return {"input_ids": out, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------
# Batches.

class ArraySource:
  """grain random-access source over a dict of equal-length arrays: item i = {k: v[i]}."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self.arrays.items()}


def train_iterator(arrays: dict[str, np.ndarray], batch_size: int, seed: int):
  """Endless shuffled [batch_size, ...] batches (reshuffled each epoch). The iterator's
  get_state()/set_state() (JSON-able) make it resumable; same seed -> same batches."""
  ds = (grain.MapDataset.source(ArraySource(arrays)).shuffle(seed=seed).repeat(None)
        .batch(batch_size, drop_remainder=True))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """All rows once, in order, as [batch_size, ...] batches; the last is padded with all-zero rows
  (attention_mask 0, so they carry no weight)."""
  n = len(next(iter(arrays.values())))
  for s in range(0, n, batch_size):
    batch = {k: v[s:s + batch_size] for k, v in arrays.items()}
    short = batch_size - len(batch["attention_mask"])
    if short:
      batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    yield batch
