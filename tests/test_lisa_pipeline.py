"""grain pipelines of LISA batches: determinism, checkpointable iterator state, host sharding,
skip counts in the batch, validation passes, and the TFDS array_record round trip."""

import json
import os
import pickle
from unittest import mock

import numpy as np
import pytest

from jaxlisa.data import lisa_pipeline as P
from jaxlisa.data import synthetic_shapes as S
from jaxlisa.data.lisa_collate import CollateConfig
from jaxlisa.data.lisa_datasets import (LisaSource, ReasonSegDataset, ValDataset, build_hybrid,
                                        get_mask_from_json, make_sample)
from jaxlisa.data.lisa_datasets import common
from jaxlisa.data.preprocess import load_image

CFG = CollateConfig(images_per_batch=2, num_image_tokens=4, clip_size=32, clip_crop=32, sam_size=64,
                    seq_buckets=(64, 128, 256), mask_buckets=(64,))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes"))
  S.write_dataset(out, num_train=16, num_val=4, image_size=48, seed=0)
  return out, S.train_tokenizer(S.read_corpus(out))


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_state_restores_batches(synth):
  out, tok = synth
  hybrid = build_hybrid(out, samples_per_epoch=12, **S.HYBRID_KWARGS)  # 6 batches per epoch
  kw = dict(seed=1, process_index=0, process_count=1)
  it = P.train_iterator(hybrid, tok, CFG, **kw)
  first = _take(it, 3)
  state = it.get_state()
  json.dumps(state)
  nxt = _take(it, 5)  # crosses into the second epoch
  it2 = P.train_iterator(hybrid, tok, CFG, **kw)
  it2.set_state(state)
  assert all(_same(a, b) for a, b in zip(nxt, _take(it2, 5)))
  again = _take(P.train_iterator(hybrid, tok, CFG, **kw), 3)
  assert all(_same(a, b) for a, b in zip(first, again))
  other = _take(P.train_iterator(hybrid, tok, CFG, **dict(kw, seed=2)), 3)
  assert not all(_same(a, b) for a, b in zip(first, other))
  batches = first + nxt
  assert not any(b["num_dropped"].any() for b in batches)
  assert batches[0]["input_ids"].shape[:2] == (2, 3)  # per-image layout: [I, M, T]
  valid = np.concatenate([b["conv_valid"].ravel() for b in batches])
  segs = np.concatenate([b["mask_valid"][..., 0].ravel() for b in batches])
  assert segs.sum() > 0 and (valid & ~segs).sum() > 0 and not (segs & ~valid).any()  # + text-only


class _KeySource(LisaSource):
  """Item k: an image of height 16 + k with one [SEG] question; items in `bad` are broken files,
  items in `two_seg` have two [SEG] in one answer (a BadSample at encode time)."""

  name = "keys"

  def __init__(self, n, bad=(), two_seg=()):
    self.n, self.bad, self.two_seg = n, set(bad), set(two_seg)

  def __len__(self):
    return self.n

  def read(self, index, rng):
    if index in self.bad:
      raise OSError(f"cannot read item {index}")
    h = 16 + index
    k = 2 if index in self.two_seg else 1
    return make_sample(np.zeros((h, 20, 3), np.uint8), ["<image>\nPlease segment the circle in this image."],
                       [" and ".join(["[SEG]"] * k) + "."], np.ones((k, h, 20), np.uint8), source="keys",
                       image_path=f"k{index}")


def _keys(batches):
  return [int(h) - 16 for b in batches for h, v in zip(b["orig_hw"][:, 0], b["image_valid"]) if v]


def test_hosts_split_keys_and_epochs_reshuffle(synth):
  _, tok = synth
  src = _KeySource(10)
  cfg = CollateConfig(**{**CFG.__dict__, "images_per_batch": 1})
  per_host = []
  for host in (0, 1):
    it = P.train_iterator(src, tok, cfg, seed=3, samples_per_epoch=10, num_epochs=2, random_draw=False,
                          process_index=host, process_count=2)
    per_host.append(_keys(list(it)))
  assert [len(k) for k in per_host] == [10, 10]  # 2 epochs x 5 per host, then the iterator ends
  epoch0 = per_host[0][:5] + per_host[1][:5]
  epoch1 = per_host[0][5:] + per_host[1][5:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(10))
  assert epoch0 != epoch1  # reshuffled
  order = [k for pair in zip(per_host[0][:5], per_host[1][:5]) for k in pair]
  single = _keys(list(P.train_iterator(src, tok, cfg, seed=3, samples_per_epoch=10, num_epochs=1,
                                       random_draw=False, process_index=0, process_count=1)))
  assert order == single  # host h takes elements h, h + 2, ... of the one global stream


