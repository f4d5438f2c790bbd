"""BLIP-2 stage 1 (LAVIS `blip2` pretraining: ITC + ITM + ITG, summed) on image-caption data.

config.model      Blip2Config fields: vision {EVAViTConfig}, qformer {QFormerConfig}, embed_dim, temp,
                  learn_temp, itc/lm_label_smoothing, max_txt_len. qformer.vocab_size -1 = the
                  tokenizer's size, qformer.encoder_hidden_size -1 = vision.hidden_size; the
                  Q-Former's pad / bos ("[DEC]") / sep ids always come from the tokenizer.
config.init       pretrained: a whole stage-1 checkpoint (LAVIS .pth, HF Blip2ForImageTextRetrieval
                  directory or converted jaxlisa directory); vision: an EVA ViT checkpoint (LAVIS
                  eva_vit_g.pth) for visual_encoder; tokenizer: a BERT tokenizer directory
                  ("[DEC]" is added as bos, as LAVIS) ('' everywhere = from scratch, with a
                  WordPiece tokenizer trained on the data's texts).
config.data       base_dir ('' = the synthetic shapes captions, written to workdir/data once),
                  image_root ('' = base_dir), train_ann / val_ann (LAVIS caption json: [{"image",
                  "caption"}]), max_words (LAVIS blip_caption processor), vocab_size (trained
                  tokenizer), synthetic {num_train, num_val, image_size, max_shapes,
                  captions_per_image, seed}.
Images: LAVIS's eval transform (resize to vision.image_size, bicubic, CLIP mean/std); no
RandomResizedCrop / flip (they would cut shapes out of the synthetic captions).
Validation: the losses (hard negatives drawn with a fixed key) and in-batch retrieval recall@1
(image -> text `i2t_r1`, text -> image `t2i_r1`, among the batch's config.batch_size candidates;
a candidate with the same caption tokens counts as correct).

ITC under the trainer's jit sees the global batch, so the similarities span the whole mesh as
LAVIS's `concat_all_gather`; unlike LAVIS, gradients also flow through the other devices' features
(the gradient of the global loss; values are the same).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from jaxlisa.data import image_text, synthetic_captions
from jaxlisa.data.lavis_processors import ImageEvalProcessor, pre_caption
from jaxlisa.models import blip2 as blip2_lib
from jaxlisa.tasks import model_config
from jaxlisa.training.task import TaskBase


# ----------------------------------------------------------------------------- shared helpers
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


# ----------------------------------------------------------------------------- config
def _resolve_qformer(d: dict, tokenizer) -> None:
  q = d["qformer"]
  if q.get("encoder_hidden_size", -1) == -1:
    q["encoder_hidden_size"] = d["vision"]["hidden_size"]
  q.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
           sep_token_id=tokenizer.sep_token_id)


def model_config_from(config, tokenizer) -> blip2_lib.Blip2Config:
  return model_config.from_tokenizer(config, tokenizer, blip2_lib.Blip2Config, "qformer", _resolve_qformer)


def _touch_params(model: blip2_lib.Blip2Qformer, pixels):
  """Creates every parameter with one queries-only pass (the Q-Former builds its text parts and LM
  head when initializing) instead of tracing the three losses: a much smaller init program."""
  q = model.query_output(model.image_embeds(pixels)).last_hidden_state
  return model.vision_proj(q), model.text_proj(q[:, 0]), model.itm_head(q), model.temperature()


class Task(CaptionDataTask):
  """BLIP-2 stage 1: ITC + ITM + ITG; losses and in-batch retrieval recall@1 on validation."""

  TEXT_KEYS = ("caption",)
  MODEL = blip2_lib.Blip2Qformer
  model_config_from = staticmethod(model_config_from)

  def _pretrained_tokenizer(self, path: str):
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})  # LAVIS Blip2Base.init_tokenizer
    return tok

  def _train_tokenizer(self, texts):
    texts = [pre_caption(t, self.config.data.max_words) for t in texts]
    return synthetic_captions.load_or_train(self.tokenizer_dir, synthetic_captions.train_bert_tokenizer, texts,
                                            vocab_size=self.config.data.vocab_size)

  def _source(self, anns, root, split):
    """Captions through LAVIS's blip_caption processor, tokenized as LAVIS (padding to max_txt_len)."""
    texts = [pre_caption(a["caption"], self.config.data.max_words) for a in anns]
    enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.model_config.max_txt_len)
    arrays = {"input_ids": np.asarray(enc["input_ids"], np.int32),
              "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    cut = int((arrays["attention_mask"][:, -1] == 1).sum())
    if cut:
      logging.info("%d of %d captions reach max_txt_len %d", cut, len(texts), self.model_config.max_txt_len)
    return image_text.ImageTextSource([os.path.join(root, a["image"]) for a in anns], arrays, self.processor)

  # ---------------------------------------------------------------------------------- model
  def init(self, rng):
    pixels = blip2_lib.dummy_inputs(self.model_config)[0]
    return self.model.init(rng, pixels, method=_touch_params)["params"]

  def pretrained(self):
    init = self.config.init
    out = {}
    if init.vision:
      c = self.model_config.vision
      vit = convert_part(init.vision, "eva_vit", {f.name: getattr(c.replace(use_ln_vision=False), f.name)
                                                  for f in dataclasses.fields(c)})
      out["visual_encoder"] = vit
    if init.pretrained:
      out.update(convert_whole(init.pretrained, self.model_config))
    return out or None

  def forward(self, params, batch, rng, train):
    r_neg, r_drop = jax.random.split(rng)
    return self.model.apply({"params": params}, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                            rng=r_neg, deterministic=not train, rngs={"dropout": r_drop} if train else None)

  def loss(self, params, batch, rng, train=True):
    out = self.forward(params, batch, rng, train)
    return out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm,
                      "weight": jnp.float32(batch["input_ids"].shape[0])}

  def eval_step(self, params, batch, rng):
    out = self.forward(params, batch, rng, False)
    ids = batch["input_ids"]
    same_text = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)  # [B, B] caption i == caption j
    i2t = jnp.argmax(out.sim_i2t, axis=1)
    t2i = jnp.argmax(out.sim_t2i, axis=1)
    rows = jnp.arange(ids.shape[0])
    return {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm,
            "i2t_r1": jnp.mean(same_text[rows, i2t].astype(jnp.float32)),
            "t2i_r1": jnp.mean(same_text[t2i, rows].astype(jnp.float32)),
            "weight": jnp.float32(ids.shape[0])}

  def describe(self):
    c = self.model_config
    v, q = c.vision, c.qformer
    return {"model": f"BLIP-2 stage 1: EVA ViT {v.num_hidden_layers}x{v.hidden_size}@{v.image_size}px/{v.patch_size}, "
                     f"Q-Former {q.num_hidden_layers}x{q.hidden_size} ({c.num_query_tokens} queries, cross-attn every "
                     f"{q.cross_attention_freq}), ITC dim {c.embed_dim}",
            "data": f"{len(self.train_source)} train / {len(self.val_source) if self.val_source else 0} val captions "
                    f"from {self.base_dir}",
            "tokenizer": f"{len(self.tokenizer)} tokens ([DEC] = {q.bos_token_id}), max_txt_len {c.max_txt_len}"}
