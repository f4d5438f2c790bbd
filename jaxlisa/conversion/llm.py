"""Decoder LM families: HF config -> DecoderConfig, and key maps for LLaMA/Vicuna, Mistral,
Qwen2, Qwen(1) and OPT (both `OPTForCausalLM` and bare `OPTModel` prefixes)."""

from __future__ import annotations

from typing import Any, Sequence

from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import FLAT, IDENTITY, LINEAR, LINEAR_IN2, Rule, linear, linear_rules
from jaxlisa.conversion.family import Family, any_key
from jaxlisa.models.llm import DecoderConfig, DecoderLM

BUFFERS = (r"rotary_emb\.inv_freq$", r"\.masked_bias$", r"attn\.bias$")


def _rope_theta(cfg: dict, default: float = 10000.0) -> float:
  rp = cfg.get("rope_parameters") or {}
  return float(rp.get("rope_theta", cfg.get("rope_theta", default)))


def _rope_linear_factor(cfg: dict) -> float:
  rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
  kind = rs.get("rope_type", rs.get("type", "default"))
  if kind in (None, "default"):
    return 1.0
  if kind == "linear":
    return float(rs["factor"])
  raise CheckpointError(f"RoPE scaling type {kind!r} is not supported (only linear)")


def _eos(v):
  return tuple(v) if isinstance(v, list) else v


def config_from_hf(cfg: dict[str, Any]) -> DecoderConfig:
  """HF `config.json` (llama / mistral / qwen2 / qwen / opt) -> DecoderConfig."""
  mt = cfg.get("model_type")
  common = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=_eos(cfg.get("eos_token_id")),
                pad_token_id=cfg.get("pad_token_id"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt in ("opt",))))
  if mt in ("llama", "mistral", "qwen2"):
    sliding, layer_types = None, None
    if mt == "mistral":
      sliding = cfg.get("sliding_window")
    elif mt == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
      # transformers' Qwen2: only the "sliding_attention" layers slide (default: layers >= max_window_layers)
      sliding = cfg["sliding_window"]
      n = cfg["num_hidden_layers"]
      layer_types = tuple(cfg.get("layer_types") or [
          "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention" for i in range(n)])
      if "sliding_attention" not in layer_types:
        sliding, layer_types = None, None
    bias = bool(cfg.get("attention_bias", False))
    return DecoderConfig(
        family=mt, intermediate_size=cfg["intermediate_size"],
        num_key_value_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(cfg), rope_scaling_factor=_rope_linear_factor(cfg),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), hidden_act=cfg.get("hidden_act", "silu"),
        attention_bias=True if mt == "qwen2" else bias, o_proj_bias=bias if mt == "llama" else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=sliding, layer_types=layer_types,
        **common)
  if mt == "qwen":
    heads = cfg["num_attention_heads"]
    return DecoderConfig(
        family="qwen", intermediate_size=cfg["intermediate_size"] // 2,
        head_dim=cfg.get("kv_channels", cfg["hidden_size"] // heads),
        max_position_embeddings=cfg.get("max_position_embeddings", cfg.get("seq_length", 8192)),
        rope_theta=float(cfg.get("rotary_emb_base", 10000.0)), norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        attention_bias=True, o_proj_bias=not cfg.get("no_bias", True), mlp_bias=not cfg.get("no_bias", True),
        **{**common, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))})
  if mt == "opt":
    if not cfg.get("enable_bias", True):
      raise CheckpointError("OPT with enable_bias=False is not supported")
    proj = cfg.get("word_embed_proj_dim")
    return DecoderConfig(
        family="opt", intermediate_size=cfg["ffn_dim"], max_position_embeddings=cfg["max_position_embeddings"],
        norm_eps=1e-5, hidden_act=cfg.get("activation_function", "relu"), attention_bias=True,
        o_proj_bias=True, mlp_bias=True, word_embed_proj_dim=proj if proj != cfg["hidden_size"] else None,
        do_layer_norm_before=cfg.get("do_layer_norm_before", True),
        final_layer_norm=cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False),
        **common)
  raise CheckpointError(f"config.json model_type {mt!r} is not a decoder LM family")


