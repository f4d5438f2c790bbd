"""LISA end to end vs a tiny PyTorch LISA assembled here from its official parts, through the
`lisa` converter; [SEG] selection vs the official index arithmetic; the converter itself.

The PyTorch side: transformers CLIPVisionModel + nn.Linear mm_projector + LlamaForCausalLM,
segment_anything Sam (64 px), text_hidden_fcs = Sequential(Linear, ReLU, Linear, Dropout(0)), and
a transcription of LISA's model_forward (model/LISA.py) with LISA's LLaVA merge
(model/llava/model/llava_arch.py, mm_use_im_start_end branch) and LISA's PromptEncoder for text
embeddings. One difference is forced by transformers versions: LISA (transformers 4.31) reads
`output.hidden_states[-1]`, which 4.31 records after the final RMSNorm; the transcription reads
`last_hidden_state`, the same tensor. The weights are saved in the merge script's format (no
CLIP; CLIP in its own HF directory) and converted; jaxlisa runs the same batch in its per-image
layout [I, J, T'] (image 0 owns two conversations, image 1 one: J = 2 with a padded slot).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import assert_trees_equal, max_abs_diff, write_checkpoint_dir

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
import transformers as tf  # noqa: E402

conftest.stub_torchvision()
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402,E501

from jaxlisa.conversion import lisa as lisa_conv  # noqa: E402
from jaxlisa.conversion import families  # noqa: E402
from jaxlisa.conversion import loaders  # noqa: E402
from jaxlisa.conversion.checkpoint_io import CheckpointError  # noqa: E402
from jaxlisa.conversion.convert import export_checkpoint, load_pretrained, save_converted  # noqa: E402
from jaxlisa.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from jaxlisa.data.tokenization import expand_image_tokens  # noqa: E402
from jaxlisa.models import lisa as lisa_lib  # noqa: E402
from jaxlisa.training import losses  # noqa: E402
from torch_refs import lisa as lisa_ref  # noqa: E402

V, D, IM_START, IM_END, SEG = 100, 64, 97, 98, 99
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14)
N = (28 // 14) ** 2  # image tokens per image
TEXT = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, hidden_act="silu",
            rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
SAM_IMG, SAM_GRID, C = 64, 8, 32  # SAM input, embedding grid, prompt dim (= out_dim)
WEIGHTS = dict(ce=1.0, bce=2.0, dice=0.5)
ORIG = [(50, 37), (29, 61)]  # original (H, W) per image: different, not square
HB = 64  # mask canvas (bucket) side


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))


def _np(x):
  return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


# ----------------------------------------------------------------------------- the PyTorch LISA
def _build_reference():
  torch.manual_seed(0)
  clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(**CLIP)).eval()
  llama = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, initializer_range=0.1, attn_implementation="eager")).eval()
  projector = torch.nn.Linear(CLIP["hidden_size"], D)
  enc = ImageEncoderViT(img_size=SAM_IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                        out_chans=C, qkv_bias=True, norm_layer=lambda n: torch.nn.LayerNorm(n, eps=1e-6),
                        use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
  pe = PromptEncoder(embed_dim=C, image_embedding_size=(SAM_GRID, SAM_GRID), input_image_size=(SAM_IMG, SAM_IMG),
                     mask_in_chans=8)
  dec = MaskDecoder(num_multimask_outputs=3, transformer_dim=C, iou_head_depth=3, iou_head_hidden_dim=32,
                    transformer=TwoWayTransformer(depth=2, embedding_dim=C, mlp_dim=64, num_heads=8))
  sam = Sam(enc, pe, dec).eval()
  fcs = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(inplace=True),
                                                 torch.nn.Linear(D, C), torch.nn.Dropout(0.0))])
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, t in sam.state_dict().items():  # O(0.2) everywhere, so mask logits are not tiny
      if "gaussian_matrix" not in name:
        base = 1.0 if name.endswith("weight") and t.ndim == 1 else 0.0
        t.copy_(base + 0.2 * torch.randn(t.shape, generator=g))
    for name in ("weight", "bias"):  # mask logits of O(5): the 1e-4 mask check bites, sigmoids do not saturate
      getattr(sam.mask_decoder.output_hypernetworks_mlps[0].layers[2], name).mul_(30.0)
    for m in (clip, llama):
      for name, p in m.named_parameters():
        if "norm" in name or name.endswith("bias"):
          p.add_(0.1 * torch.randn(p.shape, generator=g))
  return dict(clip=clip, llama=llama, projector=projector, sam=sam, fcs=fcs)


def official_state(ref) -> dict[str, torch.Tensor]:
  """The merge script's saved state dict (transformers 4.31 names; no vision_tower)."""
  state = dict(ref["llama"].state_dict())
  for i in range(TEXT["num_hidden_layers"]):  # persistent in transformers 4.31, skipped by the converter
    state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, 16, 2).float() / 16))
  state.update(lisa_ref.parts_state(ref))
  return {k: v.detach().clone().contiguous() for k, v in state.items()}


