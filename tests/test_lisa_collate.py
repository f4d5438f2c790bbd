"""LISA collate: static shapes and buckets, labels as preprocess_lisa gives them with the image
token expanded by hand here, LISA's offset semantics, gt mask padding / validity, truncation,
microbatch-safe rows, inference batches."""

import numpy as np
import pytest

from jaxlisa.data import conversation as C
from jaxlisa.data import synthetic_shapes as S
from jaxlisa.data.lisa_collate import (CollateConfig, SampleEncoder, collate, collate_samples,
                                       conversation_rows, seg_token_index, split_conversations)
from jaxlisa.data.lisa_datasets import BadSample, make_sample, render_conversations
from jaxlisa.data.preprocess import clip_preprocess, sam_preprocess
from jaxlisa.data.tokenization import preprocess_lisa

N_IMG = 8        # image tokens per image in these tests
PLACEHOLDER = 5
IGNORE, IMAGE = -100, -200


@pytest.fixture(scope="module")
def tok():
  extra = ["What is the cat doing? It sleeps on a mat. Describe it. A small grey cat.",
           "Please segment the dog and the red ball in this image.", "the ball", "dog"]
  return S.train_tokenizer(S.template_texts() + extra * 3, vocab_size=400)


def _cfg(**kw):
  base = dict(images_per_batch=2, max_conversations_per_image=3, num_image_tokens=N_IMG,
              image_placeholder_id=PLACEHOLDER, clip_size=32, clip_crop=32, sam_size=64,
              seq_buckets=(64, 128, 256, 512), mask_buckets=(32, 64, 128), layout="flat")
  base.update(kw)
  return CollateConfig(**base)


def _img(h, w, seed):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _seg_sample(h=30, w=40, n=2, seed=0):
  masks = []
  for k in range(n):
    m = np.zeros((h, w), np.uint8)
    m[k:k + 5, 2 * k:2 * k + 9] = 1
    m[h - 3:, w - 4:] = 255
    masks.append(m)
  qs = [C.SHORT_QUESTION_LIST[k % 4].format(class_name=["dog", "the ball", "cat"][k % 3]) for k in range(n)]
  ans = [C.ANSWER_LIST[k % 5] for k in range(n)]
  return make_sample(_img(h, w, seed), qs, ans, masks, source="test/seg", image_path=f"seg{seed}.jpg")


def _vqa_sample(h=50, w=20):
  return make_sample(_img(h, w, 9), ["<image>\nWhat is the cat doing?", "Describe it."],
                     ["It sleeps on a mat.", "A small grey cat."], None, source="test/vqa",
                     image_path="vqa.jpg", multi_turn=True)


def _expected_row(ids, labels, t, pad):
  """Image token -> N_IMG placeholders (labels IGNORE), right-padded to t; done by hand."""
  ids, labels = list(ids), list(labels)
  p = ids.index(IMAGE)
  e_ids = ids[:p] + [PLACEHOLDER] * N_IMG + ids[p + 1:]
  e_lab = labels[:p] + [IGNORE] * N_IMG + labels[p + 1:]
  n = len(e_ids)
  return (np.array(e_ids + [pad] * (t - n)), np.array(e_lab + [IGNORE] * (t - n)),
          np.array([1] * n + [0] * (t - n)), np.arange(t) - p)


