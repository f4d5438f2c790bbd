"""Shared LISA config skeleton: the official train_ds.py defaults (model/LISA.py, train_ds.py)."""

import ml_collections

from configs import common
from jaxlisa.models import sam as sam_lib

# The official trainable set: LoRA on q/v, full lm_head, embed_tokens, mask decoder, text_hidden_fcs.
OFFICIAL_TRAINABLE = (r".*/lora_[ab]", r"llava/language_model/lm_head/.*", r"llava/language_model/embed_tokens/.*",
                      r"visual_model/mask_decoder/.*", r"text_hidden_fcs/.*")


def sam_vit_h() -> dict:
  """SAM ViT-H: the sizes of jaxlisa.models.sam.vit_h."""
  return common.preset_fields(sam_lib.vit_h(), "img_size patch_size embed_dim depth num_heads window_size "
                              "global_attn_indexes out_chans prompt_embed_dim")


def lisa_config(text: dict, vision: dict, sam: dict, out_dim: int = 256) -> ml_collections.ConfigDict:
  config = common.trainer(ml_collections.ConfigDict())
  config.task = "lisa"
  config.model = ml_collections.ConfigDict(dict(
      llava=dict(vision=vision, text=text, projector_type="linear", vision_feature_layer=-2,
                 vision_feature_select_strategy="default", image_token_index=-200, mm_use_im_start_end=True),
      sam=sam, seg_token_idx=-1, out_dim=out_dim, max_seg_per_conversation=1,
      ce_loss_weight=1.0, bce_loss_weight=2.0, dice_loss_weight=0.5,
      point_prompt_loss_weight=0.0))
  config.init = ml_collections.ConfigDict(dict(
      pretrained="", clip="",  # a LISA checkpoint (converted or official) and, for official ones, CLIP
      # SAM's mask-decoder heads for an official checkpoint / compose.sam .pth (0 = SAM's 8, with a warning)
      sam_decoder_num_heads=0,
      compose=dict(llava="", clip="", sam="", tokenizer="")))  # or LISA from parts (train_ds.py's start)
  config.data = ml_collections.ConfigDict(dict(
      base_dir="", dataset="sem_seg||refer_seg||vqa||reason_seg", sample_rates="9,3,3,1",
      sem_seg_data="ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
      refer_seg_data="refclef||refcoco||refcoco+||refcocog", vqa_data="llava_instruct_150k",
      reason_seg_data="ReasonSeg|train", val_dataset="ReasonSeg|val", explanatory=0.1,
      num_classes_per_sample=3, samples_per_epoch=80_000,
      synthetic=dict(num_train=2000, num_val=100, image_size=64, max_shapes=3, seed=0, vocab_size=600,
                     seg_lstrip=False),
      collate=dict(max_conversations_per_image=3, model_max_length=512, conv_type="llava_v1",
                   use_mm_start_end=True, pad_token_id=0)))
  # official optimizer: AdamW lr 3e-4, betas (0.9, 0.95), no weight decay, WarmupDecayLR 100 steps, clip 1.0
  config.optim.update(lr=3e-4, schedule="warmup_decay", warmup_steps=100, b1=0.9, b2=0.95, weight_decay=0.0,
                      grad_clip=1.0)
  # --config.mode=segment: --config.image=a.jpg[,b.jpg] --config.prompt="question[||question]"
  config.image = ""
  config.prompt = ""
  config.max_new_tokens = 64
  config.segment_dir = ""  # default: workdir/segment
  # batch segmentation: --config.images=DIR|GLOB|list.jsonl ({"image", "prompt"} lines), this many at a time
  config.images = ""
  config.segment_batch_size = 4
  # --config.mode=serve: HTTP service (jaxlisa.serving.server; README "Serving")
  config.serve = ml_collections.ConfigDict(dict(
      host="127.0.0.1", port=8000, max_batch_size=4, batch_wait_ms=20.0, queue_size=32,
      max_body_bytes=16 * 1024 * 1024, max_prompt_tokens=256, max_image_pixels=4096 * 4096,
      request_timeout_s=120.0, mask_size_multiple=256, warmup=True,
      quantize=""))  # "int8": the LLM's dense kernels as int8 + per-channel scale (serve and batch segment)
  config.trainable = OFFICIAL_TRAINABLE
  config.ckpt.update(best_metric="eval/giou", best_mode="max")
  return config
