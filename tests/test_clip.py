"""CLIP vision tower vs transformers' CLIPVisionModel / CLIPModel, through the converter."""

import numpy as np
import pytest
import torch

from conftest import max_abs_diff
from jaxlisa.conversion import families, keymap
from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.convert import convert_checkpoint
from jaxlisa.conversion.vision import CLIP_SKIP, clip_config_from_hf, clip_vision_rules, find_clip_prefix
from jaxlisa.models.clip import CLIPVisionConfig, CLIPVisionModel, select_features

import jax
import transformers

TOL = 1e-4
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=56, patch_size=14)


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.1)  # non-trivial biases and norms
  return model


def _nchw(x):
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION)).eval(), 1)
  d = tmp_path_factory.mktemp("clip_vision")
  model.save_pretrained(d)
  return model, str(d)


@pytest.fixture(scope="module")
def converted(ref):
  return convert_checkpoint(ref[1])


@pytest.fixture(scope="module")
def run(converted):
  module = CLIPVisionModel(converted.config)
  return jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))


@pytest.fixture(scope="module")
def pixels():
  return np.random.RandomState(0).randn(2, 56, 56, 3).astype(np.float32)


def test_family_and_config(converted):
  assert converted.family == "clip_vision"
  c = converted.config
  assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.image_size, c.patch_size) == (32, 2, 4, 56, 14)
  assert c.hidden_act == "quick_gelu" and c.layer_norm_eps == 1e-5
  assert converted.params["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)


def test_matches_hf(ref, converted, run, pixels):
  model = ref[0]
  with torch.no_grad():
    want = model(_nchw(pixels), output_hidden_states=True)
  got = run(converted.params, pixels)
  assert len(got.hidden_states) == len(want.hidden_states) == 3
  for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
    assert max_abs_diff(g, w) <= TOL, f"hidden_states[{i}]"
  assert max_abs_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
  assert max_abs_diff(got.pooler_output, want.pooler_output) <= TOL


@pytest.mark.parametrize("hw", [(84, 84), (42, 70)])
def test_position_interpolation(ref, converted, run, hw):
  model = ref[0]
  x = np.random.RandomState(1).randn(1, *hw, 3).astype(np.float32)
  with torch.no_grad():
    want = model(_nchw(x), interpolate_pos_encoding=True)
  got = run(converted.params, x)
  assert got.last_hidden_state.shape[1] == 1 + (hw[0] // 14) * (hw[1] // 14)
  assert max_abs_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
  assert max_abs_diff(got.pooler_output, want.pooler_output) <= TOL


def test_select_features(ref, converted, run, pixels):
  with torch.no_grad():
    want = ref[0](_nchw(pixels), output_hidden_states=True).hidden_states
  got = run(converted.params, pixels).hidden_states
  patch = select_features(got, -2, "patch")
  assert patch.shape == (2, 16, 32)
  assert max_abs_diff(patch, want[-2][:, 1:]) <= TOL
  assert max_abs_diff(select_features(got, -2, "cls_patch"), want[-2]) <= TOL
  with pytest.raises(ValueError, match="kind"):
    select_features(got, -2, "cls")


def test_unscanned_layers(ref, converted, pixels):
  conv = convert_checkpoint(ref[1], config_overrides={"scan_layers": False})
  assert "layers_1" in conv.params["encoder"]
  with torch.no_grad():
    want = ref[0](_nchw(pixels))
  got = CLIPVisionModel(conv.config).apply({"params": conv.params}, pixels)
  assert max_abs_diff(got.pooler_output, want.pooler_output) <= TOL


def test_clip_model_keys(tmp_path, run, pixels):
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=99, max_position_embeddings=16),
      vision_config=HF_VISION, projection_dim=16)
  torch.manual_seed(1)
  model = _randomize(transformers.CLIPModel(cfg).eval(), 2)
  model.save_pretrained(tmp_path)
  conv = convert_checkpoint(str(tmp_path))
  assert conv.family == "clip_vision"
  assert conv.config == CLIPVisionConfig(**HF_VISION)
  with torch.no_grad():
    want = model.vision_model(_nchw(pixels), output_hidden_states=True)
  got = run(conv.params, pixels)
  assert max_abs_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
  assert max_abs_diff(got.pooler_output, want.pooler_output) <= TOL


def _hf_state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model.",
                                    "vision_tower.", "model.vision_tower.", "vision_model."])
def test_llava_prefixes(ref, converted, prefix):
  state = {prefix + k: v for k, v in _hf_state(ref[0]).items()}
  state["model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 4), np.float32)  # LLM keys around it
  state["model.mm_projector.weight"] = np.zeros((4, 32), np.float32)
  assert find_clip_prefix(list(state)) == prefix
  expected = families.abstract_params(families.get_family("clip_vision"), converted.config)
  params = keymap.convert_state(state, clip_vision_rules(converted.config, prefix), expected,
                                skip=CLIP_SKIP + (r"^(?!" + prefix.replace(".", r"\.") + ")",))
  for path, v in keymap.flatten_tree(converted.params).items():
    np.testing.assert_array_equal(keymap.flatten_tree(params)[path], v, err_msg="/".join(path))


def test_no_config_json(tmp_path, ref, converted):
  """A bare safetensors file: dims come from tensor shapes (heads assume head_dim 64 unless overridden)."""
  import shutil
  shutil.copy(f"{ref[1]}/model.safetensors", tmp_path / "clip.safetensors")
  conv = convert_checkpoint(str(tmp_path / "clip.safetensors"), config_overrides={"num_attention_heads": 4})
  assert conv.family == "clip_vision" and conv.config == converted.config
  for path, v in keymap.flatten_tree(converted.params).items():
    np.testing.assert_array_equal(keymap.flatten_tree(conv.params)[path], v, err_msg="/".join(path))


def test_export_round_trip(ref, converted):
  back = keymap.export_state(converted.params, clip_vision_rules(converted.config, ""))
  want = _hf_state(ref[0])
  assert sorted(back) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_missing_key_is_named(ref, converted):
  state = _hf_state(ref[0])
  del state["encoder.layers.1.mlp.fc2.bias"]
  expected = families.abstract_params(families.get_family("clip_vision"), converted.config)
  with pytest.raises(CheckpointError, match="encoder/layers/mlp/fc2/bias"):
    keymap.convert_state(state, clip_vision_rules(None, ""), expected)


def test_configs():
  llava_vision = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                  "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
  c = clip_config_from_hf({"model_type": "llava", "vision_config": llava_vision})
  assert c == CLIPVisionConfig.vit_l14(336)
  assert c.hidden_act == "quick_gelu" and c.layer_norm_eps == 1e-5 and c.num_positions == 577
  assert CLIPVisionConfig.vit_l14(224).num_positions == 257
  assert CLIPVisionConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError):
    CLIPVisionConfig.vit_l14(448)
  with pytest.raises(CheckpointError):
    clip_config_from_hf({"model_type": "siglip_vision_model"})
