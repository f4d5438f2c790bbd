"""LISA batches with static shapes: per-sample encoding, then a pure-numpy collate.

`SampleEncoder(tokenizer, cfg)(sample)` (per image, in a grain map): renders each conversation
with the `cfg.conv_type` template, "<image>" -> "<im_start><image><im_end>" (use_mm_start_end),
tokenizes and masks it as LISA's collate_fn (`tokenization.preprocess_lisa`), cuts training
sequences to `model_max_length - num_image_tokens + 1` tokens before expansion (LISA's
`model_max_length - 255`), expands the image token to `num_image_tokens` placeholders, and
preprocesses the image for CLIP (original image) and SAM. It raises BadSample (the pipeline skips
and counts the sample) when a conversation holds more than `max_seg_per_conversation` [SEG]s, the
[SEG] tokens do not match the answers, a conversation has no single "<image>", or the image is
larger than the largest mask bucket. Training samples keep their first
`max_conversations_per_image` conversations.

`collate(encoded, cfg)` -> LisaBatch, a dict of numpy arrays. Sizes: images I =
cfg.images_per_batch, conversation slots per image M (max_conversations_per_image; inference: the
smallest `conv_buckets` entry >= the most conversations of an image), K = max_seg_per_conversation.
With cfg.layout = "per_image" (default; what models/lisa.py takes) every conversation field leads
with [I, M]; with "flat" it leads with C = I * M rows (shapes below are written flat):

  input_ids       int32 [C, T]  right-padded with pad_token_id; image placeholders hold
                                image_placeholder_id (default -200, never a real id; set it to the
                                model's image_token_index)
  labels          int32 [C, T]  IGNORE_INDEX (-100) on prompt, image and padding
  attention_mask  int32 [C, T]  1 on every real position (placeholders included)
  image_token_mask bool [C, T]  True on the num_image_tokens placeholder positions
  seg_positions   int32 [C, K]  position of the k-th [SEG] token in input_ids (0 if invalid); LISA
                                takes the hidden state at seg_positions - 1
  image_index     int32 [C]     the image each conversation row belongs to
  conv_valid      bool  [C]
  gt_masks        uint8 [C, K, Hb, Wb]  the masks of each conversation's [SEG]s in order, at the
                                original resolution, zero-padded bottom / right; 255 = ignore
  mask_valid      bool  [C, K]  True for each [SEG] present in input_ids (truncation can cut one)
  clip_pixels     float32 [I, crop, crop, 3]; sam_pixels float32 [I, S, S, 3] (zero-padded)
  image_valid     bool  [I];  resize_hw int32 [I, 2] (SAM size before padding); orig_hw int32 [I, 2]
  num_conversations int32 [I]   LISA's offset = [0] + cumsum(num_conversations)
  num_skipped     int32 [I]     unreadable samples skipped while drawing image i
  num_dropped     int32 [I]     conversations whose labels were blanked (token count mismatch)

T is the smallest `seq_buckets` entry >= the longest sequence; Hb = Wb the smallest `mask_buckets`
entry >= the largest original image side. Every leaf of a per_image batch leads with I, so any
split of the batch dim (data shards, the trainer's strided microbatches) keeps conversations with
their image. Flat rows: image i's m-th conversation is row `conversation_rows(I, M,
microbatches)[i, m]`; with microbatches = 1 that is i * M + m; with k microbatches rows are
interleaved so that after the trainer's strided split (rows j, j + k, ...) and any even split into
contiguous shards, row r of every piece still belongs to image r // M of that piece. Unlike LISA,
attention_mask is 1 on an in-text <unk> (LISA's mask is input_ids != pad); such a conversation
fails the token count check and carries no labels anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypedDict

import numpy as np
from absl import logging

from jaxlisa.data.conversation import (DEFAULT_IMAGE_TOKEN, DEFAULT_SEG_TOKEN, IGNORE_INDEX,
                                       IMAGE_TOKEN_INDEX, get_template)
from jaxlisa.data.lisa_datasets.common import (BadSample, Sample, conversation_turns, render_conversations,
                                               seg_counts)
from jaxlisa.data.preprocess import clip_preprocess, sam_preprocess
from jaxlisa.data.tokenization import expand_image_tokens, preprocess_lisa


@dataclasses.dataclass(frozen=True)
class CollateConfig:
  images_per_batch: int = 2                  # I (per host)
  max_conversations_per_image: int = 3       # M (training; LISA num_classes_per_sample)
  max_seg_per_conversation: int = 1          # K
  num_image_tokens: int = 256                # CLIP-L/14 at 224 px
  image_placeholder_id: int = IMAGE_TOKEN_INDEX  # never a real or pad id; match the model's
  pad_token_id: int = 0                      # LISA pads with <unk>
  model_max_length: int = 512
  conv_type: str = "llava_v1"
  use_mm_start_end: bool = True
  clip_size: int = 224
  clip_crop: int = 224
  sam_size: int = 1024
  seq_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  mask_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  conv_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # inference conversations per image
  layout: str = "per_image"                  # "per_image": [I, M, ...]; "flat": [I * M, ...]
  microbatches: int = 1                      # flat layout: the trainer's grad_accum (interleaving)

  def __post_init__(self):
    if self.layout not in ("per_image", "flat"):
      raise ValueError(f"layout must be 'per_image' or 'flat', got {self.layout!r}")
    if self.layout == "per_image" and self.microbatches != 1:
      raise ValueError("microbatches (row interleaving) only applies to the flat layout")

  @property
  def truncate_len(self) -> int:
    """LISA's training cut before image expansion: model_max_length - 255 for 256 image tokens."""
    return self.model_max_length - self.num_image_tokens + 1


