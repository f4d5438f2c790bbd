"""segment-anything's `SamPredictor` for jaxlisa SAM: embed an image once, then prompt it many times.

  predictor = SamPredictor(Sam(config), params)     # or SamPredictor.from_pretrained(path)
  predictor.set_image(image)                        # uint8 [H, W, 3] RGB; runs the image encoder once
  masks, iou, low_res = predictor.predict(point_coords=[[x, y]], point_labels=[1], multimask_output=True)

Prompts are in the original image's pixel coordinates (x, y; boxes x0, y0, x1, y1), mapped as
segment-anything's `ResizeLongestSide` does: the image is resized (PIL bilinear) so its longest
side is `img_size` (`(int(h * s + 0.5), int(w * s + 0.5))`, s = img_size / max(h, w)), coordinates
are scaled per axis by new / old size. `mask_input` is a low-res logit mask [1, 4 h', 4 w'] (e.g.
a previous call's `low_res` best mask). Masks come back at the original size, thresholded at 0
unless `return_logits`. The prompt encoder + mask decoder + upsampling run as one jit per prompt
shape (number of points, box / mask present, multimask) and image size: static shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlisa.data.preprocess import sam_preprocess_shape, sam_resize_longest_side
from jaxlisa.models import sam as sam_lib

MASK_THRESHOLD = 0.0  # segment-anything's Sam.mask_threshold


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], target: int) -> np.ndarray:
  """ResizeLongestSide.apply_coords: [..., 2] (x, y) in the original image -> the resized one."""
  oh, ow = original_size
  nh, nw = sam_preprocess_shape(oh, ow, target)
  out = np.array(coords, dtype=np.float64, copy=True)
  out[..., 0] = out[..., 0] * (nw / ow)
  out[..., 1] = out[..., 1] * (nh / oh)
  return out


def apply_boxes(boxes: np.ndarray, original_size: tuple[int, int], target: int) -> np.ndarray:
  """ResizeLongestSide.apply_boxes: [..., 4] (x0, y0, x1, y1) -> [N, 4] in the resized image."""
  return apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, target).reshape(-1, 4)


@functools.partial(jax.jit, static_argnames=("model", "multimask_output", "input_size", "original_size"))
def _decode(model: sam_lib.Sam, params, features, points, labels, boxes, masks, *, multimask_output: bool,
            input_size: tuple[int, int], original_size: tuple[int, int]):
  """features [1, h, w, C]; points [1, P, 2] / labels [1, P] | None; boxes [1, 4] | None; masks
  [1, 4h, 4w, 1] | None -> (masks [1, M, H, W] logits, iou [1, M], low-res logits [1, M, 4h, 4w])."""
  v = {"params": params}
  sparse, dense = model.apply(v, points, labels, boxes, masks, method=sam_lib.Sam.encode_prompts)
  low, iou = model.apply(v, features, sparse, dense, multimask_output, None, method=sam_lib.Sam.decode)
  up = sam_lib.postprocess_masks(low, input_size, original_size, model.config.img_size)
  return up, iou, low


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model: sam_lib.Sam, params, pixels):
  return model.apply({"params": params}, sam_lib.preprocess(pixels, model.config), method=sam_lib.Sam.encode_image)


class SamPredictor:
  """segment_anything.SamPredictor's API on a jaxlisa `Sam` (see the module docstring)."""

  def __init__(self, model: sam_lib.Sam, params: dict):
    self.model = model
    self.params = params
    self.reset_image()

  @classmethod
  def from_pretrained(cls, path: str) -> "SamPredictor":
    """A converted SAM directory (or a .pth / HF SamModel checkpoint, converted on the fly)."""
    from jaxlisa.conversion import convert  # pylint: disable=import-outside-toplevel
    pre = convert.load_pretrained(path, with_tokenizer=False)
    if not isinstance(pre.module, sam_lib.Sam):
      raise ValueError(f"{path} is a {pre.family} checkpoint, not SAM")
    return cls(pre.module, pre.params)

  def reset_image(self) -> None:
    self.features = None
    self.original_size = None
    self.input_size = None
    self.is_image_set = False

  def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
    """image uint8 [H, W, 3] ("RGB" or "BGR"): resize the longest side to img_size, normalise,
    pad, and run the image encoder once (features [1, h, w, C])."""
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    if image_format == "BGR":
      image = image[..., ::-1]
    image = np.ascontiguousarray(image, dtype=np.uint8)
    resized = sam_resize_longest_side(image, self.model.config.img_size)
    self.original_size = tuple(int(s) for s in image.shape[:2])
    self.input_size = tuple(int(s) for s in resized.shape[:2])
    self.features = _encode(self.model, self.params, jnp.asarray(resized, jnp.float32)[None])
    self.is_image_set = True

  def get_image_embedding(self) -> jax.Array:
    """[1, h, w, C] (NHWC; segment-anything returns NCHW)."""
    if not self.is_image_set:
      raise RuntimeError("call set_image before get_image_embedding")
    return self.features

  def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
              box: np.ndarray | None = None, mask_input: np.ndarray | None = None, multimask_output: bool = True,
              return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """point_coords [P, 2] (x, y) and point_labels [P] (1 foreground, 0 background); box [4]
    (x0, y0, x1, y1); mask_input [1, 4h, 4w] low-res logits; all in original-image pixels.
    Returns (masks [M, H, W] bool, or logits with return_logits; iou [M]; low-res logits
    [M, 4h, 4w]), M = 3 with multimask_output else 1, as segment_anything.SamPredictor."""
    if not self.is_image_set:
      raise RuntimeError("call set_image before predict")
    target = self.model.config.img_size
    points = labels = boxes = masks = None
    if point_coords is not None:
      if point_labels is None:
        raise ValueError("point_labels must be given with point_coords")
      pc = np.asarray(point_coords, np.float64).reshape(-1, 2)
      pl = np.asarray(point_labels).reshape(-1)
      if len(pl) != len(pc):
        raise ValueError(f"{len(pc)} points but {len(pl)} labels")
      points = jnp.asarray(apply_coords(pc, self.original_size, target), jnp.float32)[None]
      labels = jnp.asarray(pl, jnp.int32)[None]
    if box is not None:
      boxes = jnp.asarray(apply_boxes(np.asarray(box, np.float64).reshape(-1, 4)[:1], self.original_size, target),
                          jnp.float32)
    if mask_input is not None:
      m = np.asarray(mask_input, np.float32)
      want = tuple(4 * s for s in self.features.shape[1:3])
      if m.shape[-2:] != want:
        raise ValueError(f"mask_input must be [1, {want[0]}, {want[1]}] low-res logits, got {m.shape}")
      masks = jnp.asarray(m.reshape((1,) + want + (1,)))
    up, iou, low = _decode(self.model, self.params, self.features, points, labels, boxes, masks,
                           multimask_output=bool(multimask_output), input_size=self.input_size,
                           original_size=self.original_size)
    up = np.asarray(up[0])
    return (up if return_logits else up > MASK_THRESHOLD), np.asarray(iou[0]), np.asarray(low[0])
