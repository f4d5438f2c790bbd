"""Shared BLIP-2 family config pieces: the released architectures (LAVIS) and the data section.

LAVIS training recipe (lavis/projects/blip2/train/pretrain_stage1.yaml and its runner): AdamW betas
(0.9, 0.999), weight decay 0.05 (not on biases / norms), lr 1e-4 with linear warmup then cosine to
min_lr 1e-5, ViT frozen (`freeze_vit`), images 224 px, 32 queries, max_txt_len 32.
"""

import ml_collections

from configs import common
from jaxlisa.models.eva import EVAViTConfig

# LAVIS freeze_vit: every ViT parameter but ln_vision (a separate module in LAVIS, trained).
FROZEN_VIT = (r"visual_encoder/(?!ln_vision/).*",)


def eva_vit_g(image_size: int = 224) -> dict:
  """LAVIS create_eva_vit_g: the sizes of jaxlisa.models.eva.EVAViTConfig.eva_vit_g."""
  return common.preset_fields(EVAViTConfig.eva_vit_g(image_size), "image_size patch_size hidden_size "
                              "num_hidden_layers num_attention_heads mlp_dim layer_norm_eps ln_vision_eps")


def bert_base_qformer(**kw) -> dict:
  """LAVIS Blip2Base.init_Qformer: bert-base-uncased, cross-attention every 2 layers, 32 queries.
  vocab_size / encoder_hidden_size -1: from the tokenizer / the vision tower."""
  base = dict(vocab_size=-1, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512, cross_attention_freq=2, encoder_hidden_size=-1, num_query_tokens=32,
              hidden_dropout_prob=0.1)
  return {**base, **kw}


# The tiny demos' towers (configs/blip2_tiny.py, configs/minigpt4qwen_tiny.py): trained from scratch at 64 px.
TINY_VISION = dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_dim=128,
                   layer_norm_eps=1e-6, ln_vision_eps=1e-5)


def tiny_qformer(**kw) -> dict:
  """A 2-layer, 64-wide Q-Former with cross-attention in every layer and 8 queries, no dropout."""
  return bert_base_qformer(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, cross_attention_freq=1, num_query_tokens=8,
                                     hidden_dropout_prob=0.0), **kw})


def tiny_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tiny demos' smoke run: 80 images, one ViT and one Q-Former layer, 30 steps of 8."""
  config.data.synthetic.update(num_train=64, num_val=16)
  config.model.vision.num_hidden_layers = 1
  config.model.qformer.num_hidden_layers = 1
  return common.smoke(config, total_steps=30, batch_size=8, eval_every=15, ckpt_every=15)


def data(**synthetic) -> ml_collections.ConfigDict:
  """base_dir '' = the synthetic shapes captions/instructions written to workdir/data."""
  return ml_collections.ConfigDict(dict(
      base_dir="", image_root="", train_ann="captions_train.json", val_ann="captions_val.json", max_words=50,
      vocab_size=400,
      synthetic=dict(dict(num_train=2000, num_val=256, image_size=64, max_shapes=3, captions_per_image=2, seed=0),
                     **synthetic)))


def init() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(pretrained="", vision="", qformer="", llm="", tokenizer=""))


def stage1_config(vision: dict, qformer: dict, **model) -> ml_collections.ConfigDict:
  """BLIP-2 stage 1 (task blip2_stage1) with the LAVIS optimizer; callers set sizes and steps."""
  config = common.trainer(ml_collections.ConfigDict())
  config.task = "blip2_stage1"
  config.model = ml_collections.ConfigDict(dict(
      dict(vision=vision, qformer=qformer, embed_dim=256, temp=0.07, learn_temp=True, itc_label_smoothing=0.1,
           lm_label_smoothing=0.1, max_txt_len=32), **model))
  config.init = init()
  config.data = data()
  config.frozen = FROZEN_VIT
  config.optim.update(lr=1e-4, schedule="cosine", min_lr=1e-5, warmup_steps=5000, b1=0.9, b2=0.999,
                      weight_decay=0.05)
  # --config.mode=caption --config.image=a.jpg[,b.jpg]: the Q-Former's captions (LAVIS
  # Blip2Qformer.generate's defaults: 3 beams; use_nucleus_sampling samples with top_p instead)
  config.image = ""
  config.caption = ml_collections.ConfigDict(dict(num_beams=3, max_length=30, min_length=10, repetition_penalty=1.0,
                                                  use_nucleus_sampling=False, top_p=0.9))
  config.ckpt.best_metric = "eval/i2t_r1"
  config.ckpt.best_mode = "max"
  return config


def minigpt4qwen_config(vision: dict, qformer: dict, llm: dict, **model) -> ml_collections.ConfigDict:
  """MiniGPT4-Qwen instruction tuning (task minigpt4qwen). config.trainable = () means the model's
  freeze switches decide (jaxlisa.tasks.minigpt4qwen.trainable_patterns)."""
  config = common.trainer(ml_collections.ConfigDict())
  config.task = "minigpt4qwen"
  config.model = ml_collections.ConfigDict(dict(
      dict(vision=vision, qformer=dict(qformer, use_text=False, lm_head=False), llm=llm, image_token_id=-1,
           max_txt_len=512, freeze_vit=True, unfreeze_pos_embed=False, freeze_qformer=True, freeze_queries=True,
           freeze_proj=False, freeze_llm=True), **model))
  config.init = init()
  config.data = data()
  config.data.update(train_ann="instructions_train.json", val_ann="instructions_val.json", vocab_size=600)
  config.trainable = ()
  # --config.mode=chat --config.image=a.jpg[,b.jpg] --config.prompt="question[||question]": one ChatML
  # turn per image (greedy as the original's chat demo; chat.do_sample samples with top_p / temperature)
  config.image = ""
  config.prompt = ""
  config.max_new_tokens = 64
  config.chat = ml_collections.ConfigDict(dict(do_sample=False, top_p=0.8, top_k=0, temperature=1.0,
                                               repetition_penalty=1.0))
  config.optim.update(lr=1e-4, schedule="cosine", min_lr=1e-6, warmup_steps=500, b1=0.9, b2=0.999,
                      weight_decay=0.05)
  return config
