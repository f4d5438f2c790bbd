"""Visual instruction data: LLaVA-Instruct-150k (LISA utils/vqa_dataset.py).

Layout: base_dir/llava_dataset/{vqa_data}.json, a list of {"image": file name, "conversations":
[{"from": "human" | "gpt", "value": str}, ...]}, images base_dir/coco/train2017/{image}.
A sample is the whole multi-turn conversation (multi_turn=True): "<image>" moved to the front of
its message, a leading "gpt" turn dropped, turns must alternate (else a bad sample), a trailing
unanswered question dropped; no [SEG], no masks.
"""

from __future__ import annotations

import os

from jaxlisa.data.lisa_datasets.common import BadSample, LisaSource, image_first, load_json, make_sample
from jaxlisa.data.preprocess import load_image


def conversation_pairs(source: list[dict]) -> tuple[list[str], list[str]]:
  """(questions, answers) of a LLaVA conversation, as LISA's VQADataset builds it."""
  source = [dict(s, value=image_first(s["value"])) for s in source]
  if source and source[0]["from"] != "human":
    source = source[1:]
  expected = ("human", "gpt")
  for j, s in enumerate(source):
    if s["from"] != expected[j % 2]:
      raise BadSample(f"turn {j} is from {s['from']!r}; turns must alternate human / gpt")
  if len(source) % 2:
    source = source[:-1]
  if not source:
    raise BadSample("empty conversation")
  return [s["value"] for s in source[0::2]], [s["value"] for s in source[1::2]]


class VQADataset(LisaSource):
  name = "vqa"

  def __init__(self, base_dir: str, vqa_data: str = "llava_instruct_150k",
               image_root: str | None = None):
    self.json_path = os.path.join(base_dir, "llava_dataset", f"{vqa_data}.json")
    self.items = load_json(self.json_path)
    self.image_root = os.path.join(base_dir, "coco", "train2017") if image_root is None else image_root
    self.vqa_data = vqa_data

  def __len__(self):
    return len(self.items)

  def describe(self, index):
    item = self.items[index]
    return f"{self.json_path}[{index}] image {os.path.join(self.image_root, str(item.get('image')))}"

  def read(self, index, rng):
    del rng
    item = self.items[index]
    path = os.path.join(self.image_root, item["image"])
    questions, answers = conversation_pairs(item["conversations"])
    return make_sample(load_image(path), questions, answers, None, source=f"vqa/{self.vqa_data}",
                       image_path=path, multi_turn=True)
