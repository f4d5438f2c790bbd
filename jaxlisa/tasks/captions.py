"""What the caption-data tasks (blip2_stage1, minigpt4qwen) share: LAVIS-layout annotations under
config.data.base_dir (or the synthetic shapes captions written to workdir/data by prepare()), a
tokenizer from init.tokenizer or trained on the annotations' texts, image-text sources read lazily,
and the conversion of whole / partial pretrained checkpoints into the run's params.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from absl import logging
from flax import traverse_util

from jaxlisa.data import image_text, synthetic_captions
from jaxlisa.data.lavis_processors import ImageEvalProcessor
from jaxlisa.training.task import TaskBase


def data_dir(config, workdir: str) -> str:
  """config.data.base_dir, or workdir/data (where ensure_data writes the synthetic dataset)."""
  return config.data.base_dir or os.path.join(workdir, "data")


def ensure_data(config, workdir: str) -> None:
  """Write the synthetic dataset to workdir/data once, when config.data.base_dir is ''."""
  d = config.data
  if d.base_dir:
    return
  s = d.synthetic
  synthetic_captions.ensure_dataset(data_dir(config, workdir), num_train=s.num_train, num_val=s.num_val,
                                    image_size=s.image_size, seed=s.seed, max_shapes=s.max_shapes,
                                    captions_per_image=s.captions_per_image)


def saved_tokenizer(directory: str):
  """The tokenizer a task's prepare() saved in `directory`; ValueError when there is none."""
  if not os.path.exists(os.path.join(directory, "tokenizer.json")):
    raise ValueError(f"no tokenizer in {directory}: the task's prepare() trains it (training does)")
  from jaxlisa.data.tokenization import load_saved_tokenizer  # pylint: disable=import-outside-toplevel
  return load_saved_tokenizer(directory)


class CaptionDataTask(TaskBase):
  """What the BLIP-2 and MiniGPT4-Qwen tasks share: LAVIS-layout annotations under data_dir, a
  tokenizer from init.tokenizer or trained on the annotations' texts by prepare(), and image-text
  sources read lazily. Subclasses give TEXT_KEYS, MODEL, model_config_from(config, tokenizer),
  _pretrained_tokenizer(path), _train_tokenizer(texts) and _source(anns, root, split)."""

  TEXT_KEYS: tuple[str, ...] = ()
  MODEL: type = type(None)  # the linen module class, built from model_config
  model_config_from = None  # staticmethod(config, tokenizer) -> the model config

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    self.base_dir = data_dir(config, workdir)
    self.tokenizer_dir = os.path.join(workdir, "tokenizer")

  def prepare(self):
    """Write the synthetic dataset (config.data.base_dir '') and train the tokenizer into
    workdir/tokenizer (no init.tokenizer), each once."""
    ensure_data(self.config, self.workdir)
    if not self.config.init.tokenizer and "tokenizer" not in self.__dict__:
      texts = corpus_texts(self.base_dir, self.train_ann, self.TEXT_KEYS)
      self.__dict__["tokenizer"] = self._train_tokenizer(texts)

  def _train_tokenizer(self, texts):
    raise NotImplementedError

  def _pretrained_tokenizer(self, path: str):
    raise NotImplementedError

  @functools.cached_property
  def tokenizer(self):
    if self.config.init.tokenizer:
      return self._pretrained_tokenizer(self.config.init.tokenizer)
    return saved_tokenizer(self.tokenizer_dir)

  @functools.cached_property
  def model_config(self):
    return self.model_config_from(self.config, self.tokenizer)  # pylint: disable=not-callable

  @functools.cached_property
  def model(self):
    return self.MODEL(self.model_config)

  @functools.cached_property
  def processor(self):
    return ImageEvalProcessor(self.model_config.vision.image_size)

  @functools.cached_property
  def train_ann(self) -> list[dict]:
    return synthetic_captions.read_json(os.path.join(self.base_dir, self.config.data.train_ann))

  @functools.cached_property
  def val_ann(self) -> list[dict]:
    d = self.config.data
    return synthetic_captions.read_json(os.path.join(self.base_dir, d.val_ann)) if d.val_ann else []

  @functools.cached_property
  def train_source(self):
    return self._source(self.train_ann, self.config.data.image_root or self.base_dir, "train")

  @functools.cached_property
  def val_source(self):
    return self._source(self.val_ann, self.config.data.image_root or self.base_dir, "val") if self.val_ann else None

  def _source(self, anns, root, split):
    raise NotImplementedError

  def train_data(self):
    return image_text.train_iterator(self.train_source, self.config.batch_size, self.config.seed)

  def eval_data(self):
    if self.val_source is None:
      return None
    return image_text.eval_batches(self.val_source, self.config.batch_size)


def corpus_texts(base: str, anns: list[dict], keys: tuple[str, ...]) -> list[str]:
  """Texts to train a tokenizer on: base/corpus.json when there is one, else the annotations' fields."""
  path = os.path.join(base, "corpus.json")
  if os.path.exists(path):
    return synthetic_captions.read_json(path)
  out = []
  for a in anns:
    for k in keys:
      v = a.get(k, [])
      out += v if isinstance(v, list) else [v]
  return out


def convert_whole(path: str, model_config, family: str | None = None) -> dict:
  """Params of a whole-model checkpoint: a converted jaxlisa directory as saved; LAVIS .pth files
  (no config inside) with the run's architecture (config.model); HF directories with their own."""
  from jaxlisa.conversion import convert as convert_lib  # pylint: disable=import-outside-toplevel
  if convert_lib.is_converted(path):
    return convert_lib.load_params(path)
  over = None
  if path.endswith((".pth", ".pt", ".bin")):
    over = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}
  return convert_lib.convert_checkpoint(path, family=family, config_overrides=over).params


def convert_part(path: str, family: str, config_overrides: dict | None = None) -> dict:
  from jaxlisa.conversion import convert as convert_lib  # pylint: disable=import-outside-toplevel
  if convert_lib.is_converted(path):
    return convert_lib.load_params(path)
  return convert_lib.convert_checkpoint(path, family=family, config_overrides=config_overrides).params


def fit_to(params: dict, abstract, what: str) -> dict:
  """The leaves of `params` that the model has with the same shape (others logged and dropped), e.g.
  a stage-1 Q-Former's text parts when the model's Q-Former has none."""
  want = traverse_util.flatten_dict(abstract)
  flat = traverse_util.flatten_dict(params)
  keep = {k: v for k, v in flat.items() if k in want and tuple(np.shape(v)) == tuple(want[k].shape)}
  dropped = sorted("/".join(map(str, k)) for k in flat if k not in keep)
  if dropped:
    logging.info("%s: %d tensors the model does not have (or of another shape) left out: %s%s", what, len(dropped),
                 ", ".join(dropped[:8]), " ..." if len(dropped) > 8 else "")
  if not keep:
    raise ValueError(f"{what}: no tensor fits the model")
  return traverse_util.unflatten_dict(keep)
