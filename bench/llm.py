"""Decoder LM: jaxlisa vs transformers (PyTorch) on the same machine, in one run.

  python bench/llm.py [--layers 8 --hidden 512 --vocab 32000 --new_tokens 128]

Cases: forward on [8, 512] tokens; greedy decoding of 128 new tokens at batch 1 and 8 (tokens/s,
KV cache on both sides: HF `generate` uses its DynamicCache). Same random weights on both sides
(converted with jaxlisa's converter); fp32.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from bench.common import report, timeit  # noqa: E402
from jaxlisa.conversion.convert import convert_checkpoint  # noqa: E402
from jaxlisa.inference.generate import generate  # noqa: E402
from jaxlisa.models.llm import DecoderLM  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--iters", type=int, default=3)
  a = ap.parse_args()

  torch.manual_seed(0)
  cfg = tf.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                       num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                       max_position_embeddings=2048, pad_token_id=0, eos_token_id=2)
  ref = tf.LlamaForCausalLM(cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    conv = convert_checkpoint(d)
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
  rows.append({"case": f"forward [{a.batch}, {a.seq}]", "unit": "s", "jaxlisa": tj, "torch": tt})

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
    rows.append({"case": f"greedy decode batch {b}, {a.new_tokens} new tokens", "unit": "tok/s",
                 "jaxlisa": n / tj, "torch": n / tt, "higher_is_better": True, "tokens_identical": bool(same)})
  report("llm", rows, {"config": vars(a)})


if __name__ == "__main__":
  main()
