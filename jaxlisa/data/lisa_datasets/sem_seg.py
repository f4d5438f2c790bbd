"""Semantic-segmentation sets as class-name questions (LISA utils/sem_seg_dataset.py).

On-disk layouts (under base_dir), as LISA reads them:
  ade20k      ade20k/images/training/*.jpg, ade20k/annotations/training/*.png (same stem);
              label 0 -> 255, then label - 1, 254 -> 255 (so 1..150 -> classes 0..149)
  cocostuff   cocostuff/train2017/*.png labels (0 = person ... 181 = wood, 255 unlabeled) with
              images coco/train2017/*.jpg; classes whose name holds "-" are set to 255
  mapillary   mapillary/config_v2.0.json ("labels"[i]["readable"], lowercased), labels
              mapillary/training/v2.0/labels/*.png, images mapillary/training/images/*.jpg;
              LISA applies no remap, so every label value (including "unlabeled") is a class
  paco_lvis   vlpart/paco/annotations/paco_lvis_v1_train.json, images coco/{file_name}
  pascal_part vlpart/pascal_part/train.json, images vlpart/pascal_part/VOCdevkit/VOC2010/
              JPEGImages/{file_name}
Part categories "obj:part" (PACO "_(...)" suffixes cut) are asked as "obj part" or "the part of
the obj" with probability 1/2 each.

A sample: up to `num_classes_per_sample` classes present in the image (annotations for the part
sets), drawn without replacement; per class a SHORT_QUESTION_LIST question with the lowercase
name, an ANSWER_LIST answer, and the mask `label == class` (`annToMask` for the part sets).
A draw picks a sub-dataset uniformly, then an image uniformly (LISA). Label lists are sorted.
A tree may carry its own ADE20K class list as ade20k/classes.json (the synthetic shapes do);
`class_lists={"ade20k": [...] | path}` overrides either.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from typing import Mapping, Sequence

import numpy as np

from jaxlisa.data.lisa_datasets import class_names
from jaxlisa.data.lisa_datasets.common import (IGNORE_LABEL, BadSample, LisaSource, choice,
                                               load_json, load_label_map, make_sample,
                                               sample_indices, seg_answer, short_question)
from jaxlisa.data.preprocess import load_image

DEFAULT_SEM_SEG_DATA = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"  # train_ds.py


def _names(spec: Sequence[str] | str) -> list[str]:
  return list(load_json(spec)) if isinstance(spec, str) else list(spec)


class _LabelMapSet:
  """ADE20K / COCO-Stuff / Mapillary: class-index PNG per image."""

  def __init__(self, name: str, classes: Sequence[str], images: list[str], labels: list[str],
               ignore_ids: Sequence[int] = ()):
    self.name, self.classes, self.images, self.labels = name, list(classes), images, labels
    self.ignore_ids = np.asarray(sorted(ignore_ids), np.int64)

  def __len__(self):
    return len(self.images)

  def describe(self, i):
    return f"{self.images[i]} + {self.labels[i]}"

  def label(self, i: int) -> np.ndarray:
    """The class map [H, W] int32 after LISA's remap (255 = ignore)."""
    label = load_label_map(self.labels[i]).astype(np.int32)
    if self.name == "ade20k":
      label = np.where(label == 0, IGNORE_LABEL, label - 1)
      label[label == 254] = IGNORE_LABEL
    elif self.ignore_ids.size:
      label[np.isin(label, self.ignore_ids)] = IGNORE_LABEL
    return label

  def read(self, i, rng, num_classes):
    label = self.label(i)
    image = load_image(self.images[i])
    if image.shape[:2] != label.shape:
      raise BadSample(f"label {label.shape} does not match image {image.shape[:2]}")
    present = [int(c) for c in np.unique(label) if c != IGNORE_LABEL]
    if not present:
      raise BadSample("no labelled class in the image")
    if max(present) >= len(self.classes):
      raise BadSample(f"label value {max(present)} outside the {len(self.classes)} classes")
    ids = [present[k] for k in sample_indices(rng, len(present), num_classes)]
    questions = [short_question(rng, self.classes[c]) for c in ids]
    answers = [seg_answer(rng) for _ in ids]
    masks = np.stack([(label == c).astype(np.uint8) for c in ids])
    return make_sample(image, questions, answers, masks, source=f"sem_seg/{self.name}",
                       image_path=self.images[i])


class _PartSet:
  """PACO-LVIS / PASCAL-Part: COCO-format instance annotations, one question per annotation."""

  def __init__(self, name: str, json_path: str, image_root: str):
    from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
    with contextlib.redirect_stdout(io.StringIO()):
      self.coco = COCO(json_path)
    self.name, self.image_root = name, image_root
    self.class_map = {}
    for cat in self.coco.loadCats(self.coco.getCatIds()):
      parts = cat["name"].strip().split(":")
      if len(parts) == 1:
        self.class_map[cat["id"]] = parts[0].split("_(")[0]
      elif len(parts) == 2:
        self.class_map[cat["id"]] = tuple(p.split("_(")[0] for p in parts)
      else:
        raise ValueError(f"{json_path}: category name {cat['name']!r} is not 'obj' or 'obj:part'")
    # LISA resamples images without annotations; listing only annotated ones draws the same.
    self.img_ids = sorted(i for i in self.coco.getImgIds() if self.coco.getAnnIds(imgIds=[i]))

  def __len__(self):
    return len(self.img_ids)

  def image_path(self, i):
    return os.path.join(self.image_root, self.coco.loadImgs([self.img_ids[i]])[0]["file_name"])

  def describe(self, i):
    return f"{self.image_path(i)} (image id {self.img_ids[i]})"

  def read(self, i, rng, num_classes):
    path = self.image_path(i)
    image = load_image(path)
    anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[self.img_ids[i]]))
    anns = [anns[k] for k in sample_indices(rng, len(anns), num_classes)]
    names = []
    for ann in anns:
      cls = self.class_map[ann["category_id"]]
      if isinstance(cls, tuple):
        obj, part = cls
        cls = f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
      names.append(cls)
    questions = [short_question(rng, n) for n in names]
    answers = [seg_answer(rng) for _ in names]
    masks = np.stack([self.coco.annToMask(a) for a in anns]).astype(np.uint8)
    if masks.shape[1:] != image.shape[:2]:
      raise BadSample(f"annotation size {masks.shape[1:]} does not match image {image.shape[:2]}")
    return make_sample(image, questions, answers, np.minimum(masks, 1),
                       source=f"sem_seg/{self.name}", image_path=path)


