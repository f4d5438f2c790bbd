"""Parity of jaxlisa SAM with segment_anything, through the `sam` converter (.pth round trip)."""

import copy
import importlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import max_abs_diff

torch = pytest.importorskip("torch")
conftest.stub_torchvision()
from segment_anything.modeling import image_encoder as sa_ie  # noqa: E402

from jaxlisa.conversion import sam as sam_conv  # noqa: E402
from jaxlisa.conversion.keymap import export_state  # noqa: E402
from jaxlisa.models import sam as S  # noqa: E402

TOL = 1e-4
IMG, PATCH, GRID = 64, 8, 8


def _t(x):
  return torch.from_numpy(np.asarray(x, np.float32))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def ref():
  """Tiny segment_anything Sam: 3 blocks (block 1 global), window 3 on an 8x8 grid (padded to 9).
  The decoder keeps SAM's 8 heads: a .pth does not say, and the converter assumes 8."""
  return conftest.tiny_reference_sam(depth=3, decoder_heads=8, img=IMG, patch=PATCH)


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
  path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
  torch.save(ref.state_dict(), path)
  return conftest.converted_sam(path)


@pytest.fixture(scope="module")
def fns(converted):
  return conftest.jitted_sam(*converted[1:])


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).randn(2, IMG, IMG, 3).astype(np.float32)


@pytest.fixture(scope="module")
def embeddings(ref, fns, images):
  with torch.no_grad():
    want = ref.image_encoder(_t(_nchw(images))).numpy()
  return fns["encode"](images), want


def test_detect_and_infer_config(converted):
  conv, _, _ = converted
  c = conv.config
  assert conv.family == "sam"
  assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.encoder_mlp_dim) == (64, 8, 32, 3, 2, 128)
  assert (c.window_size, c.global_attn_indexes, c.out_chans) == (3, (1,), 32)
  assert (c.prompt_embed_dim, c.mask_in_chans) == (32, 8)
  assert (c.decoder_depth, c.decoder_mlp_dim, c.attention_downsample_rate, c.num_multimask_outputs) == (2, 64, 2, 3)
  assert (c.iou_head_depth, c.iou_head_hidden_dim) == (3, 32)
  assert S.SamConfig.from_dict(c.to_dict()) == c


def test_presets_match_build_sam(monkeypatch):
  """Encoder sizes as segment_anything's build_sam_vit_{b,l,h} pass them (captured, not built)."""
  bs = importlib.import_module("segment_anything.build_sam")
  seen = {}
  monkeypatch.setattr(bs, "_build_sam", lambda **kw: seen.update(kw))
  for name in ("vit_b", "vit_l", "vit_h"):
    seen.clear()
    bs.sam_model_registry[name]()
    c = S.PRESETS[name]()
    assert (c.embed_dim, c.depth, c.num_heads, c.global_attn_indexes) == (
        seen["encoder_embed_dim"], seen["encoder_depth"], seen["encoder_num_heads"],
        tuple(seen["encoder_global_attn_indexes"])), name
    # constants inside _build_sam
    assert (c.img_size, c.patch_size, c.window_size, c.out_chans, c.image_embedding_size) == (1024, 16, 14, 256, 64)
    assert (c.decoder_mlp_dim, c.decoder_num_heads, c.iou_head_hidden_dim, c.mask_in_chans) == (2048, 8, 256, 16)


def test_export_round_trip(ref, converted):
  conv, _, v = converted
  out = export_state(v["params"], sam_conv.sam_rules(conv.config), scan=False)
  want = ref.state_dict()
  assert sorted(out) == sorted(want)
  for k, x in out.items():
    np.testing.assert_array_equal(x, want[k].numpy(), err_msg=k)


def test_image_encoder(embeddings):
  got, want = embeddings
  assert got.shape == (2, GRID, GRID, 32)
  err = max_abs_diff(_nchw(got), want)
  print(f"image embeddings max err {err:.2e}")
  assert err <= TOL


