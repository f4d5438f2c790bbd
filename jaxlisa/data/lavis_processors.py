"""LAVIS's image and text processors (`lavis/processors/blip_processors.py`), used by the zoo
(jaxlisa/zoo.py) and the BLIP-2 / MiniGPT4-Qwen tasks.

"eval" images are resized to S x S (bicubic) and normalised with the OpenAI CLIP mean/std; "train"
images take a random resized crop (scale 0.5-1, bicubic) and a random horizontal flip first.
Text: `blip_caption` (lower case, `.!"()*#:;~` -> space, spaces collapsed, at most max_words words,
the prompt in front) and `blip_question`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

from jaxlisa.data.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _check_rgb, _pil_resize, normalize


class ImageEvalProcessor:
  """LAVIS `blip_image_eval` / `blip2_image_eval`: Resize((S, S), bicubic), ToTensor, Normalize."""

  def __init__(self, image_size: int = 384, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    self.image_size, self.mean, self.std = image_size, mean, std

  def __call__(self, img: np.ndarray) -> np.ndarray:
    img = _pil_resize(_check_rgb(img), (self.image_size, self.image_size), Image.BICUBIC)
    return normalize(img, self.mean, self.std, scale=1 / 255)


class ImageTrainProcessor(ImageEvalProcessor):
  """LAVIS `blip_image_train` (without RandAugment): RandomResizedCrop(S, scale=(min_scale, 1),
  bicubic), RandomHorizontalFlip, ToTensor, Normalize. `rng` is a numpy Generator."""

  def __init__(self, image_size: int = 384, min_scale: float = 0.5, max_scale: float = 1.0, seed: int = 0, **kw):
    super().__init__(image_size, **kw)
    self.scale = (min_scale, max_scale)
    self.rng = np.random.default_rng(seed)

  def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (ratio 3/4..4/3, 10 tries, then a center crop)."""
    area = h * w
    for _ in range(10):
      target = area * self.rng.uniform(*self.scale)
      ratio = np.exp(self.rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
      if 0 < cw <= w and 0 < ch <= h:
        return int(self.rng.integers(0, h - ch + 1)), int(self.rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side

  def __call__(self, img: np.ndarray) -> np.ndarray:
    img = _check_rgb(img)
    top, left, ch, cw = self._crop_box(*img.shape[:2])
    img = img[top:top + ch, left:left + cw]
    if self.rng.random() < 0.5:
      img = img[:, ::-1]
    return super().__call__(np.ascontiguousarray(img))


def pre_caption(caption: str, max_words: int = 50) -> str:
  """LAVIS `BlipCaptionProcessor.pre_caption`."""
  caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
  caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
  words = caption.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_words: int = 50) -> str:
  """LAVIS `BlipQuestionProcessor.pre_question`."""
  question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
  words = question.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else question


@dataclasses.dataclass
class CaptionProcessor:
  prompt: str = ""
  max_words: int = 50

  def __call__(self, caption: str) -> str:
    return self.prompt + pre_caption(caption, self.max_words)


@dataclasses.dataclass
class QuestionProcessor:
  max_words: int = 50

  def __call__(self, question: str) -> str:
    return pre_question(question, self.max_words)
