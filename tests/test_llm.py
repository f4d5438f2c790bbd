"""Decoder LM parity with transformers (fp32): logits and every hidden state on padded batches,
greedy generation, KV-cache consistency, unscanned/remat variants."""

import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from conftest import max_abs_diff
from jaxlisa.conversion.convert import convert_checkpoint
from jaxlisa.inference.generate import generate, left_pad
from jaxlisa.models import llm

V = 96
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

CASES = {
    # GQA, LLaMA-2 eps, non-default theta
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **SMALL, intermediate_size=112, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # sliding window shorter than the sequences below
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
        **SMALL, intermediate_size=112, num_key_value_heads=1, sliding_window=5, pad_token_id=0,
        eos_token_id=2)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        **SMALL, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=2)),
    # project_in/out as opt-350m, pre-LN with final LN
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        **SMALL, ffn_dim=112, word_embed_proj_dim=32, max_position_embeddings=64,
        do_layer_norm_before=True, pad_token_id=0, eos_token_id=2)),
    # opt-350m itself is post-LN without a final LN
    "opt_post_ln": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        **SMALL, ffn_dim=112, word_embed_proj_dim=32, max_position_embeddings=64,
        do_layer_norm_before=False, pad_token_id=0, eos_token_id=2)),
}


def _perturb(model):
  """Random norms/biases so every parameter matters in the comparison."""
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.1)
  return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
  torch.manual_seed(0)
  ref = _perturb(CASES[request.param]()).eval()
  d = tempfile.mkdtemp()
  ref.save_pretrained(d)
  conv = convert_checkpoint(d)
  return request.param, ref, llm.DecoderLM(conv.config), conv.params


def _batch(seed=0, b=3, t=12):
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, V, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, 8:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  return ids, mask


def test_logits_and_hidden_states_right_padding(pair):
  name, ref, module, params = pair
  ids, mask = _batch()
  out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
  assert max_abs_diff(out.logits, want.logits, mask) <= 1e-4, name
  assert len(out.hidden_states) == len(want.hidden_states)
  for i, (h, w) in enumerate(zip(out.hidden_states, want.hidden_states)):
    assert max_abs_diff(h, w, mask) <= 1e-4, (name, i)


def test_logits_left_padding(pair):
  name, ref, module, params = pair
  ids, mask = left_pad(*_batch(1))
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None) * mask + (1 - mask)
  out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
  assert max_abs_diff(out.logits, want, mask) <= 1e-4, name


def test_greedy_generation_matches_hf(pair):
  name, ref, module, params = pair
  ids, mask = left_pad(*_batch(2))
  got = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=16,
                 stop_ids=(2,), pad_token_id=0)
  with torch.no_grad():
    want = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=16,
                        do_sample=False, pad_token_id=0, eos_token_id=2)[:, ids.shape[1]:].numpy()
  got = np.asarray(got.tokens)[:, :want.shape[1]]
  np.testing.assert_array_equal(got, want, err_msg=name)


def test_kv_cache_matches_full_forward(pair):
  """Prefill 7 tokens then feed 5 one at a time: logits equal the uncached forward."""
  name, _, module, params = pair
  ids = np.random.RandomState(3).randint(3, V, (2, 12))
  mask = np.ones_like(ids)
  full = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
  cache = llm.init_cache(module.config, 2, 12)
  step = jax.jit(lambda x, m, c, i: module.apply({"params": params}, x, m, cache=c, cache_index=i))
  out = step(jnp.asarray(ids[:, :7]), jnp.asarray(mask) * (np.arange(12) < 7), cache, 0)
  steps = [out.logits]
  cache = out.cache
  for t in range(7, 12):
    o = step(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask) * (np.arange(12) <= t), cache, t)
    steps.append(o.logits)
    cache = o.cache
  assert max_abs_diff(jnp.concatenate(steps, 1), full) <= 1e-5, name