class LisaBatch(TypedDict):
  """See the module docstring for shapes and meaning."""
  input_ids: np.ndarray
  labels: np.ndarray
  attention_mask: np.ndarray
  image_token_mask: np.ndarray
  seg_positions: np.ndarray
  image_index: np.ndarray
  conv_valid: np.ndarray
  gt_masks: np.ndarray
  mask_valid: np.ndarray
  clip_pixels: np.ndarray
  sam_pixels: np.ndarray
  image_valid: np.ndarray
  resize_hw: np.ndarray
  orig_hw: np.ndarray
  num_conversations: np.ndarray
  num_skipped: np.ndarray
  num_dropped: np.ndarray


def bucket(n: int, buckets: Sequence[int], what: str = "size") -> int:
  """The smallest bucket >= n (ValueError when none is)."""
  for b in sorted(buckets):
    if b >= n:
      return int(b)
  raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}")


def conversation_rows(images: int, convs: int, microbatches: int = 1) -> np.ndarray:
  """[images, convs] row of image i's m-th conversation (module docstring)."""
  if images % microbatches:
    raise ValueError(f"{images} images per batch do not split into {microbatches} microbatches")
  i, m = np.meshgrid(np.arange(images), np.arange(convs), indexing="ij")
  block, r = np.divmod(i, microbatches)
  return (block * convs * microbatches + m * microbatches + r).astype(np.int32)


CONVERSATION_FIELDS = ("input_ids", "labels", "attention_mask", "image_token_mask", "seg_positions",
                       "image_index", "conv_valid", "gt_masks", "mask_valid")


