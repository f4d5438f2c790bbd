"""Converter: every on-disk format, family detection, bit-exact round trip, and clear errors."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from conftest import max_abs_diff
from jaxlisa.conversion import convert, keymap
from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.models import llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 80


def _llama(**kw):
  torch.manual_seed(0)
  cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
  cfg.update(kw)
  return tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()


def _logits_match(ref, module, params, tol=1e-4):
  ids = np.random.RandomState(0).randint(0, V, (2, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  err = max_abs_diff(got, want, mask)
  assert err <= tol, err
  return err


def _write_sharded_bin(model, d, n_shards=3):
  """The pre-safetensors HF layout: pytorch_model-0000k-of-0000n.bin + index json."""
  os.makedirs(d, exist_ok=True)
  model.config.save_pretrained(d)
  sd = model.state_dict()
  keys = sorted(sd)
  weight_map = {}
  for s in range(n_shards):
    name = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
    part = {k: sd[k].clone() for k in keys[s::n_shards]}
    torch.save(part, os.path.join(d, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded_safetensors", "sharded_bin"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt"])
def test_formats_and_families(tmp_path, fmt, arch):
  torch.manual_seed(0)
  small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
  ref = {
      "llama": lambda: _llama(),
      "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**small, intermediate_size=48,
                                                                num_key_value_heads=2, sliding_window=4)),
      "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, intermediate_size=48, num_key_value_heads=2)),
      "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(**small, ffn_dim=48, word_embed_proj_dim=16,
                                                    max_position_embeddings=32)),
  }[arch]().eval()
  src = str(tmp_path / "src")
  if fmt == "sharded_bin":
    _write_sharded_bin(ref, src)
  else:
    ref.save_pretrained(src, max_shard_size="20KB" if fmt == "sharded_safetensors" else "1GB")
  files = os.listdir(src)
  assert any(f.endswith(".index.json") for f in files) == (fmt != "safetensors")
  conv = convert.convert_checkpoint(src)
  assert conv.family == arch
  out = convert.save_converted(str(tmp_path / "dst"), conv, source_dir=src)
  pre = convert.load_pretrained(out)
  assert pre.family == arch and pre.config == conv.config
  _logits_match(ref, pre.module, pre.params)


def test_load_pretrained_accepts_raw_hf_dir_and_tokenizer(tmp_path):
  from tokenizers import SentencePieceBPETokenizer  # pylint: disable=import-outside-toplevel
  ref = _llama()
  ref.save_pretrained(tmp_path)
  sp = SentencePieceBPETokenizer(unk_token="<unk>")
  sp.train_from_iterator(["the red circle", "a blue square"] * 10, vocab_size=60,
                         special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  tf.PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>").save_pretrained(tmp_path)
  module, params, config = convert.load_pretrained(str(tmp_path))
  assert config.family == "llama"
  _logits_match(ref, module, params)
  out = convert.save_converted(str(tmp_path / "conv"), convert.convert_checkpoint(str(tmp_path)),
                               source_dir=str(tmp_path))
  tok = convert.load_pretrained(out).tokenizer
  assert tok is not None and tok("the red circle").input_ids == \
      tf.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))("the red circle").input_ids


def test_single_pth_file_with_inv_freq_buffers_and_no_config(tmp_path):
  """LISA-era LLaMA checkpoints carry rotary_emb.inv_freq; a bare .pth has no config.json."""
  ref = _llama(num_attention_heads=1, num_key_value_heads=1, hidden_size=64)
  sd = dict(ref.state_dict())
  for i in range(2):
    sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
  torch.save(sd, tmp_path / "model.pth")
  conv = convert.convert_checkpoint(str(tmp_path / "model.pth"))
  assert conv.family == "llama" and conv.config.num_hidden_layers == 2
  _logits_match(ref, llm.DecoderLM(conv.config), conv.params)


def test_qwen1_fused_c_attn(tmp_path):
  """Qwen(1) remote-code names (fused c_attn, w1/w2 swapped roles) equal the Qwen2 model."""
  torch.manual_seed(0)
  ref = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=4, rms_norm_eps=1e-6)).eval()
  sd = ref.state_dict()
  q1 = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"]}
  for i in range(2):
    p = f"model.layers.{i}."
    h = f"transformer.h.{i}."
    q1[h + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
    q1[h + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    q1[h + "attn.c_attn.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    q1[h + "attn.c_attn.bias"] = torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
    q1[h + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
    q1[h + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
    q1[h + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
    q1[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: v.contiguous() for k, v in q1.items()}, tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "vocab_size": V, "hidden_size": 32,
               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 8,
               "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "seq_length": 64, "no_bias": True}, f)
  conv = convert.convert_checkpoint(str(tmp_path))
  assert conv.family == "qwen"
  _logits_match(ref, llm.DecoderLM(conv.config), conv.params)
  back = convert.export_checkpoint(conv.params, "qwen", conv.config, None)
  assert set(back) == set(q1) and all(np.array_equal(back[k], q1[k].numpy()) for k in q1)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_export_round_trip_is_bit_exact(tmp_path, arch):
  ref = _llama() if arch == "llama" else tf.OPTForCausalLM(tf.OPTConfig(
      vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
      word_embed_proj_dim=16, max_position_embeddings=32)).eval()
  ref.save_pretrained(tmp_path / "src")
  conv = convert.convert_checkpoint(str(tmp_path / "src"))
  state = convert.export_checkpoint(conv.params, conv.family, conv.config, str(tmp_path / "back.safetensors"))
  sd = {k: v for k, v in ref.state_dict().items() if not (arch == "opt" and k == "lm_head.weight")}
  assert set(state) == set(sd)
  for k in sd:
    assert np.array_equal(state[k], sd[k].numpy()), k
  # and the exported file loads back into transformers
  reloaded = type(ref)(ref.config)
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  missing, unexpected = reloaded.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}


def test_bfloat16_conversion(tmp_path):
  ref = _llama()
  ref.save_pretrained(tmp_path / "src")
  conv = convert.convert_checkpoint(str(tmp_path / "src"), dtype="bfloat16")
  assert all(str(x.dtype) == "bfloat16" for x in __import__("jax").tree.leaves(conv.params))
  _logits_match(ref, llm.DecoderLM(conv.config), conv.params, tol=0.1)


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  _llama().save_pretrained(d)
  return str(d)


def _rewrite(src, dst, edit):
  from safetensors.torch import load_file, save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(dst, exist_ok=True)
  sd = load_file(os.path.join(src, "model.safetensors"))
  edit(sd)
  save_file(sd, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_missing_key_is_named(llama_src, tmp_path):
  d = _rewrite(llama_src, str(tmp_path / "m"), lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing parameters.*layers/mlp/up_proj/kernel.*only 1 of 2"):
    convert.convert_checkpoint(d)


def test_unexpected_key_is_named(llama_src, tmp_path):
  d = _rewrite(llama_src, str(tmp_path / "u"), lambda sd: sd.update({"model.extra.weight": torch.zeros(2)}))
  with pytest.raises(CheckpointError, match=r"unexpected source keys.*model\.extra\.weight"):
    convert.convert_checkpoint(d)


def test_shape_mismatch_is_named(llama_src, tmp_path):
  d = _rewrite(llama_src, str(tmp_path / "s"),
               lambda sd: sd.update({"model.norm.weight": torch.ones(31)}))
  with pytest.raises(CheckpointError, match=r"shape mismatches.*model\.norm\.weight \(31,\) -> norm/scale \(32,\)"):
    convert.convert_checkpoint(d)


def test_unknown_family(tmp_path):
  torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "x.pth")
  with pytest.raises(CheckpointError, match="cannot tell which model family"):
    convert.convert_checkpoint(str(tmp_path / "x.pth"))
  with pytest.raises(CheckpointError, match="unknown family 'nope'"):
    convert.convert_checkpoint(str(tmp_path / "x.pth"), family="nope")


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_truncated_file(llama_src, tmp_path, kind):
  if kind == "safetensors":
    raw = open(os.path.join(llama_src, "model.safetensors"), "rb").read()
    path = tmp_path / "model.safetensors"
  else:
    torch.save(_llama().state_dict(), tmp_path / "full.bin")
    raw = open(tmp_path / "full.bin", "rb").read()
    os.remove(tmp_path / "full.bin")
    path = tmp_path / "pytorch_model.bin"
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(CheckpointError, match=str(path.name)):
    convert.convert_checkpoint(str(path), family="llama")


def test_failed_conversion_leaves_no_partial_output(llama_src, tmp_path):
  conv = convert.convert_checkpoint(llama_src)
  conv.params["norm"]["scale"] = object()  # cannot be serialised
  with pytest.raises(Exception):
    convert.save_converted(str(tmp_path / "out"), conv)
  assert not os.path.exists(tmp_path / "out")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_rule_templates_resolve_scanned_and_unscanned():
  r = keymap.Rule("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up_proj/kernel")
  m = r.regex.match("model.layers.12.mlp.up_proj.weight")
  assert keymap.resolve_dst(r.dst, m.groupdict(), True) == (("layers", "mlp", "up_proj", "kernel"), (12,))
  assert keymap.resolve_dst(r.dst, m.groupdict(), False) == (("layers_12", "mlp", "up_proj", "kernel"), ())
  assert r.regex.match("model.layers.x.mlp.up_proj.weight") is None


def test_cli_converts_and_verifies(llama_src, tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_torch_weights.py"), "--src", llama_src,
                        "--dst", str(tmp_path / "cli"), "--verify"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("verify max_abs_logit_diff")][0]
  assert float(line.split()[-1]) <= 1e-4
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_torch_weights.py"), "--src",
                        str(tmp_path / "nope"), "--dst", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert bad.returncode == 2 and "checkpoint not found" in bad.stderr
