"""BLIP-2 parity: stage 2 (OPT) vs transformers' Blip2ForConditionalGeneration (logits, loss, greedy
captions) and stage 1 vs Blip2ForImageTextRetrieval (ITM logits, ITC scores), both through the HF
converters; stage-1 losses (ITC / ITM with given hard negatives / ITG) vs a PyTorch transcription of
LAVIS `Blip2Qformer.forward` on the HF modules, through a LAVIS-named .pth; negative sampling; the
losses under shard_map on 2 devices equal the 1-device losses (subprocess)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from conftest import max_abs_diff
from torch_refs import blip2 as blip2_ref
from jaxlisa.conversion import families
from jaxlisa.conversion.checkpoint_io import open_checkpoint
from jaxlisa.conversion.convert import convert_checkpoint
from jaxlisa.conversion.keymap import export_state, flatten_tree
from jaxlisa.inference import captioning
from jaxlisa.models import blip2 as B2

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG, NQ, VOCAB, QV = 28, 4, 64, 40  # 28 px / patch 14 -> 5 image tokens; 4 queries
IMAGE_TOKEN = VOCAB - 1
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=IMG,
              patch_size=14)
QFORMER = dict(vocab_size=QV, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=20)


def _randomize(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if t.is_floating_point():
        base = 1.0 if name.endswith("weight") and t.ndim == 1 else 0.0
        t.copy_(base + 0.2 * torch.randn(t.shape, generator=g))
  return model.eval().requires_grad_(False)


def _pixels(n, seed=0):
  x = np.random.RandomState(seed).randn(n, IMG, IMG, 3).astype(np.float32)
  return x, torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- stage 2 (OPT)
@pytest.fixture(scope="module")
def opt_pair(tmp_path_factory):
  text = dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
              eos_token_id=2)
  cfg = tf.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text, num_query_tokens=NQ,
                       image_token_index=IMAGE_TOKEN)
  torch.manual_seed(0)
  ref = _randomize(tf.Blip2ForConditionalGeneration(cfg))  # the qkv k-bias stays random: softmax ignores it
  d = str(tmp_path_factory.mktemp("blip2_opt"))
  ref.save_pretrained(d)
  conv = convert_checkpoint(d)
  return ref, conv, B2.Blip2OPT(conv.config), d


def _opt_text(seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, IMAGE_TOKEN, (2, 7))
  ids[:, 0] = 2
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  ids[mask == 0] = 1
  return ids, mask


def test_opt_family_and_config(opt_pair):
  _, conv, _, _ = opt_pair
  c = conv.config
  assert conv.family == "blip2_opt_hf"
  assert c.text.family == "opt" and c.num_query_tokens == NQ and c.vision.ln_vision_eps == 1e-6
  assert not c.qformer.use_text and not c.qformer.lm_head
  assert set(conv.params) == {"visual_encoder", "Qformer", "query_tokens", "opt_proj", "opt_model"}
  assert B2.Blip2Config.from_dict(c.to_dict()) == c


def test_opt_logits_and_loss_match_hf(opt_pair):
  ref, conv, module, _ = opt_pair
  x, xt = _pixels(2)
  ids, mask = _opt_text()
  labels = np.asarray(B2.opt_targets(jnp.asarray(ids), jnp.asarray(mask), prompt_length=2))
  out = jax.jit(lambda p, *a: module.apply({"params": p}, *a))(conv.params, x, jnp.asarray(ids), jnp.asarray(mask),
                                                                 jnp.asarray(labels))
  hf_ids = np.concatenate([np.full((2, NQ), IMAGE_TOKEN), ids], 1)
  hf_mask = np.concatenate([np.ones((2, NQ), np.int64), mask], 1)
  hf_labels = np.concatenate([np.full((2, NQ), -100), labels], 1)
  with torch.no_grad():
    want = ref(pixel_values=xt, input_ids=torch.tensor(hf_ids), attention_mask=torch.tensor(hf_mask),
               labels=torch.tensor(hf_labels))
  assert out.logits.shape == (2, NQ + 7, VOCAB)
  assert max_abs_diff(out.logits, want.logits, np.broadcast_to(hf_mask[..., None], out.logits.shape)) <= TOL
  assert abs(float(out.loss) - float(want.loss)) <= TOL
  assert (labels[:, :2] == -100).all() and (labels[1, 5:] == -100).all() and (labels[0, 2:] == ids[0, 2:]).all()


def test_opt_greedy_captions_match_hf(opt_pair):
  ref, conv, module, _ = opt_pair
  x, xt = _pixels(2, seed=1)
  eos = 5
  got = captioning.generate_captions(module, conv.params, x, jnp.full((2, 1), 2, jnp.int32),
                                     jnp.ones((2, 1), jnp.int32), max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
  hf_ids = torch.tensor([[IMAGE_TOKEN] * NQ + [2]] * 2)
  with torch.no_grad():
    want = ref.generate(pixel_values=xt, input_ids=hf_ids, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                        pad_token_id=1).numpy()
  if want.shape[1] > 10:  # prompt ids returned in front of the new tokens
    want = want[:, NQ + 1:]
  np.testing.assert_array_equal(np.asarray(got.tokens)[:, :want.shape[1]], want)


def test_opt_captions_with_lavis_generate_arguments_match_hf(opt_pair):
  """LAVIS Blip2OPT.generate's repetition_penalty / min_length (new tokens) / length_penalty through
  generate_captions, and beam_captions(num_beams=1), against HF greedy with the same processors."""
  ref, conv, module, _ = opt_pair
  x, xt = _pixels(2, seed=1)
  eos = 5
  hf_ids = torch.tensor([[IMAGE_TOKEN] * NQ + [2]] * 2)
  prompt, pmask = jnp.full((2, 1), 2, jnp.int32), jnp.ones((2, 1), jnp.int32)
  for rp, mn in ((1.3, 0), (1.3, 3), (0.8, 2)):
    got = captioning.generate_captions(module, conv.params, x, prompt, pmask, max_new_tokens=10, eos_token_id=eos,
                                       pad_token_id=1, repetition_penalty=rp, min_length=mn, length_penalty=1.0)
    with torch.no_grad():
      want = ref.generate(pixel_values=xt, input_ids=hf_ids, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                          pad_token_id=1, repetition_penalty=rp, min_new_tokens=mn).numpy()
    if want.shape[1] > 10:  # prompt ids returned in front of the new tokens
      want = want[:, NQ + 1:]
    np.testing.assert_array_equal(np.asarray(got.tokens)[:, :want.shape[1]], want, err_msg=str((rp, mn)))
    seqs, lengths = captioning.beam_captions(module, conv.params, x, prompt, pmask, num_beams=1, max_new_tokens=10,
                                             eos_ids=(eos,), fill_value=1, min_new_tokens=mn, repetition_penalty=rp)
    with torch.no_grad():
      full = ref.generate(pixel_values=xt, input_ids=hf_ids, max_new_tokens=10, num_beams=1, do_sample=False,
                          eos_token_id=eos, pad_token_id=1, repetition_penalty=rp, min_new_tokens=mn).numpy()
    if full.shape[1] > 10:
      full = full[:, NQ + 1:]
    np.testing.assert_array_equal(full, want)
    np.testing.assert_array_equal(np.asarray(seqs)[:, NQ + 1:NQ + 1 + want.shape[1]], want)


def test_opt_beam_captions_match_hf(opt_pair):
  ref, conv, module, _ = opt_pair
  x, xt = _pixels(2, seed=1)
  kw = dict(num_beams=3, max_new_tokens=8, repetition_penalty=1.3)
  seqs, lengths = captioning.beam_captions(module, conv.params, x, jnp.full((2, 1), 2, jnp.int32),
                                           jnp.ones((2, 1), jnp.int32), eos_ids=(50,), fill_value=1, min_new_tokens=2,
                                           **kw)
  with torch.no_grad():
    want = ref.generate(pixel_values=xt, input_ids=torch.tensor([[IMAGE_TOKEN] * NQ + [2]] * 2), eos_token_id=50,
                        pad_token_id=1, min_new_tokens=2, **kw).numpy()
  seqs, lengths = np.asarray(seqs), np.asarray(lengths)
  np.testing.assert_array_equal(seqs[:, :NQ + 1 + lengths.max()], want)


def test_opt_export_round_trip(opt_pair):
  _, conv, _, d = opt_pair
  src = open_checkpoint(d)
  back = export_state(conv.params, families.get_family("blip2_opt_hf").export_rules(conv.config, ()))
  for k, v in back.items():
    want = src.get(k)
    if k.endswith("qkv.bias"):  # (q, 0, v): the k part is not a parameter here
      w = 32
      np.testing.assert_array_equal(v[:w], want[:w])
      np.testing.assert_array_equal(v[2 * w:], want[2 * w:])
      assert not v[w:2 * w].any()
    else:
      np.testing.assert_array_equal(v, want, err_msg=k)
  assert sorted(back) == sorted(src.keys())


def test_lavis_blip2_opt_file_converts_to_the_same_params(opt_pair, tmp_path):
  ref, conv, _, _ = opt_pair
  state = _lavis_state(ref)
  state["Qformer.cls.predictions.bias"] = torch.zeros(QV)  # a stage-1 leftover the stage-2 model drops
  path = str(tmp_path / "blip2_opt.pth")
  torch.save({"model": state}, path)
  src = open_checkpoint(path)
  fam = families.detect_family(None, src.keys())
  c = fam.config_from_hf(None, src)
  assert fam.name == "blip2_opt_lavis" and c.text.num_attention_heads == 1  # width 32: heads of 64 guessed
  over = {"vision": c.vision.replace(num_attention_heads=4, ln_vision_eps=1e-6),
          "qformer": c.qformer.replace(num_attention_heads=4), "text": c.text.replace(num_attention_heads=4)}
  lav = convert_checkpoint(path, config_overrides=over)
  assert lav.config.text.replace(eos_token_id=2) == conv.config.text.replace(eos_token_id=2)
  want, got = flatten_tree(conv.params), flatten_tree(lav.params)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg="/".join(k))


# ----------------------------------------------------------------------------- stage 1
@pytest.fixture(scope="module")
def ret_pair(tmp_path_factory):
  cfg = tf.Blip2Config(vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": True},
                       num_query_tokens=NQ, image_text_hidden_size=16)
  torch.manual_seed(1)
  ref = _randomize(tf.Blip2ForImageTextRetrieval(cfg), seed=1)
  ref.config._attn_implementation = "eager"  # pylint: disable=protected-access
  ref.qformer.config._attn_implementation = "eager"  # pylint: disable=protected-access
  d = str(tmp_path_factory.mktemp("blip2_ret"))
  ref.save_pretrained(d)
  conv = convert_checkpoint(d)
  return ref, conv, B2.Blip2Qformer(conv.config)


def _bert_text(seed=0, b=3, t=6):
  rs = np.random.RandomState(seed)
  ids = rs.randint(5, QV - 1, (b, t))
  ids[:, 0] = 1  # [CLS]
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  ids[mask == 0] = 0  # [PAD]
  return ids, mask


def test_retrieval_itm_and_itc_match_hf(ret_pair):
  ref, conv, module = ret_pair
  assert conv.family == "blip2_retrieval_hf" and not conv.config.learn_temp
  x, xt = _pixels(3, seed=2)
  ids, mask = _bert_text(1)
  both = jax.jit(lambda p, *a: (module.apply({"params": p}, *a, method=B2.Blip2Qformer.itm_scores),
                                 module.apply({"params": p}, *a, method=B2.Blip2Qformer.itc_scores)))
  itm, itc = both(conv.params, x, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    want_itm = ref(pixel_values=xt, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   use_image_text_matching_head=True).logits_per_image
    want_itc = ref(pixel_values=xt, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   use_image_text_matching_head=False).logits_per_image
  assert itm.shape == (3, 2) and itc.shape == (3, 3)
  assert max_abs_diff(itm, want_itm) <= TOL
  assert max_abs_diff(itc, want_itc) <= TOL


def _lavis_state(ref, seed=3):
  """The retrieval model's weights under LAVIS names, plus a random LM head and temp (a stage-1 .pth)."""
  g = torch.Generator().manual_seed(seed)
  sd = ref.state_dict()
  out = blip2_ref.lavis_names(sd)
  if "opt_proj.weight" in out:
    return out
  d = sd["qformer.layernorm.weight"].shape[0]
  p = "Qformer.cls.predictions."
  out[p + "transform.dense.weight"] = 0.2 * torch.randn(d, d, generator=g)
  out[p + "transform.dense.bias"] = 0.2 * torch.randn(d, generator=g)
  out[p + "transform.LayerNorm.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
  out[p + "transform.LayerNorm.bias"] = 0.2 * torch.randn(d, generator=g)
  out[p + "bias"] = 0.2 * torch.randn(QV, generator=g)
  out[p + "decoder.bias"] = out[p + "bias"]
  out[p + "decoder.weight"] = out["Qformer.bert.embeddings.word_embeddings.weight"]
  out["Qformer.bert.embeddings.position_ids"] = torch.arange(20)[None]
  out["temp"] = torch.tensor(0.05)
  return out


@pytest.fixture(scope="module")
def lavis_stage1(ret_pair, tmp_path_factory):
  ref = ret_pair[0]
  state = _lavis_state(ref)
  path = str(tmp_path_factory.mktemp("blip2_lavis") / "blip2_pretrained.pth")
  torch.save({"model": state}, path)
  src = open_checkpoint(path)
  fam = families.detect_family(None, src.keys())
  c = fam.config_from_hf(None, src)
  # tiny widths: give the head counts (LAVIS files carry no config) and HF's ln eps of the reference
  over = {"vision": c.vision.replace(num_attention_heads=4, ln_vision_eps=1e-6),
          "qformer": c.qformer.replace(num_attention_heads=4, bos_token_id=QV - 1, sep_token_id=4)}
  conv = convert_checkpoint(path, config_overrides=over)
  return state, conv, B2.Blip2Qformer(conv.config), fam.name


def _torch_stage1(ref, state, x, ids, mask, neg_img, neg_txt, temp, bos):
  """LAVIS Blip2Qformer.forward (one device), on HF modules; the given hard negatives."""
  image_embeds = ref.vision_model(pixel_values=x).last_hidden_state
  p = "Qformer.cls.predictions."

  def lm_logits(hidden):
    h = F.linear(hidden, state[p + "transform.dense.weight"], state[p + "transform.dense.bias"])
    h = F.layer_norm(F.gelu(h), (h.shape[-1],), state[p + "transform.LayerNorm.weight"],
                     state[p + "transform.LayerNorm.bias"], eps=1e-12)
    return h @ state[p + "decoder.weight"].T + state[p + "bias"]

  return blip2_ref.stage1_losses(ref, image_embeds, ids, mask, temp, bos, lm_logits, neg_img, neg_txt)


@pytest.fixture(scope="module")
def stage1_out(lavis_stage1):
  _, conv, module, _ = lavis_stage1
  x, _ = _pixels(3, seed=4)
  ids, mask = _bert_text(5)
  run = jax.jit(lambda p, r, *a: module.apply({"params": p}, *a, rng=r))
  return run(conv.params, jax.random.PRNGKey(7), x, jnp.asarray(ids), jnp.asarray(mask))


def test_stage1_losses_match_lavis_transcription(ret_pair, lavis_stage1, stage1_out):
  ref = ret_pair[0]
  state, conv, _, fam = lavis_stage1
  assert fam == "blip2_lavis" and conv.config.learn_temp and conv.config.qformer.lm_head
  _, xt = _pixels(3, seed=4)
  ids, mask = _bert_text(5)
  got = stage1_out
  neg_img, neg_txt = np.asarray(got.neg_image_idx), np.asarray(got.neg_text_idx)
  assert (neg_img != np.arange(3)).all() and (neg_txt != np.arange(3)).all()  # positives are never drawn
  with torch.no_grad():
    want = _torch_stage1(ref, state, xt, torch.tensor(ids), torch.tensor(mask), torch.tensor(neg_img),
                         torch.tensor(neg_txt), state["temp"], QV - 1)
  for k in ("sim_i2t", "sim_t2i"):
    assert max_abs_diff(getattr(got, k), want[k]) <= 1e-3, k  # / temp 0.05 scales the error by 20
  assert max_abs_diff(got.itm_logits, want["itm"]) <= TOL
  for k in ("loss_itc", "loss_itm", "loss_lm"):
    assert abs(float(getattr(got, k)) - float(want[k])) <= TOL, k
  assert abs(float(got.loss) - float(want["loss_itc"] + want["loss_itm"] + want["loss_lm"])) <= 3 * TOL


def test_hard_negatives_follow_the_similarities(stage1_out):
  """The draw is softmax(sim) with positives masked: over many keys the empirical frequencies
  match the weights, and the positive is never drawn."""
  sim_t2i, sim_i2t = stage1_out.sim_t2i, stage1_out.sim_i2t
  positive = jnp.eye(3, dtype=bool)
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  neg_img, neg_txt = jax.vmap(lambda k: B2.sample_hard_negatives(k, sim_t2i, sim_i2t, positive))(keys)
  for draws, sim in ((np.asarray(neg_img), np.asarray(sim_t2i)), (np.asarray(neg_txt), np.asarray(sim_i2t))):
    logits = np.where(np.eye(3, dtype=bool), -np.inf, sim)
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    freq = np.stack([(draws == j).mean(0) for j in range(3)], 1)
    assert np.abs(freq - weights).max() < 0.03, (freq, weights)
    assert not (draws == np.arange(3)).any()


def test_qformer_captions_decode_the_lm_head(lavis_stage1):
  """LAVIS Blip2Qformer.generate: the greedy caption (nucleus sampling with top_p -> 0) equals argmax
  decoding by full causal recomputation (no cache), [SEP] blocked below min_length; beam search keeps
  [DEC] first and respects min_length."""
  _, conv, module, _ = lavis_stage1
  sep, dec = conv.config.qformer.sep_token_id, QV - 1
  x, _ = _pixels(2, seed=6)
  seqs, lengths = captioning.qformer_captions(module, conv.params, x, use_nucleus_sampling=True, top_p=1e-6,
                                              max_length=7, min_length=4)
  seqs, lengths = np.asarray(seqs), np.asarray(lengths)
  q = np.broadcast_to(np.asarray(conv.params["query_tokens"]), (2, NQ, 32))

  def joint(m, ids):  # queries + causal text in one pass (LAVIS's first generate step, for every step)
    out = m.Qformer(ids, None, q, m.image_embeds(x), causal=True)
    return m.Qformer.logits(out.last_hidden_state[:, NQ:])

  all_logits = jax.jit(lambda ids: module.apply({"params": conv.params}, ids, method=joint))
  ids = np.full((2, 7), 5)
  ids[:, 0] = dec
  for t in range(1, 7):  # recompute the whole (causal) sequence each step: no cache
    logits = np.array(all_logits(jnp.asarray(ids)))[:, t - 1]
    if t < 4:
      logits[:, sep] = -np.inf
    ids[:, t] = np.argmax(logits, -1)
  for r in range(2):
    n = int(lengths[r])
    np.testing.assert_array_equal(seqs[r, :1 + n], ids[r, :1 + n])
    assert n == 6 or seqs[r, n] == sep
  # num_beams=1 is greedy decoding (HF): the penalty on raw logits, like the top_p -> 0 sampler
  kw = dict(max_length=7, min_length=4, repetition_penalty=1.3)
  greedy = captioning.qformer_captions(module, conv.params, x, num_beams=1, **kw)
  nucleus = captioning.qformer_captions(module, conv.params, x, use_nucleus_sampling=True, top_p=1e-6, **kw)
  for a, b in zip(greedy, nucleus):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  beams, blen = captioning.qformer_captions(module, conv.params, x, num_beams=2, max_length=7, min_length=4)
  assert (np.asarray(beams)[:, 0] == dec).all() and (np.asarray(blen) + 1 >= 4).all()


def test_extract_features_modes(lavis_stage1):
  _, conv, module, _ = lavis_stage1
  x, _ = _pixels(2, seed=5)
  ids, mask = _bert_text(6, b=2)
  f = lambda p, mode: module.apply({"params": p}, x, jnp.asarray(ids), jnp.asarray(mask), mode=mode,
                                   method=B2.Blip2Qformer.extract_features)
  img, txt, mm = jax.jit(lambda p: [f(p, m) for m in ("image", "text", "multimodal")])(conv.params)
  assert img.image_embeds.shape == (2, NQ, 32) and img.image_embeds_proj.shape == (2, NQ, 16)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(img.image_embeds_proj), axis=-1), 1.0, rtol=1e-5)
  assert txt.text_embeds_proj.shape == (2, 6, 16) and txt.image_embeds is None
  assert mm.multimodal_embeds.shape == (2, NQ, 32)
  with pytest.raises(ValueError, match="mode"):
    f(conv.params, "audio")


