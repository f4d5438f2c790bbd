"""LLaVA (v1 / v1.5) vs transformers' LlavaForConditionalGeneration through the converter:
logits on right-padded batches (one image per sample; two images in one sample next to a
text-only sample), greedy generation, the three llava-hf key naming schemes, export; the
original-LLaVA converter (tower inside / separate / from mm_vision_tower) on renamed weights; and
the collate + merge against a torch transcription of LLaVA's prepare_inputs_labels_for_multimodal
(labels, attention mask, positions, truncation to model_max_length, dummy image of text-only
samples)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file

from conftest import assert_trees_equal, max_abs_diff, write_checkpoint_dir
from jaxlisa.conversion import families
from jaxlisa.conversion import llava as llava_conv
from jaxlisa.conversion import loaders
from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.convert import convert_checkpoint, export_checkpoint, load_pretrained, save_converted
from jaxlisa.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from jaxlisa.data import llava_collate
from jaxlisa.models import llava
from jaxlisa.inference import multimodal

TOL = 1e-4
V, IMG, N = 128, 100, 9  # vocab, llava-hf image token id, tokens per image (42 px / patch 14)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=42, patch_size=14)
TEXT = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)


def _perturb(model, seed=1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
  return model


def _nchw(x):
  return torch.tensor(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  torch.manual_seed(0)
  cfg = tf.LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMG)
  model = _perturb(tf.LlavaForConditionalGeneration(cfg)).eval()
  d = tmp_path_factory.mktemp("llava_hf")
  model.save_pretrained(d)
  return model, str(d)


@pytest.fixture(scope="module")
def converted(hf):
  return convert_checkpoint(hf[1])


def _logits(converted, ids, mask, px, image_mask=None, offset=None):
  module = llava.Llava(converted.config)
  f = _jitted(module)
  return f(converted.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(px),
           None if image_mask is None else jnp.asarray(image_mask),
           None if offset is None else jnp.asarray(offset))


_JIT = {}


def _jitted(module):
  """One jitted forward per model config (each compiles once per input shape)."""
  if module.config not in _JIT:
    _JIT[module.config] = jax.jit(lambda p, ids, mask, px, im, off: module.apply(
        {"params": p}, ids, mask, px, image_mask=im, image_row_offset=off).logits)
  return _JIT[module.config]


def _row(rs, parts):
  """parts: ints (text lengths) and 'I' (an image) -> ids with N image tokens per image."""
  out = [1]
  for p in parts:
    out += [IMG] * N if p == "I" else list(rs.randint(3, IMG, p))
  return out


def _right_pad(rows):
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int64)
  mask = np.zeros_like(ids)
  for b, r in enumerate(rows):
    ids[b, :len(r)], mask[b, :len(r)] = r, 1
  return ids, mask


def _pixels(n, seed=0):
  return np.random.RandomState(seed).randn(n, 42, 42, 3).astype(np.float32)


def _hf_logits(model, ids, mask, px):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=_nchw(px) if len(px) else None).logits


def test_family_and_config(hf, converted):
  assert converted.family == "llava_hf"
  c = converted.config
  assert (c.projector_type, c.vision_feature_layer, c.vision_feature_select_strategy) == ("mlp2x_gelu", -2, "default")
  assert c.image_token_index == IMG and c.tokens_per_crop == N and not c.is_anyres
  assert c.text.num_key_value_heads == 2 and c.vision.image_size == 42
  assert llava.LlavaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  keys = list(load_file(os.path.join(hf[1], "model.safetensors")))
  assert not families.get_family("llama").detect(None, keys)
  assert families.detect_family(None, keys).name == "llava_hf"


def test_logits_one_image_per_sample(hf, converted):
  rs = np.random.RandomState(0)
  ids, mask = _right_pad([_row(rs, [3, "I", 6]), _row(rs, [5, "I", 1])])
  px = _pixels(2)
  err = max_abs_diff(_logits(converted, ids, mask, px), _hf_logits(hf[0], ids, mask, px), mask)
  print(f"max |logits - HF| = {err:.2e}")
  assert err <= TOL, err


def test_logits_two_images_in_one_sample(hf, converted):
  """Row 0 holds two images, row 1 none, row 2 one: features flow in reading order."""
  rs = np.random.RandomState(1)
  ids, mask = _right_pad([_row(rs, [2, "I", 3, "I", 2]), _row(rs, [9]), _row(rs, ["I", 4])])
  px = _pixels(3, seed=1)
  err = max_abs_diff(_logits(converted, ids, mask, px), _hf_logits(hf[0], ids, mask, px), mask)
  print(f"max |logits - HF| = {err:.2e}")
  assert err <= TOL, err


def test_greedy_generation_matches_hf(hf, converted):
  rs = np.random.RandomState(2)
  rows = [_row(rs, [2, "I", 5]), _row(rs, ["I", 2])]
  t = max(map(len, rows))
  ids = np.zeros((2, t), np.int64)
  mask = np.zeros_like(ids)
  for b, r in enumerate(rows):  # left padding
    ids[b, t - len(r):], mask[b, t - len(r):] = r, 1
  px = _pixels(2, seed=2)
  module = llava.Llava(converted.config)
  got = multimodal.llava_generate(module, converted.params, ids, mask, px, max_new_tokens=10, stop_ids=(2,),
                                  pad_token_id=0)
  with torch.no_grad():
    want = hf[0].generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=_nchw(px),
                          max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2)[:, t:].numpy()
  np.testing.assert_array_equal(np.asarray(got.tokens)[:, :want.shape[1]], want)


def test_variant_feature_layers_full_strategy_tied_mistral(tmp_path):
  """Two concatenated CLIP layers, CLS kept ('full'), a Mistral LM with a sliding window and tied
  embeddings (no lm_head in the file)."""
  torch.manual_seed(3)
  text = {**TEXT, "model_type": "mistral", "sliding_window": 8, "tie_word_embeddings": True}
  cfg = tf.LlavaConfig(vision_config=VISION, text_config=text, image_token_index=IMG, vision_feature_layer=[-3, -1],
                       vision_feature_select_strategy="full", tie_word_embeddings=True)
  model = _perturb(tf.LlavaForConditionalGeneration(cfg)).eval()
  model.save_pretrained(tmp_path)
  conv = convert_checkpoint(str(tmp_path))
  c = conv.config
  assert (c.vision_feature_layer, c.tokens_per_crop, c.mm_hidden_size) == ((-3, -1), N + 1, 64)
  assert c.text.family == "mistral" and c.text.sliding_window == 8 and c.text.tie_word_embeddings
  rs = np.random.RandomState(4)
  ids, mask = _right_pad([[1, *rs.randint(3, IMG, 4), *[IMG] * (N + 1), *rs.randint(3, IMG, 6)],
                          [1, *[IMG] * (N + 1), *rs.randint(3, IMG, 3)]])
  px = _pixels(2, seed=4)
  err = max_abs_diff(_logits(conv, ids, mask, px), _hf_logits(model, ids, mask, px), mask)
  print(f"max |logits - HF| (variant) = {err:.2e}")
  assert err <= TOL, err


def test_hf_key_schemes_and_export(hf, converted, tmp_path):
  """transformers-5 in-memory names and transformers-4 hub names convert to the same params;
  export writes back what save_pretrained wrote."""
  model, d = hf
  cfg = json.load(open(os.path.join(d, "config.json")))
  in_memory = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in in_memory)
  on_disk = load_file(os.path.join(d, "model.safetensors"))
  v4 = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
        for k, v in on_disk.items()}
  for name, state in (("memory", in_memory), ("v4", v4)):
    conv = convert_checkpoint(write_checkpoint_dir(tmp_path / name, state, cfg))
    assert conv.family == "llava_hf"
    assert_trees_equal(conv.params, converted.params)
  exported = export_checkpoint(converted.params, "llava_hf", converted.config, None)
  assert exported.keys() == on_disk.keys()
  for k in on_disk:
    np.testing.assert_array_equal(exported[k], on_disk[k], err_msg=k)


def test_save_and_load_converted(converted, tmp_path):
  dst = save_converted(str(tmp_path / "out"), converted)
  loaded = load_pretrained(dst)
  assert loaded.family == "llava_hf" and loaded.config == converted.config
  assert isinstance(loaded.module, llava.Llava)
  assert_trees_equal(loaded.params, converted.params)


# ----------------------------------------------------------------------------- original LLaVA
def _original_names(on_disk):
  """llava-hf file names -> original LLaVA names (tower inside), mlp2x_gelu projector."""
  out = {}
  for k, v in on_disk.items():
    if k.startswith("language_model.model."):
      k = "model." + k[len("language_model.model."):]
    elif k == "language_model.lm_head.weight":
      k = "lm_head.weight"
    elif k.startswith("multi_modal_projector.linear_"):
      i, rest = k[len("multi_modal_projector.linear_"):].split(".", 1)
      k = f"model.mm_projector.{2 * (int(i) - 1)}.{rest}"
    elif k.startswith("vision_tower."):
      k = "model.vision_tower.vision_tower.vision_model." + k[len("vision_tower."):]
    out[k] = v
  return out


@pytest.fixture(scope="module")
def original(hf, tmp_path_factory):
  """Original-LLaVA checkpoints built from the HF model's weights: tower inside (its config from a
  local CLIP directory named by mm_vision_tower), tower in a separate CLIP directory."""
  model, d = hf
  root = tmp_path_factory.mktemp("llava_original")
  clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION))
  clip.load_state_dict(model.model.vision_tower.state_dict())
  clip_dir = str(root / "clip")
  clip.save_pretrained(clip_dir)
  cfg = {**json.load(open(os.path.join(d, "config.json")))["text_config"], "model_type": "llava",
         "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": clip_dir, "mm_hidden_size": 32,
         "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
         "mm_use_im_start_end": False, "image_aspect_ratio": "pad", "tokenizer_model_max_length": 20}
  names = _original_names(load_file(os.path.join(d, "model.safetensors")))
  inside = write_checkpoint_dir(root / "inside", names, cfg)
  no_tower = {k: v for k, v in names.items() if "vision_tower" not in k}
  separate = write_checkpoint_dir(root / "separate", no_tower, {**cfg, "mm_vision_tower": "openai/not-here"})
  return dict(inside=inside, separate=separate, clip=clip_dir, auto=write_checkpoint_dir(root / "auto", no_tower, cfg))


@pytest.fixture(scope="module")
def converted_original(original):
  return convert_checkpoint(original["inside"])


def test_original_converter(original, converted, converted_original):
  conv = converted_original
  assert conv.family == "llava_original"
  c = conv.config
  assert c.image_token_index == IMAGE_TOKEN_INDEX and c.image_aspect_ratio == "pad"
  assert c.vision == converted.config.vision and c.text == converted.config.text
  assert c.tokenizer_model_max_length == 20
  assert_trees_equal(conv.params, converted.params)
  # the tower from a CLIP directory passed as an argument, or found through mm_vision_tower
  assert_trees_equal(llava_conv.convert_llava(original["separate"], clip=original["clip"]).params, conv.params)
  assert_trees_equal(llava_conv.convert_llava(original["auto"]).params, conv.params)
  loaded = loaders.load_llava(original["separate"], clip=original["clip"], with_tokenizer=False)
  assert loaded.config == c and loaded.family == "llava_original"
  with pytest.raises(CheckpointError, match="clip="):
    convert_checkpoint(original["separate"])
  # export back to original names (tower inside) and read them again
  state = export_checkpoint(conv.params, "llava_original", c, None)
  assert set(state) == set(load_file(os.path.join(original["inside"], "model.safetensors")))


def test_linear_projector_names():
  """LLaVA-1 / LISA: a single Linear stored as model.mm_projector.{weight,bias}."""
  c = llava.LlavaConfig(vision=llava.CLIPVisionConfig(**VISION), text=llava.DecoderConfig(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4),
      projector_type="linear")
  keys = ["model.mm_projector.weight", "model.mm_projector.bias",
          "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"]
  srcs = {r.src for r in llava_conv.original_rules(c, keys)}
  assert {"model.mm_projector.weight", "model.mm_projector.bias"} <= srcs
  assert not any(s.startswith("model.mm_projector.0") for s in srcs)
  abstract = families.abstract_params(families.get_family("llava_original"), c)
  assert abstract["multi_modal_projector"]["linear_1"]["kernel"].shape == (32, 64)
  assert "linear_2" not in abstract["multi_modal_projector"]


# ----------------------------------------------------------------------------- collate + merge
def ref_prepare_inputs_labels(embed_tokens, input_ids, attention_mask, labels, image_features,
                              max_length=None, padding_side="right"):
  """Torch transcription of LLaVA's `prepare_inputs_labels_for_multimodal` after the images are
  encoded (llava/model/llava_arch.py): returns (embeds, labels, attention_mask, position_ids)."""
  keep = attention_mask.bool()
  ids_list = [ids[m] for ids, m in zip(input_ids, keep)]
  lab_list = [lab[m] for lab, m in zip(labels, keep)]
  new_embeds, new_labels, image_idx = [], [], 0
  for b, ids in enumerate(ids_list):
    n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
    if n_images == 0:  # consumes (and drops) one image: the dummy image of text-only samples
      feats = image_features[image_idx]
      new_embeds.append(torch.cat([embed_tokens(ids), feats[0:0]]))
      new_labels.append(lab_list[b])
      image_idx += 1
      continue
    cuts = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [ids.shape[0]]
    text_ids = [ids[cuts[i] + 1:cuts[i + 1]] for i in range(len(cuts) - 1)]
    text_labels = [lab_list[b][cuts[i] + 1:cuts[i + 1]] for i in range(len(cuts) - 1)]
    text_embeds = torch.split(embed_tokens(torch.cat(text_ids)), [len(x) for x in text_ids])
    pieces, piece_labels = [], []
    for i in range(n_images + 1):
      pieces.append(text_embeds[i])
      piece_labels.append(text_labels[i])
      if i < n_images:
        feats = image_features[image_idx]
        image_idx += 1
        pieces.append(feats)
        piece_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=labels.dtype))
    new_embeds.append(torch.cat(pieces))
    new_labels.append(torch.cat(piece_labels))
  if max_length is not None:
    new_embeds = [x[:max_length] for x in new_embeds]
    new_labels = [x[:max_length] for x in new_labels]
  t = max(x.shape[0] for x in new_embeds)
  bsz, d = len(new_embeds), new_embeds[0].shape[1]
  embeds = torch.zeros((bsz, t, d))
  out_labels = torch.full((bsz, t), IGNORE_INDEX, dtype=labels.dtype)
  mask = torch.zeros((bsz, t), dtype=torch.bool)
  pos = torch.zeros((bsz, t), dtype=torch.long)
  for b, (e, lab) in enumerate(zip(new_embeds, new_labels)):
    n = e.shape[0]
    sl = slice(t - n, t) if padding_side == "left" else slice(0, n)
    embeds[b, sl], out_labels[b, sl], mask[b, sl], pos[b, sl] = e, lab, True, torch.arange(n)
  return embeds, out_labels, mask, pos


@pytest.fixture(scope="module")
def collate_case(hf):
  """Row 0: two images, the second cut by model_max_length=20; row 1: text only (with a dummy
  image, as LLaVA's dataset gives it); row 2: one image."""
  rs = np.random.RandomState(5)
  rows = [[1, *rs.randint(3, 90, 2), IMAGE_TOKEN_INDEX, *rs.randint(3, 90, 3), IMAGE_TOKEN_INDEX, 7, 8],
          [1, *rs.randint(3, 90, 6)],
          [1, *rs.randint(3, 90, 3), IMAGE_TOKEN_INDEX, *rs.randint(3, 90, 4)]]
  labels = [np.where(np.arange(len(r)) < len(r) // 2, IGNORE_INDEX, np.asarray(r)) for r in rows]
  px = _pixels(4, seed=5)
  px[2] = 0  # the dummy image of row 1
  counts = [[N, N], [N], [N]]
  with torch.no_grad():
    feats = list(hf[0].model.get_image_features(pixel_values=_nchw(px)).pooler_output)
  return rows, labels, px, counts, feats


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_and_merge_match_prepare_inputs_labels(hf, converted_original, collate_case, side):
  model = hf[0]
  rows, labels, px, counts, feats = collate_case
  c = converted_original.config
  t = max(map(len, rows))
  ids = torch.zeros((3, t), dtype=torch.long)
  lab = torch.full((3, t), IGNORE_INDEX, dtype=torch.long)
  mask = torch.zeros((3, t), dtype=torch.long)
  for b, (r, l) in enumerate(zip(rows, labels)):
    ids[b, :len(r)], lab[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), torch.tensor(l), 1
  embed_tokens = model.model.language_model.embed_tokens
  with torch.no_grad():
    want_e, want_l, want_m, want_p = ref_prepare_inputs_labels(embed_tokens, ids, mask, lab, feats,
                                                               c.tokenizer_model_max_length, side)
  batch = llava_collate.collate(c, rows, labels, counts, padding_side=side)
  np.testing.assert_array_equal(batch.labels, want_l.numpy())
  np.testing.assert_array_equal(batch.attention_mask, want_m.numpy())
  np.testing.assert_array_equal(batch.position_ids, want_p.numpy())
  module = llava.Llava(c)
  embeds = module.apply({"params": converted_original.params}, jnp.asarray(batch.input_ids), jnp.asarray(px),
                        image_mask=jnp.asarray(batch.image_mask),
                        image_row_offset=jnp.asarray(batch.image_row_offset), method=llava.Llava.embed)
  err = max_abs_diff(embeds, want_e, batch.attention_mask)
  print(f"max |merged embeds - prepare_inputs_labels| = {err:.2e}")
  assert err <= 1e-5, err
  if side == "right":  # LLaVA's forward on the merged embeddings vs ours end to end
    with torch.no_grad():
      h = model.model.language_model(inputs_embeds=want_e, attention_mask=want_m.long(), position_ids=want_p)
      want_logits = model.lm_head(h.last_hidden_state)
    got = _logits(converted_original, batch.input_ids, batch.attention_mask, px, batch.image_mask,
                  batch.image_row_offset)
    err = max_abs_diff(got, want_logits, batch.attention_mask)
    print(f"max |logits - LLaVA forward| = {err:.2e}")
    assert err <= TOL, err


def test_tokenize_prompt():
  from tokenizers import SentencePieceBPETokenizer, processors
  from jaxlisa.data.tokenization import tokenizer_image_token
  sp = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
  sp.train_from_iterator(["what is in the image", "a cat on a mat", "USER: ASSISTANT:"], vocab_size=120,
                         min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok = tf.PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")
  tok.add_tokens(["<im_start>", "<im_end>", "<image>"], special_tokens=True)
  c = llava.LlavaConfig(vision=llava.CLIPVisionConfig(**VISION), image_token_index=IMAGE_TOKEN_INDEX)
  prompt = "USER: <image>\nwhat is in the image? ASSISTANT:"
  ids = llava_collate.tokenize_prompt(c, prompt, tok)
  base = tokenizer_image_token(prompt, tok)
  assert int(np.sum(ids == IMAGE_TOKEN_INDEX)) == N and len(ids) == len(base) + N - 1
  np.testing.assert_array_equal(ids[ids != IMAGE_TOKEN_INDEX], [i for i in base if i != IMAGE_TOKEN_INDEX])
  ids = llava_collate.tokenize_prompt(c.replace(mm_use_im_start_end=True), prompt, tok)
  k = int(np.argmax(ids == IMAGE_TOKEN_INDEX))
  assert ids[k - 1] == tok.convert_tokens_to_ids("<im_start>")
  assert ids[k + N] == tok.convert_tokens_to_ids("<im_end>")
