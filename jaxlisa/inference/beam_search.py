"""Beam search and sampling over a step function, with HF `generate`'s semantics (transformers 5), each
one `lax.while_loop` with static shapes: `beam_search` (num_beams, min/max length, repetition penalty,
length penalty, early stopping) and `sample` (repetition penalty, min length, temperature, top-k, top-p;
argmax when do_sample=False, which is HF's greedy decoding). The model is only a step function
`step(state, tokens [N, 1], index) -> (logits [N, V], state)`, so BLIP, BLIP-2's Q-Former and OPT
(jaxlisa.inference.captioning) share them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from jaxlisa.inference.generate import filter_logits, mark_seen, penalize_repeats


def _penalize_repeats(scores: jax.Array, seqs: jax.Array, length: jax.Array, penalty: float) -> jax.Array:
  """HF RepetitionPenaltyLogitsProcessor: scores [N, V] of tokens present in seqs[:, :length]
  ([N, M]) are multiplied by penalty where negative, divided where positive."""
  if penalty == 1.0:
    return scores
  ids = jnp.where(jnp.arange(seqs.shape[1])[None] < length, seqs, -1)
  return penalize_repeats(scores, mark_seen(jnp.zeros(scores.shape, bool), ids), penalty)


def _block_eos(scores: jax.Array, length: jax.Array, min_length: int, eos: jax.Array) -> jax.Array:
  """HF MinLengthLogitsProcessor: eos scores -> -inf while the sequence is shorter than min_length."""
  is_eos = jnp.any(jnp.arange(scores.shape[-1])[:, None] == eos[None, :], axis=-1)
  return jnp.where(is_eos[None] & (length < min_length), -jnp.inf, scores)


@flax.struct.dataclass
class BeamSearchOutput:
  sequences: jax.Array  # [B, R, M] prompt + generated tokens, filled with fill_value after each end
  scores: jax.Array  # [B, R] length-penalised log-probabilities
  lengths: jax.Array  # [B, R] generated tokens (eos included)


def beam_search(step: Callable, state: Any, first_logits: jax.Array, prompt: jax.Array, *, num_beams: int,
                max_length: int, min_length: int = 0, eos_ids: tuple[int, ...] = (), fill_value: int = 0,
                repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1,
                state_batch_axis: int = 0) -> BeamSearchOutput:
  """HF `_beam_search` (transformers 5) with static shapes, inside one `lax.while_loop`.

  prompt [B, P] (the same for every beam); first_logits [B * K, V] for the last prompt position;
  state: pytree whose leaves have the B * K axis at `state_batch_axis` (caches: [L, B * K, ...] -> 1),
  reordered along with the beams;
  step(state, tokens [B * K, 1], index) -> (logits [B * K, V], state) feeds the token at slot `index`.
  Keeps 2K candidates per step (K live, eos-ended ones scored by length ** length_penalty), the early
  stop heuristic and `early_stopping` (False | True | "never") of HF. Returns the best
  num_return_sequences hypotheses per batch row.
  """
  b, p = prompt.shape
  k, m = num_beams, max_length
  v = first_logits.shape[-1]
  keep = max(2, 1 + len(eos_ids)) * k
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  seqs0 = jnp.full((b, k, m), fill_value, jnp.int32).at[:, :, :p].set(jnp.broadcast_to(prompt[:, None], (b, k, p)))
  running_scores0 = jnp.concatenate([jnp.zeros((b, 1)), jnp.full((b, k - 1), -1e9)], axis=1).astype(jnp.float32)
  top_mask = jnp.arange(keep) < k
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(s):
    return ~s["done"]

  def body(s):
    cur = s["cur"]
    running = s["running"]
    logp = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1)
    flat = running.reshape(b * k, m)
    logp = _penalize_repeats(logp, flat, cur, repetition_penalty)
    logp = _block_eos(logp, cur, min_length, eos)
    acc = (logp.reshape(b, k, v) + s["running_scores"][:, :, None]).reshape(b, k * v)
    top_scores, top_idx = jax.lax.top_k(acc, keep)
    beam, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
    cand = gather(running, beam)
    cand = jnp.where(jnp.arange(m)[None, None] == cur, tok[..., None], cand)
    hits = jnp.any(tok[..., None] == eos, axis=-1) | (cur + 1 >= m)
    # live beams for the next step
    live_scores = top_scores + hits.astype(jnp.float32) * -1e9
    _, nxt = jax.lax.top_k(live_scores, k)
    new_running = gather(cand, nxt)
    new_running_scores = gather(live_scores, nxt)
    src = (gather(beam, nxt) + jnp.arange(b)[:, None] * k).reshape(b * k)
    # finished hypotheses
    gen_len = cur + 1 - p
    fin = top_scores / (gen_len.astype(jnp.float32) ** length_penalty)
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    fin = fin + full.astype(jnp.float32) * -1e9
    fin = fin + (~s["unsatisfied"]).astype(jnp.float32) * -1e9
    just = hits & top_mask[None]
    fin = fin + (~just).astype(jnp.float32) * -1e9
    merged_scores = jnp.concatenate([s["scores"], fin], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    seqs = gather(jnp.concatenate([s["seqs"], cand], axis=1), best)
    scores = gather(merged_scores, best)
    finished = gather(jnp.concatenate([s["finished"], just], axis=1), best)
    lengths = gather(jnp.concatenate([s["lengths"], jnp.full((b, keep), gen_len, jnp.int32)], axis=1), best)
    # early-stop heuristic and loop condition (after cur_len += 1, as HF)
    cur = cur + 1
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = jnp.float32(m - p)
    else:
      best_len = (cur - p).astype(jnp.float32)
    best_running = new_running_scores[:, :1] / (best_len ** length_penalty)
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -1e9)
    unsatisfied = s["unsatisfied"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
    go_on = jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
    # reorder the model state, feed the last token of every live beam
    state = jax.tree.map(lambda x: jnp.take(x, src, axis=state_batch_axis), s["state"])
    last = jnp.take_along_axis(new_running.reshape(b * k, m), jnp.full((b * k, 1), cur - 1), axis=1)
    logits, state = step(state, last, cur - 1)
    return dict(cur=cur, running=new_running, running_scores=new_running_scores, seqs=seqs, scores=scores,
                finished=finished, lengths=lengths, unsatisfied=unsatisfied, done=~go_on, logits=logits,
                state=state)

  s0 = dict(cur=jnp.int32(p), running=seqs0, running_scores=running_scores0, seqs=seqs0,
            scores=jnp.full((b, k), -1e9, jnp.float32), finished=jnp.zeros((b, k), bool),
            lengths=jnp.zeros((b, k), jnp.int32), unsatisfied=jnp.ones((b, 1), bool), done=jnp.bool_(p >= m),
            logits=first_logits, state=state)
  s = jax.lax.while_loop(cond, body, s0)
  r = num_return_sequences
  return BeamSearchOutput(sequences=s["seqs"][:, :r], scores=s["scores"][:, :r], lengths=s["lengths"][:, :r])


def sample(step: Callable, state: Any, first_logits: jax.Array, prompt: jax.Array, rng: jax.Array, *,
           max_length: int, min_length: int = 0, eos_ids: tuple[int, ...] = (), pad_token_id: int = 0,
           repetition_penalty: float = 1.0, do_sample: bool = True, temperature: float = 1.0, top_k: int = 50,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """HF `_sample`: repetition penalty and min length on the logits, then temperature, top-k, top-p and
  a categorical draw (argmax when do_sample=False). prompt [B, P]; step as in `beam_search`.
  Returns (sequences [B, M] prompt + tokens, pad after eos; lengths [B] generated tokens)."""
  b, p = prompt.shape
  m = max_length
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  seqs0 = jnp.full((b, m), pad_token_id, jnp.int32).at[:, :p].set(prompt)

  def cond(s):
    return (s["cur"] < m) & ~jnp.all(s["done"])

  def body(s):
    cur = s["cur"]
    scores = _penalize_repeats(s["logits"].astype(jnp.float32), s["seqs"], cur, repetition_penalty)
    scores = _block_eos(scores, cur, min_length, eos)
    rng, key = jax.random.split(s["rng"])
    if do_sample:
      k = min(top_k, scores.shape[-1])  # HF TopKLogitsWarper: top_k capped at the vocabulary
      tok = jax.random.categorical(key, filter_logits(scores, temperature, k, top_p), axis=-1)
    else:
      tok = jnp.argmax(scores, axis=-1)
    tok = jnp.where(s["done"], pad_token_id, tok.astype(jnp.int32))
    seqs = jax.lax.dynamic_update_slice(s["seqs"], tok[:, None], (0, cur))
    done = s["done"] | jnp.any(tok[:, None] == eos[None], axis=-1)
    lengths = s["lengths"] + (~s["done"]).astype(jnp.int32)
    logits, state = step(s["state"], tok[:, None], cur)
    return dict(cur=cur + 1, seqs=seqs, done=done, lengths=lengths, logits=logits, state=state, rng=rng)

  s0 = dict(cur=jnp.int32(p), seqs=seqs0, done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
            logits=first_logits, state=state, rng=rng)
  s = jax.lax.while_loop(cond, body, s0)
  return s["seqs"], s["lengths"]
