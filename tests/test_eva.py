"""EVA ViT (LAVIS eva_vit.py, as BLIP-2 uses it) + ln_vision vs a PyTorch reference written here
with LAVIS's structure and parameter names, converted from a torch.save'd .pth."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import max_abs_diff
from jaxlisa.conversion import keymap
from jaxlisa.conversion.convert import convert_checkpoint
from jaxlisa.conversion.vision import eva_rules
from jaxlisa.models.eva import EVAViTConfig, EVAVisionTransformer

import jax

TOL = 1e-4
IMG, PATCH, WIDTH, DEPTH, HEADS, RATIO = 56, 14, 64, 2, 4, 4.3637


# ----------------------------------------------------------------------------- PyTorch reference (LAVIS layout)
class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.num_heads, self.scale = heads, (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=False)
    self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, _ = x.shape
    bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
    qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
  def __init__(self, dim, heads, ratio):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, img, patch, dim):
    super().__init__()
    self.num_patches = (img // patch) ** 2
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  def __init__(self, img=IMG, patch=PATCH, dim=WIDTH, depth=DEPTH, heads=HEADS, ratio=RATIO):
    super().__init__()
    self.patch_embed = PatchEmbed(img, patch, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, heads, ratio) for _ in range(depth)])

  def forward(self, x, all_layers=False):
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
    outs = [x]
    for blk in self.blocks:
      x = blk(x)
      outs.append(x)
    return outs if all_layers else x


class Blip2Vision(nn.Module):
  """BLIP-2's visual_encoder + ln_vision (LAVIS LayerNorm: torch default eps 1e-5, run in fp32)."""

  def __init__(self, **kw):
    super().__init__()
    self.visual_encoder = VisionTransformer(**kw)
    self.ln_vision = nn.LayerNorm(self.visual_encoder.pos_embed.shape[-1])

  def forward(self, x):
    return self.ln_vision(self.visual_encoder(x))


def lavis_interpolate_pos_embed(model, state):
  """LAVIS `interpolate_pos_embed` (bicubic on the patch grid, CLS kept), on a state dict."""
  pe = state["pos_embed"].float()
  num_patches = model.patch_embed.num_patches
  extra = model.pos_embed.shape[-2] - num_patches
  orig, new = int((pe.shape[-2] - extra) ** 0.5), int(num_patches ** 0.5)
  if orig != new:
    tok = pe[:, extra:].reshape(-1, orig, orig, pe.shape[-1]).permute(0, 3, 1, 2)
    tok = F.interpolate(tok, size=(new, new), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat((pe[:, :extra], tok.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


# ----------------------------------------------------------------------------- fixtures
def _nchw(x):
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  torch.manual_seed(0)
  model = Blip2Vision().eval()
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.2)
  d = tmp_path_factory.mktemp("eva")
  path = str(d / "blip2_vision.pth")
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope="module")
def converted(ref):
  return convert_checkpoint(ref[1], config_overrides={"num_attention_heads": HEADS})


@pytest.fixture(scope="module")
def run(converted):
  module = EVAVisionTransformer(converted.config)
  return jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))


@pytest.fixture(scope="module")
def big_ref(ref):
  """The LAVIS build at 84 px (grid 6) loading the 56 px (grid 4) weights."""
  big = VisionTransformer(img=84).eval()
  state = {k[len("visual_encoder."):]: v for k, v in ref[0].state_dict().items() if k.startswith("visual_encoder.")}
  lavis_interpolate_pos_embed(big, state)
  big.load_state_dict(state)
  return big


