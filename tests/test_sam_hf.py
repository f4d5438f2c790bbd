"""Parity of jaxlisa SAM with transformers' SamModel, through the `sam_hf` converter
(save_pretrained -> config.json + model.safetensors -> convert)."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import converted_sam, jitted_sam, max_abs_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlisa.conversion import sam as sam_conv  # noqa: E402
from jaxlisa.conversion.checkpoint_io import open_checkpoint  # noqa: E402
from jaxlisa.conversion.keymap import export_state  # noqa: E402

TOL = 1e-4
IMG, GRID = 64, 8


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """Tiny SamModel: 2 blocks (block 1 global), window 3 on an 8x8 grid; decoder with 2 heads (read
  from config.json). num_pos_feats must be half the prompt width (stack_notes 5)."""
  vc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=8,
            output_channels=32, window_size=3, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
  pc = dict(hidden_size=32, image_size=IMG, patch_size=8, mask_input_channels=8)
  mc = dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
  torch.manual_seed(0)
  model = transformers.SamModel(transformers.SamConfig(vision_config=vc, prompt_encoder_config=pc,
                                                       mask_decoder_config=mc)).eval().requires_grad_(False)
  with torch.no_grad():  # every tensor random (HF inits rel-pos / pos_embed to zero, norms to one)
    for name, t in model.state_dict().items():
      if "positional_embedding" in name:  # original SAM's scale (HF initialises it with std hidden/2)
        t.copy_(torch.randn_like(t))
      elif t.is_floating_point():
        base = 1.0 if name.endswith("weight") and t.ndim == 1 else 0.0
        t.copy_(base + 0.2 * torch.randn_like(t))
  path = tmp_path_factory.mktemp("sam_hf")
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def converted(hf):
  return converted_sam(hf[1])


@pytest.fixture(scope="module")
def fns(converted):
  return jitted_sam(*converted[1:])


@pytest.fixture(scope="module")
def pixels():
  return np.random.RandomState(0).randn(1, IMG, IMG, 3).astype(np.float32)


@pytest.fixture(scope="module")
def embeddings(hf, fns, pixels):
  model, _ = hf
  with torch.no_grad():
    want = model.get_image_embeddings(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
  return fns["encode"](pixels), want


def test_config(converted):
  conv, _, _ = converted
  c = conv.config
  assert conv.family == "sam_hf"
  assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.encoder_mlp_dim) == (64, 8, 32, 2, 2, 64)
  assert (c.window_size, c.global_attn_indexes, c.out_chans) == (3, (1,), 32)
  assert (c.prompt_embed_dim, c.mask_in_chans) == (32, 8)
  assert (c.decoder_num_heads, c.decoder_mlp_dim, c.decoder_norm_eps, c.decoder_final_norm_eps) == (2, 64, 1e-6, 1e-5)


def test_export_round_trip(hf, converted):
  conv, _, v = converted
  out = export_state(v["params"], sam_conv.hf_export_rules(conv.config), scan=False)
  src = open_checkpoint(hf[1])
  assert sorted(out) == sorted(src.keys())
  for k, x in out.items():
    np.testing.assert_array_equal(x, src.get(k), err_msg=k)


def test_image_embeddings(embeddings):
  got, want = embeddings
  err = max_abs_diff(np.asarray(got).transpose(0, 3, 1, 2), want)
  print(f"HF image embeddings max err {err:.2e}")
  assert err <= TOL


PTS = np.array([[[10.0, 20.0]], [[40.5, 7.0]]], np.float32)  # 2 prompts x 1 point
LABELS = np.array([[1], [0]], np.int64)
BOXES = np.array([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 30.0, 60.0]], np.float32)


@pytest.mark.parametrize("prompt,multimask", [("point", True), ("point", False), ("box", True)])
def test_masks_and_iou(hf, fns, embeddings, prompt, multimask):
  model, _ = hf
  emb, want_emb = embeddings
  if prompt == "point":
    jkw = dict(points=PTS, labels=LABELS)
    tkw = dict(input_points=torch.from_numpy(PTS[None]), input_labels=torch.from_numpy(LABELS[None]))
  else:
    jkw = dict(boxes=BOXES)
    tkw = dict(input_boxes=torch.from_numpy(BOXES[None]))
  with torch.no_grad():
    out = model(image_embeddings=torch.from_numpy(want_emb), multimask_output=multimask, **tkw)
  sparse, dense = fns["prompts"]({k: jnp.asarray(x) for k, x in jkw.items()})
  masks, iou = fns["decode"](emb, sparse, dense, multimask)
  wm, wi = out.pred_masks[0].numpy(), out.iou_scores[0].numpy()  # [P, M, 32, 32], [P, M]
  assert masks.shape == wm.shape == (2, 3 if multimask else 1, 4 * GRID, 4 * GRID)
  em, ei = max_abs_diff(masks, wm), max_abs_diff(iou, wi)
  print(f"HF {prompt} multimask={multimask}: masks err {em:.2e} (|max| {np.abs(wm).max():.1f}), iou err {ei:.2e}")
  assert em <= TOL and ei <= TOL
