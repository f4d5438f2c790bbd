"""Synthetic shapes: deterministic files, exact masks (vs analytic disks / squares computed here
from shapes_meta.json), questions that are true of the scene, and the tokenizer."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxlisa.data import synthetic_shapes as S
from jaxlisa.data.lisa_collate import seg_token_index
from jaxlisa.data.lisa_datasets import (ReasonSegDataset, Refer, SemSegDataset, ValDataset,
                                        VQADataset, get_mask_from_json)
from jaxlisa.data.lisa_datasets.common import fill_polygon

SIZE = 48


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes"))
  S.write_dataset(out, num_train=12, num_val=4, image_size=SIZE, seed=0)
  with open(os.path.join(out, "shapes_meta.json")) as f:
    return out, json.load(f)


def _analytic(shape, size=SIZE):
  """Disk / axis-aligned square (vertices at 45 degrees on radius r) over pixel centres."""
  y, x = np.mgrid[0:size, 0:size] + 0.5
  dx, dy = x - shape["cx"], y - shape["cy"]
  if shape["kind"] == "circle":
    return (dx ** 2 + dy ** 2 <= shape["r"] ** 2).astype(np.uint8)
  if shape["kind"] == "square":
    half = shape["r"] / np.sqrt(2)
    return ((np.abs(dx) <= half) & (np.abs(dy) <= half)).astype(np.uint8)
  return None


def _files(d):
  out = {}
  for root, _, names in os.walk(d):
    for n in names:
      p = os.path.join(root, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, d)] = f.read()
  return out


def test_same_seed_same_files(tmp_path):
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    S.write_dataset(str(tmp_path / name), num_train=4, num_val=2, image_size=32, seed=seed)
  a, b, c = (_files(str(tmp_path / n)) for n in "abc")
  assert a == b
  assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)
  assert "refer_seg/refcoco/refs(unc).p" in a and "ade20k/classes.json" in a


def test_masks_are_exact(tree):
  out, meta = tree
  n_checked = 0
  refer = Refer(os.path.join(out, "refer_seg"), "refcoco")
  refs_by_file = {}
  for ref in refer.refs:
    refs_by_file.setdefault(refer.imgs[ref["image_id"]]["file_name"], []).append(ref)
  for k, (name, m) in enumerate(sorted(meta.items())):
    scene = S.make_scene(int(name.split("_")[-1]), 0, SIZE)
    shapes = m["shapes"]
    for sh, mask in zip(shapes, scene.masks):
      want = _analytic(sh)
      if want is not None:
        np.testing.assert_array_equal(mask, want)
        n_checked += 1
    # Referring: the ann of a ref is the mask of the shape whose colour the sentences name.
    for ref in refs_by_file[name + ".jpg"]:
      color = next(c for c in S.COLORS if ref["sentences"][0]["sent"].split()[:2].count(c))
      sh = next(s for s in shapes if s["color"] == color)
      want = _analytic(sh)
      got = refer.ann_mask(ref["ann_id"], ref["image_id"])
      np.testing.assert_array_equal(got, want if want is not None else scene.masks[shapes.index(sh)])
    # Reasoning: the json polygons rasterize to exactly the target shapes.
    d = os.path.join(out, "reason_seg/ReasonSeg", m["split"])
    mask, texts, is_sentence = get_mask_from_json(os.path.join(d, name + ".json"), (SIZE, SIZE))
    want = np.zeros((SIZE, SIZE), np.uint8)
    for t in m["reason_targets"]:
      a = _analytic(shapes[t])
      want |= a if a is not None else scene.masks[t]
    np.testing.assert_array_equal(mask, want)
    assert is_sentence and texts
    # Class maps: raw value 1 + kind index exactly on the shapes of that kind.
    if m["split"] == "train":
      raw = np.asarray(Image.open(os.path.join(out, "ade20k/annotations/training", name + ".png")))
      for kind in ("circle", "square"):
        want = np.zeros((SIZE, SIZE), np.uint8)
        for sh in shapes:
          if sh["kind"] == kind:
            want |= _analytic(sh)
        np.testing.assert_array_equal(raw == S.KINDS.index(kind) + 1, want.astype(bool))
  assert n_checked >= 5


def test_images_show_the_shapes(tree):
  out, meta = tree
  for name, m in sorted(meta.items())[:6]:
    sc = S.make_scene(int(name.split("_")[-1]), 0, SIZE)
    covered = np.zeros((SIZE, SIZE), bool)
    for sh, mask in zip(m["shapes"], sc.masks):
      assert (sc.image[mask.astype(bool)] == S.COLORS[sh["color"]]).all()
      assert not (covered & mask.astype(bool)).any()  # no overlaps
      covered |= mask.astype(bool)
    assert (sc.image[~covered] == m["background"]).all()
    jpg = np.asarray(Image.open(os.path.join(out, "reason_seg/ReasonSeg", m["split"], name + ".jpg")))
    assert np.abs(jpg.astype(int) - sc.image).mean() < 4  # JPEG of the same picture


NUM = {w: k for k, w in enumerate(S.NUMBER_WORDS)}


def test_questions_are_true(tree):
  out, meta = tree
  by_name = {f"{n}.jpg": m for n, m in meta.items()}
  # Text-only chat.
  vqa = VQADataset(out)
  for i in range(len(vqa)):
    s = vqa.read(i, None)
    shapes = by_name[os.path.basename(s["image_path"])]["shapes"]
    kinds = [sh["kind"] for sh in shapes]
    assert s["questions"][0].startswith("<image>\n") and s["masks"].shape[0] == 0
    assert s["questions"][0].endswith("\n" + S.SHORT_ANSWER_PROMPT)  # a short-answer reasoning turn first
    for q, a in zip(s["questions"], s["answers"]):
      q = q.replace("<image>\n", "")
      if q.endswith("\n" + S.SHORT_ANSWER_PROMPT):  # reasoning question, answered "<colour> <kind>"
        q = q[:-len(S.SHORT_ANSWER_PROMPT) - 1]
        color, kind = re.fullmatch(r"(\w+) (\w+)", a).groups()
        assert {"color": color, "kind": kind} in [{"color": sh["color"], "kind": sh["kind"]} for sh in shapes]
        if (g := re.fullmatch(r"Which shape has the colour of (.+)\?", q)):
          assert g[1] in S.COLOR_THINGS[color]
        else:
          assert q in S.KIND_REASONS[kind][0] and kinds.count(kind) == 1
      elif q.startswith("How many shapes"):
        words = a.split()
        assert NUM[words[2]] == len(shapes)
      elif (g := re.fullmatch(r"What colour is the (\w+)\?", q)):
        assert a == f"The {g[1]} is {shapes[kinds.index(g[1])]['color']}."
      elif (g := re.fullmatch(r"Is there a (\w+) in this image\?", q)):
        assert a.startswith("Yes") == (g[1] in kinds)
      elif (g := re.fullmatch(r"What shape is the (\w+) object\?", q)):
        assert a == f"It is a {next(sh['kind'] for sh in shapes if sh['color'] == g[1])}."
      else:
        assert q == "Describe the image briefly." and a.count(" a ") + a.startswith("a ") >= len(shapes)
  # Reasoning + explanations: the explanation names the target, kind questions fit the kind.
  with open(os.path.join(out, "reason_seg/ReasonSeg/explanatory/train.json")) as f:
    expl = {e["image"]: e["outputs"] for e in json.load(f)}
  assert len(expl) == 12
  for img, text in expl.items():
    m = by_name[img]
    target = m["shapes"][m["reason_targets"][0]]
    assert f"{target['color']} {target['kind']}" in text
    with open(os.path.join(out, "reason_seg/ReasonSeg/train", img[:-4] + ".json")) as f:
      texts = json.load(f)["text"]
    if any("roll" in t for t in texts):
      assert target["kind"] == "circle"
    if any("three corners" in t for t in texts):
      assert target["kind"] == "triangle"
  # Referring expressions with a relation are true of the centres.
  val = ValDataset(out, "refcoco|unc|val")
  seen_rel = 0
  for i in range(len(val)):
    s = val[i]
    shapes = by_name[os.path.basename(s["image_path"])]["shapes"]
    for q in s["questions"]:
      g = re.search(r"What is (?:\w+ )?(\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) in", q)
      if not g:
        continue
      a = next(sh for sh in shapes if sh["color"] == g[1])
      b = next(sh for sh in shapes if sh["color"] == g[4])
      assert (a["kind"], b["kind"]) == (g[2], g[5])
      dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
      want = (("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else
              ("above" if dy > 0 else "below"))
      assert g[3] == want
      seen_rel += 1
  assert seen_rel > 0
  # Class-name questions through the ADE20K loader use the tree's own class list.
  sem = SemSegDataset(out, "ade20k")
  s = sem.read(0, np.random.default_rng(0))
  assert all(any(k in q for k in S.KINDS) for q in s["questions"])
  assert ReasonSegDataset(out).explanations


def test_mask_to_polygons_exact_for_any_blob():
  rng = np.random.default_rng(0)
  blobs = []
  ring = np.zeros((20, 20), np.uint8)
  ring[3:17, 3:17] = 1
  ring[7:12, 6:14] = 0
  blobs.append(ring)
  two = np.zeros((12, 12), np.uint8)
  two[1:4, 1:4] = 1
  two[6:10, 5:11] = 1
  blobs.append(two)
  blobs += [(rng.random((10, 14)) < 0.3).astype(np.uint8) for _ in range(3)]
  for i in range(20):
    blobs += list(S.make_scene(i, 5, 40).masks)
  for blob in blobs:
    got = np.zeros_like(blob)
    for poly in S.mask_to_polygons(blob):
      fill_polygon(got, poly, 1)
    np.testing.assert_array_equal(got, blob)
  assert len(S.mask_to_polygons(S.make_scene(0, 0, 64).masks[0])) == 1  # convex: one outline


def test_tokenizer(tree, tmp_path):
  out, _ = tree
  corpus = S.read_corpus(out)
  tok = S.train_tokenizer(corpus, str(tmp_path / "a"))
  S.train_tokenizer(corpus, str(tmp_path / "b"))
  assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
  seg = seg_token_index(tok)
  added = {t.content: t.special for t in tok.added_tokens_decoder.values()}
  assert tok.convert_ids_to_tokens(seg) == "[SEG]" and added["[SEG]"] is False
  for t in ("<im_start>", "<im_end>"):
    ids = tok(t, add_special_tokens=False).input_ids
    assert len(ids) == 1 and added[t] is True
  assert tok.pad_token_id == tok.unk_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2
  text = "<im_start>x<im_end>\nPlease segment the red circle. Sure, it is [SEG]."
  ids = tok(text).input_ids
  assert ids.count(seg) == 1 and 0 not in ids  # no <unk>: newline and all characters are known
  assert all(0 not in tok(c).input_ids for c in corpus)
  reloaded = S.load_tokenizer(str(tmp_path / "a"))
  assert reloaded(text).input_ids == ids
  from jaxlisa.data import synthetic_text as text_lib
  bare = text_lib.train_tokenizer(corpus, 300)  # no [SEG] added: several pieces
  with pytest.raises(ValueError, match="single id"):
    seg_token_index(bare)


def test_seg_lstrip_moves_the_seg_state_onto_the_role_token(tree, tmp_path):
  """As LLaMA's tokenizer does, the space before an added [SEG] is a lone '▁' piece, the position
  whose state LISA reads; seg_lstrip=True folds that space into [SEG], so the state read is the
  preceding word's ('ASSISTANT:', 'is'). Survives save / load."""
  out, _ = tree
  corpus = S.read_corpus(out)
  text = "USER: Please segment the red circle. ASSISTANT: [SEG].</s>"
  before = lambda tok: tok.convert_ids_to_tokens(tok(text).input_ids)[
      tok(text).input_ids.index(seg_token_index(tok)) - 1]
  assert before(S.train_tokenizer(corpus)) == "▁"
  tok = S.train_tokenizer(corpus, str(tmp_path / "l"), seg_lstrip=True)
  assert before(tok) == before(S.load_tokenizer(str(tmp_path / "l"))) == "▁ASSISTANT:"
  assert seg_token_index(tok) == seg_token_index(S.train_tokenizer(corpus))
