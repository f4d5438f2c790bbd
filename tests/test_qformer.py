"""Q-Former parity with transformers' Blip2QFormerModel (+ Blip2TextEmbeddings) built tiny, through the
HF-name key map: queries only (cross-attention to image features), text only, queries + text (ITM),
queries + causal text (ITG, HF given the UniLM mask as a 4D mask); the cached query K/V reused by the
LM pass; the LM head and label-smoothed loss vs a PyTorch transcription of LAVIS's `BertLMHeadModel`;
incremental text decoding with the functional cache; export round trip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from transformers.models.blip_2 import modeling_blip_2 as hf_blip2

from conftest import max_abs_diff
from jaxlisa.conversion import blip2 as conv
from jaxlisa.conversion import keymap
from jaxlisa.models import qformer as Q
from jaxlisa.models.losses import cross_entropy

TOL = 1e-4
V, D, L, N, FF, DV = 50, 32, 3, 4, 48, 24  # 3 layers: cross-attention in layers 0 and 2
B, NQ, T, TI = 2, 5, 6, 7
BOS = 49


@pytest.fixture(scope="module")
def hf():
  cfg = tf.Blip2QFormerConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=N,
                              intermediate_size=FF, encoder_hidden_size=DV, cross_attention_frequency=2,
                              use_qformer_text_input=True, max_position_embeddings=20)
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  qformer = hf_blip2.Blip2QFormerModel(cfg).eval()
  emb = hf_blip2.Blip2TextEmbeddings(cfg).eval()
  head = torch.nn.ModuleDict(dict(dense=torch.nn.Linear(D, D), ln=torch.nn.LayerNorm(D, eps=1e-12))).eval()
  head_bias = torch.nn.Parameter(torch.zeros(V))
  with torch.no_grad():  # every tensor random, norms around one
    for mod in (qformer, emb, head):
      for name, t in mod.state_dict().items():
        if t.is_floating_point():
          t.copy_((1.0 if name.endswith("weight") and t.ndim == 1 else 0.0) + 0.2 * torch.randn_like(t))
    head_bias.copy_(0.2 * torch.randn(V))
  state = {f"qformer.{k}": v.numpy() for k, v in qformer.state_dict().items()}
  state.update({f"embeddings.{k}": v.numpy() for k, v in emb.state_dict().items()})
  # LAVIS `cls.predictions` names for the LM head (decoder tied to the word embeddings)
  p = "cls.predictions."
  state.update({p + "transform.dense.weight": head.dense.weight.detach().numpy(),
                p + "transform.dense.bias": head.dense.bias.detach().numpy(),
                p + "transform.LayerNorm.weight": head.ln.weight.detach().numpy(),
                p + "transform.LayerNorm.bias": head.ln.bias.detach().numpy(),
                p + "bias": head_bias.detach().numpy(), p + "decoder.bias": head_bias.detach().numpy(),
                p + "decoder.weight": emb.word_embeddings.weight.detach().numpy()})
  return qformer, emb, head, head_bias, state


CFG = Q.QFormerConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=N, intermediate_size=FF,
                      encoder_hidden_size=DV, max_position_embeddings=20, hidden_dropout_prob=0.0, bos_token_id=BOS)


def _rules():
  hf_rules = conv.qformer_rules(CFG.replace(lm_head=False), "qformer.", "", style="hf", embeddings_src="embeddings.")
  head_rules = [r for r in conv.qformer_rules(CFG, "", "") if r.src.startswith("cls.")]
  return hf_rules + head_rules


def _inputs(seed=0):
  rs = np.random.RandomState(seed)
  queries = np.broadcast_to(rs.randn(1, NQ, D).astype(np.float32), (B, NQ, D))
  image = rs.randn(B, TI, DV).astype(np.float32)
  ids = rs.randint(1, V - 1, (B, T))
  mask = np.ones((B, T), np.int64)
  mask[1, 4:] = 0
  return queries, image, ids, mask


@pytest.fixture(scope="module")
def jx(hf):
  module = Q.QFormer(CFG)
  q, img, ids, mask = _inputs()
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask), q, img))
  params = keymap.convert_state(hf[4], _rules(), nn.meta.unbox(abstract["params"]), skip=conv.QFORMER_SKIP)
  fwd = jax.jit(lambda p, *a, causal=False: module.apply({"params": p}, *a, causal=causal),
                static_argnames=("causal",))
  return module, params, fwd


def _full_mask(mask):
  return np.concatenate([np.ones((mask.shape[0], NQ), mask.dtype), mask], 1)


def _rows(x, mask):
  return np.broadcast_to(np.asarray(mask, bool)[..., None], x.shape)


def test_queries_only_matches_hf(hf, jx):
  qformer = hf[0]
  _, params, fwd = jx
  q, img, _, _ = _inputs()
  got = fwd(params, None, None, q, img)
  with torch.no_grad():
    want = qformer(query_embeds=torch.tensor(q), encoder_hidden_states=torch.tensor(img)).last_hidden_state
  assert got.last_hidden_state.shape == (B, NQ, D)
  assert max_abs_diff(got.last_hidden_state, want) <= TOL
  assert got.query_kv["k"].shape == (L, B, NQ, N, D // N)


def test_text_only_matches_hf(hf, jx):
  qformer, emb = hf[:2]
  _, params, fwd = jx
  _, _, ids, mask = _inputs(1)
  got = fwd(params, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
  with torch.no_grad():
    want = qformer(query_embeds=emb(input_ids=torch.tensor(ids)), query_length=0,
                   attention_mask=torch.tensor(mask)).last_hidden_state
  assert max_abs_diff(got, want, _rows(got, mask)) <= TOL


def test_queries_and_text_bidirectional_matches_hf(hf, jx):
  qformer, emb = hf[:2]
  _, params, fwd = jx
  q, img, ids, mask = _inputs(2)
  got = fwd(params, jnp.asarray(ids), jnp.asarray(mask), q, img).last_hidden_state
  with torch.no_grad():
    want = qformer(query_embeds=emb(input_ids=torch.tensor(ids), query_embeds=torch.tensor(q)), query_length=NQ,
                   attention_mask=torch.tensor(_full_mask(mask)), encoder_hidden_states=torch.tensor(img)).last_hidden_state
  assert max_abs_diff(got, want, _rows(got, _full_mask(mask))) <= TOL


def _unilm_4d(mask):
  """LAVIS `get_extended_attention_mask(..., is_decoder=True, has_query=True)` as an additive 4D mask."""
  t = mask.shape[1]
  allowed = np.zeros((NQ + t, NQ + t), np.float32)
  allowed[:, :NQ] = 1
  allowed[NQ:, NQ:] = np.tril(np.ones((t, t)))
  allowed = allowed[None] * _full_mask(mask)[:, None, :]
  return torch.tensor(((1.0 - allowed[:, None]) * -10000.0).astype(np.float32))


def test_causal_text_after_queries_matches_hf(hf, jx):
  qformer, emb = hf[:2]
  _, params, fwd = jx
  q, img, ids, mask = _inputs(3)
  got = fwd(params, jnp.asarray(ids), jnp.asarray(mask), q, img, causal=True).last_hidden_state
  with torch.no_grad():
    want = qformer(query_embeds=emb(input_ids=torch.tensor(ids), query_embeds=torch.tensor(q)), query_length=NQ,
                   attention_mask=_unilm_4d(mask), encoder_hidden_states=torch.tensor(img)).last_hidden_state
  assert max_abs_diff(got, want, _rows(got, _full_mask(mask))) <= TOL


def _torch_lm_loss(hf, hidden, labels):
  """LAVIS BertLMHeadModel: cls(text states), shift by one, CE with label_smoothing 0.1."""
  _, emb, head, bias = hf[:4]
  x = head.ln(torch.nn.functional.gelu(head.dense(hidden)))
  logits = x @ emb.word_embeddings.weight.T + bias
  loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
  return loss, logits


def test_itg_with_cached_query_kv_matches_reference(hf, jx):
  """The LM pass over text with the queries-only call's K/V (LAVIS past_key_values) equals the joint
  UniLM pass of HF; its label-smoothed loss equals the PyTorch LM head + CrossEntropyLoss."""
  qformer, emb = hf[:2]
  module, params, fwd = jx
  q, img, ids, mask = _inputs(4)
  dec = ids.copy()
  dec[:, 0] = BOS
  labels = np.where(mask == 0, -100, dec)
  query_kv = fwd(params, None, None, q, img).query_kv
  loss, logits = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=Q.QFormer.lm_loss))(
      params, jnp.asarray(dec), jnp.asarray(mask), query_kv, jnp.asarray(labels))
  with torch.no_grad():
    hidden = qformer(query_embeds=emb(input_ids=torch.tensor(dec), query_embeds=torch.tensor(q)), query_length=NQ,
                     attention_mask=_unilm_4d(mask), encoder_hidden_states=torch.tensor(img)).last_hidden_state
    want_loss, want_logits = _torch_lm_loss(hf, hidden[:, NQ:], torch.tensor(labels))
  assert max_abs_diff(logits, want_logits, _rows(logits, mask)) <= TOL
  assert abs(float(loss) - float(want_loss)) <= TOL
  # The cached text pass is the same computation as the joint causal pass.
  joint = fwd(params, jnp.asarray(dec), jnp.asarray(mask), q, img, causal=True).last_hidden_state[:, NQ:]
  text = module.apply({"params": params}, jnp.asarray(dec), jnp.asarray(mask), prefix_kv=query_kv,
                      causal=True).last_hidden_state
  assert max_abs_diff(text, joint, _rows(text, mask)) <= 1e-5


def test_incremental_text_cache_matches_full_pass(jx):
  module, params, fwd = jx
  q, img, ids, _ = _inputs(5)
  full = fwd(params, jnp.asarray(ids), None, q, img, causal=True).last_hidden_state[:, NQ:]
  query_kv = fwd(params, None, None, q, img).query_kv
  cache = {"k": jnp.zeros((L, B, T, N, D // N)), "v": jnp.zeros((L, B, T, N, D // N))}
  step = jax.jit(lambda p, x, m, c, i: module.apply({"params": p}, x, m, prefix_kv=query_kv, cache=c, cache_index=i))
  outs = []
  for t in range(T):
    o = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray((np.arange(T) <= t)[None].repeat(B, 0)), cache, t)
    outs.append(o.last_hidden_state)
    cache = o.cache
  assert max_abs_diff(jnp.concatenate(outs, 1), full) <= 1e-5


def test_label_smoothed_ce_matches_torch():
  rs = np.random.RandomState(0)
  logits = rs.randn(3, 5, 11).astype(np.float32)
  labels = rs.randint(0, 11, (3, 5))
  labels[0, :2] = -100
  for eps in (0.0, 0.1):
    want = torch.nn.CrossEntropyLoss(label_smoothing=eps)(torch.tensor(logits).reshape(-1, 11),
                                                          torch.tensor(labels).reshape(-1))
    assert abs(float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps)) - float(want)) <= 1e-6


def test_export_round_trip_and_axes(hf, jx):
  _, params, _ = jx
  back = keymap.export_state(params, _rules())
  state = hf[4]
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)
  assert set(state) - set(back) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  abstract = jax.eval_shape(Q.QFormer(CFG).init, jax.random.PRNGKey(0), None, None, jnp.zeros((1, NQ, D)),
                            jnp.zeros((1, TI, DV)))
  spec = nn.get_partition_spec(abstract)["params"]["bert"]["encoder"]["layer_0"]["crossattention"]["self"]
  assert tuple(spec["query"]["kernel"]) == ("embed", "heads", "head_dim")
  assert "crossattention" not in abstract["params"]["bert"]["encoder"]["layer_1"]
  assert "intermediate" in abstract["params"]["bert"]["encoder"]["layer_1"]  # text FFN made at init
  assert "cls" in abstract["params"]


def test_stage2_qformer_has_no_text_parts():
  c = CFG.replace(use_text=False, lm_head=False)
  p = jax.eval_shape(Q.QFormer(c).init, jax.random.PRNGKey(0), None, None, jnp.zeros((1, NQ, D)),
                     jnp.zeros((1, TI, DV)))["params"]
  assert set(p["bert"]["embeddings"]) == {"LayerNorm"} and "cls" not in p
  assert "intermediate" not in p["bert"]["encoder"]["layer_0"]
  with pytest.raises(ValueError, match="no word embeddings"):
    Q.QFormer(c).apply({"params": p}, jnp.zeros((1, 3), jnp.int32))
