"""Decoder LM: jaxlisa vs transformers (PyTorch) on the same machine, in one run.

  python bench/llm.py [--layers 8 --hidden 512 --vocab 32000 --new_tokens 128 --train_batch 4]

Cases: forward on [8, 512] tokens; one train step (next-token CE, forward + backward + AdamW) on
[train_batch, 512]; greedy decoding of 128 new tokens at batch 1 and 8 (tokens/s, KV cache on both
sides: HF `generate` uses its DynamicCache). Same random weights on both sides (converted with
jaxlisa's converter); fp32.

Limits measured in the same run (bench/roofline.py): forward and train step as achieved FLOP/s and
fraction of XLA's fp32 matmul peak (model FLOPs from the config's shapes; train = 3x forward);
decode as bytes read per step (weights + the whole preallocated KV cache) over the per-token time,
as a fraction of the measured copy bandwidth (the per-token time includes the prefill's share).
"""

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import optax  # noqa: E402
import transformers as tf  # noqa: E402

from bench import roofline  # noqa: E402
from bench.common import convert_reference, parse_args, report, timeit  # noqa: E402
from bench.lm_step import make_train_step  # noqa: E402
from jaxlisa.inference.generate import generate  # noqa: E402
from jaxlisa.models.llm import DecoderLM  # noqa: E402


def main():
  a = parse_args(layers=8, hidden=512, vocab=32000, seq=512, batch=8, prompt=16, new_tokens=128, train_batch=4, iters=3)
  limits = roofline.Roofline.measure()

  torch.manual_seed(0)
  cfg = tf.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                       num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                       max_position_embeddings=2048, pad_token_id=0, eos_token_id=2)
  ref = tf.LlamaForCausalLM(cfg).eval()
  conv = convert_reference(ref)
  module = DecoderLM(conv.config)
  params = jax.device_put(conv.params)
  rows = []

  # forward [B, T]
  ids = np.random.RandomState(0).randint(3, a.vocab, (a.batch, a.seq))
  fwd = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
  x = jnp.asarray(ids)
  tj = timeit(lambda: fwd(params, x).block_until_ready(), iters=a.iters)
  tx = torch.tensor(ids)
  with torch.inference_mode():
    tt = timeit(lambda: ref(tx).logits, iters=a.iters)
  flops = roofline.decoder_flops(conv.config, a.batch, a.seq)
  rows.append({"case": f"forward [{a.batch}, {a.seq}]", "unit": "s", "jaxlisa": tj, "torch": tt,
               "jaxlisa_roofline": limits.rate("jaxlisa forward", flops, tj),
               "torch_roofline": limits.rate("pytorch forward", flops, tt)})

  # train step [train_batch, T]: next-token CE, forward + backward + AdamW (lr 1e-5)
  ids = np.random.RandomState(2).randint(3, a.vocab, (a.train_batch, a.seq))
  adamw = optax.adamw(1e-5)
  step = make_train_step(module, adamw)
  box = {"params": jax.tree.map(jnp.copy, params)}
  box["opt"] = adamw.init(box["params"])
  x = jnp.asarray(ids)

  def step_j():
    box["params"], box["opt"], loss = step(box["params"], box["opt"], x)
    loss.block_until_ready()

  tj = timeit(step_j, iters=a.iters)
  del box
  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)
  tx = torch.tensor(ids)

  def step_t():
    opt.zero_grad(set_to_none=True)
    logits = ref(tx).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tx[:, 1:].reshape(-1))
    loss.backward()
    opt.step()

  tt = timeit(step_t, iters=a.iters)
  ref.eval()
  del opt
  flops = 3 * roofline.decoder_flops(conv.config, a.train_batch, a.seq)
  rows.append({"case": f"train step [{a.train_batch}, {a.seq}] (fwd+bwd+AdamW)", "unit": "s", "jaxlisa": tj,
               "torch": tt, "jaxlisa_roofline": limits.rate("jaxlisa train step", flops, tj),
               "torch_roofline": limits.rate("pytorch train step", flops, tt)})

  # greedy decoding; eos disabled on both sides so every run decodes exactly new_tokens tokens
  for b in (1, a.batch):
    prompt = np.random.RandomState(1).randint(3, a.vocab, (b, a.prompt))
    mask = np.ones_like(prompt)
    pj, mj = jnp.asarray(prompt), jnp.asarray(mask)
    run_j = lambda: generate(module, params, pj, mj, max_new_tokens=a.new_tokens, stop_ids=(),
                             pad_token_id=0).tokens.block_until_ready()
    tj = timeit(run_j, iters=a.iters)
    pt, mt = torch.tensor(prompt), torch.tensor(mask)
    with torch.inference_mode():
      run_t = lambda: ref.generate(pt, attention_mask=mt, max_new_tokens=a.new_tokens,
                                   min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
      tt = timeit(run_t, iters=a.iters)
      same = np.array_equal(np.asarray(run_j()), run_t()[:, a.prompt:].numpy())
    n = b * a.new_tokens
    step_bytes = roofline.decode_step_bytes(conv.config, params, b, a.prompt + a.new_tokens)
    rows.append({"case": f"greedy decode batch {b}, {a.new_tokens} new tokens", "unit": "tok/s",
                 "jaxlisa": n / tj, "torch": n / tt, "higher_is_better": True, "tokens_identical": bool(same),
                 "decode_step_bytes": step_bytes,
                 "jaxlisa_roofline": limits.bandwidth_fraction(f"jaxlisa decode step, batch {b}",
                                                              step_bytes["total"], tj / a.new_tokens)})
  limits_end = roofline.Roofline.measure()
  report("llm", rows, {"config": vars(a), "roofline": limits.as_dict(), "roofline_end": limits_end.as_dict()})


if __name__ == "__main__":
  main()
