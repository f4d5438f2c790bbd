"""Batch segmentation from the command line: a folder, a glob or a jsonl of (image, question) through
the serving engine (jaxlisa.serving.server.SegmentEngine), in batches of a fixed bucket size so the
programs compile once and only one batch of images is in memory at a time.

  main.py --config.mode=segment --config.images=DIR|GLOB --config.prompt="question"
  main.py --config.mode=segment --config.images=list.jsonl     # lines {"image": path, "prompt": text}

Per input i it writes, in the output folder: {i:05d}_{stem}.json ({"image", "prompt", "answer",
"masks": [COCO RLE, ...]}), {i:05d}_{stem}_mask_{k}.png and {i:05d}_{stem}_overlay_{k}.png per [SEG],
and one line per input to results.jsonl (an unreadable image gets {"image", "error"} there and is
skipped). Paths in a jsonl are relative to the jsonl's folder.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np
from absl import logging
from PIL import Image

from jaxlisa.data.preprocess import ImageError, load_image
from jaxlisa.inference import segment as seg_lib
from jaxlisa.serving.server import SegmentEngine, encode_rle

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class InputError(ValueError):
  """--config.images names nothing usable (the CLI exits 2 with this message)."""


@dataclasses.dataclass(frozen=True)
class Item:
  image: str  # path
  prompt: str


def list_inputs(spec: str, prompt: str = "") -> list[Item]:
  """spec: a folder (its image files, sorted), a glob, or a .jsonl of {"image", "prompt"} lines;
  `prompt` is every image's question for a folder / glob (and the default for jsonl lines without one)."""
  if spec.endswith(".jsonl"):
    if not os.path.isfile(spec):
      raise InputError(f"no such jsonl file: {spec}")
    base, items = os.path.dirname(os.path.abspath(spec)), []
    with open(spec, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          path, question = row["image"], row.get("prompt", prompt)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
          raise InputError(f"{spec}:{n}: expected a JSON object with \"image\" (and \"prompt\")") from None
        if not str(question).strip():
          raise InputError(f"{spec}:{n}: no prompt (give one per line or --config.prompt)")
        items.append(Item(os.path.join(base, path), str(question)))
  else:
    paths = (sorted(os.path.join(spec, n) for n in os.listdir(spec)) if os.path.isdir(spec)
             else sorted(glob.glob(spec)))
    paths = [p for p in paths if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)]
    if not prompt.strip():
      raise InputError("--config.images with a folder or glob needs --config.prompt=QUESTION")
    items = [Item(p, prompt) for p in paths]
  if not items:
    raise InputError(f"no images in {spec!r} (a folder, a glob, or a .jsonl of {{\"image\", \"prompt\"}})")
  return items


def _batches(items: Sequence[Item], size: int) -> Iterator[list[tuple[int, Item, np.ndarray | str]]]:
  """Consecutive groups of `size` items, each with its index and its image (or the read error)."""
  for start in range(0, len(items), size):
    group = []
    for i, item in enumerate(items[start:start + size], start):
      try:
        group.append((i, item, load_image(item.image)))
      except (ImageError, FileNotFoundError, OSError) as e:
        group.append((i, item, str(e)))
    yield group


def run(engine: SegmentEngine, items: Sequence[Item], out_dir: str,
        progress: Callable[[int], None] | None = None) -> list[dict]:
  """Segment every item, engine.max_batch_size at a time; writes the files of the module docstring.
  Returns the results.jsonl rows. progress(n) after each batch (n = inputs done)."""
  os.makedirs(out_dir, exist_ok=True)
  rows, done = [], 0
  with open(os.path.join(out_dir, "results.jsonl"), "w", encoding="utf-8") as log:
    for group in _batches(items, engine.max_batch_size):
      ok = [(i, item, im) for i, item, im in group if isinstance(im, np.ndarray)]
      results = (engine.run([im for _, _, im in ok], [item.prompt for _, item, _ in ok],
                            [engine.max_new_tokens] * len(ok)) if ok else [])
      by_index = {i: (item, im, res) for (i, item, im), res in zip(ok, results)}
      for i, item, im in group:
        if i not in by_index:
          logging.warning("skipping %s: %s", item.image, im)
          row = {"image": item.image, "error": im}
        else:
          row = _write(out_dir, i, *by_index[i])
        rows.append(row)
        log.write(json.dumps(row) + "\n")
      done += len(group)
      if progress is not None:
        progress(done)
  return rows


def _write(out_dir: str, i: int, item: Item, image: np.ndarray, res: seg_lib.SegmentResult) -> dict:
  name = f"{i:05d}_{os.path.splitext(os.path.basename(item.image))[0]}"
  files = []
  for k, m in enumerate(res.masks):
    for kind, pixels in (("mask", (m * 255).astype(np.uint8)), ("overlay", seg_lib.overlay(image, m))):
      path = os.path.join(out_dir, f"{name}_{kind}_{k}.png")
      Image.fromarray(pixels).save(path)
      files.append(os.path.basename(path))
  row = {"image": item.image, "prompt": item.prompt, "answer": res.text,
         "masks": [encode_rle(m) for m in res.masks], "files": files}
  with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(row, f)
  return row
