"""Generation utilities: sampling filters vs HF's logits warpers, streaming, stop ids, left_pad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from jaxlisa.inference.generate import _filter_logits, generate, left_pad
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
  got = np.asarray(_filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
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
  free = np.asarray(generate(m, p, ids, mask, max_new_tokens=8).tokens)[0]
  stop = int(free[2])  # stop on the third token the model produces anyway
  out = generate(m, p, ids, mask, max_new_tokens=8, stop_ids=(stop,), pad_token_id=39)
  toks = np.asarray(out.tokens)[0]
  first = int(np.argmax(free == stop))
  np.testing.assert_array_equal(toks[:first + 1], free[:first + 1])
  assert (toks[first + 1:] == 39).all() and int(out.lengths[0]) == first + 1


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
