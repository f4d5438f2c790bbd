"""LISA dataset families on tiny native-format trees written here, against masks drawn here.

Conventions the expectations rely on (not on the code under test): pycocotools rasterizes the
polygon x0,y0,x1,y0,x1,y1,x0,y1 as the half-open box [y0:y1, x0:x1]; LISA's cv2 fillPoly +
polylines include the boundary, so a ReasonSeg rectangle covers [y0:y1 + 1, x0:x1 + 1]; ADE20K
label v (1..150) is class v - 1, whose names start wall, building, sky, floor, tree.
"""

import io
import json
import os
import pickle
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jaxlisa.data import conversation as C
from jaxlisa.data.lisa_datasets import common
from jaxlisa.data.lisa_datasets import (HybridDataset, LisaSource, ReasonSegDataset, ReferSegDataset,
                                        SemSegDataset, ValDataset, VQADataset, make_sample,
                                        render_conversations)


def _img(h, w, seed):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, arr, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, format=fmt)


def _decoded(path):
  return np.asarray(Image.open(path).convert("RGB"))


def _write(path, text_or_bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode())


def _short_match(q):
  """The lowercase class name a SHORT_QUESTION_LIST question was built from, else None."""
  for t in C.SHORT_QUESTION_LIST:
    pre, post = t.split("{class_name}")
    if q.startswith(pre) and q.endswith(post):
      return q[len(pre):len(q) - len(post)]
  return None


def _rngs(n=12):
  return [np.random.default_rng(s) for s in range(n)]


# --------------------------------------------------------------------------------------- sem_seg
@pytest.fixture(scope="module")
def sem_tree(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("sem"))
  # ADE20K: raw 0 (ignore), 1 (wall), 5 (tree), 255 (ignore).
  ade = np.zeros((30, 40), np.uint8)
  ade[:10, :20] = 1
  ade[10:25, 5:35] = 5
  ade[25:, :] = 255
  _save(f"{base}/ade20k/images/training/a.jpg", _img(30, 40, 0), "JPEG")
  _save(f"{base}/ade20k/annotations/training/a.png", ade, "PNG")
  many = np.repeat(np.arange(1, 5, dtype=np.uint8), 8)[None].repeat(16, 0)  # classes 0..3 in stripes
  _save(f"{base}/ade20k/images/training/b.jpg", _img(16, 32, 1), "JPEG")
  _save(f"{base}/ade20k/annotations/training/b.png", many, "PNG")
  # COCO-Stuff: 0 = person, 95 = building-other (has "-": ignored), 255 unlabeled.
  cs = np.full((24, 24), 255, np.uint8)
  cs[:12] = 0
  cs[12:20] = 95
  _save(f"{base}/cocostuff/train2017/c.png", cs, "PNG")
  _save(f"{base}/coco/train2017/c.jpg", _img(24, 24, 2), "JPEG")
  # Mapillary v2.0: readable names lowercased, no remap.
  _write(f"{base}/mapillary/config_v2.0.json",
         json.dumps({"labels": [{"readable": "Bird"}, {"readable": "Ground Animal"},
                                {"readable": "Unlabeled"}]}))
  mp = np.zeros((20, 20), np.uint8)
  mp[5:, :] = 1
  _save(f"{base}/mapillary/training/v2.0/labels/m.png", mp, "PNG")
  _save(f"{base}/mapillary/training/images/m.jpg", _img(20, 20, 3), "JPEG")
  # PASCAL-Part: COCO json, "obj:part" categories; PACO: "_(...)" suffixes and object classes.
  for name, json_path, img_path, cats in [
      ("pascal_part", "vlpart/pascal_part/train.json",
       "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/p.jpg", ["dog:head", "dog:leg"]),
      ("paco_lvis", "vlpart/paco/annotations/paco_lvis_v1_train.json", "coco/train2017/q.jpg",
       ["bottle_(container):cap_(lid)", "mug_(cup)"])]:
    fname = img_path.split("/")[-1] if name == "pascal_part" else "train2017/q.jpg"
    _save(f"{base}/{img_path}", _img(32, 48, 4), "JPEG")
    coco = {"images": [{"id": 7, "file_name": fname, "height": 32, "width": 48},
                       {"id": 8, "file_name": "none.jpg", "height": 32, "width": 48}],
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(cats)],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 40, "bbox": [2, 3, 8, 5],
                 "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
                {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0, "area": 100, "bbox": [20, 10, 20, 20],
                 "segmentation": [[20, 10, 40, 10, 40, 30, 20, 30]]}]}
    _write(f"{base}/{json_path}", json.dumps(coco))
  return base


