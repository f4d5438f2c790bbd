"""LLaVA-1.6 (anyres) vs transformers' LlavaNextForConditionalGeneration through the converter:
two images of different sizes and aspect ratios (one is unpadded by rows, one by columns),
spatial_unpad + image_newline, logits and greedy generation; the packing order of all merge
types vs a torch transcription of LLaVA's merge code; the original-LLaVA v1.6 names."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

from conftest import max_abs_diff
from jaxlisa.conversion.convert import convert_checkpoint, export_checkpoint
from jaxlisa.conversion.keymap import flatten_tree
from jaxlisa.data import anyres
from jaxlisa.inference import multimodal
from jaxlisa.models import llava

TOL = 1e-4
V, IMG, S = 128, 100, 42  # vocab, image token id, CLIP input size (3 x 3 patches of 14)
PINPOINTS = [[42, 84], [84, 42], [84, 84]]
SIZES = [(20, 100), (90, 50)]  # (height, width): 1x2 crops cut to 1 row; 2x2 crops cut to 4 columns
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=S, patch_size=14)
TEXT = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)


def _nchw(x):
  return torch.tensor(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, -3)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  torch.manual_seed(0)
  cfg = tf.LlavaNextConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMG,
                           image_grid_pinpoints=PINPOINTS)
  model = tf.LlavaNextForConditionalGeneration(cfg).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith(("bias", "newline")):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
      elif "embed_tokens" in n or "lm_head" in n:  # so that greedy decoding does not settle at once
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
  d = tmp_path_factory.mktemp("llava_next_hf")
  model.save_pretrained(d)
  return model, str(d)


@pytest.fixture(scope="module")
def converted(hf):
  return convert_checkpoint(hf[1])


@pytest.fixture(scope="module")
def images(converted):
  """HF layout: pixel_values [n_img, max_crops, H, W, 3] (unused crops are noise)."""
  c = converted.config
  crops = [llava.num_crops(c, s) for s in SIZES]
  px = np.random.RandomState(0).randn(len(SIZES), max(crops), S, S, 3).astype(np.float32)
  return px, crops, [llava.num_image_tokens(c, s) for s in SIZES]


def _rows(rs, counts, left=False):
  rows = [[1, *rs.randint(3, IMG, 3), *[IMG] * n, *rs.randint(3, IMG, 2 + 3 * b)] for b, n in enumerate(counts)]
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int64)
  mask = np.zeros_like(ids)
  for b, r in enumerate(rows):
    sl = slice(t - len(r), t) if left else slice(0, len(r))
    ids[b, sl], mask[b, sl] = r, 1
  return ids, mask


def test_config_and_token_counts(converted):
  c = converted.config
  assert converted.family == "llava_next_hf"
  assert c.is_anyres and c.mm_patch_merge_type == "spatial_unpad" and c.has_image_newline
  assert c.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
  assert llava.LlavaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  for s in SIZES:
    assert llava.num_image_tokens(c, s) == anyres.num_anyres_image_tokens(s, PINPOINTS, S, 14)
    rows, cols = anyres.unpadded_feature_shape(s, PINPOINTS, S, 14)
    grid_r, grid_c = anyres.get_anyres_image_grid_shape(s, PINPOINTS, S)
    assert rows * cols < grid_r * grid_c * 9  # both images are really unpadded
  assert converted.params["image_newline"].shape == (64,)


def test_logits_anyres(hf, converted, images):
  px, _, counts = images
  ids, mask = _rows(np.random.RandomState(1), counts)
  module = llava.Llava(converted.config)
  index, lens = llava.anyres_feature_index(converted.config, SIZES, crops_per_slot=px.shape[1])
  assert lens == counts
  fwd = jax.jit(lambda p, i, m, x, fi: module.apply({"params": p}, i, m, x, feature_index=fi).logits)
  got = fwd(converted.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(px), jnp.asarray(index))
  with torch.no_grad():
    want = hf[0](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=_nchw(px),
                 image_sizes=torch.tensor(SIZES)).logits
  err = max_abs_diff(got, want, mask)
  print(f"max |logits - HF LlavaNext| = {err:.2e}")
  assert err <= TOL, err


def test_greedy_generation_concatenated_crops(hf, converted, images):
  """Left-padded prompts; the crops passed concatenated [sum n_crops, H, W, 3] with image_sizes."""
  px, crops, counts = images
  ids, mask = _rows(np.random.RandomState(2), counts, left=True)
  flat = np.concatenate([px[i, :n] for i, n in enumerate(crops)])
  module = llava.Llava(converted.config)
  got = multimodal.llava_generate(module, converted.params, ids, mask, flat, SIZES, max_new_tokens=10, stop_ids=(2,),
                                  pad_token_id=0)
  with torch.no_grad():
    want = hf[0].generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=_nchw(px),
                          image_sizes=torch.tensor(SIZES), max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=2)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(got.tokens)[:, :want.shape[1]], want)


def ref_merge_order(feats, image_size, grid_shape, merge_type, newline):
  """Torch transcription of LLaVA's per-image anyres merge (llava_arch.py), with transformers'
  rounding in unpad: feats [n_crops, s*s, D] -> [L, D]."""
  base, rest = feats[0], feats[1:]
  s = int(round(base.shape[0] ** 0.5))
  if merge_type == "flat":
    return feats.flatten(0, 1)
  rows, cols = grid_shape
  x = rest.view(rows, cols, s, s, -1)
  if merge_type == "spatial":
    return torch.cat([base, x.permute(0, 2, 1, 3, 4).flatten(0, 3)])
  x = x.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, rows*s, cols*s]
  h, w = image_size
  ch, cw = x.shape[1:]
  if w / h > cw / ch:
    pad = (ch - int(round(h * (cw / w), 7))) // 2
    x = x[:, pad:ch - pad]
  else:
    pad = (cw - int(round(w * (ch / h), 7))) // 2
    x = x[:, :, pad:cw - pad]
  x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
  return torch.cat([base, x.flatten(1, 2).transpose(0, 1)])


@pytest.mark.parametrize("merge", ["flat", "spatial", "spatial_unpad"])
@pytest.mark.parametrize("size", SIZES + [(60, 61), (84, 30)])
def test_packing_order_matches_llava(converted, merge, size):
  c = converted.config.replace(mm_patch_merge_type=merge)
  n = llava.num_crops(c, size)
  feats = torch.arange(n * 9, dtype=torch.float64).view(n, 9, 1) + 1  # value = 1 + feature row
  grid = anyres.get_anyres_image_grid_shape(size, PINPOINTS, S)
  want = ref_merge_order(feats, size, grid, merge, torch.zeros(1, dtype=torch.float64))[:, 0].numpy() - 1
  got, lens = llava.anyres_feature_index(c, [size])
  np.testing.assert_array_equal(got, want)  # -1 marks image_newline on both sides
  assert lens == [len(want)]


def test_original_v16_names(hf, converted, tmp_path):
  """LLaVA-1.6 original names (model.image_newline, mm_projector.{0,2}, tower inside) and its
  config (pinpoints as (width, height), anyres, spatial_unpad) give the same model."""
  on_disk = load_file(os.path.join(hf[1], "model.safetensors"))
  state = {}
  for k, v in on_disk.items():
    k = {"image_newline": "model.image_newline", "language_model.lm_head.weight": "lm_head.weight"}.get(k, k)
    k = k.replace("language_model.model.", "model.", 1).replace(
        "vision_tower.", "model.vision_tower.vision_tower.vision_model.", 1)
    k = k.replace("multi_modal_projector.linear_1.", "model.mm_projector.0.").replace(
        "multi_modal_projector.linear_2.", "model.mm_projector.2.")
    state[k] = v
  clip_dir = tmp_path / "clip"
  tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)).save_pretrained(clip_dir)  # config source only
  cfg = {**json.load(open(os.path.join(hf[1], "config.json")))["text_config"], "model_type": "llava_llama",
         "mm_vision_tower": str(clip_dir), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
         "mm_vision_select_layer": -2, "image_aspect_ratio": "anyres",
         "image_grid_pinpoints": [[w, h] for h, w in PINPOINTS], "mm_patch_merge_type": "spatial_unpad"}
  d = tmp_path / "orig"
  os.makedirs(d)
  save_file(state, str(d / "model.safetensors"))
  with open(d / "config.json", "w") as f:
    json.dump(cfg, f)
  conv = convert_checkpoint(str(d))
  assert conv.family == "llava_original"
  c = conv.config
  assert (c.image_grid_pinpoints, c.mm_patch_merge_type, c.is_anyres) == \
      (converted.config.image_grid_pinpoints, "spatial_unpad", True)
  fa, fb = flatten_tree(conv.params), flatten_tree(converted.params)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def test_in_memory_names_and_export(hf, converted, tmp_path):
  """transformers-5 in-memory names (model.image_newline, ...) convert to the same params; export
  writes back the save_pretrained names."""
  model, d = hf
  save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    f.write(open(os.path.join(d, "config.json")).read())
  conv = convert_checkpoint(str(tmp_path))
  fa, fb = flatten_tree(conv.params), flatten_tree(converted.params)
  assert conv.family == "llava_next_hf" and fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))
  on_disk = load_file(os.path.join(d, "model.safetensors"))
  exported = export_checkpoint(converted.params, "llava_next_hf", converted.config, None)
  assert exported.keys() == on_disk.keys()
  for k in on_disk:
    np.testing.assert_array_equal(exported[k], on_disk[k], err_msg=k)
