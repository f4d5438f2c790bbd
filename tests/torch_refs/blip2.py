"""HF BLIP-2 state dicts under LAVIS names (what LAVIS's blip2 .pth files hold)."""

import torch
import torch.nn.functional as F


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


def stage1_losses(ref, image_embeds, ids, mask, temp, bos, lm_logits, neg_img=None, neg_txt=None) -> dict:
  """LAVIS `Blip2Qformer.forward` after the ViT, on transformers' Blip2ForImageTextRetrieval modules.

  image_embeds [B, P, D] (ln_vision applied); ids, mask [B, T] BERT text ([CLS] first); temp: the
  ITC temperature; bos: the [DEC] id ITG puts first; lm_logits(hidden [B, T, D]) -> [B, T, V]
  (the LM head, which the HF retrieval model lacks). neg_img / neg_txt [B]: the hard negatives, or
  None to draw them as LAVIS does (one per row from softmax(sim), positives masked).
  Returns {loss_itc, loss_itm, loss_lm, sim_i2t, sim_t2i, itm (ITM logits [3B, 2]), neg_img, neg_txt}.
  """
  b, nq = ids.shape[0], ref.query_tokens.shape[1]
  q = ref.query_tokens.expand(b, -1, -1)
  query_out = ref.qformer(query_embeds=q, encoder_hidden_states=image_embeds).last_hidden_state
  image_feats = F.normalize(ref.vision_projection(query_out), dim=-1)
  text_out = ref.qformer(query_embeds=ref.embeddings(input_ids=ids), query_length=0, attention_mask=mask)
  text_feat = F.normalize(ref.text_projection(text_out.last_hidden_state[:, 0, :]), dim=-1)
  sim_i2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1).max(-1)[0] / temp
  sim_t2i = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(2).max(-1)[0] / temp
  targets = torch.arange(b)
  loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) +
              F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
  if neg_img is None:
    with torch.no_grad():
      w_t2i = F.softmax(sim_t2i.masked_fill(torch.eye(b, dtype=torch.bool), -10000), dim=1)
      w_i2t = F.softmax(sim_i2t.masked_fill(torch.eye(b, dtype=torch.bool), -10000), dim=1)
      neg_img = torch.multinomial(w_t2i, 1)[:, 0]
      neg_txt = torch.multinomial(w_i2t, 1)[:, 0]
  ids_all = torch.cat([ids, ids, ids[neg_txt]])
  atts_all = torch.cat([mask, mask, mask[neg_txt]])
  img_all = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])
  q3 = ref.query_tokens.expand(3 * b, -1, -1)
  itm = ref.qformer(query_embeds=ref.embeddings(input_ids=ids_all, query_embeds=q3), query_length=nq,
                    attention_mask=torch.cat([torch.ones(3 * b, nq, dtype=torch.long), atts_all], 1),
                    encoder_hidden_states=img_all).last_hidden_state
  itm_logits = ref.itm_head(itm[:, :nq]).mean(1)
  loss_itm = F.cross_entropy(itm_logits, torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]))
  dec = ids.clone()
  dec[:, 0] = bos
  labels = dec.masked_fill(ids == 0, -100)
  t = ids.shape[1]
  allowed = torch.zeros(nq + t, nq + t)
  allowed[:, :nq] = 1
  allowed[nq:, nq:] = torch.tril(torch.ones(t, t))
  allowed = allowed[None] * torch.cat([torch.ones(b, nq), mask.float()], 1)[:, None, :]
  hidden = ref.qformer(query_embeds=ref.embeddings(input_ids=dec, query_embeds=q), query_length=nq,
                       attention_mask=((1.0 - allowed[:, None]) * -10000.0),
                       encoder_hidden_states=image_embeds).last_hidden_state
  lm = lm_logits(hidden[:, nq:])
  loss_lm = F.cross_entropy(lm[:, :-1].reshape(-1, lm.shape[-1]), labels[:, 1:].reshape(-1), label_smoothing=0.1)
  return dict(loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm, sim_i2t=sim_i2t, sim_t2i=sim_t2i,
              itm=itm_logits, neg_img=neg_img, neg_txt=neg_txt)
