"""LLaVA: jaxlisa vs transformers (PyTorch) LlavaForConditionalGeneration, same machine, one run.

  python bench/llava.py [--vision_layers 4 --vision_width 256 --layers 4 --hidden 512 --new_tokens 64]

Cases: prefill (one 224 px image = 256 image tokens + a text prompt, full forward to logits) at
batch 1; greedy decoding of `new_tokens` after that prompt at batch 1 and 4 (tokens/s, prefill
included, KV cache on both sides, eos disabled so every run decodes exactly new_tokens). Same
random weights on both sides (converted with jaxlisa's converter); fp32.
"""

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from bench.common import convert_reference, parse_args, report, timeit  # noqa: E402
from jaxlisa.inference import multimodal  # noqa: E402
from jaxlisa.models import llava  # noqa: E402


def main():
  a = parse_args(vision_layers=4, vision_width=256, image_size=224, layers=4, hidden=512, vocab=32000, prompt=32,
                 batch=4, new_tokens=64, iters=3)

  torch.manual_seed(0)
  image_token = a.vocab - 1  # llava-hf keeps the image token inside the vocabulary
  cfg = tf.LlavaConfig(
      vision_config=dict(hidden_size=a.vision_width, intermediate_size=4 * a.vision_width,
                         num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_width // 64,
                         image_size=a.image_size, patch_size=14),
      text_config=dict(model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden,
                       intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                       num_attention_heads=a.hidden // 64, max_position_embeddings=2048, pad_token_id=0,
                       eos_token_id=2),
      image_token_index=image_token)
  ref = tf.LlavaForConditionalGeneration(cfg).eval()
  conv = convert_reference(ref)
  module = llava.Llava(conv.config)
  params = jax.device_put(conv.params)
  n_img = conv.config.tokens_per_crop
  rows = []

  def inputs(b, seed):
    rs = np.random.RandomState(seed)
    text = rs.randint(3, image_token, (b, a.prompt))
    ids = np.concatenate([text[:, :1], np.full((b, n_img), image_token), text[:, 1:]], axis=1)
    px = rs.randn(b, a.image_size, a.image_size, 3).astype(np.float32)
    return ids, np.ones_like(ids), px

  # prefill: vision tower + projector + merge + LM forward over image and prompt tokens
  ids, mask, px = inputs(1, 0)
  fwd = jax.jit(lambda p, i, m, x: module.apply({"params": p}, i, m, x).logits)
  ij, mj, xj = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(px)
  tj = timeit(lambda: fwd(params, ij, mj, xj).block_until_ready(), iters=a.iters)
  it, mt, xt = torch.tensor(ids), torch.tensor(mask), torch.tensor(px.transpose(0, 3, 1, 2).copy())
  with torch.inference_mode():
    tt = timeit(lambda: ref(input_ids=it, attention_mask=mt, pixel_values=xt).logits, iters=a.iters)
    err = float(np.abs(np.asarray(fwd(params, ij, mj, xj)) - ref(input_ids=it, attention_mask=mt,
                                                                  pixel_values=xt).logits.numpy()).max())
  rows.append({"case": f"prefill 1 image + {a.prompt} tokens ({ids.shape[1]} positions)", "unit": "s",
               "jaxlisa": tj, "torch": tt, "max_abs_logit_diff": err})

  # greedy decoding after the multimodal prompt
  for b in (1, a.batch):
    ids, mask, px = inputs(b, b)
    run_j = lambda: multimodal.llava_generate(module, params, ids, mask, px, max_new_tokens=a.new_tokens, stop_ids=(),
                                              pad_token_id=0).tokens.block_until_ready()
    tj = timeit(run_j, iters=a.iters)
    it, mt, xt = torch.tensor(ids), torch.tensor(mask), torch.tensor(px.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
      run_t = lambda: ref.generate(input_ids=it, attention_mask=mt, pixel_values=xt, max_new_tokens=a.new_tokens,
                                   min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
      tt = timeit(run_t, iters=a.iters)
      same = np.array_equal(np.asarray(run_j()), run_t()[:, ids.shape[1]:].numpy())
    n = b * a.new_tokens
    rows.append({"case": f"greedy decode batch {b}, {a.new_tokens} new tokens", "unit": "tok/s",
                 "jaxlisa": n / tj, "torch": n / tt, "higher_is_better": True, "tokens_identical": bool(same)})
  report("llava", rows, {"config": vars(a)})


if __name__ == "__main__":
  main()
