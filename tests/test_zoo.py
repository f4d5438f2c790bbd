"""LAVIS-style zoo: every tiny model builds and runs; a LAVIS-named .pth loads back into the zoo
architecture; image processors vs PIL + CLIP normalisation; caption / question text processing vs a
transcription of LAVIS's processors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jaxlisa import zoo as R
from jaxlisa.conversion import families as conv_families
from jaxlisa.conversion.keymap import export_state, flatten_tree
from jaxlisa.data.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from jaxlisa.inference import captioning


def lavis_pre_caption(caption, max_words=50):
  caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
  caption = re.sub(r"\s{2,}", " ", caption)
  caption = caption.rstrip("\n")
  caption = caption.strip(" ")
  caption_words = caption.split(" ")
  if len(caption_words) > max_words:
    caption = " ".join(caption_words[:max_words])
  return caption


@pytest.mark.parametrize("text", ["A Cat; sitting (on) a MAT!!", "  two   dogs.\n", "x " * 60, "#hash:tag~"])
def test_caption_processor_matches_lavis(text):
  assert R.pre_caption(text) == lavis_pre_caption(text)
  assert R.CaptionProcessor("a picture of ")(text) == "a picture of " + lavis_pre_caption(text)


def test_image_processors():
  img = np.random.RandomState(0).randint(0, 256, (40, 60, 3)).astype(np.uint8)
  got = R.ImageEvalProcessor(28)(img)
  resized = np.asarray(Image.fromarray(img).resize((28, 28), Image.BICUBIC)).astype(np.float32) / 255
  want = (resized - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
  np.testing.assert_allclose(got, want, atol=1e-6)
  train = R.ImageTrainProcessor(28, seed=1)
  a, b = train(img), train(img)
  assert a.shape == b.shape == (28, 28, 3) and not np.array_equal(a, b)


def test_unknown_names():
  with pytest.raises(ValueError, match="known"):
    R.load_model_and_preprocess("blip3")
  with pytest.raises(ValueError, match="model_type"):
    R.load_model_and_preprocess("blip2", "huge")
  assert "pretrain_opt2.7b" in R.model_types("blip2_opt")


def test_zoo_real_architectures_have_the_released_sizes():
  c = R.MODEL_ZOO["blip2_opt"]["caption_coco_opt2.7b"][0]()
  assert c.vision.image_size == 364 and c.vision.num_hidden_layers == 39 and c.text.hidden_size == 2560
  assert c.qformer.num_query_tokens == 32 and not c.qformer.use_text and c.prompt == "a photo of"
  b = R.MODEL_ZOO["blip_caption"]["large_coco"][0]()
  assert b.vision.hidden_size == 1024 and b.text.encoder_hidden_size == 1024 and b.prompt == "a picture of "


def test_tiny_blip_caption_round_trip(tmp_path):
  module, params, vis, txt = R.load_model_and_preprocess("blip_caption", "tiny", seed=3)
  state = export_state(params, conv_families.get_family("blip_lavis").export_rules(module.config, ()))
  path = str(tmp_path / "blip_tiny.pth")
  torch.save({"model": {k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}}, path)
  module2, params2, _, _ = R.load_model_and_preprocess("blip_caption", "tiny", checkpoint=path)
  assert module2.config == module.config
  a, b = flatten_tree(params), flatten_tree(params2)
  assert sorted(a) == sorted(b)
  for k in a:
    if k[-1] in ("q_bias", "v_bias") or "qkv" not in k:
      np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg="/".join(k))
  img = np.random.RandomState(0).randint(0, 256, (30, 30, 3)).astype(np.uint8)
  pixels = jnp.asarray(vis["eval"](img))[None]
  assert txt["eval"]("A DOG.") == "a picture of a dog"
  seqs, lengths = captioning.blip_captions(module2, params2, pixels, jnp.asarray([[62, 5, 6]]), num_beams=2, max_length=8,
                             min_length=4)
  assert seqs.shape == (1, 8) and 1 <= int(lengths[0]) <= 5


@pytest.mark.parametrize("name", ["blip2", "blip2_opt", "minigpt4qwen"])
def test_tiny_models_build(name):
  make, cls, family, size, _ = R.MODEL_ZOO[name]["tiny"]
  config = make()
  module = cls(config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *config.dummy_inputs())["params"]
  assert "visual_encoder" in shapes and "query_tokens" in shapes
  assert conv_families.get_family(family).build(config) == module
  assert R.ImageEvalProcessor(size)(np.zeros((10, 12, 3), np.uint8)).shape == (size, size, 3)
