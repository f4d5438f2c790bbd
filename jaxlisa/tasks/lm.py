"""Next-token LM on the synthetic shapes corpus (jaxlisa/data/synthetic_text.py), from scratch.

config.model: DecoderConfig fields; config.data: seed, num_train, num_eval, seq_len, vocab_size
(the tokenizer's target size, <= model.vocab_size), tokenizer_docs (documents it is trained on).
The tokenizer is saved to workdir/tokenizer and reused when the run resumes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging

from jaxlisa import tasks
from jaxlisa.data import synthetic_text as text
from jaxlisa.models.llm import DecoderConfig, DecoderLM
from jaxlisa.models.losses import IGNORE_INDEX, causal_lm_cross_entropy


def next_token_loss(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, dict]:
  """logits [B, T, V] predict input_ids [B, T] shifted by one; mean CE over real target tokens.
  Returns (loss, {'weight': #targets, 'accuracy'})."""
  loss = causal_lm_cross_entropy(logits, jnp.where(attention_mask > 0, input_ids, IGNORE_INDEX))
  targets, w = input_ids[:, 1:], attention_mask[:, 1:].astype(jnp.float32)
  n = w.sum()
  acc = ((jnp.argmax(logits[:, :-1], -1) == targets) * w).sum() / jnp.maximum(n, 1.0)
  return loss, {"weight": n, "accuracy": acc}


class Task(tasks.Task):
  """Tiny decoder LM trained on the shapes corpus."""

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    d = config.data
    docs = text.corpus(0, d.num_train + d.num_eval, seed=d.seed, max_facts=d.max_facts)
    self.tokenizer = text.load_or_train_tokenizer(os.path.join(workdir, "tokenizer"),
                                                  docs[:d.tokenizer_docs], d.vocab_size)
    self.model_config = DecoderConfig.from_dict(config.model.to_dict())
    if len(self.tokenizer) > self.model_config.vocab_size:
      raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens > model.vocab_size {self.model_config.vocab_size}")
    self.model = DecoderLM(self.model_config)
    arrays = text.tokenize(self.tokenizer, docs, d.seq_len)
    self.train_arrays = {k: v[:d.num_train] for k, v in arrays.items()}
    self.eval_arrays = {k: v[d.num_train:] for k, v in arrays.items()}
    logging.info("lm task: %d train / %d eval documents, %.1f tokens per document",
                 d.num_train, d.num_eval, arrays["attention_mask"].sum(1).mean())

  def init(self, rng):
    ids = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
    return self.model.init(rng, ids, jnp.ones_like(ids))["params"]

  def loss(self, params, batch, rng, train=True):
    out = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           deterministic=not train)
    return next_token_loss(out.logits, batch["input_ids"], batch["attention_mask"])

  def train_data(self):
    return text.train_iterator(self.train_arrays, self.config.batch_size, seed=self.config.seed)

  def eval_data(self):
    return text.eval_batches(self.eval_arrays, self.config.batch_size)

  def describe(self):
    m = self.model_config
    return {"model": f"{m.family} {m.num_hidden_layers} layers x {m.hidden_size} ({m.num_attention_heads} heads, "
                     f"mlp {m.intermediate_size}, {m.dtype})",
            "tokenizer": f"{len(self.tokenizer)} tokens (model vocab {self.model_config.vocab_size})",
            "data": f"{self.config.data.num_train} train / {self.config.data.num_eval} eval docs, "
                    f"seq_len {self.config.data.seq_len}"}
