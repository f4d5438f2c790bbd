"""BLIP-2 stage 1 at the released size with LAVIS's recipe (lavis/projects/blip2/train/pretrain_stage1.yaml):
EVA ViT-g/14 at 224 px, frozen (ln_vision trains); Q-Former bert-base with 32 queries, cross-attention
every 2 layers; ITC + ITM + ITG; AdamW lr 1e-4 (warmup, cosine to 1e-5), wd 0.05, betas (0.9, 0.999);
100 images per GPU x 16 GPUs.

  python main.py --config configs/blip2_stage1.py --config.init.vision=eva_vit_g.pth \\
      --config.init.tokenizer=bert-base-uncased/ --config.data.base_dir=/data/coco \\
      --config.data.train_ann=annotations/coco_karpathy_train.json --config.data.val_ann=annotations/coco_karpathy_val.json

The Q-Former starts from random weights here (LAVIS copies bert-base-uncased into it; continue from a
BLIP-2 checkpoint instead with --config.init.pretrained=blip2_pretrained.pth). Without base_dir it
trains on the synthetic shapes captions (a smoke test at this size, not a recipe).
"""

from configs import blip2_common
from jaxlisa.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, batch_size=1600, image_size=224)
  config = blip2_common.stage1_config(blip2_common.eva_vit_g(arg.image_size), blip2_common.bert_base_qformer())
  config.model.vision.update(dtype="bfloat16", remat_policy="full")
  config.model.qformer.update(dtype="bfloat16")
  config.batch_size = arg.batch_size
  config.total_steps = 250_000  # the BLIP-2 paper's first stage
  config.log_every = 50
  config.eval_every = 5000
  config.ckpt_every = 5000
  config.data.update(vocab_size=30522)
  config.data.synthetic.update(image_size=arg.image_size)
  config.mesh.update(data=-1, fsdp=1)
  return config
