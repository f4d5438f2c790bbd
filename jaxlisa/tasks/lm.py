"""Next-token LM on the synthetic shapes corpus (jaxlisa/data/synthetic_text.py), from scratch.

config.model: DecoderConfig fields; config.data: seed, num_train, num_eval, seq_len, vocab_size
(the tokenizer's target size, <= model.vocab_size), tokenizer_docs (documents it is trained on).
The tokenizer is saved to workdir/tokenizer and reused when the run resumes.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from absl import logging

from jaxlisa.data import synthetic_text as text
from jaxlisa.models.llm import DecoderConfig, DecoderLM
from jaxlisa.models.losses import IGNORE_INDEX, causal_lm_cross_entropy
from jaxlisa.training.task import TaskBase


def next_token_loss(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, dict]:
  """logits [B, T, V] predict input_ids [B, T] shifted by one; mean CE over real target tokens.
  Returns (loss, {'weight': #targets, 'accuracy'})."""
  loss = causal_lm_cross_entropy(logits, jnp.where(attention_mask > 0, input_ids, IGNORE_INDEX))
  targets, w = input_ids[:, 1:], attention_mask[:, 1:].astype(jnp.float32)
  n = w.sum()
  acc = ((jnp.argmax(logits[:, :-1], -1) == targets) * w).sum() / jnp.maximum(n, 1.0)
  return loss, {"weight": n, "accuracy": acc}


class Task(TaskBase):
  """Tiny decoder LM trained on the shapes corpus."""

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    self.model_config = DecoderConfig.from_dict(config.model.to_dict())
    self.model = DecoderLM(self.model_config)
    self.tokenizer_dir = os.path.join(workdir, "tokenizer")

  def _docs(self) -> list[str]:
    d = self.config.data
    return text.corpus(0, d.num_train + d.num_eval, seed=d.seed, max_facts=d.max_facts)

  def prepare(self):
    """Train the tokenizer on the corpus and save it to workdir/tokenizer (reused when there)."""
    d = self.config.data
    self._set_tokenizer(text.load_or_train_tokenizer(self.tokenizer_dir, self._docs()[:d.tokenizer_docs],
                                                     d.vocab_size))

  def _set_tokenizer(self, tok):
    if len(tok) > self.model_config.vocab_size:
      raise ValueError(f"tokenizer has {len(tok)} tokens > model.vocab_size {self.model_config.vocab_size}")
    self.__dict__["tokenizer"] = tok

  @functools.cached_property
  def tokenizer(self):
    """workdir/tokenizer (prepare() trains it)."""
    if not os.path.exists(os.path.join(self.tokenizer_dir, "tokenizer.json")):
      raise ValueError(f"no tokenizer in {self.tokenizer_dir}: the task's prepare() trains it (training does)")
    from jaxlisa.data.tokenization import load_saved_tokenizer  # pylint: disable=import-outside-toplevel
    self._set_tokenizer(load_saved_tokenizer(self.tokenizer_dir))
    return self.__dict__["tokenizer"]

  @functools.cached_property
  def _arrays(self) -> tuple[dict, dict]:
    """(train, eval) token arrays of the corpus."""
    d = self.config.data
    arrays = text.tokenize(self.tokenizer, self._docs(), d.seq_len)
    logging.info("lm task: %d train / %d eval documents, %.1f tokens per document",
                 d.num_train, d.num_eval, arrays["attention_mask"].sum(1).mean())
    return ({k: v[:d.num_train] for k, v in arrays.items()}, {k: v[d.num_train:] for k, v in arrays.items()})

  def init(self, rng):
    ids = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
    return self.model.init(rng, ids, jnp.ones_like(ids))["params"]

  def loss(self, params, batch, rng, train=True):
    out = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           deterministic=not train)
    return next_token_loss(out.logits, batch["input_ids"], batch["attention_mask"])

  def train_data(self):
    return text.train_iterator(self._arrays[0], self.config.batch_size, seed=self.config.seed)

  def eval_data(self):
    return text.eval_batches(self._arrays[1], self.config.batch_size)

  def describe(self):
    m = self.model_config
    return {"model": f"{m.family} {m.num_hidden_layers} layers x {m.hidden_size} ({m.num_attention_heads} heads, "
                     f"mlp {m.intermediate_size}, {m.dtype})",
            "tokenizer": f"{len(self.tokenizer)} tokens (model vocab {self.model_config.vocab_size})",
            "data": f"{self.config.data.num_train} train / {self.config.data.num_eval} eval docs, "
                    f"seq_len {self.config.data.seq_len}"}
