"""int8 weight-only loading for serving (jaxlisa.inference.quantize): a tiny scanned LLaMA's logits
with int8 dense kernels against fp32, and the parameter bytes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlisa.inference import quantize as qz
from jaxlisa.inference.generate import generate
from jaxlisa.models import llm

# int8 per-channel rounding moves each weight by <= scale / 2 = max|w| / 254; through 2 layers the
# logits of this model move by ~1% of the largest logit (measured 1.07%); 3% bounds it.
REL_TOL = 0.03


@pytest.fixture(scope="module")
def tiny():
  cfg = llm.DecoderConfig(family="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, scan_layers=True)
  m = llm.DecoderLM(cfg)
  p = nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))["params"])
  return m, p


def test_int8_logits_close_to_fp32(tiny):
  m, p = tiny
  qp = qz.quantize_params(p)
  flat = traverse_util.flatten_dict(qp, is_leaf=lambda _, x: isinstance(x, qz.Int8Kernel))
  kernels = {k: v for k, v in flat.items() if k[-1] == "kernel"}
  assert kernels and all(isinstance(v, qz.Int8Kernel) and v.q.dtype == jnp.int8 for v in kernels.values())
  assert isinstance(flat[("embed_tokens", "embedding")], jax.Array)  # embeddings stay float
  q_proj = flat[("layers", "self_attn", "q_proj", "kernel")]
  assert q_proj.scale.shape == (2, 1, 1, 16)  # per layer, per last-axis channel
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 16)), jnp.int32)
  mask = jnp.ones((2, 16), jnp.int32)
  fwd = jax.jit(lambda params: m.apply({"params": params}, ids, mask).logits)
  ref, got = np.asarray(fwd(p)), np.asarray(fwd(qp))
  diff, top = np.abs(ref - got).max(), np.abs(ref).max()
  print(f"int8 vs fp32 logits: max abs diff {diff:.3e}, max |logit| {top:.3e}, relative {diff / top:.2e}")
  assert 0 < diff <= REL_TOL * top
  # dequantize is exact up to the rounding: q * scale within scale / 2 of the kernel
  w = np.asarray(p["layers"]["mlp"]["down_proj"]["kernel"])
  dq = np.asarray(qp["layers"]["mlp"]["down_proj"]["kernel"].astype(jnp.float32))
  assert np.all(np.abs(w - dq) <= np.asarray(qp["layers"]["mlp"]["down_proj"]["kernel"].scale) / 2 + 1e-7)
  # greedy decoding runs on the quantized tree (the KV-cache jit takes it as a pytree)
  out = generate(m, qp, ids[:, :8], mask[:, :8], max_new_tokens=4, stop_ids=())
  assert out.tokens.shape == (2, 4)


def test_int8_bytes(tiny):
  _, p = tiny
  qp = qz.quantize_params(p)
  kernel_bytes = lambda t: qz.param_bytes([v for k, v in traverse_util.flatten_dict(
      t, is_leaf=lambda _, x: isinstance(x, qz.Int8Kernel)).items() if k[-1] == "kernel"])
  ratio = kernel_bytes(p) / kernel_bytes(qp)
  total = qz.param_bytes(p) / qz.param_bytes(qp)
  print(f"dense kernels {kernel_bytes(p)} -> {kernel_bytes(qp)} bytes ({ratio:.2f}x); "
        f"whole LM {qz.param_bytes(p)} -> {qz.param_bytes(qp)} ({total:.2f}x, embeddings stay fp32)")
  assert 3.7 < ratio <= 4.0
  assert qz.param_bytes(qz.quantize_params(p, where=("lm_head",))) < qz.param_bytes(p)  # `where` limits it
  assert qz.param_bytes(qz.quantize_params(p, where=("nothing",))) == qz.param_bytes(p)


def test_bad_quantize_mode_exits_2(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import ROOT  # pylint: disable=import-outside-toplevel
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                      os.path.join(ROOT, "configs/lisa_tiny.py:runlocal"), "--workdir", str(tmp_path),
                      "--config.mode=serve", "--config.allow_random_init=True", "--config.serve.quantize=int4",
                      "--config.serve.port=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "serve.quantize must be one of" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