def batch_shapes(cfg: CollateConfig, seq_len: int, mask_size: int, convs: int | None = None,
                 images: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{field: (shape, dtype)} of a batch with these sizes (e.g. to build abstract model inputs)."""
  i = cfg.images_per_batch if images is None else images
  m = cfg.max_conversations_per_image if convs is None else convs
  c = (i, m) if cfg.layout == "per_image" else (i * m,)
  k, t, s = cfg.max_seg_per_conversation, seq_len, cfg.sam_size
  i32, u8, f32, b = np.dtype(np.int32), np.dtype(np.uint8), np.dtype(np.float32), np.dtype(bool)
  return {"input_ids": (c + (t,), i32), "labels": (c + (t,), i32), "attention_mask": (c + (t,), i32),
          "image_token_mask": (c + (t,), b), "seg_positions": (c + (k,), i32), "image_index": (c, i32),
          "conv_valid": (c, b), "gt_masks": (c + (k, mask_size, mask_size), u8),
          "mask_valid": (c + (k,), b), "clip_pixels": ((i, cfg.clip_crop, cfg.clip_crop, 3), f32),
          "sam_pixels": ((i, s, s, 3), f32), "image_valid": ((i,), b), "resize_hw": ((i, 2), i32),
          "orig_hw": ((i, 2), i32), "num_conversations": ((i,), i32), "num_skipped": ((i,), i32),
          "num_dropped": ((i,), i32)}


def split_conversations(sample: Sample, max_conversations: int) -> list[Sample]:
  """A sample with many conversations (a refCOCO val image) as several samples of at most
  max_conversations each, masks split with them (the per-mask metrics are unchanged)."""
  turns, counts = conversation_turns(sample), seg_counts(sample)
  if sample.get("multi_turn") or len(turns) <= max_conversations:
    return [sample]
  out, start = [], 0
  for c in range(0, len(turns), max_conversations):
    n = sum(counts[c:c + max_conversations])
    part = dict(sample, questions=sample["questions"][c:c + max_conversations],
                answers=sample["answers"][c:c + max_conversations],
                masks=sample["masks"][start:start + n])
    out.append(part)
    start += n
  return out


def seg_token_index(tokenizer) -> int:
  """LISA's seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0], checked to
  be the only id (a LLaMA-2 tokenizer can give [29871, [SEG]], LISA issue #55)."""
  ids = tokenizer(DEFAULT_SEG_TOKEN, add_special_tokens=False).input_ids
  if len(ids) != 1:
    raise ValueError(f"[SEG] tokenizes to {ids}, not a single id: the [SEG] positions would be wrong")
  return int(ids[0])


class SampleEncoder:
  """sample -> encoded sample (module docstring); picklable for grain workers."""

  def __init__(self, tokenizer, cfg: CollateConfig):
    self.tokenizer, self.cfg = tokenizer, cfg
    self.template = get_template(cfg.conv_type)
    self.seg_token_id = seg_token_index(tokenizer)
    if tokenizer.pad_token_id != cfg.pad_token_id:
      raise ValueError(f"tokenizer pad id {tokenizer.pad_token_id} != cfg.pad_token_id {cfg.pad_token_id}")
    if cfg.image_placeholder_id == self.seg_token_id:
      raise ValueError("image_placeholder_id must differ from the [SEG] id")

  def __call__(self, sample: Sample) -> dict:
    cfg, inference = self.cfg, bool(sample.get("inference", False))
    convs, counts = render_conversations(sample, self.template), seg_counts(sample)
    masks = sample["masks"]
    if max(counts) > cfg.max_seg_per_conversation:
      raise BadSample(f"{sample['image_path']}: {max(counts)} [SEG] in one conversation > "
                      f"max_seg_per_conversation {cfg.max_seg_per_conversation}")
    if not inference and len(convs) > cfg.max_conversations_per_image:
      convs, counts = convs[:cfg.max_conversations_per_image], counts[:cfg.max_conversations_per_image]
      masks = masks[:sum(counts)]
    h, w = sample["image"].shape[:2]
    if max(h, w) > max(cfg.mask_buckets):
      raise BadSample(f"{sample['image_path']}: image {h}x{w} exceeds the largest mask bucket")
    enc = {"input_ids": [], "labels": [], "image_token_mask": [], "seg_positions": [], "dropped": []}
    for conv, count in zip(convs, counts):
      if conv.count(DEFAULT_IMAGE_TOKEN) != 1:
        raise BadSample(f"{sample['image_path']}: a conversation needs exactly one {DEFAULT_IMAGE_TOKEN}")
      tok = preprocess_lisa(conv, self.tokenizer, self.template, max_length=cfg.model_max_length,
                            use_mm_start_end=cfg.use_mm_start_end)
      if int((tok.input_ids == self.seg_token_id).sum()) != count:
        raise BadSample(f"{sample['image_path']}: [SEG] tokens do not match the {count} in the answers")
      cut = None if inference else cfg.truncate_len
      ex = expand_image_tokens(tok.input_ids[:cut], tok.labels[:cut], cfg.num_image_tokens,
                               cfg.image_placeholder_id)
      enc["input_ids"].append(ex.input_ids.astype(np.int32))
      enc["labels"].append(ex.labels.astype(np.int32))
      enc["image_token_mask"].append(ex.image_positions)
      enc["seg_positions"].append(np.flatnonzero((ex.input_ids == self.seg_token_id)
                                                 & ~ex.image_positions).astype(np.int32))
      enc["dropped"].append(bool(tok.dropped))
    sam, resize = sam_preprocess(sample["image"], cfg.sam_size)
    enc.update(seg_counts=list(counts), masks=np.asarray(masks, np.uint8),
               clip_pixels=clip_preprocess(sample["image"], cfg.clip_size, cfg.clip_crop),
               sam_pixels=sam, resize_hw=np.asarray(resize, np.int32),
               orig_hw=np.asarray((h, w), np.int32), inference=inference,
               num_skipped=int(sample.get("num_skipped", 0)), image_path=sample["image_path"],
               source=sample["source"])
    return enc


def collate(encoded: Sequence[dict], cfg: CollateConfig, inference: bool | None = None,
            images_per_batch: int | None = None) -> LisaBatch:
  """Encoded samples (at most images_per_batch; missing ones become invalid padding images)
  -> LisaBatch (module docstring)."""
  encoded = list(encoded)
  inference = any(e["inference"] for e in encoded) if inference is None else inference
  n_img = cfg.images_per_batch if images_per_batch is None else images_per_batch
  if len(encoded) > n_img:
    raise ValueError(f"{len(encoded)} samples for {n_img} images per batch")
  most = max([len(e["input_ids"]) for e in encoded] + [1])
  if inference:
    m_conv = bucket(most, cfg.conv_buckets, "conversations per image")
  else:
    m_conv = cfg.max_conversations_per_image
    if most > m_conv:
      raise ValueError(f"an image has {most} conversations > max_conversations_per_image {m_conv}")
  k_seg = cfg.max_seg_per_conversation
  per_image = cfg.layout == "per_image"
  rows = conversation_rows(n_img, m_conv, 1 if per_image else cfg.microbatches)
  n_conv = n_img * m_conv
  longest = max([len(x) for e in encoded for x in e["input_ids"]] + [1])
  if longest > max(cfg.seq_buckets):
    logging.warning("a sequence of %d tokens is cut to the largest bucket %d", longest, max(cfg.seq_buckets))
  t = bucket(min(longest, max(cfg.seq_buckets)), cfg.seq_buckets, "sequence length")
  side = bucket(max([int(max(e["orig_hw"])) for e in encoded] + [1]), cfg.mask_buckets, "image side")

  out = {
      "input_ids": np.full((n_conv, t), cfg.pad_token_id, np.int32),
      "labels": np.full((n_conv, t), IGNORE_INDEX, np.int32),
      "attention_mask": np.zeros((n_conv, t), np.int32),
      "image_token_mask": np.zeros((n_conv, t), bool),
      "seg_positions": np.zeros((n_conv, k_seg), np.int32),
      "image_index": np.zeros((n_conv,), np.int32),
      "conv_valid": np.zeros((n_conv,), bool),
      "gt_masks": np.zeros((n_conv, k_seg, side, side), np.uint8),
      "mask_valid": np.zeros((n_conv, k_seg), bool),
      "clip_pixels": np.zeros((n_img, cfg.clip_crop, cfg.clip_crop, 3), np.float32),
      "sam_pixels": np.zeros((n_img, cfg.sam_size, cfg.sam_size, 3), np.float32),
      "image_valid": np.zeros((n_img,), bool),
      "resize_hw": np.zeros((n_img, 2), np.int32),
      "orig_hw": np.zeros((n_img, 2), np.int32),
      "num_conversations": np.zeros((n_img,), np.int32),
      "num_skipped": np.zeros((n_img,), np.int32),
      "num_dropped": np.zeros((n_img,), np.int32),
  }
  out["image_index"][rows.reshape(-1)] = np.repeat(np.arange(n_img, dtype=np.int32), m_conv)
  for i, e in enumerate(encoded):
    h, w = (int(x) for x in e["orig_hw"])
    first_mask = 0
    for m, ids in enumerate(e["input_ids"]):
      r, n = rows[i, m], min(len(ids), t)
      out["input_ids"][r, :n] = ids[:n]
      out["labels"][r, :n] = e["labels"][m][:n]
      out["attention_mask"][r, :n] = 1
      out["image_token_mask"][r, :n] = e["image_token_mask"][m][:n]
      out["conv_valid"][r] = True
      pos = e["seg_positions"][m]
      pos = pos[pos < t][:k_seg]
      kept = len(pos)
      out["seg_positions"][r, :kept] = pos
      out["mask_valid"][r, :kept] = True
      out["gt_masks"][r, :kept, :h, :w] = e["masks"][first_mask:first_mask + kept]
      first_mask += e["seg_counts"][m]
    out["clip_pixels"][i] = e["clip_pixels"]
    out["sam_pixels"][i] = e["sam_pixels"]
    out["image_valid"][i] = True
    out["resize_hw"][i] = e["resize_hw"]
    out["orig_hw"][i] = (h, w)
    out["num_conversations"][i] = len(e["input_ids"])
    out["num_skipped"][i] = e.get("num_skipped", 0)
    out["num_dropped"][i] = sum(e["dropped"])
  if per_image:  # rows are i * M + m
    for name in CONVERSATION_FIELDS:
      out[name] = out[name].reshape(n_img, m_conv, *out[name].shape[1:])
  return out


def collate_samples(samples: Sequence[Sample], tokenizer, cfg: CollateConfig,
                    inference: bool | None = None) -> LisaBatch:
  """Encode + collate in one call (tests, scripts); BadSample propagates. Inference batches hold
  exactly the given images."""
  enc = SampleEncoder(tokenizer, cfg)
  if inference is None:
    inference = any(s.get("inference", False) for s in samples)
  return collate([enc(s) for s in samples], cfg, inference,
                 images_per_batch=len(samples) if inference else None)