def _infer_from_keys(src) -> DecoderConfig:
  """Infer a LLaMA-style config from tensor shapes when there is no config.json (e.g. a .pth)."""
  keys = src.keys()
  n_layers = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("model.layers."))
  vocab, hidden = src.shape("model.embed_tokens.weight")
  inter = src.shape("model.layers.0.mlp.up_proj.weight")[0]
  q = src.shape("model.layers.0.self_attn.q_proj.weight")[0]
  kv = src.shape("model.layers.0.self_attn.k_proj.weight")[0]
  head_dim = 128 if hidden % 128 == 0 and hidden >= 2048 else 64
  if q % head_dim or kv % head_dim or not kv:
    raise CheckpointError(f"no config.json beside the weights, and the attention heads cannot be read off "
                          f"the shapes (q_proj {q} rows, k_proj {kv}, assumed head_dim {head_dim}); put the "
                          "model's config.json beside the file")
  return DecoderConfig(family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=n_layers, num_attention_heads=q // head_dim,
                       num_key_value_heads=kv // head_dim, head_dim=head_dim,
                       tie_word_embeddings="lm_head.weight" not in keys)


def llama_rules(c: DecoderConfig, prefix: str = "model.", head: str = "lm_head.") -> list[Rule]:
  """HF LLaMA/Mistral/Qwen2 names -> DecoderLM params."""
  L = f"{prefix}layers.{{i}}."
  d = "layers/{i}/"
  rules = [
      Rule(f"{prefix}embed_tokens.weight", "embed_tokens/embedding"),
      Rule(f"{prefix}norm.weight", "norm/scale"),
      Rule(L + "input_layernorm.weight", d + "input_layernorm/scale"),
      Rule(L + "post_attention_layernorm.weight", d + "post_attention_layernorm/scale"),
      Rule(L + "self_attn.o_proj.weight", d + "self_attn/o_proj/kernel", LINEAR_IN2),
      Rule(L + "self_attn.o_proj.bias", d + "self_attn/o_proj/bias"),
  ]
  for n in ("q_proj", "k_proj", "v_proj"):
    rules += linear_rules(L + f"self_attn.{n}", d + f"self_attn/{n}")
  for n in ("gate_proj", "up_proj", "down_proj"):
    rules += linear_rules(L + f"mlp.{n}", d + f"mlp/{n}")
  rules.append(Rule(f"{head}weight", () if c.tie_word_embeddings else "lm_head/kernel", LINEAR))
  return rules


def opt_rules(c: DecoderConfig, prefix: str = "model.decoder.") -> list[Rule]:
  L = f"{prefix}layers.{{i}}."
  d = "layers/{i}/"
  rules = [
      Rule(f"{prefix}embed_tokens.weight", "embed_tokens/embedding"),
      Rule(f"{prefix}embed_positions.weight", "embed_positions/embedding"),
      Rule(f"{prefix}project_in.weight", "project_in/kernel", LINEAR),
      Rule(f"{prefix}project_out.weight", "project_out/kernel", LINEAR),
      Rule(f"{prefix}final_layer_norm.weight", "norm/scale"),
      Rule(f"{prefix}final_layer_norm.bias", "norm/bias"),
      Rule(L + "self_attn_layer_norm.weight", d + "input_layernorm/scale"),
      Rule(L + "self_attn_layer_norm.bias", d + "input_layernorm/bias"),
      Rule(L + "final_layer_norm.weight", d + "post_attention_layernorm/scale"),
      Rule(L + "final_layer_norm.bias", d + "post_attention_layernorm/bias"),
      Rule(L + "self_attn.out_proj.weight", d + "self_attn/o_proj/kernel", LINEAR_IN2),
      Rule(L + "self_attn.out_proj.bias", d + "self_attn/o_proj/bias"),
  ]
  for n in ("q_proj", "k_proj", "v_proj"):
    rules += linear_rules(L + f"self_attn.{n}", d + f"self_attn/{n}")
  for n in ("fc1", "fc2"):
    rules += linear_rules(L + n, d + f"mlp/{n}")
  rules.append(Rule("lm_head.weight", ()))  # tied to embed_tokens
  return rules