def official_params(ref) -> dict[str, torch.nn.Parameter]:
  """The same names -> the live parameters (for gradients)."""
  out = {k: p for k, p in ref["llama"].named_parameters()}
  out["model.mm_projector.weight"], out["model.mm_projector.bias"] = ref["projector"].weight, ref["projector"].bias
  out.update({"model.visual_model." + k: p for k, p in ref["sam"].named_parameters()})
  out.update({"model.text_hidden_fcs." + k: p for k, p in ref["fcs"].named_parameters()})
  return out


def ref_prepare_inputs_labels(embed_tokens, input_ids, attention_mask, labels, image_features):
  """LISA's LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal, mm_use_im_start_end=True,
  tune_mm_mlp_adapter=False, one image per row (no padding removal: every row keeps its pads)."""
  new_embeds, new_labels = [], []
  for b, cur_ids in enumerate(input_ids):
    starts = torch.where(cur_ids == IMAGE_TOKEN_INDEX)[0]
    cur_labels = labels[b]
    pieces, lab_pieces, img = [], [], 0
    while starts.numel() > 0:
      s = starts[0]
      feats = image_features[b]
      pieces += [embed_tokens(cur_ids[:s]), feats, embed_tokens(cur_ids[s + 1:s + 2])]
      lab_pieces += [cur_labels[:s], torch.full((feats.shape[0],), IGNORE_INDEX, dtype=labels.dtype),
                     cur_labels[s + 1:s + 2]]
      cur_labels = cur_labels[s + 2:]
      cur_ids = cur_ids[s + 2:]
      img += 1
      starts = torch.where(cur_ids == IMAGE_TOKEN_INDEX)[0]
    if cur_ids.numel() > 0:
      pieces.append(embed_tokens(cur_ids))
      lab_pieces.append(cur_labels)
    new_embeds.append(torch.cat(pieces))
    new_labels.append(torch.cat(lab_pieces))
  assert all(x.shape == new_embeds[0].shape for x in new_embeds)  # the branch LISA's batches take
  embeds, new_labels = torch.stack(new_embeds), torch.stack(new_labels)
  pad_left = torch.ones((attention_mask.shape[0], embeds.shape[1] - input_ids.shape[1]), dtype=attention_mask.dtype)
  return embeds, new_labels, torch.cat([pad_left, attention_mask], 1)