def _rect(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), np.uint8)
  m[y0:y1, x0:x1] = 1
  return m


def test_ade20k_remap_and_questions(sem_tree):
  ds = SemSegDataset(sem_tree, "ade20k")
  assert len(ds) == 2
  raw = np.asarray(Image.open(f"{sem_tree}/ade20k/annotations/training/a.png"))
  want = {"wall": (raw == 1), "tree": (raw == 5)}
  for rng in _rngs():
    s = ds.read(0, rng)
    names = [_short_match(q) for q in s["questions"]]
    assert sorted(names) == ["tree", "wall"]  # fewer classes than 3: all of them
    assert all(a in C.ANSWER_LIST for a in s["answers"])
    for n, m in zip(names, s["masks"]):
      np.testing.assert_array_equal(m, want[n].astype(np.uint8))
    np.testing.assert_array_equal(s["image"], _decoded(f"{sem_tree}/ade20k/images/training/a.jpg"))
    assert s["source"] == "sem_seg/ade20k" and s["image_path"].endswith("a.jpg")
  stripes = np.asarray(Image.open(f"{sem_tree}/ade20k/annotations/training/b.png"))
  seen = set()
  for rng in _rngs(30):
    s = ds.read(1, rng)
    names = [_short_match(q) for q in s["questions"]]
    assert len(names) == 3 and len(set(names)) == 3 and set(names) <= {"wall", "building", "sky", "floor"}
    for n, m in zip(names, s["masks"]):
      v = ["wall", "building", "sky", "floor"].index(n) + 1
      np.testing.assert_array_equal(m, (stripes == v).astype(np.uint8))
    seen.add(tuple(names))
  assert len(seen) > 3  # the choice and order vary with rng


def test_cocostuff_mapillary(sem_tree):
  s = SemSegDataset(sem_tree, "cocostuff").read(0, np.random.default_rng(0))
  assert [_short_match(q) for q in s["questions"]] == ["person"]  # building-other is ignored
  np.testing.assert_array_equal(s["masks"][0], _rect(24, 24, 0, 12, 0, 24))
  assert s["image_path"].endswith("coco/train2017/c.jpg")
  s = SemSegDataset(sem_tree, "mapillary").read(0, np.random.default_rng(0))
  got = dict(zip([_short_match(q) for q in s["questions"]], s["masks"]))
  assert sorted(got) == ["bird", "ground animal"]
  np.testing.assert_array_equal(got["ground animal"], _rect(20, 20, 5, 20, 0, 20))
  np.testing.assert_array_equal(got["bird"], _rect(20, 20, 0, 5, 0, 20))


@pytest.mark.parametrize("name,names", [
    ("pascal_part", {"dog head", "the head of the dog", "dog leg", "the leg of the dog"}),
    ("paco_lvis", {"bottle cap", "the cap of the bottle", "mug"})])
def test_part_sets(sem_tree, name, names):
  ds = SemSegDataset(sem_tree, name)
  assert len(ds) == 1  # the image without annotations is not listed
  small, big = _rect(32, 48, 3, 8, 2, 10), _rect(32, 48, 10, 30, 20, 40)
  forms = set()
  for rng in _rngs(16):
    s = ds.read(0, rng)
    got = [_short_match(q) for q in s["questions"]]
    assert len(got) == 2 and set(got) <= names
    forms.update(got)
    for n, m in zip(got, s["masks"]):
      np.testing.assert_array_equal(m, small if ("head" in n or "cap" in n) else big)
  assert forms == names  # both phrasings of the parts show up