# ----------------------------------------------------------------------------- tests
def test_inferred_config(converted):
  c = converted.config
  assert converted.family == "eva_vit"
  assert (c.image_size, c.patch_size, c.hidden_size, c.num_hidden_layers, c.mlp_dim) == (IMG, PATCH, WIDTH, DEPTH,
                                                                                         int(WIDTH * RATIO))
  assert c.use_ln_vision and c.qkv_bias and c.layer_norm_eps == 1e-6 and c.ln_vision_eps == 1e-5
  assert converted.params["blocks"]["attn"]["qkv"]["kernel"].shape == (DEPTH, WIDTH, 3, HEADS, WIDTH // HEADS)


def test_matches_reference(ref, converted, run):
  model = ref[0]
  x = np.random.RandomState(0).randn(2, IMG, IMG, 3).astype(np.float32)
  with torch.no_grad():
    layers = model.visual_encoder(_nchw(x), all_layers=True)
    embeds = model.ln_vision(layers[-1])
  got = run(converted.params, x)
  for i, (g, w) in enumerate(zip(got.hidden_states, layers)):
    assert max_abs_diff(g, w) <= TOL, f"hidden_states[{i}]"
  assert max_abs_diff(got.last_hidden_state, layers[-1]) <= TOL
  assert max_abs_diff(got.image_embeds, embeds) <= TOL


def test_runtime_pos_interpolation(converted, run, big_ref):
  x = np.random.RandomState(1).randn(1, 84, 84, 3).astype(np.float32)
  with torch.no_grad():
    want = big_ref(_nchw(x))
  got = run(converted.params, x)
  assert got.last_hidden_state.shape == (1, 37, WIDTH)
  assert max_abs_diff(got.last_hidden_state, want) <= TOL


def test_convert_to_other_size(ref, big_ref):
  conv = convert_checkpoint(ref[1], config_overrides={"num_attention_heads": HEADS, "image_size": 84})
  assert conv.params["pos_embed"].shape == (1, 37, WIDTH)
  assert max_abs_diff(conv.params["pos_embed"], big_ref.pos_embed) <= 1e-5
  x = np.random.RandomState(2).randn(1, 84, 84, 3).astype(np.float32)
  with torch.no_grad():
    want = big_ref(_nchw(x))
  got = EVAVisionTransformer(conv.config).apply({"params": conv.params}, x)
  assert max_abs_diff(got.last_hidden_state, want) <= TOL


def test_bare_lavis_names(tmp_path, ref, converted):
  """A ViT-only file (no `visual_encoder.` prefix, no ln_vision) converts to the same ViT params."""
  state = {k[len("visual_encoder."):]: v for k, v in ref[0].state_dict().items() if k.startswith("visual_encoder.")}
  path = str(tmp_path / "eva_vit_g.pth")
  torch.save(state, path)
  conv = convert_checkpoint(path, config_overrides={"num_attention_heads": HEADS})
  assert conv.family == "eva_vit" and not conv.config.use_ln_vision and "ln_vision" not in conv.params
  want = {p: v for p, v in keymap.flatten_tree(converted.params).items() if p[0] != "ln_vision"}
  got = keymap.flatten_tree(conv.params)
  assert sorted(got) == sorted(want)
  for p, v in want.items():
    np.testing.assert_array_equal(got[p], v, err_msg="/".join(p))


def test_export_round_trip(ref, converted):
  back = keymap.export_state(converted.params, eva_rules(converted.config, "visual_encoder."))
  want = {k: v.numpy() for k, v in ref[0].state_dict().items()}
  assert sorted(back) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_eva_vit_g_preset():
  c = EVAViTConfig.eva_vit_g(364)
  assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.mlp_dim) == (1408, 39, 16, 88, 6144)
  assert c.grid == 26 and c.layer_norm_eps == 1e-6 and c.hidden_act == "gelu"
  assert EVAViTConfig.from_dict(c.to_dict()) == c
  shapes = jax.eval_shape(lambda: EVAVisionTransformer(c).init(jax.random.PRNGKey(0),
                                                               np.zeros((1, 364, 364, 3), np.float32)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert 985e6 < n < 990e6, n  # EVA ViT-g with 39 blocks + ln_vision: ~986M parameters
