"""SAM's decoder head count (a .pth cannot say it: warned when assumed, given by override, recorded
in the converted directory) and the SamPredictor-style entry against segment_anything.SamPredictor
on a tiny SAM whose decoder has 4 heads."""

import json
import os

import numpy as np
import pytest
from absl import logging
from PIL import Image

import conftest

torch = pytest.importorskip("torch")
conftest.stub_torchvision()
import torchvision.transforms.functional as tvf  # noqa: E402  (the stub)
from segment_anything import SamPredictor as RefPredictor  # noqa: E402

from jaxlisa.conversion import convert as conv_lib  # noqa: E402
from jaxlisa.inference.sam_predictor import SamPredictor  # noqa: E402
from jaxlisa.models import sam as S  # noqa: E402

IMG, PATCH, GRID, HEADS = 64, 8, 8, 4


@pytest.fixture(scope="module")
def ref_pth(tmp_path_factory):
  model = conftest.tiny_reference_sam(depth=2, decoder_heads=HEADS, img=IMG, patch=PATCH)
  path = str(tmp_path_factory.mktemp("sam4") / "sam_tiny4.pth")
  torch.save(model.state_dict(), path)
  return model, path


def _warnings(fn):
  seen = []
  orig = logging.warning

  def spy(msg, *args, **kw):
    seen.append(msg % args if args else msg)
    return orig(msg, *args, **kw)

  logging.warning = spy
  try:
    out = fn()
  finally:
    logging.warning = orig
  return out, [m for m in seen if "head count" in m]


@pytest.fixture(scope="module")
def converted(ref_pth, tmp_path_factory):
  _, path = ref_pth
  conv, warned = _warnings(lambda: conv_lib.convert_checkpoint(path, config_overrides={"decoder_num_heads": HEADS}))
  assert not warned and conv.config.decoder_num_heads == HEADS
  dst = str(tmp_path_factory.mktemp("sam4_jax") / "out")
  conv_lib.save_converted(dst, conv, path)
  return conv, dst


def test_decoder_heads_assumed_with_a_warning(ref_pth):
  _, path = ref_pth
  conv, warned = _warnings(lambda: conv_lib.convert_checkpoint(path))
  assert conv.config.decoder_num_heads == 8 and len(warned) == 1 and "assuming 8" in warned[0]


def test_decoder_heads_override_matches_segment_anything_and_is_recorded(ref_pth, converted):
  ref, _ = ref_pth
  conv, dst = converted
  with open(os.path.join(dst, conv_lib.CONFIG_FILE)) as fh:
    assert json.load(fh)["config"]["decoder_num_heads"] == HEADS
  model, v = S.Sam(conv.config), {"params": conv.params}
  x = np.random.RandomState(0).randn(1, IMG, IMG, 3).astype(np.float32)
  pts = np.array([[[10.0, 20.0], [40.0, 7.0]]], np.float32)
  lab = np.array([[1, 0]])
  emb = model.apply(v, x, method=S.Sam.encode_image)
  sparse, dense = model.apply(v, pts, lab, method=S.Sam.encode_prompts)
  masks, iou = model.apply(v, emb, sparse, dense, True, None, method=S.Sam.decode)
  with torch.no_grad():
    e = ref.image_encoder(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    s, d = ref.prompt_encoder(points=(torch.from_numpy(pts), torch.from_numpy(lab)), boxes=None, masks=None)
    wm, wi = ref.mask_decoder(e, ref.prompt_encoder.get_dense_pe(), s, d, True)
  assert conftest.max_abs_diff(masks, wm.numpy()) <= 1e-4 and conftest.max_abs_diff(iou, wi.numpy()) <= 1e-4


@pytest.fixture()
def pil_resize(monkeypatch):
  """torchvision is stubbed: ResizeLongestSide.apply_image's to_pil_image + resize via PIL (bilinear)."""
  monkeypatch.setattr(tvf, "to_pil_image", lambda a: Image.fromarray(np.asarray(a)))
  monkeypatch.setattr(tvf, "resize", lambda im, hw: im.resize((hw[1], hw[0]), Image.BILINEAR))
  import segment_anything.utils.transforms as sat  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sat, "to_pil_image", tvf.to_pil_image)
  monkeypatch.setattr(sat, "resize", tvf.resize)


def test_predictor_matches_segment_anything(ref_pth, converted, pil_resize):
  del pil_resize
  ref, _ = ref_pth
  _, dst = converted
  image = np.random.RandomState(1).randint(0, 256, (48, 80, 3)).astype(np.uint8)  # resized to 38 x 64, padded
  want_p, got_p = RefPredictor(ref), SamPredictor.from_pretrained(dst)
  want_p.set_image(image)
  got_p.set_image(image)
  assert got_p.input_size == tuple(want_p.input_size) and got_p.original_size == tuple(want_p.original_size)
  emb = want_p.get_image_embedding().numpy().transpose(0, 2, 3, 1)
  worst = conftest.max_abs_diff(got_p.get_image_embedding(), emb)
  rs = np.random.RandomState(2)
  low_prev = None
  cases = [dict(point_coords=np.array([[20.5, 30.0]]), point_labels=np.array([1])),
           dict(point_coords=np.array([[5.0, 40.0], [70.0, 10.0]]), point_labels=np.array([1, 0]),
                multimask_output=False),
           dict(box=np.array([8.0, 4.0, 60.0, 44.0])),
           dict(point_coords=np.array([[33.0, 21.0]]), point_labels=np.array([0]), box=np.array([2.0, 3.0, 79.0, 47.0])),
           dict(point_coords=np.array([[12.0, 9.0]]), point_labels=np.array([1]), mask_input="prev",
                return_logits=True),
           dict(mask_input=rs.randn(1, 4 * GRID, 4 * GRID).astype(np.float32), multimask_output=False,
                return_logits=True)]
  for kw in cases:
    kw = dict(kw)
    if isinstance(kw.get("mask_input"), str):
      kw["mask_input"] = low_prev
    wm, wi, wl = want_p.predict(**kw)
    gm, gi, gl = got_p.predict(**kw)
    assert gm.shape == wm.shape == ((3 if kw.get("multimask_output", True) else 1), 48, 80)
    assert gm.dtype == wm.dtype
    if kw.get("return_logits"):
      worst = max(worst, conftest.max_abs_diff(gm, wm))
    else:  # thresholded masks: identical away from logits within the tolerance of 0
      logits = got_p.predict(**{**kw, "return_logits": True})[0]
      ambiguous = np.abs(logits) <= 1e-4
      assert ((gm == wm) | ambiguous).all()
    worst = max(worst, conftest.max_abs_diff(gi, wi), conftest.max_abs_diff(gl, wl))
    low_prev = wl[np.argmax(wi)][None]
  print(f"SamPredictor max diff vs segment_anything: {worst:.2e}")
  assert worst <= 1e-4