def test_batch_contract(tok):
  cfg = _cfg()
  samples = [_seg_sample(), _vqa_sample()]
  b = collate_samples(samples, tok, cfg)
  tmpl = C.llava_v1
  convs = [render_conversations(s, tmpl) for s in samples]
  ref = [[preprocess_lisa(c, tok, tmpl, max_length=512, truncate_len=cfg.truncate_len) for c in cs]
         for cs in convs]
  longest = max(len(r.input_ids) - 1 + N_IMG for rs in ref for r in rs)
  t = min(x for x in cfg.seq_buckets if x >= longest)
  m, k = cfg.max_conversations_per_image, cfg.max_seg_per_conversation
  want = {"input_ids": ((6, t), np.int32), "labels": ((6, t), np.int32), "attention_mask": ((6, t), np.int32),
          "image_token_mask": ((6, t), bool), "seg_positions": ((6, k), np.int32), "image_index": ((6,), np.int32),
          "conv_valid": ((6,), bool), "gt_masks": ((6, k, 64, 64), np.uint8), "mask_valid": ((6, k), bool),
          "clip_pixels": ((2, 32, 32, 3), np.float32), "sam_pixels": ((2, 64, 64, 3), np.float32),
          "image_valid": ((2,), bool), "resize_hw": ((2, 2), np.int32), "orig_hw": ((2, 2), np.int32),
          "num_conversations": ((2,), np.int32), "num_skipped": ((2,), np.int32), "num_dropped": ((2,), np.int32)}
  assert set(b) == set(want)
  for name, (shape, dtype) in want.items():
    assert b[name].shape == shape and b[name].dtype == dtype, name
  seg = seg_token_index(tok)
  for i, rs in enumerate(ref):
    for j, r in enumerate(rs):
      row = i * m + j
      ids, labels, attn, rel = _expected_row(r.input_ids, r.labels, t, tok.pad_token_id)
      np.testing.assert_array_equal(b["input_ids"][row], ids)
      np.testing.assert_array_equal(b["labels"][row], labels)
      np.testing.assert_array_equal(b["attention_mask"][row], attn)
      np.testing.assert_array_equal(b["image_token_mask"][row], (rel >= 0) & (rel < N_IMG))
      assert not r.dropped
  # The loss falls exactly on the answers (+ "</s>").
  for row, answer in ((0, samples[0]["answers"][0]), (1, samples[0]["answers"][1])):
    lab = b["labels"][row]
    assert tok.decode(lab[lab != IGNORE]).replace(" ", "") == (answer + "</s>").replace(" ", "")
  # [SEG] positions and masks.
  assert list(b["conv_valid"]) == [True, True, False, True, False, False]
  assert list(b["mask_valid"][:, 0]) == [True, True, False, False, False, False]
  for row in (0, 1):
    assert b["input_ids"][row, b["seg_positions"][row, 0]] == seg
    assert b["labels"][row, b["seg_positions"][row, 0]] == seg
    want_mask = np.zeros((64, 64), np.uint8)
    want_mask[:30, :40] = samples[0]["masks"][row]
    np.testing.assert_array_equal(b["gt_masks"][row, 0], want_mask)
    assert (b["gt_masks"][row, 0] == 255).sum() == 3 * 4
  assert not b["gt_masks"][2:].any() and not b["seg_positions"][2:].any()
  # Images.
  for i, s in enumerate(samples):
    np.testing.assert_array_equal(b["clip_pixels"][i], clip_preprocess(s["image"], 32, 32))
    sam, hw = sam_preprocess(s["image"], 64)
    np.testing.assert_array_equal(b["sam_pixels"][i], sam)
    assert tuple(b["resize_hw"][i]) == hw and tuple(b["orig_hw"][i]) == s["image"].shape[:2]
  assert tuple(b["resize_hw"][1]) == (64, 26)  # 50x20 -> longest side 64
  assert b["image_valid"].all() and list(b["num_conversations"]) == [2, 1]
  assert not b["num_skipped"].any() and not b["num_dropped"].any()


def _official_offset_and_convs(samples, tmpl):
  """LISA collate_fn: conversation_list.extend(...); cnt += len(conversations); offset.append(cnt)."""
  conversation_list, offset, cnt = [], [0], 0
  for s in samples:
    conversations = render_conversations(s, tmpl)
    conversation_list.extend(conversations)
    cnt += len(conversations)
    offset.append(cnt)
  return offset, conversation_list