def test_unscanned_and_remat_variants_agree():
  torch.manual_seed(1)
  cfg = llm.DecoderConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
  ids = jnp.asarray(_batch(4)[0])
  scanned = llm.DecoderLM(cfg)
  params = nn.meta.unbox(scanned.init(jax.random.PRNGKey(0), ids)["params"])
  unstacked = dict(params)
  layers = unstacked.pop("layers")
  for i in range(3):
    unstacked[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
  base = scanned.apply({"params": params}, ids).logits
  loop = llm.DecoderLM(cfg.replace(scan_layers=False)).apply({"params": unstacked}, ids).logits
  assert max_abs_diff(loop, base) <= 1e-6
  remat = llm.DecoderLM(cfg.replace(remat_policy="full"))
  g1 = jax.grad(lambda p: scanned.apply({"params": p}, ids).logits.sum())(params)
  g2 = jax.grad(lambda p: remat.apply({"params": p}, ids).logits.sum())(params)
  rel = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12)), g1, g2)
  assert max(jax.tree.leaves(rel)) <= 1e-5


def test_params_carry_logical_axes():
  cfg = llm.DecoderConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4)
  abstract = jax.eval_shape(llm.DecoderLM(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  specs = jax.tree.leaves(nn.get_partition_spec(abstract)["params"],
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert specs and all(len(s) > 0 and any(a is not None for a in s) for s in specs)
  q = nn.get_partition_spec(abstract)["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert tuple(q) == ("layers", "embed", "heads", "head_dim")


def test_initializer_range_sets_every_kernel_and_embedding_std():
  """From-scratch models (the LISA demo) pick their init scale; HF's default is 0.02."""
  stds = {}
  for r in (0.02, 0.1):
    cfg = llm.DecoderConfig(family="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, initializer_range=r)
    params = nn.unbox(llm.DecoderLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    flat = {"/".join(str(p.key) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    stds[r] = {k: float(np.std(v)) for k, v in flat.items() if not k.endswith("scale")}
  assert set(stds[0.1]) >= {"embed_tokens/embedding", "lm_head/kernel", "layers/self_attn/q_proj/kernel",
                            "layers/mlp/down_proj/kernel"}
  for k, s in stds[0.1].items():
    assert abs(s / 0.1 - 1) < 0.1 and abs(stds[0.02][k] / 0.02 - 1) < 0.1, (k, s, stds[0.02][k])


def test_qwen2_sliding_window_only_on_layers_from_max_window_layers():
  """transformers' Qwen2 slides only the layers >= max_window_layers (its layer_types); the
  window shorter than the sequence makes the full-attention layer differ."""
  torch.manual_seed(2)
  ref = _perturb(tf.Qwen2ForCausalLM(tf.Qwen2Config(
      vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=112,
      num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1,
      pad_token_id=0, eos_token_id=2))).eval()
  assert ref.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
  d = tempfile.mkdtemp()
  ref.save_pretrained(d)
  conv = convert_checkpoint(d)
  assert conv.config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
  assert conv.config.window_layers == (False, True, True) and conv.config.sliding_window == 3
  ids, mask = _batch(5, t=12)
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  for cfg in (conv.config, conv.config.replace(scan_layers=False)):
    params = conv.params
    if not cfg.scan_layers:
      params = dict(params)
      layers = params.pop("layers")
      for i in range(3):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    out = llm.DecoderLM(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_abs_diff(out.logits, want, mask) <= 1e-4, cfg.scan_layers
  # the window on every layer (the former conversion) is measurably wrong here
  every = llm.DecoderLM(conv.config.replace(layer_types=None)).apply(
      {"params": conv.params}, jnp.asarray(ids), jnp.asarray(mask))
  assert max_abs_diff(every.logits, want, mask) > 1e-2
  # the KV-cache path (generation) uses the same per-layer masks
  lids, lmask = left_pad(ids, mask)
  got = generate(llm.DecoderLM(conv.config), conv.params, jnp.asarray(lids), jnp.asarray(lmask), max_new_tokens=8,
                 stop_ids=(2,), pad_token_id=0)
  with torch.no_grad():
    hf = ref.generate(torch.tensor(lids), attention_mask=torch.tensor(lmask), max_new_tokens=8, do_sample=False,
                      pad_token_id=0, eos_token_id=2)[:, lids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(got.tokens)[:, :hf.shape[1]], hf)