def test_sem_seg_draws_subsets_uniformly(sem_tree):
  ds = SemSegDataset(sem_tree, "ade20k||cocostuff||mapillary")
  picks = [ds.draw_index(r) for r in _rngs(300)]
  frac = np.bincount(picks, minlength=4) / 300  # 2 ADE images, 1 COCO-Stuff, 1 Mapillary
  assert abs(frac[:2].sum() - 1 / 3) < 0.08 and abs(frac[2] - 1 / 3) < 0.08


# ------------------------------------------------------------------------------------- refer_seg
REF_SENTS = ["The Man On The LEFT ", "left guy", "a dog", "brown dog lying", "dog on the right"]


@pytest.fixture(scope="module")
def refer_tree(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("refer"))
  h, w = 30, 40
  _save(f"{base}/refer_seg/images/mscoco/images/train2014/COCO_1.jpg", _img(h, w, 5), "JPEG")
  _save(f"{base}/refer_seg/images/mscoco/images/train2014/COCO_2.jpg", _img(h, w, 6), "JPEG")
  rle_mask = np.zeros((h, w), np.uint8)
  rle_mask[12:20, 25:38] = 1
  rle_mask[2:4, 30:33] = 1
  rle = mask_utils.encode(np.asfortranarray(rle_mask))
  anns = [{"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
           "segmentation": [[1, 2, 9, 2, 9, 12, 1, 12], [3, 20, 6, 20, 6, 25, 3, 25]]},
          {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0,
           "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}},
          {"id": 21, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": []}]
  instances = {"images": [{"id": 1, "file_name": "COCO_1.jpg", "height": h, "width": w},
                          {"id": 2, "file_name": "COCO_2.jpg", "height": h, "width": w}],
               "annotations": anns, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}

  def sents(texts, start):
    return [{"sent": t, "sent_id": start + k, "tokens": t.split(), "raw": t} for k, t in enumerate(texts)]
  refs = [{"ref_id": 1, "ann_id": 11, "image_id": 1, "category_id": 1, "split": "train",
           "sentences": sents(REF_SENTS[:2], 100)},
          {"ref_id": 2, "ann_id": 12, "image_id": 1, "category_id": 2, "split": "train",
           "sentences": sents(REF_SENTS[2:], 200)},
          {"ref_id": 3, "ann_id": 21, "image_id": 2, "category_id": 2, "split": "val",
           "sentences": sents(["empty one"], 300)},
          {"ref_id": 4, "ann_id": 12, "image_id": 1, "category_id": 2, "split": "testA",
           "sentences": sents(["test dog"], 400)}]
  _write(f"{base}/refer_seg/refcoco/instances.json", json.dumps(instances))
  _write(f"{base}/refer_seg/refcoco/refs(unc).p", pickle.dumps(refs, protocol=2))
  person = np.zeros((h, w), np.uint8)
  person[2:12, 1:9] = 1
  person[20:25, 3:6] = 1
  return base, {11: person, 12: rle_mask}


def test_refer_seg_polygon_and_rle(refer_tree):
  base, masks = refer_tree
  ds = ReferSegDataset(base, "refcoco")
  assert len(ds) == 1  # image 2 only has a val ref
  by_sent = {t.strip().lower(): 11 if k < 2 else 12 for k, t in enumerate(REF_SENTS)}
  chosen = set()
  for rng in _rngs(20):
    s = ds.read(0, rng)
    names = [_short_match(q) for q in s["questions"]]
    assert len(names) == 3 and len(set(names)) == 3 and set(names) <= set(by_sent)
    chosen.update(names)
    for n, m in zip(names, s["masks"]):
      np.testing.assert_array_equal(m, masks[by_sent[n]])
    assert s["source"] == "refer_seg/refcoco"
  assert chosen == set(by_sent)


def test_refer_val_all_sentences(refer_tree):
  base, masks = refer_tree
  val = ValDataset(base, "refcoco|unc|testA")
  s = val[0]
  assert s["questions"] == ["<image>\n What is test dog in this image? Please output segmentation mask."]
  assert s["answers"] == ["[SEG]."] and s["inference"]
  np.testing.assert_array_equal(s["masks"][0], masks[12])
  val = ValDataset(base, "refcoco|unc|val")  # LISA: an empty segmentation gives an all-zero mask
  s = val[0]
  assert s["masks"].shape == (1, 30, 40) and not s["masks"].any()
  assert "What is empty one in this image?" in s["questions"][0]


# ------------------------------------------------------------------------------------ reason_seg
def _shape(label, x0, y0, x1, y1):
  return {"label": label, "points": [[x0 + 0.7, y0 + 0.2], [x1 + 0.9, y0], [x1, y1 + 0.5], [x0, y1]],
          "shape_type": "polygon"}


@pytest.fixture(scope="module")
def reason_tree(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("reason"))
  d = f"{base}/reason_seg/ReasonSeg"
  _save(f"{d}/train/r1.jpg", _img(40, 50, 7), "JPEG")
  # Target big, ignore small inside it (drawn later: smaller), flag ignored.
  _write(f"{d}/train/r1.json", json.dumps({
      "text": ["What keeps the food cold?", "the cold box", "Where is milk stored?"], "is_sentence": True,
      "shapes": [_shape("target", 5, 5, 30, 30), _shape("ignore", 10, 10, 14, 14),
                 _shape("flag", 0, 0, 49, 39)]}))
  _save(f"{d}/train/r2.jpg", _img(40, 50, 8), "JPEG")
  # Ignore big around a small target: the target is drawn last.
  _write(f"{d}/train/r2.json", json.dumps({
      "text": ["Red Car"], "is_sentence": False,
      "shapes": [_shape("Ignore", 0, 0, 40, 30), _shape("target", 20, 20, 25, 28)]}))
  _write(f"{d}/explanatory/train.json", json.dumps([
      {"image": "r1.jpg", "query": "What keeps the food cold?", "outputs": "The fridge keeps food cold."}]))
  _save(f"{d}/val/v1.jpg", _img(20, 30, 9), "JPEG")
  _write(f"{d}/val/v1.json", json.dumps({"text": ["First query.", "second"], "is_sentence": True,
                                         "shapes": [_shape("target", 2, 2, 20, 10),
                                                    _shape("ignore", 0, 12, 5, 15)]}))
  m1 = np.zeros((40, 50), np.uint8)
  m1[5:31, 5:31] = 1
  m1[10:15, 10:15] = 255
  m2 = np.zeros((40, 50), np.uint8)
  m2[0:31, 0:41] = 255
  m2[20:29, 20:26] = 1
  mv = np.zeros((20, 30), np.uint8)
  mv[2:11, 2:21] = 1
  mv[12:16, 0:6] = 255
  return base, {"r1": m1, "r2": m2, "v1": mv}


def test_reason_seg_masks_and_templates(reason_tree):
  base, masks = reason_tree
  ds = ReasonSegDataset(base, "ReasonSeg|train", explanatory=-1)
  assert [os.path.basename(p) for p in ds.images] == ["r1.jpg", "r2.jpg"]
  long_forms = [t.split("{sent}") for t in C.LONG_QUESTION_LIST]
  for rng in _rngs(6):
    s = ds.read(0, rng)
    assert len(s["questions"]) == 3
    for q, m in zip(s["questions"], s["masks"]):
      assert any(q.startswith(a) and q.endswith(b) for a, b in long_forms)  # is_sentence: LONG
      np.testing.assert_array_equal(m, (masks["r1"] == 1).astype(np.uint8))
    s = ds.read(1, rng)
    assert [_short_match(q) for q in s["questions"]] == ["red car"]
    np.testing.assert_array_equal(s["masks"][0], (masks["r2"] == 1).astype(np.uint8))


def test_reason_seg_explanatory(reason_tree):
  base, masks = reason_tree
  expl = "The fridge keeps food cold."
  ds = ReasonSegDataset(base, "ReasonSeg|train", explanatory=1.0)  # always the text-only answer
  s = ds.read(0, np.random.default_rng(0))
  assert s["masks"].shape == (0, 40, 50) and s["answers"] == [expl] * 3
  assert sorted(q.split("\n", 1)[1] for q in s["questions"]) == sorted(
      ["What keeps the food cold?", "the cold box", "Where is milk stored?"])
  assert ds.read(1, np.random.default_rng(0))["masks"].shape[0] == 1  # no explanation for r2
  ds = ReasonSegDataset(base, "ReasonSeg|train", explanatory=0.0)
  modes = []
  for rng in _rngs(20):
    s = ds.read(0, rng)
    np.testing.assert_array_equal(s["masks"], np.stack([(masks["r1"] == 1).astype(np.uint8)] * 3))
    if s["answers"][0].endswith(expl):
      modes.append(1)
      for q, a in zip(s["questions"], s["answers"]):
        assert a[:-len(expl) - 1] in C.ANSWER_LIST
        text, tail = q[len("<image>\n"):].rsplit(" Please", 1)
        assert text in ["What keeps the food cold?", "the cold box", "Where is milk stored?"]
        assert "Please" + tail in C.EXPLANATORY_QUESTION_LIST
    else:
      modes.append(0)
      assert all(a in C.ANSWER_LIST for a in s["answers"])
  assert 4 <= sum(modes) <= 16  # 1/2 each


def test_reason_seg_val_keeps_ignore(reason_tree):
  base, masks = reason_tree
  s = ValDataset(base, "ReasonSeg|val")[0]
  assert s["questions"] == ["<image>\n First query. Please output segmentation mask."]
  assert s["answers"] == ["[SEG]."]
  np.testing.assert_array_equal(s["masks"][0], masks["v1"])


# ------------------------------------------------------------------------------------------- vqa
def test_vqa_multi_turn(tmp_path):
  base = str(tmp_path)
  _save(f"{base}/coco/train2017/x.jpg", _img(20, 24, 10), "JPEG")
  items = [{"image": "x.jpg", "conversations": [
      {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
      {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Black."}]},
           {"image": "x.jpg", "conversations": [
               {"from": "gpt", "value": "dropped"}, {"from": "human", "value": "<image>\nHi"},
               {"from": "gpt", "value": "Hello."}]}]
  _write(f"{base}/llava_dataset/llava_instruct_150k.json", json.dumps(items))
  ds = VQADataset(base)
  s = ds.read(0, None)
  assert s["questions"] == ["<image>\nWhat is this?", "Color?"] and s["answers"] == ["A cat.", "Black."]
  assert s["multi_turn"] and s["masks"].shape == (0, 20, 24)
  assert render_conversations(s, C.llava_v1) == [
      C.llava_v1.system + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>"]
  s = ds.read(1, None)
  assert s["questions"] == ["<image>\nHi"] and s["answers"] == ["Hello."]


# ------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_skipped_and_counted(tmp_path):
  base = str(tmp_path)
  d = f"{base}/reason_seg/ReasonSeg/train"
  good = {"text": ["x"], "is_sentence": False, "shapes": [_shape("target", 1, 1, 5, 5)]}
  _save(f"{d}/a_ok.jpg", _img(10, 10, 0), "JPEG")
  _write(f"{d}/a_ok.json", json.dumps(good))
  _write(f"{d}/b_corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
  _write(f"{d}/b_corrupt.json", json.dumps(good))
  _save(f"{d}/c_nojson.jpg", _img(10, 10, 1), "JPEG")
  _save(f"{d}/d_nopoly.jpg", _img(10, 10, 2), "JPEG")
  _write(f"{d}/d_nopoly.json", json.dumps(dict(good, shapes=[])))
  _save(f"{d}/e_badjson.jpg", _img(10, 10, 3), "JPEG")
  _write(f"{d}/e_badjson.json", '{"text": ["x"], "shapes": [')
  _save(f"{d}/f_ok.jpg", _img(10, 10, 4), "JPEG")
  _write(f"{d}/f_ok.json", json.dumps(good))
  ds = ReasonSegDataset(base, explanatory=-1)
  assert len(ds) == 6
  common.reset_skip_counts()
  with mock.patch.object(common.logging, "warning") as warn:
    got = [ds.read_or_skip(i, np.random.default_rng(0)) for i in range(6)]
  assert [g is not None for g in got] == [True, False, False, False, False, True]
  assert common.skip_counts() == {"reason_seg": 4}
  named = [" ".join(map(str, c.args)) for c in warn.call_args_list]
  for stem, n in zip(["b_corrupt", "c_nojson", "d_nopoly", "e_badjson"], named):
    assert stem in n
  # Walking the indices: key 1 skips the four bad ones and lands on f_ok.
  with mock.patch.object(common.logging, "warning"):
    s = ds.sample(1, np.random.default_rng(0), random_draw=False)
  assert s["image_path"].endswith("f_ok.jpg") and s["num_skipped"] == 4
  # A missing label file in a semantic set.
  _save(f"{base}/ade20k/images/training/z.jpg", _img(8, 8, 5), "JPEG")
  os.makedirs(f"{base}/ade20k/annotations/training")
  with mock.patch.object(common.logging, "warning") as warn:
    assert SemSegDataset(base, "ade20k").read_or_skip(0, np.random.default_rng(0)) is None
  assert "z.png" in " ".join(map(str, warn.call_args.args))
  assert common.skip_counts()["sem_seg"] == 1


def test_make_sample_checks_masks():
  img = np.zeros((4, 5, 3), np.uint8)
  with pytest.raises(common.BadSample):
    make_sample(img, ["q"], ["It is [SEG]."], None, source="x", image_path="p")
  with pytest.raises(common.BadSample):
    make_sample(img, ["q"], ["It is [SEG]."], np.zeros((1, 5, 4), np.uint8), source="x", image_path="p")
  s = make_sample(img, ["q", "r"], ["It is [SEG].", "no"], [np.ones((4, 5), np.uint8)], source="x",
                  image_path="p")
  assert s["masks"].shape == (1, 4, 5) and common.seg_counts(s) == [1, 0]


# ---------------------------------------------------------------------------------------- hybrid
class _Fake(LisaSource):
  """No files: item i is a 4x4 image of value i; every `bad`-th item raises."""

  def __init__(self, name, n=10, bad=0):
    self.name, self.n, self.bad = name, n, bad

  def __len__(self):
    return self.n

  def read(self, index, rng):
    if self.bad and index % self.bad == 0:
      raise OSError(f"broken {index}")
    return make_sample(np.full((4, 4, 3), index, np.uint8), [f"<image>\n{self.name} {rng.integers(1000)}"],
                       ["ok"], None, source=self.name, image_path=f"{self.name}/{index}")


def test_hybrid_rates_and_determinism():
  fams = [_Fake("sem"), _Fake("refer", bad=2), _Fake("vqa"), _Fake("reason")]
  hy = HybridDataset(fams, (9, 3, 3, 1), samples_per_epoch=4000, seed=3)
  with mock.patch.object(common.logging, "warning"):
    draws = [hy[i] for i in range(4000)]
  counts = np.array([sum(d["source"] == f.name for d in draws) for f in fams])
  np.testing.assert_allclose(counts / 4000, np.array([9, 3, 3, 1]) / 16, atol=0.025)
  assert all(int(d["image_path"].split("/")[1]) % 2 for d in draws if d["source"] == "refer")
  assert max(d["num_skipped"] for d in draws) > 0  # half the refer items are bad, retried in refer
  with mock.patch.object(common.logging, "warning"):
    again = [hy[i] for i in range(50)]
    other = HybridDataset(fams, (9, 3, 3, 1), samples_per_epoch=4000, seed=4)
    other = [other[i] for i in range(50)]
  key = lambda d: (d["source"], d["image_path"], d["questions"][0])
  assert [key(d) for d in again] == [key(d) for d in draws[:50]]
  assert [key(d) for d in other] != [key(d) for d in draws[:50]]