def test_offset_semantics_and_padding_image(tok):
  cfg = _cfg(images_per_batch=4)
  samples = [_seg_sample(n=3, seed=1), _vqa_sample(), _seg_sample(n=1, seed=2)]  # 4th image: padding
  b = collate_samples(samples, tok, cfg)
  offset, conversation_list = _official_offset_and_convs(samples, C.llava_v1)
  np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(b["num_conversations"])]), offset + [offset[-1]])
  valid_rows = np.flatnonzero(b["conv_valid"])
  counts = np.diff(offset)
  np.testing.assert_array_equal(b["image_index"][valid_rows], np.repeat(np.arange(3), counts))
  assert len(valid_rows) == len(conversation_list)
  for row, conv in zip(valid_rows, conversation_list):  # same conversations, same order
    r = preprocess_lisa(conv, tok, C.llava_v1, 512, cfg.truncate_len)
    n = len(r.input_ids) - 1 + N_IMG
    assert (b["input_ids"][row, :n] != PLACEHOLDER).sum() == len(r.input_ids) - 1
    np.testing.assert_array_equal(b["input_ids"][row, :n][b["input_ids"][row, :n] != PLACEHOLDER],
                                  [x for x in r.input_ids if x != IMAGE])
  assert list(b["image_valid"]) == [True, True, True, False]
  np.testing.assert_array_equal(b["image_index"], np.arange(12) // 3)
  assert not b["clip_pixels"][3].any() and not b["conv_valid"][9:].any()
  assert not b["attention_mask"][~b["conv_valid"]].any()
  assert (b["labels"][~b["conv_valid"]] == IGNORE).all()


def test_buckets(tok):
  b = collate_samples([_seg_sample(h=70, w=20, n=1)], tok, _cfg(images_per_batch=1))
  assert b["gt_masks"].shape[-2:] == (128, 128)
  sample = _seg_sample(h=20, w=32, n=1)
  b = collate_samples([sample], tok, _cfg(images_per_batch=1))
  assert b["gt_masks"].shape[-2:] == (32, 32)
  n = len(preprocess_lisa(render_conversations(sample, C.llava_v1)[0], tok, C.llava_v1).input_ids) - 1 + N_IMG
  for buckets, t in (((n, n + 1), n), ((n - 1, n + 5), n + 5), ((8, 16, 2 * n), 2 * n)):
    b = collate_samples([sample], tok, _cfg(images_per_batch=1, seq_buckets=buckets))
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, t)
  with pytest.raises(BadSample, match="largest mask bucket"):
    collate_samples([_seg_sample(h=129, w=20, n=1)], tok, _cfg(images_per_batch=1))


def test_truncation_cuts_before_expansion(tok):
  sample = _seg_sample(n=1)
  conv = render_conversations(sample, C.llava_v1)[0]
  full = preprocess_lisa(conv, tok, C.llava_v1, max_length=10_000)
  seg_at = list(full.input_ids).index(seg_token_index(tok))
  cut = seg_at - 3  # LISA keeps model_max_length - (N - 1) tokens before expansion
  cfg = _cfg(images_per_batch=1, model_max_length=cut + N_IMG - 1)
  assert cfg.truncate_len == cut and CollateConfig().truncate_len == 512 - 255
  b = collate_samples([sample], tok, cfg)
  assert b["attention_mask"][0].sum() == cut - 1 + N_IMG
  assert b["conv_valid"][0] and not b["mask_valid"][0, 0] and not b["gt_masks"].any()
  ids, labels, _, _ = _expected_row(full.input_ids[:cut], full.labels[:cut], b["input_ids"].shape[1],
                                    tok.pad_token_id)
  np.testing.assert_array_equal(b["input_ids"][0], ids)
  np.testing.assert_array_equal(b["labels"][0], labels)
  inf = dict(sample, inference=True)  # inference: no truncation
  b = collate_samples([inf], tok, cfg)
  assert b["attention_mask"][0].sum() == len(full.input_ids) - 1 + N_IMG and b["mask_valid"][0, 0]


def test_seg_limits(tok):
  img = _img(20, 20, 3)
  two = make_sample(img, ["<image>\nSegment the dog and the ball."], ["[SEG] and [SEG]."],
                    np.stack([np.eye(20, dtype=np.uint8), np.ones((20, 20), np.uint8)]),
                    source="t", image_path="two.jpg")
  with pytest.raises(BadSample, match="max_seg_per_conversation"):
    collate_samples([two], tok, _cfg(images_per_batch=1))
  b = collate_samples([two], tok, _cfg(images_per_batch=1, max_seg_per_conversation=2))
  assert b["mask_valid"][0].all() and b["seg_positions"][0, 0] < b["seg_positions"][0, 1]
  np.testing.assert_array_equal(b["gt_masks"][0, 0, :20, :20], np.eye(20))
  np.testing.assert_array_equal(b["gt_masks"][0, 1, :20, :20], np.ones((20, 20)))
  in_question = make_sample(img, ["<image>\nWhat is [SEG]?"], ["It is [SEG]."], [np.ones((20, 20), np.uint8)],
                            source="t", image_path="q.jpg")
  with pytest.raises(BadSample, match="do not match"):
    collate_samples([in_question], tok, _cfg(images_per_batch=1))
  no_image = make_sample(img, ["Segment the dog."], ["[SEG]."], [np.ones((20, 20), np.uint8)],
                         source="t", image_path="n.jpg")
  with pytest.raises(BadSample, match="exactly one"):
    collate_samples([no_image], tok, _cfg(images_per_batch=1))
  with pytest.raises(ValueError, match="image_placeholder_id"):
    SampleEncoder(tok, _cfg(image_placeholder_id=seg_token_index(tok)))


