"""ReasonSeg: reasoning segmentation with optional explanations (LISA utils/reason_seg_dataset.py,
utils/data_processing.py).

Layout: base_dir/reason_seg/{ds}/{split}/{name}.jpg + {name}.json, the json holding
  "shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y], ...]}, ...]
  "text": [str, ...] (rephrasings of one query), "is_sentence": bool
and base_dir/reason_seg/{ds}/explanatory/train.json: [{"image": "{name}.jpg", "query", "outputs"}].
`reason_seg_data` is "ReasonSeg|train" ("ReasonSeg|train_val" joins splits, as LISA).

Masks (get_mask_from_json): "flag" shapes skipped; polygons drawn largest-area first (area of each
polygon drawn alone), 255 where the label contains "ignore", else 1. A json without any drawable
shape is a bad sample.

A sample: up to `num_classes_per_sample` texts drawn without replacement; LONG_QUESTION_LIST when
is_sentence, else SHORT_QUESTION_LIST with the lowercase text; masks `mask == 1` per text. When the
image has an explanation and `explanatory` != -1, one choice per image: with probability
`explanatory` a text-only answer (question "<image>\\n{text}", answer the explanation, no [SEG],
no masks), else 1/2 the plain [SEG] answer, 1/2 "{ANSWER} {explanation}" with the question
"<image>\\n{text} {EXPLANATORY_QUESTION}".
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from jaxlisa.data.conversation import DEFAULT_IMAGE_TOKEN, EXPLANATORY_QUESTION_LIST
from jaxlisa.data.lisa_datasets.common import (BadSample, LisaSource, choice, fill_polygon, load_json,
                                               long_question, make_sample, sample_indices, seg_answer,
                                               short_question)
from jaxlisa.data.preprocess import load_image


def get_mask_from_json(anno: dict | str, hw: tuple[int, int]) -> tuple[np.ndarray, list[str], bool]:
  """(mask uint8 [H, W] with 0 / 1 target / 255 ignore, texts, is_sentence) of a ReasonSeg json
  (dict or path) for an image of size hw."""
  if isinstance(anno, str):
    anno = load_json(anno)
  h, w = hw
  shapes = [s for s in anno["shapes"] if s["label"].lower() != "flag"]
  shapes = [s for s in shapes if len(s["points"])]
  if not shapes:
    raise BadSample("no polygon in the annotation")
  areas = [fill_polygon(np.zeros((h, w), np.uint8), s["points"], 1).sum() for s in shapes]
  mask = np.zeros((h, w), np.uint8)
  for k in np.argsort(areas, kind="stable")[::-1]:
    s = shapes[k]
    fill_polygon(mask, s["points"], 255 if "ignore" in s["label"].lower() else 1)
  texts = anno["text"]
  texts = [texts] if isinstance(texts, str) else list(texts)
  if not texts:
    raise BadSample("no text in the annotation")
  return mask, texts, bool(anno["is_sentence"])


def reason_sample(image: np.ndarray, mask: np.ndarray, texts: Sequence[str], is_sentence: bool,
                  explanation: str | None, rng: np.random.Generator, *, num_classes_per_sample: int = 3,
                  explanatory: float = 0.1, source: str = "reason_seg/ReasonSeg",
                  image_path: str = "") -> dict:
  """The training sample of one ReasonSeg image (module docstring); explanation None = none."""
  picked = [texts[i] for i in sample_indices(rng, len(texts), num_classes_per_sample)]
  mode = 0
  if explanation is not None and explanatory != -1:
    mode = 2 if rng.random() < explanatory else int(rng.integers(2))
  questions, answers = [], []
  for text in picked:
    if mode == 0:
      questions.append(long_question(rng, text) if is_sentence else short_question(rng, text))
      answers.append(seg_answer(rng))
    elif mode == 1:
      questions.append(f"{DEFAULT_IMAGE_TOKEN}\n{text} {choice(rng, EXPLANATORY_QUESTION_LIST)}")
      answers.append(f"{seg_answer(rng)} {explanation}")
    else:
      questions.append(f"{DEFAULT_IMAGE_TOKEN}\n{text}")
      answers.append(explanation)
  masks = None if mode == 2 else np.stack([(mask == 1).astype(np.uint8)] * len(picked))
  return make_sample(image, questions, answers, masks, source=source, image_path=image_path)


def list_split(base_dir: str, reason_seg_data: str) -> tuple[str, list[str]]:
  """("ReasonSeg", sorted image paths) of "ReasonSeg|train" / "ReasonSeg|train_val"."""
  ds, splits = reason_seg_data.split("|")
  images = []
  for split in splits.split("_"):
    d = os.path.join(base_dir, "reason_seg", ds, split)
    if not os.path.isdir(d):
      raise FileNotFoundError(f"ReasonSeg split directory not found: {d}")
    images += sorted(glob.glob(os.path.join(d, "*.jpg")))
  return ds, images


def load_explanations(path: str) -> dict[str, str]:
  """{image file name: explanation} of an explanatory/train.json."""
  return {item["image"]: item["outputs"] for item in load_json(path)}


class ReasonSegDataset(LisaSource):
  name = "reason_seg"

  def __init__(self, base_dir: str, reason_seg_data: str = "ReasonSeg|train",
               num_classes_per_sample: int = 3, explanatory: float = 0.1):
    self.ds, self.images = list_split(base_dir, reason_seg_data)
    self.num_classes_per_sample, self.explanatory = num_classes_per_sample, explanatory
    self.explanations: dict[str, str] = {}
    if explanatory != -1:
      path = os.path.join(base_dir, "reason_seg", self.ds, "explanatory", "train.json")
      if os.path.exists(path):
        self.explanations = load_explanations(path)
      else:
        logging.warning("no ReasonSeg explanations at %s; training without them", path)

  def __len__(self):
    return len(self.images)

  def json_path(self, index):
    return self.images[index][:-4] + ".json"

  def describe(self, index):
    return f"{self.images[index]} + {self.json_path(index)}"

  def read(self, index, rng):
    path = self.images[index]
    image = load_image(path)
    mask, texts, is_sentence = get_mask_from_json(self.json_path(index), image.shape[:2])
    return reason_sample(image, mask, texts, is_sentence,
                         self.explanations.get(os.path.basename(path)), rng,
                         num_classes_per_sample=self.num_classes_per_sample,
                         explanatory=self.explanatory, source=f"reason_seg/{self.ds}",
                         image_path=path)


def prepared_record(image_path: str, explanations: dict[str, str] | None = None) -> dict[str, Any]:
  """The fixed (sampling-free) content of one ReasonSeg image: what tfds_builders stores."""
  image = load_image(image_path)
  mask, texts, is_sentence = get_mask_from_json(image_path[:-4] + ".json", image.shape[:2])
  name = os.path.basename(image_path)
  return {"image": image, "mask": mask, "texts": texts, "is_sentence": is_sentence,
          "explanation": (explanations or {}).get(name, ""), "name": name}
