"""TFDS array_record builds of prepared LISA data, read back into the grain pipeline (no TensorFlow;
stack_notes.md section 2: array_record files, images as PNG bytes, DatasetInfo built directly).

`ReasonSegPrepared` stores each ReasonSeg-format image (the real ReasonSeg or the synthetic shapes'
reason_seg tree) with its fixed annotation: the decoded image, the rasterized 0/1/255 mask, the
texts, is_sentence, the explanation ("" when none) and the file name. Sampling (texts, templates,
explanatory choice) stays at read time: `PreparedReasonSegSource` wraps `tfds.data_source` as a
LisaSource whose samples equal ReasonSegDataset's for the same rng.

  prepare_reason_seg(base_dir, data_dir)              # once; reads base_dir/reason_seg/ReasonSeg
  src = PreparedReasonSegSource(data_dir, "train")    # a LisaSource over the array_record file
  lisa_pipeline.train_iterator(src, tok, cfg, random_draw=False, ...)
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from jaxlisa.data.lisa_datasets.common import READ_ERRORS, LisaSource
from jaxlisa.data.lisa_datasets.reason_seg import (list_split, load_explanations, prepared_record,
                                                   reason_sample)

SPLITS = ("train", "val", "test")


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


class ReasonSegPrepared(tfds.core.GeneratorBasedBuilder):
  """ReasonSeg images + rasterized masks + texts; splits are the split folders that exist."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "image, mask (0/1/255), texts, is_sentence, explanation, name"}
  # tfds finds a packaged builder's code through importlib_resources (not installed); the
  # path is only used to look for a checksums file next to it.
  code_path = epath.Path(__file__)

  def __init__(self, *, source_dir: str | None = None, dataset: str = "ReasonSeg", **kwargs):
    self.source_dir, self.source_dataset = source_dir, dataset
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="ReasonSeg-format data prepared for LISA training.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "texts": tfds.features.Sequence(tfds.features.Text()),
            "is_sentence": tfds.features.Scalar(np.bool_),
            "explanation": tfds.features.Text(),
            "name": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.source_dir is None:
      raise ValueError("ReasonSegPrepared needs source_dir (the base dir holding reason_seg/) to build")
    root = os.path.join(self.source_dir, "reason_seg", self.source_dataset)
    return {s: self._generate_examples(s) for s in SPLITS if os.path.isdir(os.path.join(root, s))}

  def _generate_examples(self, split):
    root = os.path.join(self.source_dir, "reason_seg", self.source_dataset)
    expl_path = os.path.join(root, "explanatory", "train.json")
    explanations = load_explanations(expl_path) if split == "train" and os.path.exists(expl_path) else {}
    _, images = list_split(self.source_dir, f"{self.source_dataset}|{split}")
    for path in images:
      try:
        rec = prepared_record(path, explanations)
      except READ_ERRORS as e:
        logging.warning("not preparing %s: %s: %s", path, type(e).__name__, e)
        continue
      yield rec["name"], {"image": _png(rec["image"]), "mask": _png(rec["mask"]),
                          "texts": rec["texts"], "is_sentence": rec["is_sentence"],
                          "explanation": rec["explanation"], "name": rec["name"]}


def prepare_reason_seg(base_dir: str, data_dir: str, dataset: str = "ReasonSeg") -> ReasonSegPrepared:
  """Builds (or reuses) the array_record files of every split under data_dir."""
  builder = ReasonSegPrepared(source_dir=base_dir, dataset=dataset, data_dir=data_dir,
                              file_format="array_record")
  builder.download_and_prepare()
  return builder


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class PreparedReasonSegSource(LisaSource):
  """A LisaSource over `tfds.data_source("reason_seg_prepared", split)`; `read(index, rng)` is
  `ReasonSegDataset.read` on the stored content (items in the file's order)."""

  name = "reason_seg_prepared"

  def __init__(self, data_dir: str, split: str = "train", num_classes_per_sample: int = 3,
               explanatory: float = 0.1):
    self.data_dir, self.split = data_dir, split
    self.num_classes_per_sample, self.explanatory = num_classes_per_sample, explanatory
    self._src = None

  @property
  def src(self):
    if self._src is None:  # opened lazily: the source stays picklable for grain workers
      self._src = tfds.data_source("reason_seg_prepared", split=self.split, data_dir=self.data_dir)
    return self._src

  def __getstate__(self):
    return dict(self.__dict__, _src=None)

  def __len__(self):
    return len(self.src)

  def describe(self, index):
    return f"{self.data_dir} reason_seg_prepared[{self.split}][{index}]"

  def record(self, index: int) -> dict:
    """The stored content: image uint8 [H, W, 3], mask uint8 [H, W], texts, is_sentence,
    explanation (None when empty), name."""
    r = self.src[index]
    image = np.asarray(r["image"], np.uint8)
    mask = np.asarray(r["mask"], np.uint8)[..., 0]
    expl = _text(r["explanation"])
    return {"image": image, "mask": mask, "texts": [_text(t) for t in r["texts"]],
            "is_sentence": bool(r["is_sentence"]), "explanation": expl or None, "name": _text(r["name"])}

  def read(self, index, rng):
    rec = self.record(index)
    return reason_sample(rec["image"], rec["mask"], rec["texts"], rec["is_sentence"], rec["explanation"],
                         rng, num_classes_per_sample=self.num_classes_per_sample,
                         explanatory=self.explanatory, source="reason_seg/prepared",
                         image_path=f"{self.split}/{rec['name']}")
