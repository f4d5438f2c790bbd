"""BLIP captioning parity with transformers' BlipForConditionalGeneration built tiny, through the
blip_hf converter: logits and the label-smoothed caption loss (prompt masked), beam search (with
min length and repetition penalty) token for token, greedy decoding of the sampler, nucleus sampling
properties; a LAVIS/BLIP-named .pth converts to the same params; the generic beam search against a
brute-force enumeration on a toy model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from conftest import max_abs_diff
from jaxlisa.conversion import families
from jaxlisa.conversion.checkpoint_io import open_checkpoint
from jaxlisa.conversion.convert import convert_checkpoint
from jaxlisa.conversion.keymap import export_state, flatten_tree
from jaxlisa.inference import beam_search, captioning
from jaxlisa.models import blip as B

TOL = 1e-4
IMG, V, DEC, SEP = 28, 40, 38, 3  # vocab 40: [DEC] 38 is the bos, [SEP] 3 the eos, [PAD] 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=IMG,
                patch_size=14)
  text = dict(vocab_size=V, hidden_size=32, encoder_hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=40, bos_token_id=DEC, sep_token_id=SEP, pad_token_id=0,
              eos_token_id=SEP, label_smoothing=0.1)
  torch.manual_seed(0)
  ref = tf.BlipForConditionalGeneration(tf.BlipConfig(vision_config=vision, text_config=text))
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # every tensor random (the decoder weight stays tied to the word embeddings)
    for name, t in ref.state_dict().items():
      if t.is_floating_point():
        base = 1.0 if name.endswith("weight") and t.ndim == 1 else 0.0
        t.copy_(base + 0.3 * torch.randn(t.shape, generator=g))
  ref.eval().requires_grad_(False)
  d = str(tmp_path_factory.mktemp("blip"))
  ref.save_pretrained(d)
  conv = convert_checkpoint(d)
  return ref, conv, B.BlipForConditionalGeneration(conv.config), d


def _pixels(n, seed=0):
  x = np.random.RandomState(seed).randn(n, IMG, IMG, 3).astype(np.float32)
  return x, torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_family_and_config(pair):
  _, conv, _, _ = pair
  assert conv.family == "blip_hf"
  c = conv.config
  assert c.label_smoothing == 0.1 and c.text.cross_attention_freq == 1 and c.text.bos_token_id == DEC
  assert B.BlipConfig.from_dict(c.to_dict()) == c
  assert "intermediate_query" not in conv.params["text_decoder"]["bert"]["encoder"]["layer_0"]


def test_logits_and_caption_loss_match_hf(pair):
  ref, conv, module, _ = pair
  x, xt = _pixels(2)
  rs = np.random.RandomState(0)
  ids = rs.randint(4, DEC, (2, 9))
  ids[:, 0] = DEC
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  ids[mask == 0] = 0
  labels = np.asarray(B.caption_targets(jnp.asarray(ids), jnp.asarray(mask), prompt_length=3))
  out = jax.jit(lambda p, *a: module.apply({"params": p}, *a))(conv.params, x, jnp.asarray(ids), jnp.asarray(mask),
                                                                 jnp.asarray(labels))
  with torch.no_grad():
    want = ref(pixel_values=xt, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               labels=torch.tensor(labels, dtype=torch.long))
  assert max_abs_diff(out.logits, want.logits, np.broadcast_to(mask[..., None], out.logits.shape)) <= TOL
  assert abs(float(out.loss) - float(want.loss)) <= TOL
  assert (labels[:, :3] == -100).all() and (labels[1, 6:] == -100).all()


PROMPT = np.array([[DEC, 7, 12, 9]] * 3)  # "[DEC] a picture of"


def _hf_generate(ref, xt, **kw):
  ids = torch.tensor(np.concatenate([PROMPT, np.full((3, 1), SEP)], 1))  # the processor's trailing [SEP]
  with torch.no_grad():
    return ref.generate(pixel_values=xt, input_ids=ids, **kw).numpy()


@pytest.mark.parametrize("kw", [dict(num_beams=3, max_length=14, min_length=8),
                                dict(num_beams=2, max_length=12, min_length=5, repetition_penalty=1.5)])
def test_beam_search_matches_hf(pair, kw):
  ref, conv, module, _ = pair
  x, xt = _pixels(3, seed=1)
  want = _hf_generate(ref, xt, **kw)
  seqs, lengths = captioning.blip_captions(module, conv.params, x, jnp.asarray(PROMPT), **kw)
  seqs, lengths = np.asarray(seqs), np.asarray(lengths)
  got = seqs[:, :PROMPT.shape[1] + lengths.max()]  # HF crops to the longest returned hypothesis
  np.testing.assert_array_equal(got, want)
  assert (lengths + PROMPT.shape[1] >= kw["min_length"]).all()


def test_greedy_sampler_matches_hf_greedy(pair):
  ref, conv, module, _ = pair
  x, xt = _pixels(3, seed=2)
  want = _hf_generate(ref, xt, num_beams=1, do_sample=False, max_length=12, min_length=6, repetition_penalty=1.3)
  # top_p -> 0 keeps only the best token: nucleus sampling degenerates to greedy decoding
  seqs, lengths = captioning.blip_captions(module, conv.params, x, jnp.asarray(PROMPT), use_nucleus_sampling=True,
                                           top_p=1e-6, max_length=12, min_length=6, repetition_penalty=1.3,
                                           rng=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(seqs)[:, :want.shape[1]], want)


def test_num_beams_1_is_hf_greedy(pair):
  """num_beams=1 is HF's greedy decoding: the repetition penalty on raw logits (not log-probs),
  finished rows padded with pad (not eos); 9 rows over three image batches, token for token."""
  ref, conv, module, _ = pair
  kw = dict(num_beams=1, max_length=16, min_length=6, repetition_penalty=1.3)
  rows = same = 0
  for seed in (1, 2, 3):
    x, xt = _pixels(3, seed=seed)
    want = _hf_generate(ref, xt, do_sample=False, **kw)
    seqs, lengths = captioning.blip_captions(module, conv.params, x, jnp.asarray(PROMPT), **kw)
    got = np.asarray(seqs)[:, :want.shape[1]]
    rows += len(want)
    same += int((got == want).all(1).sum())
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    ends = PROMPT.shape[1] + np.asarray(lengths)
    assert all((np.asarray(seqs)[r, ends[r]:] == 0).all() for r in range(3))  # pad after the end
  assert same == rows == 9


def test_nucleus_sampling_is_seeded_and_stays_in_the_nucleus(pair):
  _, conv, module, _ = pair
  x, _ = _pixels(3, seed=2)
  run = lambda key: np.asarray(captioning.blip_captions(module, conv.params, x, jnp.asarray(PROMPT),
                                                        use_nucleus_sampling=True, top_p=0.9, max_length=12,
                                                        min_length=6, rng=key)[0])
  a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert (a[:, :4] == PROMPT).all() and not np.array_equal(a, c)
  assert not (a[:, 4:6] == SEP).any()  # min_length 6 (prompt included): no eos among the first two new tokens


def test_export_and_lavis_names(pair, tmp_path):
  ref, conv, _, d = pair
  src = open_checkpoint(d)
  back = export_state(conv.params, families.get_family("blip_hf").export_rules(conv.config, ()))
  hf_names = set(src.keys()) - {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
  assert sorted(back) == sorted(hf_names)
  # The same weights under BLIP / LAVIS names (timm ViT with a final `norm`) convert to the same params.
  state = {}
  for k, v in ref.state_dict().items():
    if k.startswith("text_decoder."):
      state[k] = v
      continue
    k2 = (k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
          .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
          .replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
          .replace("vision_model.post_layernorm", "visual_encoder.norm")
          .replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
          .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
          .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2"))
    state[k2] = v
  path = str(tmp_path / "model_base_capfilt_large.pth")
  torch.save({"model": state}, path)
  fam = families.detect_family(None, open_checkpoint(path).keys())
  c = fam.config_from_hf(None, open_checkpoint(path))
  assert fam.name == "blip_lavis" and c.text.bos_token_id == DEC
  over = {"vision": c.vision.replace(num_attention_heads=4, layer_norm_eps=1e-5, ln_vision_eps=1e-5),
          "text": c.text.replace(num_attention_heads=4, sep_token_id=SEP), "label_smoothing": 0.1}
  lav = convert_checkpoint(path, config_overrides=over)
  assert lav.config == conv.config
  want, got = flatten_tree(conv.params), flatten_tree(lav.params)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg="/".join(k))


def test_beam_search_finds_the_best_sequence_of_a_toy_model():
  """A toy model whose logits depend on the last token and the step: with as many beams as live
  prefixes, the best hypothesis is the best of an exhaustive enumeration (length penalty 0)."""
  rs = np.random.RandomState(0)
  vv, p, m, eos = 5, 1, 5, 4
  table = jnp.asarray(rs.randn(m, vv, vv).astype(np.float32) * 2)

  def step(state, tokens, index):
    return table[index, tokens[:, -1]], state

  prompt = jnp.zeros((1, p), jnp.int32)
  k = vv ** (m - p - 1)  # enough beams to keep every live prefix: the search is exhaustive
  first = table[0, jnp.zeros((k,), jnp.int32)]
  out = beam_search.beam_search(step, {"dummy": jnp.zeros((k, 1))}, first, prompt, num_beams=k, max_length=m,
                                eos_ids=(eos,), fill_value=0, length_penalty=0.0, early_stopping="never")
  logp = np.asarray(jax.nn.log_softmax(table, -1))
  best, best_seq = -np.inf, None
  for n in range(1, m - p + 1):
    for seq in itertools.product(range(vv), repeat=n):
      if eos in seq[:-1] or (n < m - p and seq[-1] != eos):
        continue
      prev, score = 0, 0.0
      for i, t in enumerate(seq):
        score += logp[p - 1 + i, prev, t]
        prev = t
      if score > best:
        best, best_seq = score, seq
  got = np.asarray(out.sequences[0, 0])
  assert tuple(got[p:p + int(out.lengths[0, 0])]) == best_seq
  assert abs(float(out.scores[0, 0]) - best) <= 1e-4
