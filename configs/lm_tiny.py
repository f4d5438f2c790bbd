"""Tiny LLaMA-family LM trained from scratch on the synthetic shapes corpus (jaxlisa/data/synthetic_text.py).

The project's default job; it learns visibly in about a minute on 2 CPU cores.

  python main.py                                                    # this config, ./workdir/lm_tiny
  python main.py --config configs/lm_tiny.py:runlocal --workdir /tmp/lm   # seconds-long smoke run
  python main.py --config.total_steps=600 --config.optim.lr=1e-3 --config.mesh.fsdp=-1 --config.mesh.data=1
"""

import ml_collections

from configs import common
from jaxlisa.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  config = common.trainer(ml_collections.ConfigDict())
  config.task = "lm"
  config.total_steps = 400
  config.batch_size = 16
  config.log_every = 10
  config.eval_every = 100
  config.ckpt_every = 200
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 30

  config.model = ml_collections.ConfigDict(dict(
      family="llama", vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, norm_eps=1e-5,
      bos_token_id=1, eos_token_id=2, pad_token_id=0,
      dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="none", attention_impl="xla"))
  config.data = ml_collections.ConfigDict(dict(
      seed=0, num_train=10_000, num_eval=256, seq_len=64, max_facts=2, vocab_size=256, tokenizer_docs=2000))

  if arg.runlocal:  # smoke test: a few steps of a narrower model, checkpoints and eval exercised
    common.smoke(config, total_steps=8, batch_size=8, eval_every=4, ckpt_every=4)
    config.model.update(hidden_size=64, intermediate_size=128)
    config.data.update(num_train=256, num_eval=16, tokenizer_docs=256)
  return config
