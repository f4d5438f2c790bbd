"""What every LISA dataset family shares: the per-image sample, skip-and-count reading, the
question / answer sampling, and mask rasterization.

A sample is one image with its conversations (a plain dict, picklable, numpy leaves):
  image       uint8 [H, W, 3] RGB (LISA's cv2 read, `preprocess.load_image`)
  questions   [str] user turns; answers [str] assistant turns, same length
  multi_turn  False: each (question, answer) is its own conversation (segmentation sets);
              True: all pairs are the turns of one conversation (LLaVA-Instruct)
  masks       uint8 [n, H, W], 0/1 with 255 = ignore, one per "[SEG]" in the order the [SEG]s
              appear across the answers (n = 0 for text-only samples)
  source      "family/dataset", e.g. "sem_seg/ade20k"; image_path: str
  inference   True for validation samples (teacher-forced "[SEG]." answers, no truncation)

Randomness: every draw takes an explicit `np.random.Generator`, so a sample is a function of
(index, rng); the pipeline seeds rng from (seed, epoch, key). LISA's sub-datasets ignore the
index and draw an image at random (`draw_index`); `LisaSource.sample` does the same or walks
the indices in order (`random_draw=False`), retrying on unreadable samples.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import zlib
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from jaxlisa.data.conversation import (ANSWER_LIST, DEFAULT_IMAGE_TOKEN, DEFAULT_SEG_TOKEN,
                                       LONG_QUESTION_LIST, SHORT_QUESTION_LIST, Conversation)

SEG = DEFAULT_SEG_TOKEN
IGNORE_LABEL = 255
MAX_ATTEMPTS = 32  # reads tried for one sample before the source is declared broken

Sample = dict  # see the module docstring


class BadSample(ValueError):
  """A sample that cannot be used (unreadable file, empty annotation, too many [SEG]s, ...)."""


# Everything a broken file or annotation raises while being read; caught per sample.
READ_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, AttributeError,
               pickle.UnpicklingError, zlib.error, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------
# Samples.

def make_sample(image: np.ndarray, questions: Sequence[str], answers: Sequence[str],
                masks: np.ndarray | Sequence[np.ndarray] | None, *, source: str, image_path: str,
                multi_turn: bool = False, inference: bool = False) -> Sample:
  """Checks and packs a sample (module docstring). Raises BadSample when the masks do not match
  the image or the number of [SEG]s in the answers."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise BadSample(f"{image_path}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  h, w = image.shape[:2]
  if masks is None or len(masks) == 0:
    masks = np.zeros((0, h, w), np.uint8)
  masks = np.asarray(np.stack(masks) if isinstance(masks, (list, tuple)) else masks)
  if len(questions) != len(answers) or not questions:
    raise BadSample(f"{image_path}: {len(questions)} questions for {len(answers)} answers")
  n_seg = sum(a.count(SEG) for a in answers)
  if masks.shape != (n_seg, h, w):
    raise BadSample(f"{image_path}: masks {masks.shape} for {n_seg} [SEG] on a {h}x{w} image")
  return {"image": image, "questions": list(questions), "answers": list(answers),
          "multi_turn": bool(multi_turn), "masks": masks.astype(np.uint8, copy=False),
          "source": source, "image_path": os.fspath(image_path), "inference": bool(inference)}


def conversation_turns(sample: Sample) -> list[list[tuple[str, str]]]:
  """The sample's conversations as lists of (question, answer) turns."""
  pairs = list(zip(sample["questions"], sample["answers"]))
  return [pairs] if sample.get("multi_turn") else [[p] for p in pairs]


def render_conversations(sample: Sample, template: Conversation) -> list[str]:
  """One prompt per conversation, rendered with `template` (LISA: llava_v1)."""
  out = []
  for turns in conversation_turns(sample):
    conv = template
    for q, a in turns:
      conv = conv.append(template.roles[0], q).append(template.roles[1], a)
    out.append(conv.get_prompt())
  return out


def seg_counts(sample: Sample) -> list[int]:
  """Number of [SEG] in each conversation (masks[sum(counts[:c]) : sum(counts[:c+1])] are c's)."""
  return [sum(a.count(SEG) for _, a in turns) for turns in conversation_turns(sample)]


# ----------------------------------------------------------------------------------------------
# Skip-and-count reading.

_SKIPS: collections.Counter = collections.Counter()


def skip_counts() -> dict[str, int]:
  """Samples skipped in this process, by source name (the pipeline also reports them per batch)."""
  return dict(_SKIPS)


def reset_skip_counts() -> None:
  _SKIPS.clear()


