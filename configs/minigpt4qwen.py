"""MiniGPT4-Qwen at the released size (Coobiw/MiniGPT4Qwen, lavis/configs/models/minigpt4qwen): EVA ViT-g/14
+ BLIP-2 Q-Former (32 queries) -> llm_proj -> Qwen-7B-Chat. Freeze switches as released: ViT,
Q-Former, queries and the LLM frozen, llm_proj trained (config.trainable = (): the switches decide;
--config.model.llm.lora_rank=8 adds LoRA on q/v, trained). LAVIS-style AdamW with warmup + cosine.

  python main.py --config configs/minigpt4qwen.py --config.init.qformer=blip2_pretrained_flant5xxl.pth \\
      --config.init.llm=Qwen-7B-Chat/ --config.init.tokenizer=Qwen-7B-Chat/ \\
      --config.data.base_dir=/data/llava --config.data.train_ann=llava_minigpt4qwen_format.json --config.data.val_ann=

or continue from a MiniGPT4-Qwen checkpoint with --config.init.pretrained=PATH.
"""

from configs import blip2_common
from configs import common
from jaxlisa.models.llm import DecoderConfig
from jaxlisa.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch_size=16)
  llm = dict(common.preset_fields(DecoderConfig.qwen_7b(), "family vocab_size hidden_size intermediate_size "
                                  "num_hidden_layers num_attention_heads max_position_embeddings norm_eps "
                                  "attention_bias bos_token_id eos_token_id pad_token_id"),
             dtype="bfloat16", remat_policy="full")
  config = blip2_common.minigpt4qwen_config(blip2_common.eva_vit_g(224), blip2_common.bert_base_qformer(), llm,
                                            max_txt_len=512)
  config.model.vision.update(dtype="bfloat16")
  config.frozen_dtype = "bfloat16"
  config.batch_size = arg.batch_size
  config.total_steps = 10_000
  config.log_every = 50
  config.eval_every = 1000
  config.ckpt_every = 1000
  config.data.synthetic.update(image_size=224)
  config.mesh.update(data=-1, fsdp=1)
  return config