def ref_model_forward(ref, images, images_clip, input_ids, labels, attention_masks, offset, masks_list,
                      label_list, resize_list):
  """LISA's model_forward (training branch), transcribed."""
  clip, llama, sam, fcs = ref["clip"], ref["llama"], ref["sam"], ref["fcs"]
  with torch.no_grad():  # get_visual_embs
    image_embeddings = torch.cat([sam.image_encoder(images[i:i + 1]) for i in range(images.shape[0])])
  assert image_embeddings.shape[0] == len(offset) - 1
  seg_token_mask = input_ids[:, 1:] == SEG
  seg_token_mask = torch.cat([seg_token_mask, torch.zeros((seg_token_mask.shape[0], 1)).bool()], dim=1)
  seg_token_mask = torch.cat([torch.zeros((seg_token_mask.shape[0], N - 1)).bool(), seg_token_mask], dim=1)
  images_clip = torch.cat([images_clip[i].unsqueeze(0).expand(offset[i + 1] - offset[i], -1, -1, -1)
                           for i in range(len(offset) - 1)])
  with torch.no_grad():  # CLIPVisionTower.forward is @torch.no_grad()
    feats = clip(images_clip, output_hidden_states=True).hidden_states[-2][:, 1:]
  feats = ref["projector"](feats)
  embeds, new_labels, mask = ref_prepare_inputs_labels(llama.model.embed_tokens, input_ids, attention_masks,
                                                       labels, feats)
  pos = torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
  hidden = llama.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
  logits = llama.lm_head(hidden)
  ce_loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, V), new_labels[..., 1:].reshape(-1))

  last_hidden_state = torch.stack([fcs[0](hidden)], dim=-1).sum(dim=-1)
  pred_embeddings = last_hidden_state[seg_token_mask]
  seg_token_offset = torch.cat([torch.zeros(1).long(), seg_token_mask.int().sum(-1).cumsum(-1)])[offset]
  pred_embeddings = [pred_embeddings[seg_token_offset[i]:seg_token_offset[i + 1]]
                     for i in range(len(seg_token_offset) - 1)]
  pe, h, w = sam.prompt_encoder, SAM_GRID, SAM_GRID
  pred_masks = []
  for i, emb in enumerate(pred_embeddings):
    # LISA's PromptEncoder.forward(points=None, boxes=None, masks=None, text_embeds=emb[:, None])
    sparse = torch.cat([torch.empty((emb.shape[0], 0, C)), emb.unsqueeze(1)], dim=1)
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(emb.shape[0], -1, h, w)
    low_res, _ = sam.mask_decoder(image_embeddings=image_embeddings[i].unsqueeze(0), image_pe=pe.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    pred = sam.postprocess_masks(low_res.float(), input_size=resize_list[i], original_size=label_list[i].shape)
    pred_masks.append(pred[:, 0])
  bce, dice, num_masks = lisa_ref.mask_losses(pred_masks, masks_list)
  ce = ce_loss * WEIGHTS["ce"]
  bce = WEIGHTS["bce"] * bce / (num_masks + 1e-8)
  dice = WEIGHTS["dice"] * dice / (num_masks + 1e-8)
  return dict(loss=ce + bce + dice, ce_loss=ce, mask_bce_loss=bce, mask_dice_loss=dice, pred_masks=pred_masks)


# ----------------------------------------------------------------------------- files
def _write_dir(d, state, config, added_tokens=True):
  tokens = {"added_tokens.json": {"<im_start>": IM_START, "<im_end>": IM_END, "[SEG]": SEG}} if added_tokens else {}
  return write_checkpoint_dir(d, state, config, tokens)


def _lisa_config_json(vision_tower):
  """config.json as the merge script leaves it (LISA-7B-v1 style, transformers 4.31 fields)."""
  return {**TEXT, "model_type": "llava", "architectures": ["LISAForCausalLM"], "mm_vision_tower": vision_tower,
          "vision_tower": vision_tower, "mm_hidden_size": CLIP["hidden_size"], "mm_use_im_start_end": True,
          "mm_use_im_patch_token": False, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
          "image_aspect_ratio": "square", "out_dim": C, "train_mask_decoder": True, "use_cache": False,
          "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": True, "initializer_range": 0.02,
          "torch_dtype": "float32", "transformers_version": "4.31.0"}


@pytest.fixture(scope="module")
def ref():
  return _build_reference()


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
  root = tmp_path_factory.mktemp("lisa")
  clip_dir = str(root / "clip")
  ref["clip"].save_pretrained(clip_dir)
  state = official_state(ref)
  return dict(
      root=root, clip=clip_dir, state=state,
      official=_write_dir(root / "official", state, _lisa_config_json("openai/clip-vit-large-patch14")),
      auto=_write_dir(root / "auto", state, _lisa_config_json(clip_dir)))


@pytest.fixture(scope="module")
def converted(files):
  return lisa_conv.convert_lisa(files["official"], clip_src=files["clip"])


# ----------------------------------------------------------------------------- the batch
def _conversation(rs, n_seg, prompt_len, answer_len):
  """[BOS, prompt, <im_start>, <image>, <im_end>, prompt, answer with n_seg [SEG], EOS] and labels
  supervising the answer (ids and labels unexpanded, as LISA's collate gives them)."""
  pre = [1, *rs.randint(3, 90, 2), IM_START, IMAGE_TOKEN_INDEX, IM_END, *rs.randint(3, 90, prompt_len)]
  answer = list(rs.randint(3, 90, answer_len))
  for j in sorted(rs.choice(answer_len, n_seg, replace=False)):
    answer[j] = SEG
  ids = pre + answer + [2]
  return ids, [IGNORE_INDEX] * len(pre) + answer + [2]


def _disk_masks(rs, n, hw):
  h, w = hw
  yy, xx = np.mgrid[:h, :w]
  out = []
  for _ in range(n):
    cy, cx, r = rs.uniform(0, h), rs.uniform(0, w), rs.uniform(0.2, 0.5) * min(h, w)
    out.append((((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) | (rs.rand(h, w) < 0.05))
  return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def batch():
  return make_batch()


def make_batch():
  """Image 0 owns conversations 0 (one [SEG]) and 1 (two [SEG]s); image 1 owns conversation 2."""
  rs = np.random.RandomState(3)
  convs = [_conversation(rs, 1, 5, 4), _conversation(rs, 2, 3, 6), _conversation(rs, 1, 7, 3)]
  offset = [0, 2, 3]
  t = max(len(c[0]) for c in convs)
  ids = np.zeros((3, t), np.int64)
  labels = np.full((3, t), IGNORE_INDEX, np.int64)
  for r, (c_ids, c_lab) in enumerate(convs):
    ids[r, :len(c_ids)], labels[r, :len(c_lab)] = c_ids, c_lab
  resize = [(int(h * SAM_IMG / max(h, w) + 0.5), int(w * SAM_IMG / max(h, w) + 0.5)) for h, w in ORIG]
  sam_px = np.zeros((2, SAM_IMG, SAM_IMG, 3), np.float32)
  for i, (h, w) in enumerate(resize):
    sam_px[i, :h, :w] = rs.randn(h, w, 3)
  clip_px = rs.randn(2, 28, 28, 3).astype(np.float32)
  seg_per_conv = [int((np.asarray(c[0]) == SEG).sum()) for c in convs]
  masks = [_disk_masks(rs, seg_per_conv[0] + seg_per_conv[1], ORIG[0]), _disk_masks(rs, seg_per_conv[2], ORIG[1])]
  return dict(ids=ids, labels=labels, offset=offset, resize=resize, sam_px=sam_px, clip_px=clip_px, masks=masks,
              seg_per_conv=seg_per_conv)


def jax_layout(b, placeholder):
  """The batch in jaxlisa's per-image layout: [I, J, T'] with the image expanded to N placeholders,
  slot (1, 1) padded; gt_masks [I, J, K, HB, HB] on a zero canvas."""
  n_img, n_conv, k = 2, 2, 2
  slots = [(0, 0), (0, 1), (1, 0)]
  t = b["ids"].shape[1] - 1 + N
  ids = np.zeros((n_img, n_conv, t), np.int32)
  labels = np.full((n_img, n_conv, t), IGNORE_INDEX, np.int32)
  gt = np.zeros((n_img, n_conv, k, HB, HB), np.float32)
  mask_valid = np.zeros((n_img, n_conv, k), bool)
  conv_valid = np.zeros((n_img, n_conv), bool)
  used = [0, 0]
  for r, (i, j) in enumerate(slots):
    ex = expand_image_tokens(b["ids"][r], b["labels"][r], N, placeholder_id=placeholder)
    ids[i, j], labels[i, j], conv_valid[i, j] = ex.input_ids, ex.labels, True
    for s in range(b["seg_per_conv"][r]):
      h, w = ORIG[i]
      gt[i, j, s, :h, :w] = b["masks"][i][used[i]]
      mask_valid[i, j, s] = True
      used[i] += 1
  attn = ((ids != 0) & conv_valid[..., None]).astype(np.int32)  # pads are <unk> = 0, as LISA
  return dict(input_ids=ids, labels=labels, attention_mask=attn, gt_masks=gt, mask_valid=mask_valid,
              conv_valid=conv_valid, clip_pixels=b["clip_px"], sam_pixels=b["sam_px"],
              resize_hw=np.asarray(b["resize"], np.int32), orig_hw=np.asarray(ORIG, np.int32), slots=slots)


@pytest.fixture(scope="module")
def torch_run(ref, batch):
  b = batch
  for m in ref.values():
    m.zero_grad(set_to_none=True)
  out = ref_model_forward(
      ref, _t(b["sam_px"]).permute(0, 3, 1, 2), _t(b["clip_px"]).permute(0, 3, 1, 2), torch.tensor(b["ids"]),
      torch.tensor(b["labels"]), torch.tensor(b["ids"] != 0), torch.tensor(b["offset"]),
      [_t(m) for m in b["masks"]], [torch.full(hw, 255) for hw in ORIG], b["resize"])
  out["loss"].backward()
  grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
           for k, p in official_params(ref).items()}
  return out, grads


@pytest.fixture(scope="module")
def jax_run(converted, batch):
  config = converted.config.replace(max_seg_per_conversation=2)
  model = lisa_lib.Lisa(config)
  x = jax_layout(batch, config.llava.image_token_index)

  def loss_fn(params):
    out = model.apply({"params": params}, jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"]),
                      jnp.asarray(x["clip_pixels"]), jnp.asarray(x["sam_pixels"]), jnp.asarray(x["resize_hw"]),
                      jnp.asarray(x["orig_hw"]), mask_shape=(HB, HB))
    total, parts = losses.lisa_loss(out.logits, jnp.asarray(x["labels"]), out.pred_masks, jnp.asarray(x["gt_masks"]),
                                    jnp.asarray(x["mask_valid"]), jnp.asarray(x["orig_hw"]),
                                    ce_weight=WEIGHTS["ce"], bce_weight=WEIGHTS["bce"], dice_weight=WEIGHTS["dice"])
    return total, (parts, out.pred_masks, out.seg_valid)

  (total, (parts, pred, seg_valid)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(converted.params)
  return dict(total=total, parts=parts, pred=np.asarray(pred), seg_valid=np.asarray(seg_valid), grads=grads,
              config=config, x=x)


# ----------------------------------------------------------------------------- parity
def test_losses(torch_run, jax_run):
  want, _ = torch_run
  got = jax_run
  want = {k: v.detach() if hasattr(v, "detach") else v for k, v in want.items()}
  errs = dict(total=abs(float(got["total"]) - float(want["loss"])),
              ce=abs(float(got["parts"]["ce"]) * WEIGHTS["ce"] - float(want["ce_loss"])),
              bce=abs(float(got["parts"]["bce"]) * WEIGHTS["bce"] - float(want["mask_bce_loss"])),
              dice=abs(float(got["parts"]["dice"]) * WEIGHTS["dice"] - float(want["mask_dice_loss"])))
  print(f"losses (torch): total {float(want['loss']):.9f} ce {float(want['ce_loss']):.9f} "
        f"bce {float(want['mask_bce_loss']):.9f} dice {float(want['mask_dice_loss']):.9f}")
  print(f"losses (jax):   total {float(got['total']):.9f} ce {float(got['parts']['ce']):.9f} "
        f"bce {float(got['parts']['bce']) * WEIGHTS['bce']:.9f} dice {float(got['parts']['dice']) * WEIGHTS['dice']:.9f}")
  print("abs errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
  assert int(got["parts"]["num_masks"]) == 4
  assert all(v <= 1e-5 for v in errs.values()), errs


def test_pred_masks_at_original_size(torch_run, jax_run, batch):
  want, _ = torch_run
  got, x = jax_run["pred"], jax_run["x"]
  np.testing.assert_array_equal(jax_run["seg_valid"], x["mask_valid"])
  worst, scale = 0.0, 0.0
  for i in range(2):
    h, w = ORIG[i]
    rows = [(j, s) for j in range(2) for s in range(2) if x["mask_valid"][i, j, s]]
    mine = np.stack([got[i, j, s, :h, :w] for j, s in rows])
    assert want["pred_masks"][i].shape == mine.shape
    worst = max(worst, max_abs_diff(mine, want["pred_masks"][i]))
    scale = max(scale, float(np.abs(_np(want["pred_masks"][i])).max()))
    for j, s in rows:  # nothing outside the image's own region of the canvas
      assert not np.any(got[i, j, s, h:]) and not np.any(got[i, j, s, :, w:])
  print(f"pred masks at original size: max err {worst:.2e} (max |logit| {scale:.1f})")
  assert worst <= 1e-4, worst


def _trainable(name: str) -> bool:
  """LISA's trainable set (lm_head, embed_tokens, mask_decoder, text_hidden_fcs) plus the LoRA
  targets' full kernels (q_proj / v_proj) standing in for the adapters."""
  return any(s in name for s in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs",
                                 "self_attn.q_proj", "self_attn.v_proj"))


def test_gradients(torch_run, jax_run):
  _, want = torch_run
  got = lisa_conv.export_lisa(jax.tree.map(np.asarray, jax_run["grads"]), jax_run["config"])
  names = sorted(k for k in want if _trainable(k))
  assert len(names) > 40 and all(k in got for k in names)
  worst, worst_name, rows = 0.0, None, []
  for k in names:
    w = _np(want[k])
    diff = max_abs_diff(got[k], w)
    peak = float(np.abs(w).max())
    if k.endswith("k_proj.bias"):  # softmax is shift invariant: analytically zero, float noise in both
      scale = float(np.abs(_np(want[k[:-len("bias")] + "weight"])).max())
      assert peak <= 1e-4 * scale and diff <= 1e-4 * scale, (k, peak, diff, scale)
      continue
    rel = diff / peak if peak > 0 else diff
    rows.append((rel, k, peak))
    if rel > worst:
      worst, worst_name = rel, k
  for rel, k, peak in sorted(rows, reverse=True)[:8]:
    print(f"  grad {k}: rel err {rel:.2e} (max |g| {peak:.2e})")
  nonzero = sum(peak > 0 for _, _, peak in rows)
  print(f"gradients: {len(names)} tensors ({nonzero} nonzero), worst relative error {worst:.2e} ({worst_name})")
  # multimask_output=False: the IoU head and the hypernetwork MLPs of masks 1..3 get no gradient
  unused = {k for _, k, _ in rows if "iou_prediction_head" in k or re.search(r"hypernetworks_mlps\.[1-9]", k)}
  assert len(unused) == 24 and {k for _, k, peak in rows if peak == 0} == unused
  assert worst <= 1e-4, (worst_name, worst)


# ----------------------------------------------------------------------------- [SEG] selection
def official_seg_positions(ids: np.ndarray, n_image_tokens: int) -> list[list[int]]:
  """LISA's index arithmetic on unexpanded rows: shift, trailing zero, N-1 prepended zeros; the
  True positions index the merged sequence."""
  ids = torch.tensor(ids)
  m = ids[:, 1:] == SEG
  m = torch.cat([m, torch.zeros((m.shape[0], 1)).bool()], dim=1)
  m = torch.cat([torch.zeros((m.shape[0], n_image_tokens - 1)).bool(), m], dim=1)
  return [torch.where(row)[0].tolist() for row in m]


def test_seg_positions_match_official_arithmetic():
  """Rows: 3 [SEG]s; adjacent [SEG][SEG] and a [SEG] right after the image; a [SEG] as the very last
  token; none; an all-padding row. Grouped as 2 images x 3 conversation slots."""
  img = [1, 5, IM_START, IMAGE_TOKEN_INDEX, IM_END]
  rows = [img + [7, SEG, 8, 9, SEG, 4, SEG, 2],
          [1, 5, IMAGE_TOKEN_INDEX, SEG, 6, SEG, SEG, 2],
          img + [7, 8, 9, 10, 11, 12, SEG],
          img + [7, 8, 2],
          img + [SEG, 2]]
  n_tok = 5
  t = max(map(len, rows))
  unexp = np.zeros((len(rows) + 1, t), np.int64)
  for r, ids in enumerate(rows):
    unexp[r, :len(ids)] = ids
  want = official_seg_positions(unexp, n_tok)
  assert want[-1] == [] and [len(w) for w in want] == [3, 3, 1, 0, 1, 0]

  def expand(r):
    if (r == IMAGE_TOKEN_INDEX).any():
      return expand_image_tokens(r, None, n_tok, placeholder_id=IMAGE_TOKEN_INDEX).input_ids
    return np.concatenate([r, np.zeros(n_tok - 1, r.dtype)])  # an empty (padding) slot

  expanded = np.stack([expand(r) for r in unexp])
  grouped = jnp.asarray(expanded.reshape(2, 3, -1))
  for k in (1, 2, 3, 4):
    pos, valid = lisa_lib.seg_positions(grouped, SEG, k)
    pos, valid = np.asarray(pos).reshape(6, k), np.asarray(valid).reshape(6, k)
    for r in range(6):
      assert pos[r][valid[r]].tolist() == want[r][:k], (k, r)
      assert valid[r].sum() == min(k, len(want[r]))
      assert all(expanded[r, p + 1] == SEG for p in pos[r][valid[r]])


# ----------------------------------------------------------------------------- converter
def test_config_from_official_files(converted):
  c = converted.config
  assert converted.family == "lisa"
  assert c.seg_token_idx == SEG and c.out_dim == C and c.max_seg_per_conversation == 1
  lv = c.llava
  assert lv.projector_type == "linear" and lv.mm_use_im_start_end and lv.vision_feature_layer == -2
  assert lv.image_token_index == IMAGE_TOKEN_INDEX and lv.vision_feature_select_strategy == "default"
  assert lv.tokens_per_crop == N and lv.vision.hidden_size == CLIP["hidden_size"]
  assert (lv.text.vocab_size, lv.text.hidden_size, lv.text.num_hidden_layers, lv.text.kv_heads) == (V, D, 2, 2)
  assert lv.text.norm_eps == 1e-5 and not lv.text.tie_word_embeddings
  s = c.sam  # any SAM size, read off the tensors
  assert (s.img_size, s.patch_size, s.embed_dim, s.depth, s.num_heads, s.window_size) == (64, 8, 32, 2, 2, 3)
  assert (s.global_attn_indexes, s.out_chans, s.prompt_embed_dim, s.mask_in_chans) == ((1,), C, C, 8)
  assert lisa_lib.LisaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_detection(files):
  keys = list(files["state"])
  assert families.detect_family(None, keys).name == "lisa"
  assert families.detect_family(_lisa_config_json("x"), keys).name == "lisa"
  no_fcs = [k for k in keys if "text_hidden_fcs" not in k]
  assert families.detect_family(None, no_fcs).name == "lisa"  # visual_model + LLaMA layers


def test_sharded_bin_and_load_pretrained(files, converted, tmp_path):
  """pytorch_model-0000{1,2}-of-00002.bin with its index; and load_pretrained on a directory whose
  config.json names a local CLIP directory (the family table's path), saved and reloaded."""
  d = tmp_path / "sharded"
  d.mkdir()
  keys = sorted(files["state"])
  halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
  weight_map = {}
  for n, part in enumerate(halves, 1):
    name = f"pytorch_model-0000{n}-of-00002.bin"
    torch.save({k: files["state"][k] for k in part}, d / name)
    weight_map.update({k: name for k in part})
  with open(d / "pytorch_model.bin.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(d / "config.json", "w") as f:
    json.dump(_lisa_config_json("openai/clip-vit-large-patch14"), f)
  sharded = lisa_conv.convert_lisa(str(d), clip_src=files["clip"], seg_token_idx=SEG)
  assert sharded.config == converted.config
  assert_trees_equal(sharded.params, converted.params)

  loaded = load_pretrained(files["auto"])
  assert loaded.family == "lisa" and loaded.config == converted.config
  assert isinstance(loaded.module, lisa_lib.Lisa)
  assert_trees_equal(loaded.params, converted.params)
  out = save_converted(str(tmp_path / "converted"), converted, source_dir=files["official"])
  again = load_pretrained(out)
  assert again.family == "lisa" and again.config == converted.config
  assert_trees_equal(again.params, converted.params)


def test_missing_clip_and_seg_token_errors(files, tmp_path):
  with pytest.raises(CheckpointError, match="clip_src"):
    lisa_conv.convert_lisa(files["official"])
  with pytest.raises(CheckpointError, match="clip_src"):
    load_pretrained(files["official"])
  bare = _write_dir(tmp_path / "no_tokens", files["state"], _lisa_config_json("openai/x"), added_tokens=False)
  with pytest.raises(CheckpointError, match="seg_token_idx"):
    lisa_conv.convert_lisa(bare, clip_src=files["clip"])
  assert lisa_conv.convert_lisa(bare, clip_src=files["clip"], seg_token_idx=SEG).config.seg_token_idx == SEG


def test_export_round_trip_bit_exact(files, converted):
  state = {k: _np(v) for k, v in files["state"].items() if "rotary_emb" not in k}
  out = lisa_conv.export_lisa(converted.params, converted.config)
  assert sorted(out) == sorted(state) and not any("vision_tower" in k for k in out)
  for k, x in out.items():
    assert x.dtype == state[k].dtype, k
    np.testing.assert_array_equal(x, state[k], err_msg=k)
  # the generic export adds the tower under the pre-merge names, which convert without clip_src
  full = export_checkpoint(converted.params, "lisa", converted.config, None)
  tower = {k: v for k, v in full.items() if k.startswith(lisa_conv.LISA_CLIP)}
  assert len(tower) > 10 and set(full) - set(tower) == set(state)
  cls_key = lisa_conv.LISA_CLIP + "embeddings.class_embedding"
  full[cls_key] = full[cls_key] + 1.0  # tell the tower inside from the CLIP directory's
  pre = _write_dir(files["root"] / "pre_merge", full, _lisa_config_json(files["clip"]))
  inside = lisa_conv.convert_lisa(pre)  # config.json's local tower gives the CLIP config only
  assert inside.config == converted.config
  cls = inside.params["llava"]["vision_tower"]["embeddings"]["class_embedding"]
  np.testing.assert_array_equal(cls, full[cls_key])
  # a CLIP directory passed explicitly replaces the tower inside
  assert_trees_equal(lisa_conv.convert_lisa(pre, clip_src=files["clip"]).params, converted.params)


def test_mlp2x_projector_names(files, converted, tmp_path):
  rs = np.random.RandomState(0)
  state = {k: _np(v) for k, v in files["state"].items() if not k.startswith("model.mm_projector")}
  state.update({"model.mm_projector.0.weight": rs.randn(D, CLIP["hidden_size"]).astype(np.float32),
                "model.mm_projector.0.bias": rs.randn(D).astype(np.float32),
                "model.mm_projector.2.weight": rs.randn(D, D).astype(np.float32),
                "model.mm_projector.2.bias": rs.randn(D).astype(np.float32)})
  d = _write_dir(tmp_path / "mlp2x", state, _lisa_config_json("openai/x"))
  conv = lisa_conv.convert_lisa(d, clip_src=files["clip"])
  assert conv.config.llava.projector_type == "mlp2x_gelu"
  out = lisa_conv.export_lisa(conv.params, conv.config)
  assert sorted(out) == sorted(k for k in state if "rotary_emb" not in k)
  for k in ("model.mm_projector.0.weight", "model.mm_projector.2.bias"):
    np.testing.assert_array_equal(out[k], state[k])


# ----------------------------------------------------------------------------- compose from parts
def _tiny_tokenizer():
  from tokenizers import SentencePieceBPETokenizer, processors
  sp = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
  sp.train_from_iterator(["what is the cat in this image", "please segment the mat", "USER: ASSISTANT: sure it is"],
                         vocab_size=90, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"],
                         show_progress=False)
  sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tf.PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",  # pylint: disable=protected-access
                                    unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(ref, files, tmp_path_factory):
  """A plain HF LLaMA (vocab = len(tokenizer)) + its tokenizer, the CLIP directory, a SAM .pth."""
  root = tmp_path_factory.mktemp("parts")
  tok = _tiny_tokenizer()
  torch.manual_seed(5)
  llama = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TEXT, "vocab_size": len(tok)}))
  llama.save_pretrained(root / "llama")
  sam_pth = str(root / "sam_tiny.pth")
  torch.save(ref["sam"].state_dict(), sam_pth)
  return dict(llama=llama, llama_dir=str(root / "llama"), tok=tok, clip=files["clip"], sam=sam_pth, root=root)


@pytest.mark.parametrize("how", ["hf", "mean"])
def test_compose_lisa_from_llama(parts, ref, how):
  old = len(parts["tok"])
  tok = _tiny_tokenizer()
  config, params, tok = loaders.compose_lisa(parts["llama_dir"], parts["clip"], parts["sam"], tok,
                                               new_token_init=how)
  assert len(tok) == old + 3 and tok.padding_side == "right" and tok.pad_token == tok.unk_token
  assert config.seg_token_idx == tok.convert_tokens_to_ids("[SEG]") == old  # added first, not special
  assert [tok.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_end>")] == [old + 1, old + 2]
  added = tok.added_tokens_decoder
  assert added[old + 1].special and added[old + 2].special and not added[old].special
  assert tok("a [SEG].", add_special_tokens=False).input_ids.count(config.seg_token_idx) == 1
  lv = config.llava
  assert lv.text.vocab_size == old + 3 and lv.projector_type == "linear" and lv.mm_use_im_start_end
  assert lv.image_token_index == IMAGE_TOKEN_INDEX and config.out_dim == C and config.sam.img_size == SAM_IMG
  # embeddings / lm_head resized as transformers 5's resize_token_embeddings(len(tokenizer))
  hf = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TEXT, "vocab_size": old}))
  hf.load_state_dict(parts["llama"].state_dict())
  hf.resize_token_embeddings(len(tok))
  lm = params["llava"]["language_model"]
  for mine, theirs in ((lm["embed_tokens"]["embedding"], hf.model.embed_tokens.weight),
                       (lm["lm_head"]["kernel"].T, hf.lm_head.weight)):
    theirs = _np(theirs)
    assert mine.shape == theirs.shape == (old + 3, D)
    np.testing.assert_array_equal(mine[:old], theirs[:old])
    mean = theirs[:old].mean(0)
    if how == "mean":
      np.testing.assert_allclose(mine[old:], np.repeat(mean[None], 3, 0), rtol=0, atol=1e-7)
    # HF samples N(mean, 1e-9 cov): both within a few 1e-5 of the old rows' spread of the mean
    spread = float(theirs[:old].std())
    assert np.abs(mine[old:] - mean).max() <= 1e-3 * spread
    assert np.abs(theirs[old:] - mean).max() <= 1e-3 * spread
  # the rest comes from the parts as they are; new modules have nn.Linear's default init
  sam_state = {k: _np(v) for k, v in ref["sam"].state_dict().items()}
  np.testing.assert_array_equal(params["visual_model"]["mask_decoder"]["iou_token"]["embedding"],
                                sam_state["mask_decoder.iou_token.weight"])
  proj = params["llava"]["multi_modal_projector"]["linear_1"]
  for p, fan_in in ((proj, CLIP["hidden_size"]), (params["text_hidden_fcs"]["layers_0"], D),
                    (params["text_hidden_fcs"]["layers_2"], D)):
    for leaf in (p["kernel"], p["bias"]):
      assert np.abs(leaf).max() <= fan_in ** -0.5 and leaf.std() > 0.4 * fan_in ** -0.5
  assert params["text_hidden_fcs"]["layers_2"]["kernel"].shape == (D, C)


