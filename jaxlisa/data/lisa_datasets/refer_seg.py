"""Referring segmentation: refCOCO / refCOCO+ / refCOCOg / refclef (+ gRefCOCO) as LISA reads them
(utils/refer_seg_dataset.py, utils/refer.py, utils/grefer.py).

Layout under `data_root` (training: base_dir/refer_seg):
  {ds}/refs({splitBy}).p   pickled list of refs {ref_id, ann_id, image_id, category_id, split,
                           sentences: [{sent, sent_id, ...}], ...}; gRefCOCO: {ds}/grefs({splitBy})
                           .p or .json with ann_id a list ([-1] = no target)
  {ds}/instances.json      COCO images / annotations (polygons or RLE) / categories
  images/mscoco/images/train2014/{file_name}   refcoco, refcoco+, refcocog, grefcoco
  images/saiapr_tc-12/{file_name}               refclef
splitBy: umd for refcocog, unc otherwise (LISA).

A sample: every (sentence, ann) pair of the image's refs in the split; up to
`num_classes_per_sample` drawn without replacement; SHORT_QUESTION_LIST question with the stripped,
lowercased sentence, an ANSWER_LIST answer; mask = the annotation's parts summed and > 0
(a multi-ann gRefCOCO target is the union). An annotation without segmentation is a bad sample
(LISA trains on an all-zero mask there).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Sequence

import numpy as np

from jaxlisa.data.lisa_datasets.common import (BadSample, LisaSource, choice, decode_coco_segmentation,
                                               load_json, make_sample, sample_indices, seg_answer,
                                               short_question)
from jaxlisa.data.preprocess import load_image

DEFAULT_REFER_SEG_DATA = "refclef||refcoco||refcoco+||refcocog"


def split_by(dataset: str) -> str:
  return "umd" if dataset == "refcocog" else "unc"


def split_matches(ref_split: str, split: str) -> bool:
  """REFER getRefIds(split=...): testA/B/C match any split holding that letter (testAB, ...)."""
  if split in ("testA", "testB", "testC"):
    return split[-1] in ref_split
  if split == "test":
    return "test" in ref_split
  return ref_split == split


class Refer:
  """The annotations of one REFER dataset: refs, annotations by id, images by id."""

  def __init__(self, data_root: str, dataset: str = "refcoco", splitby: str | None = None):
    self.dataset, self.data_root = dataset, data_root
    splitby = split_by(dataset) if splitby is None else splitby
    data_dir = os.path.join(data_root, dataset)
    stem = "grefs" if dataset == "grefcoco" else "refs"
    pkl, js = (os.path.join(data_dir, f"{stem}({splitby}).{e}") for e in ("p", "json"))
    if os.path.exists(pkl):
      with open(pkl, "rb") as f:
        self.refs: list[dict] = pickle.load(f)  # the released format; trusted local data
    elif os.path.exists(js):
      self.refs = load_json(js)
    else:
      raise FileNotFoundError(f"no refs file {pkl}")
    instances = load_json(os.path.join(data_dir, "instances.json"))
    self.anns = {a["id"]: a for a in instances["annotations"]}
    self.imgs = {i["id"]: i for i in instances["images"]}
    self.cats = {c["id"]: c["name"] for c in instances.get("categories", [])}
    sub = "images/saiapr_tc-12" if dataset == "refclef" else "images/mscoco/images/train2014"
    self.image_dir = os.path.join(data_root, sub)

  def image_refs(self, split: str) -> dict[int, list[dict]]:
    """{image_id: [refs]} of the split, images in id order, refs in file order."""
    out: dict[int, list[dict]] = {}
    for ref in self.refs:
      if split_matches(ref["split"], split):
        out.setdefault(ref["image_id"], []).append(ref)
    return {k: out[k] for k in sorted(out)}

  def image_path(self, image_id: int) -> str:
    return os.path.join(self.image_dir, self.imgs[image_id]["file_name"])

  def ann_mask(self, ann_id: Any, image_id: int) -> np.ndarray:
    """uint8 [H, W] 0/1 of an ann id (or gRefCOCO list of ids; [-1] = empty)."""
    info = self.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    if isinstance(ann_id, (list, tuple)):
      m = np.zeros((h, w), np.uint8)
      for a in ann_id:
        if a != -1:
          m |= decode_coco_segmentation(self.anns[a]["segmentation"], h, w)
      return m
    seg = self.anns[ann_id].get("segmentation")
    if seg is None or len(seg) == 0:
      raise BadSample(f"annotation {ann_id} has an empty segmentation")
    return decode_coco_segmentation(seg, h, w)


def image_sentences(refs: Sequence[dict]) -> tuple[list[str], list[Any]]:
  """All (sentence, ann_id) pairs of an image's refs, in order."""
  sents, ann_ids = [], []
  for ref in refs:
    for s in ref["sentences"]:
      sents.append(s["sent"])
      ann_ids.append(ref["ann_id"])
  return sents, ann_ids


class ReferSegDataset(LisaSource):
  """The refer_seg family: items are (dataset, image) pairs of `split`."""

  name = "refer_seg"

  def __init__(self, base_dir: str, refer_seg_data: str | Sequence[str] = DEFAULT_REFER_SEG_DATA,
               num_classes_per_sample: int = 3, split: str = "train",
               data_root: str | None = None):
    names = refer_seg_data.split("||") if isinstance(refer_seg_data, str) else list(refer_seg_data)
    root = os.path.join(base_dir, "refer_seg") if data_root is None else data_root
    self.refers = [Refer(root, n) for n in names]
    self.items: list[tuple[int, int]] = []  # (dataset k, image id)
    self.img2refs = []
    for k, r in enumerate(self.refers):
      refs = r.image_refs(split)
      self.img2refs.append(refs)
      self.items += [(k, i) for i in refs]
    self.num_classes_per_sample = num_classes_per_sample
    self.starts = np.cumsum([0] + [len(r) for r in self.img2refs])

  def __len__(self):
    return len(self.items)

  def describe(self, index):
    k, image_id = self.items[index]
    return f"{self.refers[k].dataset} image {image_id}: {self.refers[k].image_path(image_id)}"

  def draw_index(self, rng):
    """LISA: a dataset uniformly, then one of its images uniformly."""
    k = choice(rng, [k for k, r in enumerate(self.img2refs) if r])
    return int(self.starts[k]) + int(rng.integers(len(self.img2refs[k])))

  def read(self, index, rng):
    k, image_id = self.items[index]
    refer = self.refers[k]
    sents, ann_ids = image_sentences(self.img2refs[k][image_id])
    if not sents:
      raise BadSample("image has no sentences")
    picked = sample_indices(rng, len(sents), self.num_classes_per_sample)
    path = refer.image_path(image_id)
    image = load_image(path)
    questions = [short_question(rng, sents[i].strip()) for i in picked]
    answers = [seg_answer(rng) for _ in picked]
    masks = np.stack([refer.ann_mask(ann_ids[i], image_id) for i in picked])
    if masks.shape[1:] != image.shape[:2]:
      raise BadSample(f"instances size {masks.shape[1:]} does not match image {image.shape[:2]}")
    return make_sample(image, questions, answers, masks, source=f"refer_seg/{refer.dataset}",
                       image_path=path)
