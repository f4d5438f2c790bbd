"""A tiny LISA trained from scratch on the synthetic shapes dataset: the project's demo and main.py's
default job.

Every part is trainable (nothing is pretrained). Runs on a 2-core CPU.

  python main.py                                   # = --config configs/lisa_tiny.py --workdir workdir/lisa_tiny
  python main.py --config configs/lisa_tiny.py:runlocal --workdir /tmp/lisa   # smoke run (CI)
"""

from configs import common
from configs import lisa_common
from jaxlisa.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  text = dict(family="llama", vocab_size=-1, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, norm_eps=1e-5,
              initializer_range=0.08,  # ~1/sqrt(hidden): attention is not uniform at init
              bos_token_id=1, eos_token_id=2, pad_token_id=0, lora_rank=0, scan_layers=True)
  vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                image_size=64, patch_size=16)
  sam = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, window_size=4,
             global_attn_indexes=(1,), out_chans=64, prompt_embed_dim=64, mask_in_chans=4,
             decoder_mlp_dim=128, decoder_num_heads=2, iou_head_hidden_dim=64)
  config = lisa_common.lisa_config(text, vision, sam, out_dim=64)
  config.trainable = (".*",)  # from scratch: everything learns
  config.data.update(sample_rates="2,2,2,4", samples_per_epoch=100_000)  # reasoning-heavy: val is ReasonSeg-style
  config.data.collate.update(model_max_length=256)
  config.total_steps = 3000  # 19 min on 2 idle CPU cores (README); gIoU crosses 0.60 after ~2500 steps
  config.batch_size = 8
  config.optim.update(lr=1e-3, warmup_steps=100)
  config.log_every = 10
  config.eval_every = 250
  config.ckpt_every = 250
  if arg.runlocal:
    config.data.synthetic.update(num_train=16, num_val=4)
    config.data.samples_per_epoch = 64
    common.smoke(config, total_steps=4, batch_size=2, eval_every=2, ckpt_every=2)
  return config