def test_image_encoder_other_size(ref, converted):
  """An 80 px input (10x10 grid): bicubic-resized pos_embed, window padding 10 -> 12, and the
  global block's rel-pos table linearly resized 15 -> 19 (segment_anything's get_rel_pos)."""
  _, model, v = converted
  x = np.random.RandomState(1).randn(1, 80, 80, 3).astype(np.float32)
  enc = copy.deepcopy(ref.image_encoder)
  with torch.no_grad():  # ViTDet get_abs_pos: bicubic, align_corners=False
    pos = torch.nn.functional.interpolate(enc.pos_embed.permute(0, 3, 1, 2), size=(10, 10), mode="bicubic",
                                          align_corners=False)
    enc.pos_embed = torch.nn.Parameter(pos.permute(0, 2, 3, 1))
    want = enc(_t(_nchw(x))).numpy()
  got = jax.jit(lambda x: model.apply(v, x, method=S.Sam.encode_image))(x)
  err = max_abs_diff(_nchw(got), want)
  print(f"80 px image embeddings max err {err:.2e}")
  assert err <= TOL


@pytest.mark.parametrize("q,k,length", [(10, 10, 15), (4, 8, 15), (8, 4, 9), (5, 5, 9)])
def test_get_rel_pos(q, k, length):
  rel = np.random.RandomState(q * k).randn(length, 6).astype(np.float32)
  want = sa_ie.get_rel_pos(q, k, _t(rel)).numpy()
  assert max_abs_diff(S.get_rel_pos(q, k, jnp.asarray(rel)), want) <= 1e-5


def test_conv_transpose():
  x = np.random.RandomState(2).randn(2, 5, 3, 6).astype(np.float32)
  ct = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
  with torch.no_grad():
    want = ct(_t(_nchw(x))).numpy()
  kernel = ct.weight.detach().numpy().transpose(2, 3, 1, 0)
  got = S.ConvTranspose(4, 2).apply({"params": {"kernel": kernel, "bias": ct.bias.detach().numpy()}}, x)
  assert max_abs_diff(_nchw(got), want) <= 1e-5


PTS = np.array([[[10.0, 20.0], [40.5, 7.0]], [[63.0, 0.0], [5.0, 50.0]], [[30.0, 30.0], [12.0, 44.0]]], np.float32)
LABELS = np.array([[1, 0], [0, -1], [1, 1]], np.int64)
BOXES = np.array([[4.0, 6.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0], [20.0, 10.0, 30.0, 60.0]], np.float32)
MASKS = np.random.RandomState(3).randn(3, 4 * GRID, 4 * GRID, 1).astype(np.float32)
TEXT = np.random.RandomState(4).randn(3, 1, 32).astype(np.float32)

PROMPTS = {
    "points_padded": (dict(points=PTS, labels=LABELS), dict(points=(_t(PTS), torch.from_numpy(LABELS)))),
    "points_boxes": (dict(points=PTS, labels=LABELS, boxes=BOXES),
                     dict(points=(_t(PTS), torch.from_numpy(LABELS)), boxes=_t(BOXES))),
    "boxes": (dict(boxes=BOXES), dict(boxes=_t(BOXES))),
    "masks": (dict(masks=MASKS), dict(masks=_t(_nchw(MASKS)))),
    "points_masks": (dict(points=PTS, labels=LABELS, masks=MASKS),
                     dict(points=(_t(PTS), torch.from_numpy(LABELS)), masks=_t(_nchw(MASKS)))),
    "nothing": (dict(), dict()),
}


def _ref_prompts(ref, tkw):
  with torch.no_grad():
    return ref.prompt_encoder(points=tkw.get("points"), boxes=tkw.get("boxes"), masks=tkw.get("masks"))


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_encoder(ref, fns, name):
  jkw, tkw = PROMPTS[name]
  sparse, dense = fns["prompts"]({k: jnp.asarray(x) for k, x in jkw.items()})
  ws, wd = _ref_prompts(ref, tkw)
  es, ed = max_abs_diff(sparse, ws.numpy()), max_abs_diff(_nchw(dense), wd.numpy())
  print(f"{name}: sparse {tuple(sparse.shape)} err {es:.2e}, dense err {ed:.2e}")
  assert es <= TOL and ed <= TOL