def _stems(directory: str, ext: str) -> list[str]:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"directory not found: {directory}")
  return sorted(f[:-len(ext)] for f in os.listdir(directory) if f.endswith(ext))


def init_ade20k(base_dir: str, classes: Sequence[str] | str | None = None) -> _LabelMapSet:
  own = os.path.join(base_dir, "ade20k", "classes.json")
  if classes is None:
    classes = own if os.path.exists(own) else class_names.ADE20K_CLASSES
  img_dir = os.path.join(base_dir, "ade20k", "images", "training")
  lab_dir = os.path.join(base_dir, "ade20k", "annotations", "training")
  stems = _stems(img_dir, ".jpg")
  return _LabelMapSet("ade20k", _names(classes), [os.path.join(img_dir, s + ".jpg") for s in stems],
                      [os.path.join(lab_dir, s + ".png") for s in stems])


def init_cocostuff(base_dir: str, classes: Sequence[str] | str | None = None) -> _LabelMapSet:
  classes = _names(class_names.COCO_STUFF_CLASSES if classes is None else classes)
  lab_dir = os.path.join(base_dir, "cocostuff", "train2017")
  stems = _stems(lab_dir, ".png")
  return _LabelMapSet("cocostuff", classes,
                      [os.path.join(base_dir, "coco", "train2017", s + ".jpg") for s in stems],
                      [os.path.join(lab_dir, s + ".png") for s in stems],
                      ignore_ids=[i for i, c in enumerate(classes) if "-" in c])


def init_mapillary(base_dir: str, classes: Sequence[str] | str | None = None) -> _LabelMapSet:
  root = os.path.join(base_dir, "mapillary")
  if classes is None:
    classes = [x["readable"].lower() for x in load_json(os.path.join(root, "config_v2.0.json"))["labels"]]
  labels = sorted(glob.glob(os.path.join(root, "training", "v2.0", "labels", "*.png")))
  images = [os.path.join(root, "training", "images", os.path.basename(p)[:-4] + ".jpg") for p in labels]
  return _LabelMapSet("mapillary", _names(classes), images, labels)


def init_paco_lvis(base_dir: str, classes=None) -> _PartSet:
  del classes
  return _PartSet("paco_lvis", os.path.join(base_dir, "vlpart", "paco", "annotations",
                                            "paco_lvis_v1_train.json"), os.path.join(base_dir, "coco"))


def init_pascal_part(base_dir: str, classes=None) -> _PartSet:
  del classes
  root = os.path.join(base_dir, "vlpart", "pascal_part")
  return _PartSet("pascal_part", os.path.join(root, "train.json"),
                  os.path.join(root, "VOCdevkit", "VOC2010", "JPEGImages"))


_INIT = {"ade20k": init_ade20k, "cocostuff": init_cocostuff, "mapillary": init_mapillary,
         "paco_lvis": init_paco_lvis, "pascal_part": init_pascal_part}


class SemSegDataset(LisaSource):
  """The sem_seg family over `sem_seg_data` ("a||b||..."); items index the concatenation."""

  name = "sem_seg"

  def __init__(self, base_dir: str, sem_seg_data: str | Sequence[str] = DEFAULT_SEM_SEG_DATA,
               num_classes_per_sample: int = 3,
               class_lists: Mapping[str, Sequence[str] | str] | None = None):
    names = sem_seg_data.split("||") if isinstance(sem_seg_data, str) else list(sem_seg_data)
    unknown = [n for n in names if n not in _INIT]
    if unknown:
      raise ValueError(f"unknown sem_seg datasets {unknown}; known: {sorted(_INIT)}")
    class_lists = dict(class_lists or {})
    self.sets = [_INIT[n](base_dir, class_lists.get(n)) for n in names]
    self.num_classes_per_sample = num_classes_per_sample
    self.starts = np.cumsum([0] + [len(s) for s in self.sets])

  def __len__(self):
    return int(self.starts[-1])

  def _locate(self, index):
    k = int(np.searchsorted(self.starts, index, side="right") - 1)
    return self.sets[k], index - int(self.starts[k])

  def describe(self, index):
    s, i = self._locate(index)
    return s.describe(i)

  def draw_index(self, rng):
    nonempty = [k for k, s in enumerate(self.sets) if len(s)]
    k = choice(rng, nonempty)
    return int(self.starts[k]) + int(rng.integers(len(self.sets[k])))

  def read(self, index, rng):
    s, i = self._locate(index)
    return s.read(i, rng, self.num_classes_per_sample)