def test_compose_lisa_from_original_llava(parts, files, converted, tmp_path):
  """LISA's usual base: an original LLaVA checkpoint (tower elsewhere) whose vocabulary already
  matches the tokenizer; the projector and LLaMA weights carry over."""
  tok = _tiny_tokenizer()
  n_tok = len(tok)
  state = {k: _np(v) for k, v in files["state"].items() if k.startswith(("model.layers", "model.norm",
                                                                           "model.embed", "lm_head", "model.mm_"))}
  state = {k: v for k, v in state.items() if "rotary_emb" not in k}
  state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:n_tok]
  state["lm_head.weight"] = state["lm_head.weight"][:n_tok]
  cfg = {**TEXT, "vocab_size": n_tok, "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
         "mm_vision_tower": "openai/x", "mm_hidden_size": CLIP["hidden_size"], "mm_vision_select_layer": -2,
         "mm_use_im_start_end": False}
  d = _write_dir(tmp_path / "llava", state, cfg, added_tokens=False)
  config, params, tok = loaders.compose_lisa(d, parts["clip"], parts["sam"], tok)
  assert config.llava.mm_use_im_start_end and config.llava.text.vocab_size == n_tok + 3
  want = converted.params["llava"]
  assert_trees_equal(params["llava"]["multi_modal_projector"], want["multi_modal_projector"])
  assert_trees_equal(params["llava"]["vision_tower"], want["vision_tower"])
  np.testing.assert_array_equal(params["llava"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"],
                                want["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(params["llava"]["language_model"]["embed_tokens"]["embedding"][:n_tok],
                                want["language_model"]["embed_tokens"]["embedding"][:n_tok])
