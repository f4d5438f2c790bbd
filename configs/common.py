"""Shared config pieces: mesh, logical axis rules, trainer defaults (big_vision `configs/common.py`)."""

import dataclasses

import ml_collections

# MaxText vocabulary -> mesh axes ('data', 'fsdp', 'tensor'). Flax semantics: for each array dim the
# first rule whose mesh axes are still free wins; a tuple shards the dim over the product of axes;
# names with no rule (or None) are replicated.
LOGICAL_AXIS_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
    # parameters
    ("embed", "fsdp"),
    ("embed_proj", None),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", "tensor"),
    ("layers", None),
    # vision extras
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_height", None),
    ("conv_width", None),
    ("patch", None),
)


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh axis sizes; one may be -1 (all remaining devices)."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def trainer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fill the generic trainer fields every training config has (callers override after)."""
  config.mode = "train"  # train | eval | segment | serve | caption | chat (main.py --help lists them)
  # eval / segment on a workdir without a checkpoint and without init.pretrained stop (exit 2);
  # True runs them on random weights instead (smoke tests only)
  config.allow_random_init = False
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 32  # global batch per optimizer step (all microbatches together)
  config.grad_accum = 1  # microbatches per step (batch_size % (grad_accum * data * fsdp) == 0)
  config.log_every = 10
  config.eval_every = 0  # 0 = only at the end
  config.ckpt_every = 0  # 0 = only at the end
  config.fresh_start = False  # True: move a workdir's previous run (checkpoints, metrics, data) aside first
  config.stop_after = -1  # stop this run after N steps (time-sliced jobs, preemption drills); -1 = never
  config.ckpt = ml_collections.ConfigDict(dict(
      max_to_keep=2, best_metric="eval/loss", best_mode="min", async_save=False))
  # Trainable mask: a param (path 'a/b/kernel') is trained iff it fully matches one of `trainable` and
  # none of `frozen`. Gradients and optimizer state exist only for trained params.
  config.trainable = (".*",)
  config.frozen = ()
  config.master_dtype = "float32"  # storage dtype of trained params (the optimizer's master copy)
  config.frozen_dtype = ""  # storage dtype of frozen params ('' = as initialised)
  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, schedule="warmup_decay", warmup_steps=100, warmup_type="linear", min_lr=0.0,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay_vectors=False, grad_clip=1.0,
      # a step whose loss or gradient norm is not finite leaves params and optimizer state as they
      # were (counted as train/skipped_steps); the run stops after this many in a row (0 = never)
      skip_nonfinite=True, max_consecutive_nonfinite=10))
  config.mesh = mesh()
  config.logical_axis_rules = LOGICAL_AXIS_RULES
  return config


def smoke(config: ml_collections.ConfigDict, *, total_steps: int, batch_size: int, eval_every: int,
          ckpt_every: int) -> ml_collections.ConfigDict:
  """A config's `runlocal` variant (CI smoke runs): a few steps that log every step and exercise
  evaluation and checkpoints, with a 2-step warmup."""
  config.total_steps = total_steps
  config.batch_size = batch_size
  config.log_every = 1
  config.eval_every = eval_every
  config.ckpt_every = ckpt_every
  config.optim.warmup_steps = 2
  return config


def preset_fields(preset, names: str | None = None) -> dict:
  """The fields of a model-config preset (`jaxlisa.models`' classmethods / functions, where a
  family's sizes are written once) as a plain dict: `names` (space separated) picks some."""
  d = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
  return d if names is None else {k: d[k] for k in names.split()}