def test_skipped_samples_are_counted_in_the_batch(synth):
  _, tok = synth
  src = _KeySource(8, bad=(3, 4), two_seg=(5,))
  cfg = CollateConfig(**{**CFG.__dict__, "images_per_batch": 1})
  common.reset_skip_counts()
  with mock.patch.object(common.logging, "warning") as warn:
    batches = list(P.train_iterator(src, tok, cfg, seed=0, num_epochs=1, random_draw=False,
                                    process_index=0, process_count=1))
  got = {}
  for b in batches:  # the key asked for is unknown here; the key read and the skips are reported
    got.setdefault(_keys([b])[0], []).append(int(b["num_skipped"][0]))
  assert sorted(got[6]) == [0, 1, 2, 3]  # keys 3, 4, 5 all fall through to 6
  assert all(v == [0] for k, v in got.items() if k != 6) and set(got) == {0, 1, 2, 6, 7}
  assert common.skip_counts()["keys"] == 6 and warn.call_count == 6
  assert any("k5" in " ".join(map(str, c.args)) for c in warn.call_args_list)


def test_val_batches(synth):
  out, tok = synth
  val = ValDataset(out, "ReasonSeg|val")
  hosts = []
  for host in range(3):
    stats = {}
    hosts.append(list(P.val_batches(val, tok, CFG, process_index=host, process_count=3, stats=stats)))
    assert stats["batches"] == 2 and stats["skipped"] == 0
  valid = [int(b["image_valid"].sum()) for bs in hosts for b in bs]
  assert sum(valid) == 4 and valid.count(0) == 2  # 4 images over 3 hosts x 2 batches
  for bs in hosts:
    for b in bs:
      if b["image_valid"][0]:
        h, w = b["orig_hw"][0]
        assert b["conv_valid"].sum() == 1 and b["mask_valid"][0, 0, 0] and (h, w) == (48, 48)
  first = hosts[0][0]
  mask, _, _ = get_mask_from_json(val.images[0][:-4] + ".json", (48, 48))
  np.testing.assert_array_equal(first["gt_masks"][0, 0, 0, :48, :48], mask)
  refer = list(P.val_batches(ValDataset(out, "refcoco|unc|val"), tok, CFG, process_index=0, process_count=1))
  assert len(refer) == 4 and all(b["conv_valid"].sum() == b["mask_valid"].sum() >= 2 for b in refer)
  # padded to a mesh's batch shards: the image first, then invalid images with nothing valid
  padded = list(P.val_batches(val, tok, CFG, process_index=0, process_count=1, images_per_batch=4))
  assert len(padded) == 4 and all(b["input_ids"].shape[0] == 4 for b in padded)
  for b, ref in zip(padded, P.val_batches(val, tok, CFG, process_index=0, process_count=1)):
    assert list(b["image_valid"]) == [True, False, False, False] and not b["mask_valid"][1:].any()
    np.testing.assert_array_equal(b["gt_masks"][:1], ref["gt_masks"])
    np.testing.assert_array_equal(b["input_ids"][:1], ref["input_ids"])


def test_tfds_round_trip(synth, tmp_path):
  from jaxlisa.data import tfds_builders as TB
  out, tok = synth
  TB.prepare_reason_seg(out, str(tmp_path))
  src = TB.PreparedReasonSegSource(str(tmp_path), "train")
  direct = ReasonSegDataset(out)
  names = [os.path.basename(p) for p in direct.images]
  assert len(src) == len(direct) == 16
  for i in range(len(src)):
    rec = src.record(i)
    j = names.index(rec["name"])
    np.testing.assert_array_equal(rec["image"], load_image(direct.images[j]))
    want_mask, texts, _ = get_mask_from_json(direct.json_path(j), rec["image"].shape[:2])
    np.testing.assert_array_equal(rec["mask"], want_mask)
    assert rec["texts"] == texts and rec["explanation"] == direct.explanations[rec["name"]]
    a, b = src.read(i, np.random.default_rng(i)), direct.read(j, np.random.default_rng(i))
    assert a["questions"] == b["questions"] and a["answers"] == b["answers"]
    np.testing.assert_array_equal(a["masks"], b["masks"])
  assert len(TB.PreparedReasonSegSource(str(tmp_path), "val")) == 4
  src = pickle.loads(pickle.dumps(src))  # grain workers get a copy
  batches = _take(P.train_iterator(src, tok, CFG, seed=0, random_draw=False, process_index=0,
                                   process_count=1), 3)
  assert all(b["image_valid"].all() and not b["num_dropped"].any() for b in batches)
