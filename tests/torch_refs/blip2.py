"""HF BLIP-2 state dicts under LAVIS names (what LAVIS's blip2 .pth files hold)."""

import torch


def lavis_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """HF `Blip2*` tensors -> LAVIS Blip2Qformer / Blip2OPT names (EVA `visual_encoder` with split
  q/v biases, `ln_vision`, `Qformer.bert`, `opt_model`, the projections). Cloned."""
  out = {}
  for k, v in state.items():
    v = v.detach().clone()
    if k.startswith("vision_model."):
      k2 = (k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
            .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
            .replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
            .replace("vision_model.post_layernorm", "ln_vision")
            .replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
            .replace("self_attn.projection", "attn.proj").replace("layer_norm1", "norm1").replace("layer_norm2", "norm2"))
      if k2.endswith("self_attn.qkv.bias"):
        w = v.shape[0] // 3
        base = k2[:-len("self_attn.qkv.bias")]
        out[base + "attn.q_bias"], out[base + "attn.v_bias"] = v[:w], v[2 * w:]
        continue
      out[k2.replace("self_attn.qkv", "attn.qkv")] = v
    elif k.startswith("qformer."):
      k2 = "Qformer.bert." + k[len("qformer."):]
      k2 = k2.replace("Qformer.bert.layernorm", "Qformer.bert.embeddings.LayerNorm")
      out[k2.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                          ".crossattention.self.")] = v
    elif k.startswith("embeddings."):
      out["Qformer.bert." + k] = v
    elif k.startswith("language_model."):
      out["opt_model." + k[len("language_model."):]] = v
    else:
      out[k.replace("vision_projection", "vision_proj").replace("text_projection", "text_proj")
          .replace("language_projection", "opt_proj")] = v
  return out
