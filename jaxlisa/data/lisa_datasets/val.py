"""Validation samples (LISA utils/dataset.py ValDataset): one image with all its queries,
answered "[SEG]." (teacher-forced, inference=True).

val_dataset:
  "ReasonSeg|val"       base_dir/reason_seg/ReasonSeg/val/*.jpg (sorted); the first text only;
                        the mask keeps its 255 ignore regions
  "refcoco|unc|val"     (ds|splitBy|split) every sentence of every ref of the image in the split,
                        stripped and lowercased; an annotation without segmentation gives an
                        all-zero mask (LISA). REFER data under `refer_root` (default
                        base_dir/refer_seg; LISA's ValDataset reads base_dir itself, so pass
                        refer_root=base_dir to reproduce that layout)
Questions: "<image>\\n {sent} Please output segmentation mask." when is_sentence (ReasonSeg
sentences), else "<image>\\n What is {sent} in this image? Please output segmentation mask."
(LISA's leading space kept). Items are in a fixed order; `__getitem__` returns None (warned and
counted) for an unreadable item.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlisa.data.conversation import DEFAULT_IMAGE_TOKEN
from jaxlisa.data.lisa_datasets.common import LisaSource, decode_coco_segmentation, make_sample
from jaxlisa.data.lisa_datasets.reason_seg import get_mask_from_json, list_split
from jaxlisa.data.lisa_datasets.refer_seg import Refer, image_sentences
from jaxlisa.data.preprocess import load_image

VAL_ANSWER = "[SEG]."


def val_question(text: str, is_sentence: bool) -> str:
  text = text.strip()
  if is_sentence:
    return f"{DEFAULT_IMAGE_TOKEN}\n {text} Please output segmentation mask."
  return f"{DEFAULT_IMAGE_TOKEN}\n What is {text} in this image? Please output segmentation mask."


class ValDataset(LisaSource):
  name = "val"

  def __init__(self, base_dir: str, val_dataset: str = "ReasonSeg|val", refer_root: str | None = None):
    parts = val_dataset.split("|")
    self.val_dataset = val_dataset
    if len(parts) == 2:
      self.kind = "reason_seg"
      self.ds, self.images = list_split(base_dir, val_dataset)
    elif len(parts) == 3:
      self.kind = "refer_seg"
      self.ds, splitby, split = parts
      root = os.path.join(base_dir, "refer_seg") if refer_root is None else refer_root
      self.refer = Refer(root, self.ds, splitby)
      self.img2refs = self.refer.image_refs(split)
      self.image_ids = list(self.img2refs)
    else:
      raise ValueError(f"val_dataset {val_dataset!r} is neither 'ds|split' nor 'ds|splitBy|split'")

  def __len__(self):
    return len(self.images) if self.kind == "reason_seg" else len(self.image_ids)

  def describe(self, index):
    if self.kind == "reason_seg":
      return f"{self.images[index]} + {self.images[index][:-4]}.json"
    return f"{self.ds} image {self.image_ids[index]}: {self.refer.image_path(self.image_ids[index])}"

  def read(self, index, rng=None):
    del rng
    if self.kind == "reason_seg":
      path = self.images[index]
      image = load_image(path)
      mask, texts, is_sentence = get_mask_from_json(path[:-4] + ".json", image.shape[:2])
      sents, masks = texts[:1], mask[None]
    else:
      image_id = self.image_ids[index]
      path = self.refer.image_path(image_id)
      image = load_image(path)
      sents, ann_ids = image_sentences(self.img2refs[image_id])
      sents, is_sentence = [s.strip().lower() for s in sents], False
      info = self.refer.imgs[image_id]
      h, w = int(info["height"]), int(info["width"])
      masks = []
      for a in ann_ids:
        seg = None if isinstance(a, (list, tuple)) else self.refer.anns[a].get("segmentation")
        if isinstance(a, (list, tuple)):
          masks.append(self.refer.ann_mask(a, image_id))
        elif seg is None or len(seg) == 0:
          masks.append(np.zeros((h, w), np.uint8))
        else:
          masks.append(decode_coco_segmentation(seg, h, w))
      masks = np.stack(masks)
    questions = [val_question(s, is_sentence) for s in sents]
    return make_sample(image, questions, [VAL_ANSWER] * len(questions), masks,
                       source=f"val/{self.val_dataset}", image_path=path, inference=True)

  def __getitem__(self, index):
    return self.read_or_skip(index, None)
