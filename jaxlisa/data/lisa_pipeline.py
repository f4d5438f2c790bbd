"""grain pipelines of LISA batches.

Training (`train_dataset` / `train_iterator`): keys 0..L-1 (L = samples_per_epoch, default
len(source)) shuffled with `seed` (reshuffled each epoch), repeated, numbered (epoch, key), split
across hosts (element j goes to host j % process_count), then per element one sample drawn with
rng = default_rng([seed, epoch, key]) and encoded (`LisaSource.sample`: unreadable samples are
skipped, warned, counted in the batch's num_skipped and replaced by the next draw), and
`cfg.images_per_batch` of them collated into a LisaBatch. Random-draw sources (the hybrid
mixture, LISA-style) ignore the key; indexed sources (`random_draw=False`, e.g. a prepared TFDS
source) read item `key` and on failure `key + 1`, ... Everything is a function of (seed, epoch,
key), so the iterator's `get_state()` / `set_state()` (JSON-able) reproduce the following batches.

Validation (`val_batches`): every item of a ValDataset once, in order, host j taking items
j, j + process_count, ...; one image per batch with all its queries (inference collate); images
with more queries than the largest conv bucket are split. Unreadable items are skipped and
counted; hosts are padded with all-invalid batches to the same number of batches.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import grain
import numpy as np
from absl import logging

from jaxlisa.data.lisa_collate import (CollateConfig, LisaBatch, SampleEncoder, collate,
                                       split_conversations)
from jaxlisa.data.lisa_datasets.common import MAX_ATTEMPTS, READ_ERRORS, LisaSource


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  return process_index, process_count


class _EpochKey(grain.transforms.MapWithIndex):
  """(position j in the repeated, shuffled key stream, key) -> (epoch, key)."""

  def __init__(self, epoch_len: int):
    self.epoch_len = epoch_len

  def map_with_index(self, index, element):
    return index // self.epoch_len, int(element)


class _DrawEncoded(grain.transforms.Map):
  """(epoch, key) -> one encoded sample (skipping unreadable ones)."""

  def __init__(self, source: LisaSource, encoder, seed: int, random_draw: bool, max_attempts: int):
    self.source, self.encoder, self.seed = source, encoder, seed
    self.random_draw, self.max_attempts = random_draw, max_attempts

  def map(self, element):
    epoch, key = element
    rng = np.random.default_rng([self.seed, epoch, key])
    return self.source.sample(key, rng, self.encoder, random_draw=self.random_draw,
                              max_attempts=self.max_attempts)


def train_dataset(source: LisaSource, tokenizer, cfg: CollateConfig, *, seed: int = 0,
                  samples_per_epoch: int | None = None, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  random_draw: bool = True, max_attempts: int = MAX_ATTEMPTS) -> grain.MapDataset:
  """The batched grain MapDataset of this host (module docstring); num_epochs None = endless."""
  process_index, process_count = _host(process_index, process_count)
  epoch_len = int(samples_per_epoch or len(source))
  keys = grain.MapDataset.range(epoch_len).shuffle(seed=seed).repeat(num_epochs)
  keys = keys.map_with_index(_EpochKey(epoch_len))[process_index::process_count]
  encoder = tokenizer if isinstance(tokenizer, SampleEncoder) else SampleEncoder(tokenizer, cfg)
  samples = keys.map(_DrawEncoded(source, encoder, seed, random_draw, max_attempts))
  return samples.batch(cfg.images_per_batch, drop_remainder=True,
                       batch_fn=functools.partial(collate, cfg=cfg, inference=False))


def train_iterator(source: LisaSource, tokenizer, cfg: CollateConfig, *, read_threads: int = 0,
                   prefetch: int = 0, **kwargs):
  """An iterator of LisaBatch with get_state() / set_state(); kwargs as train_dataset."""
  ds = train_dataset(source, tokenizer, cfg, **kwargs)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=prefetch)))


def val_batches(val_source: LisaSource, tokenizer, cfg: CollateConfig, *,
                process_index: int | None = None, process_count: int | None = None,
                stats: dict | None = None, images_per_batch: int = 1) -> Iterator[LisaBatch]:
  """One pass of inference batches (one image each) for this host (module docstring). Padding
  and skipped items give an all-invalid batch (image_valid False). `images_per_batch` pads each
  batch with invalid images to that many rows (the mesh's batch shards, so that the one image
  can be placed on a data x fsdp mesh). `stats` (optional dict) receives "skipped" and "batches"."""
  process_index, process_count = _host(process_index, process_count)
  encoder = tokenizer if isinstance(tokenizer, SampleEncoder) else SampleEncoder(tokenizer, cfg)
  per_host = math.ceil(len(val_source) / process_count)
  stats = {} if stats is None else stats
  stats.update(skipped=0, batches=0)
  for item in range(process_index, per_host * process_count, process_count):
    encoded = []
    if item < len(val_source):
      sample = val_source.read_or_skip(item, None)
      for part in split_conversations(sample, max(cfg.conv_buckets)) if sample is not None else []:
        try:
          encoded.append(encoder(part))
        except READ_ERRORS as e:
          logging.warning("skipping val item %d (%s): %s: %s", item, val_source.describe(item),
                          type(e).__name__, e)
          encoded = []
          break
      stats["skipped"] += not encoded
    for e in encoded or [None]:
      stats["batches"] += 1
      yield collate([e] if e is not None else [], cfg, inference=True, images_per_batch=images_per_batch)
  if stats["skipped"]:
    logging.warning("validation: %d unreadable items skipped on host %d", stats["skipped"],
                    process_index)
