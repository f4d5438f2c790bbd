"""Image + text batches for the BLIP-2 family tasks: a grain random-access source over annotation
rows whose text is tokenized up front (numpy arrays) and whose image is read and preprocessed per item.

  source = ImageTextSource(image_paths, {"input_ids": [N, T], ...}, ImageEvalProcessor(224))
  it = train_iterator(source, batch_size, seed)    # endless shuffled batches, get_state()/set_state()
  for batch in eval_batches(source, batch_size):   # one ordered pass, full batches only
    ...                                             # {"pixels": f32 [B, S, S, 3], "input_ids": [B, T], ...}
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image


def load_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3] (PIL `convert("RGB")`, as LAVIS's datasets)."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


class ImageTextSource:
  """Item i = {"pixels": processor(load_rgb(image_paths[i])), **{k: v[i] for k, v in arrays}}."""

  def __init__(self, image_paths: Sequence[str], arrays: dict[str, np.ndarray],
               processor: Callable[[np.ndarray], np.ndarray]):
    self.image_paths, self.arrays, self.processor = list(image_paths), arrays, processor
    for k, v in arrays.items():
      if len(v) != len(self.image_paths):
        raise ValueError(f"{k}: {len(v)} rows for {len(self.image_paths)} images")

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    item = {k: v[i] for k, v in self.arrays.items()}
    item["pixels"] = np.asarray(self.processor(load_rgb(self.image_paths[i])), np.float32)
    return item


def train_iterator(source: ImageTextSource, batch_size: int, seed: int):
  """Endless [batch_size, ...] batches, reshuffled every epoch; a function of (seed, position) only,
  so get_state()/set_state() (JSON-able) resume it exactly."""
  if len(source) < batch_size:
    raise ValueError(f"{len(source)} training rows < batch_size {batch_size}")
  ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .batch(batch_size, drop_remainder=True))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(source: ImageTextSource, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Rows 0..N-1 in order as full [batch_size, ...] batches (a remainder of N % batch_size rows is
  left out: contrastive metrics need whole batches)."""
  n = len(source) // batch_size * batch_size
  if n < len(source):
    logging.log_first_n(logging.WARNING, "eval: %d of %d rows left out (not a multiple of batch_size %d)", 1,
                        len(source) - n, len(source), batch_size)
  for s in range(0, n, batch_size):
    items = [source[i] for i in range(s, s + batch_size)]
    yield {k: np.stack([it[k] for it in items]) for k in items[0]}
