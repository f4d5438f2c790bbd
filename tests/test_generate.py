"""Generation utilities: sampling filters vs HF's logits warpers, streaming, stop ids, left_pad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from jaxlisa.inference.generate import filter_logits, default_pad_id, default_stop_ids, generate, left_pad, pad_batch
from jaxlisa.models import llm


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8),
                                                     (1.3, 7, 0.6)])
def test_filters_match_hf_warpers(temperature, top_k, top_p):
  logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
  t = torch.tensor(logits)
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(lp.TopKLogitsWarper(top_k))
  if top_p < 1.0:
    warpers.append(lp.TopPLogitsWarper(top_p))
  for w in warpers:
    t = w(None, t)
  want = t.numpy()
  got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
  keep_w, keep_g = np.isfinite(want) & (want > -1e30), got > -1e30
  np.testing.assert_array_equal(keep_g, keep_w)
  np.testing.assert_allclose(got[keep_g], want[keep_w], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  cfg = llm.DecoderConfig(family="llama", vocab_size=40, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=2)
  m = llm.DecoderLM(cfg)
  p = jax.tree.map(lambda x: x * 20, __import__("flax").linen.meta.unbox(
      m.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))["params"]))
  return m, p


def test_streamer_sees_every_token_in_order(tiny):
  m, p = tiny
  ids, mask = left_pad(np.array([[5, 6, 7, 0], [8, 9, 0, 0]]), np.array([[1, 1, 1, 0], [1, 1, 0, 0]]))
  seen = []
  out = generate(m, p, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6,
                 streamer=lambda i, tok: seen.append((int(i), np.asarray(tok).tolist())))
  jax.effects_barrier()
  assert [i for i, _ in seen] == list(range(len(seen)))
  np.testing.assert_array_equal(np.array([t for _, t in seen]).T, np.asarray(out.tokens)[:, :len(seen)])


def test_stop_ids_pad_and_lengths(tiny):
  m, p = tiny
  ids, mask = jnp.asarray([[5, 6, 7]]), jnp.ones((1, 3), jnp.int32)
  free = np.asarray(generate(m, p, ids, mask, max_new_tokens=8, stop_ids=()).tokens)[0]  # () never stops
  stop = int(free[2])  # stop on the third token the model produces anyway
  out = generate(m, p, ids, mask, max_new_tokens=8, stop_ids=(stop,), pad_token_id=39)
  toks = np.asarray(out.tokens)[0]
  first = int(np.argmax(free == stop))
  np.testing.assert_array_equal(toks[:first + 1], free[:first + 1])
  assert (toks[first + 1:] == 39).all() and int(out.lengths[0]) == first + 1


def test_defaults_stop_at_config_eos_and_pad_with_config_pad(tiny):
  """Without stop_ids / pad_token_id, generate uses the model config's eos and pad (HF generate
  does: generation_config's eos, pad falling back to eos)."""
  m, p = tiny
  ids, mask = jnp.asarray([[5, 6, 7]]), jnp.ones((1, 3), jnp.int32)
  free = np.asarray(generate(m, p, ids, mask, max_new_tokens=8, stop_ids=()).tokens)[0]
  eos = int(free[2])
  for pad, want_pad in ((37, 37), (None, eos)):
    cfg = m.config.replace(eos_token_id=eos, pad_token_id=pad)
    assert default_stop_ids(cfg) == (eos,) and default_pad_id(cfg) == want_pad
    out = generate(llm.DecoderLM(cfg), p, ids, mask, max_new_tokens=8)
    toks, first = np.asarray(out.tokens)[0], int(np.argmax(free == eos))
    np.testing.assert_array_equal(toks[:first + 1], free[:first + 1])
    assert (toks[first + 1:] == want_pad).all() and int(out.lengths[0]) == first + 1
  assert default_stop_ids(m.config.replace(eos_token_id=(4, 9))) == (4, 9)
  assert default_pad_id(m.config.replace(eos_token_id=None, pad_token_id=None)) == 0


def test_pad_batch_pads_left():
  class Tok:  # the tokenizer protocol pad_batch uses
    pad_token_id = 3
    def __call__(self, texts, **kw):
      return {"input_ids": [[ord(c) for c in t] for t in texts]}
  ids, mask = pad_batch(Tok(), ["ab", "abcd"])
  np.testing.assert_array_equal(ids, [[3, 3, 97, 98], [97, 98, 99, 100]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1]])


def test_sampling_is_reproducible_and_seed_dependent(tiny):
  m, p = tiny
  p = jax.tree.map(lambda x: x / 20, p)  # a flat distribution: samples differ between seeds
  ids, mask = jnp.asarray([[5, 6, 7]] * 4), jnp.ones((4, 3), jnp.int32)
  run = lambda s: np.asarray(generate(m, p, ids, mask, max_new_tokens=10, do_sample=True, top_k=20,
                                      temperature=2.0, rng=jax.random.PRNGKey(s)).tokens)
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_left_pad():
  ids, mask = left_pad(np.array([[1, 2, 0], [3, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]]), pad_id=9)
  np.testing.assert_array_equal(ids, [[9, 1, 2], [9, 9, 3]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1]])


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  import transformers as tf
  from jaxlisa.conversion.convert import convert_checkpoint
  torch.manual_seed(0)
  ref = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2)).eval()
  with torch.no_grad():  # a peaked model that repeats itself: the penalty changes the greedy path
    for n, t in ref.named_parameters():
      t.mul_(8.0 if n.endswith("embed_tokens.weight") or "lm_head" in n else 1.0)
  d = str(tmp_path_factory.mktemp("llama"))
  ref.save_pretrained(d)
  conv = convert_checkpoint(d)
  return ref, llm.DecoderLM(conv.config), conv.params


def test_repetition_penalty_and_min_new_tokens_match_hf(hf_llama):
  ref, m, p = hf_llama
  ids, mask = left_pad(np.array([[1, 5, 9, 4, 7, 3], [1, 8, 8, 0, 0, 0], [1, 11, 0, 0, 0, 0]]),
                       np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]))
  run = lambda **kw: np.asarray(generate(m, p, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=12,
                                         pad_token_id=0, **kw).tokens)
  plain = run()
  eos = int(plain[0, 1])  # a token greedy decoding emits early: min_new_tokens has something to block

  def hf(**kw):
    with torch.no_grad():
      out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].numpy()

  for kw in (dict(repetition_penalty=1.3), dict(repetition_penalty=0.7),
             dict(repetition_penalty=1.3, min_new_tokens=4)):
    want = hf(eos_token_id=eos, **kw)
    got = run(stop_ids=(eos,), **kw)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want, err_msg=str(kw))
  assert not np.array_equal(run(repetition_penalty=1.3), plain)  # the penalty mattered
  got = run(stop_ids=(eos,), min_new_tokens=4)
  assert not (got[:, :4] == eos).any()
  np.testing.assert_array_equal(got[:, :hf(eos_token_id=eos, min_new_tokens=4).shape[1]],
                                hf(eos_token_id=eos, min_new_tokens=4))