def test_dense_pe(ref, fns):
  with torch.no_grad():
    want = ref.prompt_encoder.get_dense_pe().numpy()
  assert max_abs_diff(_nchw(fns["dense_pe"]()), want) <= TOL


@pytest.mark.parametrize("name,multimask", [("points_padded", True), ("points_padded", False),
                                            ("points_masks", True)])
def test_mask_decoder(ref, fns, embeddings, name, multimask):
  """One image, three prompts (the image embedding is shared, as segment_anything's repeat)."""
  emb, want_emb = embeddings
  jkw, tkw = PROMPTS[name]
  sparse, dense = fns["prompts"]({k: jnp.asarray(x) for k, x in jkw.items()})
  masks, iou = fns["decode"](emb[:1], sparse, dense, multimask, None)
  ws, wd = _ref_prompts(ref, tkw)
  with torch.no_grad():
    wm, wi = ref.mask_decoder(torch.from_numpy(want_emb[:1]), ref.prompt_encoder.get_dense_pe(), ws, wd, multimask)
  assert masks.shape == tuple(wm.shape) == (3, 3 if multimask else 1, 4 * GRID, 4 * GRID)
  em, ei = max_abs_diff(masks, wm.numpy()), max_abs_diff(iou, wi.numpy())
  print(f"{name} multimask={multimask}: masks err {em:.2e}, iou err {ei:.2e}")
  assert em <= TOL and ei <= TOL


def test_lisa_style_text_embeds_with_image_index(ref, fns, embeddings):
  """[SEG] projections as sparse prompts (no points, dense = no_mask_embed), two images, prompts
  0 -> image 0 and 1, 2 -> image 1 through image_index, against segment_anything per image."""
  emb, want_emb = embeddings
  sparse, dense = fns["prompts"](dict(text_embeds=jnp.asarray(TEXT)))
  assert max_abs_diff(sparse, TEXT) == 0.0
  _, wd = _ref_prompts(ref, dict(masks=None))
  assert max_abs_diff(_nchw(dense), np.broadcast_to(wd.numpy(), (3,) + wd.shape[1:])) <= TOL
  masks, iou = fns["decode"](emb, sparse, dense, False, jnp.asarray([0, 1, 1]))
  with torch.no_grad():
    pe = ref.prompt_encoder.get_dense_pe()
    w0 = ref.mask_decoder(torch.from_numpy(want_emb[0:1]), pe, _t(TEXT[:1]), wd, False)
    w1 = ref.mask_decoder(torch.from_numpy(want_emb[1:2]), pe, _t(TEXT[1:]), wd.expand(2, -1, -1, -1), False)
  wm = np.concatenate([w0[0].numpy(), w1[0].numpy()])
  wi = np.concatenate([w0[1].numpy(), w1[1].numpy()])
  em, ei = max_abs_diff(masks, wm), max_abs_diff(iou, wi)
  print(f"LISA-style: masks err {em:.2e}, iou err {ei:.2e}")
  assert em <= TOL and ei <= TOL


def test_sam_forward_end_to_end(ref, fns):
  """segment_anything Sam.forward (preprocess, encoder, prompts, decoder) on two images of raw
  pixels of different sizes, against preprocess + encode_image + encode_prompts + decode."""
  rs = np.random.RandomState(5)
  raw = [rs.uniform(0, 255, (64, 48, 3)).astype(np.float32), rs.uniform(0, 255, (40, 64, 3)).astype(np.float32)]
  prompts = [PROMPTS["points_padded"], PROMPTS["points_masks"]]
  batched = [dict(image=_t(r.transpose(2, 0, 1)), original_size=(96, 72), point_coords=tkw["points"][0],
                  point_labels=tkw["points"][1], **({"mask_inputs": tkw["masks"]} if "masks" in tkw else {}))
             for r, (_, tkw) in zip(raw, prompts)]
  want = ref(batched, multimask_output=True)
  cfg = S.SamConfig(img_size=IMG)
  emb = fns["encode"](jnp.concatenate([S.preprocess(jnp.asarray(r)[None], cfg) for r in raw]))
  for i, (jkw, _) in enumerate(prompts):
    sparse, dense = fns["prompts"]({k: jnp.asarray(x) for k, x in jkw.items()})
    masks, iou = fns["decode"](emb[i:i + 1], sparse, dense, True, None)
    em = max_abs_diff(masks, want[i]["low_res_logits"])
    ei = max_abs_diff(iou, want[i]["iou_predictions"])
    print(f"Sam.forward image {i}: low-res err {em:.2e}, iou err {ei:.2e}")
    assert em <= TOL and ei <= TOL


