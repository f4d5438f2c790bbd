"""LISA-7B with the official train_ds.py recipe (LLaVA-Lightning-7B-v1-1 / Vicuna-7B + CLIP ViT-L/14
224 px + SAM ViT-H, LoRA r8 on q/v, lm_head/embed_tokens/mask decoder/text_hidden_fcs trained).

  python tools/convert_torch_weights.py --src xinlai/LISA-7B-v1 --dst ckpt/lisa7b   # official weights
  python main.py --config configs/lisa_7b.py --config.init.pretrained=ckpt/lisa7b \
      --config.data.base_dir=/data/lisa --workdir runs/lisa7b
  python main.py --config configs/lisa_7b.py --config.mode=segment --config.init.pretrained=ckpt/lisa7b \
      --config.image=cat.jpg --config.prompt="What is the animal that likes fish? Please output segmentation mask."

Batch: 2 images per device x 8 devices x 10 microbatches = 160 images per optimizer step, 5000 steps
(epochs 10 x steps_per_epoch 500), AdamW 3e-4 with 100 warmup steps then linear decay to 0.
`:variant=13b` gives the LLaMA-2-13B-chat variant (configs/lisa_13b.py).
"""

from configs import common
from configs import lisa_common
from jaxlisa.models.clip import CLIPVisionConfig
from jaxlisa.config import parse_arg

LLM = {
    "7b": dict(family="llama", vocab_size=32004, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, norm_eps=1e-6),
    "13b": dict(family="llama", vocab_size=32003, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, norm_eps=1e-5),
}


def get_config(arg=None):
  arg = parse_arg(arg, variant="7b", runlocal=False)
  text = dict(LLM[arg.variant], bos_token_id=1, eos_token_id=2, pad_token_id=0, lora_rank=8, lora_alpha=16.0,
              lora_dropout=0.05, lora_targets=("q_proj", "v_proj"), dtype="bfloat16", param_dtype="float32",
              scan_layers=True, remat_policy="full", attention_impl="xla")
  vision = dict(common.preset_fields(CLIPVisionConfig.vit_l14(224), "hidden_size intermediate_size "
                                     "num_hidden_layers num_attention_heads image_size patch_size"),
                dtype="bfloat16", param_dtype="float32", remat_policy="full")
  sam = dict(lisa_common.sam_vit_h(), dtype="bfloat16", param_dtype="float32", remat_policy="none")
  config = lisa_common.lisa_config(text, vision, sam, out_dim=256)
  config.total_steps = 5000
  config.batch_size = 160
  config.grad_accum = 10
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.frozen_dtype = "bfloat16"
  config.master_dtype = "float32"
  config.log_every = 10
  config.eval_every = 500
  config.ckpt_every = 500
  if arg.runlocal:  # the same recipe at toy scale, for a quick look on one host
    config.total_steps, config.batch_size, config.grad_accum = 10, 2, 1
  return config