def test_mismatch_is_counted(tok):
  bad = make_sample(_img(20, 20, 4), ["<image>\nWhere is the \u20ac sign?"], ["[SEG]."],
                    [np.ones((20, 20), np.uint8)], source="t", image_path="euro.jpg")
  b = collate_samples([bad, _vqa_sample()], tok, _cfg())
  assert list(b["num_dropped"]) == [1, 0] and (b["labels"][0] == IGNORE).all()
  assert b["mask_valid"][0, 0]  # the [SEG] is still there for the mask loss


def test_per_image_layout_is_flat_grouped(tok):
  samples = [_seg_sample(n=3, seed=1), _vqa_sample()]
  flat = collate_samples(samples, tok, _cfg())
  grouped = collate_samples(samples, tok, _cfg(layout="per_image"))
  assert flat.keys() == grouped.keys()
  for name, x in grouped.items():
    assert x.shape[0] == 2, name  # every leaf leads with the images
    np.testing.assert_array_equal(x.reshape(flat[name].shape), flat[name])
  assert grouped["input_ids"].shape[:2] == (2, 3) and grouped["gt_masks"].shape[:3] == (2, 3, 1)
  np.testing.assert_array_equal(grouped["conv_valid"], [[True, True, True], [True, False, False]])
  with pytest.raises(ValueError, match="flat layout"):
    _cfg(layout="per_image", microbatches=2)
  assert CollateConfig().layout == "per_image"


def _to_micro(x, k):
  """The trainer's microbatch split (training/accumulation.py): micro j holds rows j, j + k, ..."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def test_rows_survive_microbatch_and_shard_splits(tok):
  k, n_img, m = 2, 4, 3
  cfg = _cfg(images_per_batch=n_img, microbatches=k)
  samples = [_seg_sample(n=3, seed=5), _vqa_sample(), _seg_sample(n=2, seed=6), _seg_sample(n=1, seed=7)]
  b = collate_samples(samples, tok, cfg)
  rows = conversation_rows(n_img, m, k)
  assert sorted(rows.ravel()) == list(range(n_img * m))
  conv_image = _to_micro(b["image_index"], k)
  image_ids = _to_micro(np.arange(n_img), k)
  orig = _to_micro(b["orig_hw"], k)
  conv_valid = _to_micro(b["conv_valid"], k)
  for j in range(k):
    # Row r of the microbatch belongs to image r // M of the microbatch ...
    np.testing.assert_array_equal(conv_image[j], np.repeat(image_ids[j], m))
    # ... and so does any contiguous half of it (a 2-way data shard).
    half = len(conv_image[j]) // 2
    np.testing.assert_array_equal(conv_image[j][:half], np.repeat(image_ids[j][:len(image_ids[j]) // 2], m))
    for r in np.flatnonzero(conv_valid[j]):
      assert tuple(orig[j][r // m]) == samples[image_ids[j][r // m]]["image"].shape[:2]
  # Every conversation is where the official order says, just permuted by `rows`.
  for i, s in enumerate(samples):
    for c in range(len(render_conversations(s, C.llava_v1))):
      assert b["conv_valid"][rows[i, c]] and b["image_index"][rows[i, c]] == i
  with pytest.raises(ValueError, match="microbatches"):
    conversation_rows(3, 2, 2)


def test_inference_collate(tok):
  n = 5
  masks = [np.full((16, 24), k % 2, np.uint8) for k in range(n)]
  masks[0][:2] = 255
  val = make_sample(_img(16, 24, 8), [f"<image>\n What is dog {k} in this image? Please output segmentation mask."
                                      for k in range(n)], ["[SEG]."] * n, masks, source="val",
                    image_path="v.jpg", inference=True)
  cfg = _cfg(images_per_batch=2, model_max_length=N_IMG + 5)  # would truncate a training sample
  b = collate_samples([val], tok, cfg)
  assert b["input_ids"].shape[0] == 8 and b["image_valid"].shape == (1,)  # C = conv bucket 8
  assert b["conv_valid"].sum() == n and b["mask_valid"][:, 0].sum() == n
  for c in range(n):
    np.testing.assert_array_equal(b["gt_masks"][c, 0, :16, :24], masks[c])
  lab = b["labels"][0]
  assert tok.decode(lab[lab != IGNORE]).replace(" ", "") == "[SEG].</s>"
  parts = split_conversations(val, 2)
  assert [len(p["questions"]) for p in parts] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate([p["masks"] for p in parts]), np.stack(masks))