def qwen1_rules(c: DecoderConfig) -> list[Rule]:
  """Qwen(1) remote-code names: fused c_attn split into q/k/v; w2 is the gate, w1 the up proj."""
  L = "transformer.h.{i}."
  d = "layers/{i}/"
  n_q = c.num_attention_heads * c.dim_per_head
  n_kv = c.kv_heads * c.dim_per_head
  split = (0, (n_q, n_kv, n_kv))
  qkv = tuple(d + f"self_attn/{n}/" for n in ("q_proj", "k_proj", "v_proj"))
  rules = [
      Rule("transformer.wte.weight", "embed_tokens/embedding"),
      Rule("transformer.ln_f.weight", "norm/scale"),
      Rule(L + "ln_1.weight", d + "input_layernorm/scale"),
      Rule(L + "ln_2.weight", d + "post_attention_layernorm/scale"),
      Rule(L + "attn.c_attn.weight", tuple(p + "kernel" for p in qkv), LINEAR, split=split),
      Rule(L + "attn.c_attn.bias", tuple(p + "bias" for p in qkv), FLAT, split=split),
      Rule(L + "attn.c_proj.weight", d + "self_attn/o_proj/kernel", LINEAR_IN2),
      Rule(L + "mlp.w1.weight", d + "mlp/up_proj/kernel", LINEAR),
      Rule(L + "mlp.w2.weight", d + "mlp/gate_proj/kernel", LINEAR),
      Rule(L + "mlp.c_proj.weight", d + "mlp/down_proj/kernel", LINEAR),
  ]
  rules.append(Rule("lm_head.weight", () if c.tie_word_embeddings else "lm_head/kernel", LINEAR))
  return rules


def rules_for(c: DecoderConfig, keys: Sequence[str] = ()) -> list[Rule]:
  if c.family == "opt":
    prefix = "decoder." if keys and any(k.startswith("decoder.") for k in keys) else "model.decoder."
    return opt_rules(c, prefix)
  if c.family == "qwen":
    return qwen1_rules(c)
  prefix = "model."
  if keys and not any(k.startswith("model.") for k in keys) and any(k.startswith("layers.") for k in keys):
    prefix = ""  # bare LlamaModel state dict
  return llama_rules(c, prefix)


def _detect(family: str):
  def detect(cfg, keys):
    if cfg is not None:
      return cfg.get("model_type") == family
    if family == "llama":
      return any_key(keys, r"^(model\.)?layers\.\d+\.self_attn\.q_proj\.weight$") and \
          not any_key(keys, r"visual_model|vision_tower|mm_projector|text_hidden_fcs")
    if family == "qwen":
      return any_key(keys, r"^transformer\.h\.\d+\.attn\.c_attn\.weight$")
    if family == "opt":
      return any_key(keys, r"decoder\.layers\.\d+\.self_attn_layer_norm\.weight$")
    return False
  return detect


def _config(fam):
  def make(cfg, src):
    if cfg is not None:
      return config_from_hf(cfg)
    if fam == "llama":
      return _infer_from_keys(src)
    raise CheckpointError(f"converting a {fam} checkpoint needs its config.json")
  return make


FAMILIES = tuple(Family(name=fam, detect=_detect(fam), config_from_hf=_config(fam), config_cls=DecoderConfig,
                        rules=rules_for, build=DecoderLM, skip=BUFFERS,
                        export_rules=rules_for)
                 for fam in ("llama", "mistral", "qwen2", "qwen", "opt"))

__all__ = ["config_from_hf", "rules_for", "llama_rules", "opt_rules", "qwen1_rules", "IDENTITY", "linear"]
