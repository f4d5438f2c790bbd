"""Image loading and CLIP / SAM / LLaVA preprocessing vs transformers, segment-anything and LLaVA."""

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from jaxlisa.data import preprocess as pp


def _rand(h, w, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


SHAPES = [(50, 80), (80, 50), (33, 33), (300, 224), (17, 40), (481, 640)]


# ----------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # what CLIPImageProcessor is here
  return CLIPImageProcessorPil()


@pytest.mark.parametrize("hw", SHAPES)
def test_clip_preprocess_matches_transformers(clip_processor, hw):
  img = _rand(*hw, seed=hw[0])
  want = clip_processor(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  got = pp.clip_preprocess(img)
  assert got.dtype == np.float32 and got.shape == (224, 224, 3)
  np.testing.assert_array_equal(got, want)


def test_clip_preprocess_336(clip_processor):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
  img = _rand(200, 310, seed=5)
  want = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_array_equal(pp.clip_preprocess(img, size=336, crop=336), want)


def _llava_expand2square(pil_img, background_color):
  """LLaVA's `expand2square` (llava/mm_utils.py), on PIL images."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  side = max(width, height)
  result = Image.new(pil_img.mode, (side, side), background_color)
  result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
  return result


@pytest.mark.parametrize("hw", [(30, 51), (51, 30), (40, 40)])
def test_expand2square_matches_llava(hw):
  img = _rand(*hw, seed=7)
  bg = tuple(int(x * 255) for x in pp.OPENAI_CLIP_MEAN)
  assert pp.mean_background() == bg == (122, 116, 104)
  want = np.asarray(_llava_expand2square(Image.fromarray(img), bg))
  np.testing.assert_array_equal(pp.expand2square(img, bg), want)
  np.testing.assert_array_equal(pp.expand2square(img), want)


# ----------------------------------------------------------------------------- SAM
@pytest.fixture(scope="module")
def sam_transforms():
  conftest.stub_torchvision()
  from segment_anything.utils import transforms as sam_t
  mp = pytest.MonkeyPatch()
  # torchvision's to_pil_image / resize on a PIL image (PIL bilinear), which torchvision cannot supply here.
  mp.setattr(sam_t, "to_pil_image", lambda a: Image.fromarray(a))
  mp.setattr(sam_t, "resize", lambda im, size: im.resize((size[1], size[0]), Image.BILINEAR))
  yield sam_t
  mp.undo()


def test_sam_preprocess_shape(sam_transforms):
  rs = np.random.RandomState(0)
  for h, w in [(480, 640), (640, 480), (1024, 1024), (1, 3000), (333, 777)] + \
      [tuple(rs.randint(1, 2500, 2)) for _ in range(200)]:
    ref = sam_transforms.ResizeLongestSide.get_preprocess_shape(int(h), int(w), 1024)
    # the original rounds a side below 0.5 px to 0 (and then fails to resize): clamped to 1
    assert pp.sam_preprocess_shape(int(h), int(w), 1024) == tuple(max(1, x) for x in ref)
  assert pp.sam_preprocess_shape(1, 3000, 1024) == (1, 1024)
  out, hw = pp.sam_preprocess(np.zeros((1, 200, 3), np.uint8), 64)  # 200:1 at 64 px
  assert hw == (1, 64) and out.shape == (64, 64, 3)


def test_clip_preprocess_long_image_bounded():
  """A 1 x 20000 image would resize to 224 x 4480000 (3 GB) before the crop; only the window is made."""
  img = _rand(1, 20000, seed=3)
  assert pp.clip_preprocess(img).shape == (224, 224, 3)
  # below the limit the exact (transformers) order is kept
  small = _rand(2, 900, seed=4)
  ref = pp.normalize(pp.center_crop(pp._pil_resize(small, pp.shortest_edge_size(2, 900, 224), pp.Image.BICUBIC),
                                    224), pp.OPENAI_CLIP_MEAN, pp.OPENAI_CLIP_STD, 1 / 255)
  np.testing.assert_array_equal(pp.clip_preprocess(small), ref)


@pytest.mark.parametrize("hw", [(48, 80), (90, 37), (64, 64)])
def test_sam_resize_matches_segment_anything(sam_transforms, hw):
  img = _rand(*hw, seed=hw[1])
  want = sam_transforms.ResizeLongestSide(128).apply_image(img)
  got = pp.sam_resize_longest_side(img, 128)
  np.testing.assert_array_equal(got, want)


def test_sam_preprocess_matches_sam(sam_transforms):
  conftest.stub_torchvision()
  from segment_anything.modeling.sam import Sam
  img = _rand(90, 37, seed=3)
  resized = sam_transforms.ResizeLongestSide(128).apply_image(img)
  fake = types.SimpleNamespace(pixel_mean=torch.Tensor(pp.SAM_PIXEL_MEAN).view(-1, 1, 1),
                               pixel_std=torch.Tensor(pp.SAM_PIXEL_STD).view(-1, 1, 1),
                               image_encoder=types.SimpleNamespace(img_size=128))
  want = Sam.preprocess(fake, torch.from_numpy(resized).permute(2, 0, 1).contiguous()).numpy().transpose(1, 2, 0)
  got, hw = pp.sam_preprocess(img, 128)
  assert hw == resized.shape[:2] == (128, 53)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- loading
def _save(tmp_path, name, img, **kw):
  path = tmp_path / name
  img.save(path, **kw)
  return str(path)


def test_load_rgb_png_and_bytes(tmp_path):
  a = _rand(20, 30)
  path = _save(tmp_path, "rgb.png", Image.fromarray(a))
  np.testing.assert_array_equal(pp.load_image(path), a)
  with open(path, "rb") as fh:
    np.testing.assert_array_equal(pp.load_image(fh.read()), a)


def test_load_grayscale(tmp_path):
  g = _rand(20, 30)[..., 0]
  out = pp.load_image(_save(tmp_path, "gray.png", Image.fromarray(g, "L")))
  np.testing.assert_array_equal(out, np.stack([g] * 3, -1))


def test_load_rgba_drops_alpha(tmp_path):
  a = np.random.RandomState(1).randint(0, 256, (20, 30, 4), dtype=np.uint8)
  out = pp.load_image(_save(tmp_path, "rgba.png", Image.fromarray(a, "RGBA")))
  np.testing.assert_array_equal(out, a[..., :3])


@pytest.mark.parametrize("transparency", [False, True])
def test_load_palette(tmp_path, transparency):
  rs = np.random.RandomState(2)
  palette = rs.randint(0, 256, (256, 3), dtype=np.uint8)
  idx = rs.randint(0, 256, (20, 30), dtype=np.uint8)
  im = Image.fromarray(idx, "P")
  im.putpalette(palette.reshape(-1).tolist())
  kw = {"transparency": 5} if transparency else {}
  out = pp.load_image(_save(tmp_path, "pal.png", im, **kw))
  np.testing.assert_array_equal(out, palette[idx])


def test_load_palette_alpha(tmp_path):
  rs = np.random.RandomState(4)
  palette = rs.randint(0, 256, (256, 3), dtype=np.uint8)
  idx = rs.randint(0, 256, (20, 30), dtype=np.uint8)
  im = Image.fromarray(idx, "P")
  im.putpalette(palette.reshape(-1).tolist())
  pa = im.convert("PA")
  assert pa.mode == "PA"
  np.testing.assert_array_equal(pp._to_rgb(pa), palette[idx])  # pylint: disable=protected-access


def test_load_16bit(tmp_path):
  a = np.random.RandomState(3).randint(0, 65536, (20, 30)).astype(np.uint16)
  path = _save(tmp_path, "g16.png", Image.fromarray(a))
  assert Image.open(path).mode.startswith("I;16")
  want = np.stack([(a >> 8).astype(np.uint8)] * 3, -1)  # cv2.imread(IMREAD_COLOR): high byte
  np.testing.assert_array_equal(pp.load_image(path), want)
  i32 = Image.fromarray(a.astype(np.int32), "I")
  np.testing.assert_array_equal(pp._to_rgb(i32), want)  # pylint: disable=protected-access


@pytest.mark.parametrize("orientation,k", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation(tmp_path, orientation, k):
  a = _rand(20, 30, seed=9)
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = _save(tmp_path, f"o{orientation}.png", Image.fromarray(a), exif=exif.tobytes())
  np.testing.assert_array_equal(pp.load_image(path), np.rot90(a, k))  # 6: 90 deg clockwise, 8: counter
  np.testing.assert_array_equal(pp.load_image(path, exif_transpose=False), a)  # PIL / LLaVA: as stored


def test_exif_orientation_jpeg(tmp_path):
  a = np.zeros((16, 32, 3), np.uint8)
  a[:, :16] = 255  # left half white
  exif = Image.Exif()
  exif[0x0112] = 6
  out = pp.load_image(_save(tmp_path, "o6.jpg", Image.fromarray(a), exif=exif.tobytes(), quality=95))
  assert out.shape == (32, 16, 3)
  assert out[:12].mean() > 200 and out[-12:].mean() < 50  # white half now on top


def test_corrupt_files_raise_image_error(tmp_path):
  good = io.BytesIO()
  Image.fromarray(_rand(64, 64)).save(good, "PNG")
  cases = {"truncated.png": good.getvalue()[:len(good.getvalue()) // 2], "noise.jpg": bytes(range(256)) * 4,
           "notes.png": b"this is not an image\n", "empty.png": b""}
  for name, data in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(pp.ImageError, match=name):
      pp.load_image(str(path))
  with pytest.raises(pp.ImageError, match="bytes"):
    pp.load_image(cases["truncated.png"])
  assert issubclass(pp.ImageError, ValueError)
  with pytest.raises(FileNotFoundError):
    pp.load_image(str(tmp_path / "missing.png"))


def test_rejects_non_rgb_arrays():
  with pytest.raises(ValueError, match="uint8 RGB"):
    pp.clip_preprocess(np.zeros((10, 10), np.uint8))
  with pytest.raises(ValueError, match="uint8 RGB"):
    pp.sam_preprocess(np.zeros((10, 10, 3), np.float32))
