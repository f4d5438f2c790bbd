"""LISA training and validation (the official recipe, on any of the supported datasets).

config.model      LisaConfig fields: llava {vision, text, projector_type, ...}, sam {...},
                  seg_token_idx (-1: from the tokenizer), out_dim, max_seg_per_conversation,
                  ce/bce/dice loss weights; text.vocab_size -1 = the tokenizer's size.
config.init       pretrained: a converted jaxlisa LISA directory or an official LISA checkpoint
                  (clip: its CLIP directory; the architecture comes from the checkpoint, the
                  numerics (dtypes, LoRA, remat) and loss weights from config.model); or compose
                  {llava, clip, sam}: LISA assembled from a LLaVA/LLaMA checkpoint, a CLIP
                  directory and an original SAM .pth, as the official train_ds.py starts
                  ('' everywhere = train from scratch).
config.data       base_dir ('' = the synthetic shapes dataset, written to workdir/data once),
                  synthetic {num_train, num_val, image_size, max_shapes, seed}, dataset /
                  sample_rates / *_data / explanatory / num_classes_per_sample (train_ds.py flags),
                  val_dataset, samples_per_epoch, collate {CollateConfig fields}.
Batches are per image ([I, J, ...], jaxlisa/data/lisa_collate.py); config.batch_size counts images.
Validation is teacher-forced as official and reports gIoU / cIoU (jaxlisa/evaluation).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from absl import logging

from jaxlisa import parallel
from jaxlisa.data import lisa_collate, lisa_pipeline, synthetic_shapes
from jaxlisa.data.lisa_datasets import ValDataset, build_hybrid
from jaxlisa.evaluation import seg_metrics
from jaxlisa.models.lisa import Lisa, LisaConfig
from jaxlisa.tasks import model_config
from jaxlisa.training import inference_params, losses
from jaxlisa.training.task import TaskBase


def _resolve_seg_token(d: dict, tokenizer) -> None:
  if d.get("seg_token_idx", -1) == -1:
    d["seg_token_idx"] = lisa_collate.seg_token_index(tokenizer)


def model_config_from(config, tokenizer) -> LisaConfig:
  """LisaConfig from config.model, resolving -1 (auto) fields from the tokenizer."""
  return model_config.from_tokenizer(config, tokenizer, LisaConfig, "llava.text", _resolve_seg_token)


# Fields of config.model that a pretrained checkpoint does not fix (numerics and training choices).
_RUNTIME_TEXT = ("dtype", "param_dtype", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                 "remat_policy", "scan_layers", "attention_impl")
_RUNTIME_TOWER = ("dtype", "param_dtype", "remat_policy", "attention_impl")
_RUNTIME_TOP = ("max_seg_per_conversation", "ce_loss_weight", "bce_loss_weight", "dice_loss_weight",
                "point_prompt_loss_weight")


def with_runtime_fields(pretrained: LisaConfig, config) -> LisaConfig:
  """A checkpoint's LisaConfig with config.model's numerics, LoRA and loss weights."""
  m = config.model
  pick = lambda src, names, have: {k: tuple(v) if isinstance(v, list) else v
                                   for k, v in src.to_dict().items() if k in names and hasattr(have, k)}
  llava = pretrained.llava
  llava = llava.replace(text=llava.text.replace(**pick(m.llava.text, _RUNTIME_TEXT, llava.text)),
                        vision=llava.vision.replace(**pick(m.llava.vision, _RUNTIME_TOWER, llava.vision)))
  sam = pretrained.sam.replace(**pick(m.sam, _RUNTIME_TOWER, pretrained.sam))
  top = {k: m[k] for k in _RUNTIME_TOP if k in m}
  return pretrained.replace(llava=llava, sam=sam, **top)


def collate_config(config, model_config: LisaConfig) -> lisa_collate.CollateConfig:
  c = dict(config.data.collate.to_dict())
  for k in ("seq_buckets", "mask_buckets", "conv_buckets"):
    if k in c:
      c[k] = tuple(c[k])
  return lisa_collate.CollateConfig(
      images_per_batch=config.batch_size, num_image_tokens=model_config.num_image_tokens,
      image_placeholder_id=model_config.llava.image_token_index,
      max_seg_per_conversation=model_config.max_seg_per_conversation,
      clip_size=model_config.llava.vision.image_size, clip_crop=model_config.llava.vision.image_size,
      sam_size=model_config.sam.img_size, **c)


class Task(TaskBase):
  """LISA: CE + BCE + dice on [SEG] masks; gIoU / cIoU validation."""

  def __init__(self, config, workdir: str, model_config: LisaConfig | None = None):
    """model_config: the architecture, given instead of read off the tokenizer / checkpoint (the
    planner's shapes: then init, loss and collate need neither)."""
    super().__init__(config, workdir)
    self.base_dir = config.data.base_dir or os.path.join(workdir, "data")
    self.pretrained_dir = config.init.pretrained
    self.tokenizer_dir = os.path.join(workdir, "tokenizer")
    if model_config is not None:
      self.__dict__["model_config"] = model_config  # the cached_property's value

  def prepare(self):
    """Write the synthetic shapes dataset to workdir/data once (when config.data.base_dir is '') and,
    without pretrained weights, train the tokenizer on its corpus into workdir/tokenizer once."""
    self._ensure_data()
    if not inference_params.has_pretrained(self.config) and "tokenizer" not in self.__dict__:
      self.__dict__["tokenizer"] = self._tokenizer()

  @functools.cached_property
  def _pretrained(self):
    return self._load_pretrained()

  @functools.cached_property
  def tokenizer(self):
    """The pretrained checkpoint's tokenizer, else workdir/tokenizer (prepare() trains it)."""
    if self._pretrained is not None:
      return self._pretrained[2]
    if not os.path.exists(os.path.join(self.tokenizer_dir, "tokenizer.json")):
      raise ValueError(f"no tokenizer in {self.tokenizer_dir}: the task's prepare() trains it (training does)")
    return synthetic_shapes.load_tokenizer(self.tokenizer_dir)

  @functools.cached_property
  def model_config(self) -> LisaConfig:
    if self._pretrained is not None:
      return with_runtime_fields(self._pretrained[0], self.config)
    return model_config_from(self.config, self.tokenizer)

  @functools.cached_property
  def model(self) -> Lisa:
    return Lisa(self.model_config)

  @functools.cached_property
  def collate(self) -> lisa_collate.CollateConfig:
    return collate_config(self.config, self.model_config)

  def _ensure_data(self):
    """Write the synthetic shapes dataset to workdir/data once (config.data.base_dir '')."""
    d = self.config.data
    if not d.base_dir and not os.path.exists(os.path.join(self.base_dir, "corpus.json")):
      s = d.synthetic
      logging.info("writing the synthetic shapes dataset to %s", self.base_dir)
      synthetic_shapes.write_dataset(self.base_dir, num_train=s.num_train, num_val=s.num_val,
                                     image_size=s.image_size, seed=s.seed, max_shapes=s.max_shapes)

  def _load_pretrained(self):
    """(LisaConfig, params, tokenizer) from init.pretrained or init.compose, else None."""
    init = self.config.init
    compose = init.get("compose", {})
    heads = init.get("sam_decoder_num_heads", 0)
    sam_overrides = {"decoder_num_heads": int(heads)} if heads else None  # a .pth cannot say it
    if self.pretrained_dir:
      from jaxlisa.conversion.loaders import load_lisa  # pylint: disable=import-outside-toplevel
      pre = load_lisa(self.pretrained_dir, clip_src=init.clip or None, sam_overrides=sam_overrides)
      if pre.tokenizer is None:
        raise ValueError(f"{self.pretrained_dir} has no tokenizer files (tokenizer.json / tokenizer.model)")
      return pre.config, pre.params, pre.tokenizer
    if compose and compose.get("llava"):
      from jaxlisa.conversion.loaders import compose_lisa  # pylint: disable=import-outside-toplevel
      m = self.config.model
      cfg, params, tok = compose_lisa(compose.llava, compose.clip or None, compose.sam,
                                      compose.get("tokenizer") or compose.llava,
                                      use_mm_start_end=m.llava.mm_use_im_start_end,
                                      vision_select_layer=m.llava.vision_feature_layer,
                                      max_seg_per_conversation=m.max_seg_per_conversation,
                                      sam_overrides=sam_overrides)
      return cfg, params, tok
    return None

  def _tokenizer(self):
    tok_dir = self.tokenizer_dir
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
      return synthetic_shapes.load_tokenizer(tok_dir)
    tok = synthetic_shapes.train_tokenizer(synthetic_shapes.read_corpus(self.base_dir), tok_dir,
                                           vocab_size=self.config.data.synthetic.vocab_size,
                                           seg_lstrip=self.config.data.synthetic.seg_lstrip,
                                           model_max_length=self.config.data.collate.model_max_length)
    return tok

  # ---------------------------------------------------------------------------------- model
  def init(self, rng):
    return self.model.init(rng, *self.model_config.dummy_inputs())["params"]

  def pretrained(self):
    return self._pretrained[1] if self._pretrained is not None else None

  def forward(self, params, batch, rng=None, train=False, prompt_points=None):
    out = self.model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["clip_pixels"],
        batch["sam_pixels"], batch["resize_hw"], batch["orig_hw"], mask_shape=batch["gt_masks"].shape[-2:],
        deterministic=not train, rngs={"dropout": rng} if (train and rng is not None) else None,
        prompt_points=prompt_points)
    return out, batch["mask_valid"] & out.seg_valid

  def loss(self, params, batch, rng, train=True):
    c = self.model_config
    points = point_valid = None
    if c.point_prompt_loss_weight and train and rng is not None:
      rng, point_rng = jax.random.split(rng)
      points, point_valid = losses.sample_mask_points(point_rng, batch["gt_masks"], batch["orig_hw"],
                                                      batch["resize_hw"])
    out, valid = self.forward(params, batch, rng, train, prompt_points=points)
    total, aux = losses.lisa_loss(out.logits, batch["labels"], out.pred_masks, batch["gt_masks"], valid,
                                  batch["orig_hw"], ce_weight=c.ce_loss_weight, bce_weight=c.bce_loss_weight,
                                  dice_weight=c.dice_loss_weight)
    if points is not None:
      bce, dice = losses.batch_mask_losses(out.point_masks, batch["gt_masks"], valid & point_valid,
                                           batch["orig_hw"])
      point_loss = c.bce_loss_weight * bce + c.dice_loss_weight * dice
      total = total + c.point_prompt_loss_weight * point_loss
      aux["point_prompt_loss"] = point_loss
    aux["weight"] = jnp.sum(batch["image_valid"]).astype(jnp.float32)
    return total, aux

  # ---------------------------------------------------------------------------------- data
  def train_data(self):
    d = self.config.data
    if d.base_dir:
      source = build_hybrid(d.base_dir, d.dataset, tuple(float(x) for x in d.sample_rates.split(",")),
                            samples_per_epoch=d.samples_per_epoch, seed=self.config.seed,
                            num_classes_per_sample=d.num_classes_per_sample, sem_seg_data=d.sem_seg_data,
                            refer_seg_data=d.refer_seg_data, vqa_data=d.vqa_data,
                            reason_seg_data=d.reason_seg_data, explanatory=d.explanatory)
    else:
      source = build_hybrid(self.base_dir, d.dataset, tuple(float(x) for x in d.sample_rates.split(",")),
                            samples_per_epoch=d.samples_per_epoch, seed=self.config.seed,
                            num_classes_per_sample=d.num_classes_per_sample, explanatory=d.explanatory,
                            **synthetic_shapes.HYBRID_KWARGS)
    return lisa_pipeline.train_iterator(source, self.tokenizer, self.collate, seed=self.config.seed,
                                        samples_per_epoch=d.samples_per_epoch)

  def eval_data(self):
    d = self.config.data
    if not d.val_dataset:
      return None
    val = ValDataset(self.base_dir, d.val_dataset)
    # one image per batch, padded with invalid images to the batch shards (data x fsdp) of config.mesh
    sizes = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(self.config.mesh.to_dict(), jax.device_count())))
    shards = math.prod(sizes[a] for a in parallel.BATCH_AXES)
    return lisa_pipeline.val_batches(val, self.tokenizer, self.collate, images_per_batch=shards)

  def eval_step(self, params, batch, rng):
    out, valid = self.forward(params, batch)
    region = losses.valid_region(batch["orig_hw"][:, None, None, :], out.pred_masks.shape[-2:])
    inter, union = seg_metrics.intersection_union(out.pred_masks, batch["gt_masks"], region)
    v = valid.astype(jnp.float32)
    n = v.sum()
    per = lambda x: (x * v).sum() / jnp.maximum(n, 1.0)
    return {"weight": n, "giou": per(seg_metrics.mask_iou(inter, union)), "inter": per(inter),
            "union": per(union)}

  def eval_summary(self, means):
    return {"giou": means["giou"], "ciou": means["inter"] / (means["union"] + 1e-10)}

  def describe(self):
    c = self.model_config
    t, v, s = c.llava.text, c.llava.vision, c.sam
    return {"model": f"LISA: CLIP {v.num_hidden_layers}x{v.hidden_size}@{v.image_size}px "
                     f"({c.num_image_tokens} tokens), LLM {t.family} {t.num_hidden_layers}x{t.hidden_size} "
                     f"(vocab {t.vocab_size}, lora r{t.lora_rank}), SAM {s.depth}x{s.embed_dim}@{s.img_size}px",
            "data": self.config.data.base_dir or f"synthetic shapes in {self.base_dir}",
            "tokenizer": f"{len(self.tokenizer)} tokens, [SEG] = {c.seg_token_idx}"}