@pytest.fixture(scope="module")
def low_res():
  return np.random.RandomState(6).randn(3, 2, 4 * GRID, 4 * GRID).astype(np.float32) * 5


@pytest.mark.parametrize("input_size,original_size", [((64, 48), (96, 72)), ((48, 64), (30, 40)),
                                                      ((64, 64), (64, 64)), ((37, 64), (111, 200))])
def test_postprocess_static(ref, low_res, input_size, original_size):
  with torch.no_grad():
    want = ref.postprocess_masks(_t(low_res), input_size, original_size).numpy()
  got = jax.jit(functools.partial(S.postprocess_masks, input_size=input_size, original_size=original_size,
                                  padded_size=IMG))(low_res)
  err = max_abs_diff(got, want)
  print(f"postprocess {input_size} -> {original_size}: err {err:.2e}")
  assert err <= TOL


def test_postprocess_dynamic(ref, low_res):
  """Per-mask traced sizes, static [N, M, 120, 120] output, zero outside each mask's extent."""
  sizes = [((64, 48), (96, 72)), ((48, 64), (30, 40)), ((37, 64), (111, 120))]
  fn = jax.jit(functools.partial(S.postprocess_masks_dynamic, out_shape=(120, 120), padded_size=IMG))
  got = np.asarray(fn(low_res, jnp.asarray([s[0] for s in sizes]), jnp.asarray([s[1] for s in sizes])))
  assert got.shape == (3, 2, 120, 120)
  for n, (inp, orig) in enumerate(sizes):
    with torch.no_grad():
      want = ref.postprocess_masks(_t(low_res[n:n + 1]), inp, orig).numpy()[0]
    err = max_abs_diff(got[n, :, :orig[0], :orig[1]], want)
    print(f"dynamic postprocess {inp} -> {orig}: err {err:.2e}")
    assert err <= TOL
    outside = got[n].copy()
    outside[:, :orig[0], :orig[1]] = 0
    assert not outside.any()


class _ShapeOnlySource:
  """Shapes of a state dict, with zeros as tensors (no weights needed to check a key map)."""

  def __init__(self, state, prefix=""):
    self._shapes = {prefix + k: tuple(v.shape) for k, v in state.items()}

  def keys(self):
    return list(self._shapes)

  def shape(self, k):
    return self._shapes[k]

  def get(self, k):
    return np.broadcast_to(np.zeros((), np.float32), self._shapes[k])


def test_vit_b_key_map_under_lisa_prefix():
  """Real sam_vit_b names and shapes (built on the meta device) under LISA's `model.visual_model.`:
  the config read off the shapes is the vit_b preset, and every tensor lands on a parameter."""
  from jaxlisa.conversion import families  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.keymap import convert_state  # pylint: disable=import-outside-toplevel
  with torch.device("meta"):
    model = importlib.import_module("segment_anything.build_sam").build_sam_vit_b()
  src = _ShapeOnlySource(model.state_dict(), "model.visual_model.")
  assert sam_conv.find_prefix(src.keys()) == "model.visual_model."
  cfg = sam_conv.infer_config(src)
  assert cfg == S.vit_b(mlp_dim=3072)
  expected = families.abstract_params(families.get_family("sam"), cfg)
  params = convert_state(src, sam_conv.sam_rules(cfg, "model.visual_model."), expected, scan=False,
                         dtype=np.float16)
  assert params["image_encoder"]["blocks_2"]["attn"]["rel_pos_h"].shape == (127, 64)  # global: 2 * 64 - 1
  assert params["image_encoder"]["blocks_0"]["attn"]["rel_pos_h"].shape == (27, 64)  # window 14