def test_lavis_export_round_trip(lavis_stage1):
  state, conv, _, fam = lavis_stage1
  back = export_state(conv.params, families.get_family(fam).export_rules(conv.config, ()))
  dropped = {"Qformer.cls.predictions.decoder.weight", "Qformer.cls.predictions.decoder.bias",
             "Qformer.bert.embeddings.position_ids"}
  assert sorted(back) == sorted(set(state) - dropped)
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)


SHARDED = r"""
import sys; sys.path.insert(0, {root!r})
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from functools import partial
from jax.sharding import Mesh, PartitionSpec as P
from jaxlisa.models import blip2 as B2, qformer as Q, eva
c = B2.Blip2Config(vision=eva.EVAViTConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1,
                   num_attention_heads=4, mlp_dim=48),
                   qformer=Q.QFormerConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=48, encoder_hidden_size=32, num_query_tokens=4, max_position_embeddings=20,
                   bos_token_id=39, hidden_dropout_prob=0.0), embed_dim=16)
m = B2.Blip2Qformer(c)
rs = np.random.RandomState(0)
x = rs.randn(4, 28, 28, 3).astype(np.float32)
ids = rs.randint(5, 39, (4, 6)); ids[:, 0] = 1
mask = np.ones_like(ids)
import flax.linen as nn
shapes = nn.meta.unbox(jax.eval_shape(m.init, jax.random.PRNGKey(0), x[:1], ids[:1], mask[:1])["params"])
params = jax.tree.map(lambda v: jnp.asarray(0.3 * np.asarray(rs.randn(*v.shape), np.float32)), shapes)
params["temp"] = jnp.float32(0.1)
neg_i = jnp.asarray([2, 0, 3, 1]); neg_t = jnp.asarray([1, 3, 0, 2])
full = jax.jit(lambda p: m.apply({{"params": p}}, x, ids, mask, neg_image_idx=neg_i, neg_text_idx=neg_t))(params)
mesh = Mesh(np.array(jax.devices()), ("data",))
@jax.jit
@partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data"), P("data"), P("data")),
         out_specs=P())
def sharded(p, x, ids, mask, ni, nt):
  o = m.apply({{"params": p}}, x, ids, mask, neg_image_idx=ni, neg_text_idx=nt, axis_name="data")
  return jax.lax.pmean(jnp.stack([o.loss_itc, o.loss_itm, o.loss_lm]), "data")
got = sharded(params, x, ids, mask, neg_i, neg_t)
want = np.array([full.loss_itc, full.loss_itm, full.loss_lm])
print("DIFF", float(np.abs(np.asarray(got) - want).max()), want.tolist())
"""


def test_losses_under_shard_map_equal_one_device():
  r = subprocess.run([sys.executable, "-c", SHARDED.format(root=ROOT)], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("DIFF")][-1]
  assert float(line.split()[1]) <= 1e-5, line