class LisaSource:
  """A dataset family: `len` addressable items, `read(index, rng)` one sample (raising on bad
  data), `describe(index)` the files behind an item (for warnings)."""

  name = "lisa"

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, index: int, rng: np.random.Generator) -> Sample:
    raise NotImplementedError

  def describe(self, index: int) -> str:
    return f"item {index}"

  def draw_index(self, rng: np.random.Generator) -> int:
    """The item a random draw reads (LISA: uniform over the images)."""
    return int(rng.integers(len(self)))

  def read_or_skip(self, index: int, rng: np.random.Generator,
                   transform: Callable[[Sample], Any] | None = None) -> Any | None:
    """read (+ transform); None, an absl warning naming the files and a count on failure."""
    try:
      s = self.read(index, rng)
      return transform(s) if transform is not None else s
    except READ_ERRORS as e:
      _SKIPS[self.name] += 1
      try:
        what = self.describe(index)
      except Exception:  # pylint: disable=broad-except
        what = f"item {index}"
      logging.warning("skipping %s sample %d (%s): %s: %s", self.name, index, what,
                      type(e).__name__, e)
      return None

  def sample(self, key: int, rng: np.random.Generator,
             transform: Callable[[Sample], Any] | None = None, *, random_draw: bool = True,
             max_attempts: int = MAX_ATTEMPTS) -> Any:
    """One usable sample: item `draw_index(rng)` (random_draw) or `key`, `key + 1`, ... (mod len),
    skipping unreadable ones. Returns the (transformed) sample with "num_skipped" set to the
    number of reads that were skipped on the way."""
    if not len(self):
      raise ValueError(f"{self.name} has no items")
    for attempt in range(max_attempts):
      index = self.draw_index(rng) if random_draw else (key + attempt) % len(self)
      out = self.read_or_skip(index, rng, transform)
      if out is not None:
        out["num_skipped"] = attempt
        return out
    raise RuntimeError(f"{self.name}: {max_attempts} unreadable samples in a row; is the data there?")


# ----------------------------------------------------------------------------------------------
# Sampling of questions and answers (LISA utils/utils.py lists).

def choice(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
  return seq[int(rng.integers(len(seq)))]


def sample_indices(rng: np.random.Generator, n: int, k: int) -> list[int]:
  """LISA: `np.random.choice(range(n), k, replace=False)` when n >= k (random order), else all."""
  if n >= k:
    return [int(i) for i in rng.choice(n, size=k, replace=False)]
  return list(range(n))


def short_question(rng: np.random.Generator, class_name: str) -> str:
  return choice(rng, SHORT_QUESTION_LIST).format(class_name=class_name.lower())


def long_question(rng: np.random.Generator, sent: str) -> str:
  return choice(rng, LONG_QUESTION_LIST).format(sent=sent)


def seg_answer(rng: np.random.Generator) -> str:
  return choice(rng, ANSWER_LIST)


def image_first(text: str) -> str:
  """LISA vqa preprocess_multimodal: "<image>" moved to the front of its message."""
  if DEFAULT_IMAGE_TOKEN not in text:
    return text
  return (DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()


# ----------------------------------------------------------------------------------------------
# Files and masks.

def load_json(path: str) -> Any:
  """json.load, retrying as cp1252 like LISA's get_mask_from_json."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    return json.loads(raw.decode("cp1252"))


def load_label_map(path: str) -> np.ndarray:
  """A class-index PNG as a 2-D integer array (`np.array(Image.open(path))`, palette indices kept)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"label map not found: {path}")
  with Image.open(path) as img:
    img.load()
    label = np.array(img)
  if label.ndim != 2:
    raise BadSample(f"{path}: label map must be single-channel, got shape {label.shape}")
  return label


def fill_polygon(mask: np.ndarray, points: Sequence[Sequence[float]], value: int) -> np.ndarray:
  """cv2.polylines(closed, thickness 1) + cv2.fillPoly of `points` (x, y) on `mask` [H, W] uint8,
  in place. Coordinates are cut to int32 as `np.array(points, np.int32)`. Rasterized with PIL,
  which agrees with cv2 on axis-aligned edges (both include the boundary pixels) and may differ
  by a pixel along slanted edges."""
  pts = np.asarray(points, np.float64).reshape(-1, 2).astype(np.int32)
  if len(pts) == 0:
    return mask
  h, w = mask.shape
  if len(pts) == 1 or (pts == pts[0]).all():
    x, y = pts[0]
    if 0 <= x < w and 0 <= y < h:
      mask[y, x] = value
    return mask
  img = Image.fromarray(mask)
  ImageDraw.Draw(img).polygon([tuple(map(int, p)) for p in pts], fill=int(value), outline=int(value))
  mask[...] = np.asarray(img)
  return mask


def decode_coco_segmentation(segmentation: Any, h: int, w: int) -> np.ndarray:
  """A COCO / REFER `segmentation` (polygon list, RLE list or one RLE, counts compressed or not)
  -> uint8 [h, w] 0/1: the parts summed and thresholded (> 0)."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  if segmentation is None or len(segmentation) == 0:
    raise BadSample("empty segmentation")
  if isinstance(segmentation, dict):
    segmentation = [segmentation]
  if isinstance(segmentation[0], (list, tuple)):
    polys = [list(map(float, p)) for p in segmentation if len(p) >= 6]
    if not polys:
      raise BadSample(f"no polygon with 3 or more points in {segmentation!r:.80}")
    rles = mask_utils.frPyObjects(polys, h, w)
  else:
    rles = []
    for r in segmentation:
      r = dict(r)
      if isinstance(r["counts"], list):  # uncompressed RLE
        r = mask_utils.frPyObjects(r, *r["size"])
      elif isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode()
      rles.append(r)
  m = mask_utils.decode(rles)
  m = m.reshape(m.shape[0], m.shape[1], -1)
  if m.shape[:2] != (h, w):
    raise BadSample(f"segmentation of size {m.shape[:2]} on a {h}x{w} image")
  return (m.sum(axis=2) > 0).astype(np.uint8)
