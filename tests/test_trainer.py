"""Trainer pieces: the LR schedules against DeepSpeed's formulas, frozen params (unchanged, no
gradients or optimizer state), gradient accumulation == one big batch, and main.py end to end
(checkpoints, metrics, resume at the right step with the same result as an uninterrupted run)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxlisa import config as cfg_lib
from jaxlisa.tasks import prepared_task
from jaxlisa.training import accumulation, partition
from jaxlisa.training import optimizer as optim_lib
from jaxlisa.training.trainer import Trainer, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Schedules.

class DeepSpeedWarmupDecayLR:
  """deepspeed/runtime/lr_schedules.py WarmupDecayLR.get_lr at last_batch_iteration = t."""

  def __init__(self, total_num_steps, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type):
    self.total, self.min_lr, self.max_lr, self.type = total_num_steps, warmup_min_lr, warmup_max_lr, warmup_type
    self.warmup = max(2, warmup_num_steps)
    self.inverse_log_warm_up = 1.0 / math.log(self.warmup)

  def lr(self, t):
    if t < self.warmup:
      gamma = t / self.warmup if self.type == "linear" else self.inverse_log_warm_up * math.log(t + 1)
    else:
      gamma = max(0.0, float(self.total - t) / float(max(1.0, self.total - self.warmup)))
    return self.min_lr + (self.max_lr - self.min_lr) * gamma


def _optim(**kw):
  base = dict(lr=3e-4, schedule="warmup_decay", warmup_steps=100, warmup_type="linear", min_lr=0.0)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("warmup_type,warmup,min_lr", [("linear", 100, 0.0), ("log", 100, 0.0),
                                                       ("linear", 1, 0.0), ("linear", 100, 1e-5)])
def test_warmup_decay_matches_deepspeed(warmup_type, warmup, min_lr):
  total = 5000
  ref = DeepSpeedWarmupDecayLR(total, min_lr, 3e-4, warmup, warmup_type)
  sched = optim_lib.lr_schedule(_optim(warmup_steps=warmup, warmup_type=warmup_type, min_lr=min_lr), total)
  for t in (0, 1, 2, 37, 99, 100, 101, 1000, 2550, 4999, 5000, 5001, 7000):
    assert float(sched(t)) == pytest.approx(ref.lr(t), rel=1e-6, abs=1e-12), t


def test_official_lisa_schedule_landmarks():
  sched = optim_lib.lr_schedule(_optim(), 5000)  # lr 3e-4, 100 warmup steps, 5000 steps
  assert float(sched(0)) == 0.0
  assert float(sched(50)) == pytest.approx(1.5e-4)
  assert float(sched(100)) == pytest.approx(3e-4)
  assert float(sched(2550)) == pytest.approx(1.5e-4)
  assert float(sched(5000)) == 0.0


def test_cosine_and_constant():
  cos = optim_lib.lr_schedule(_optim(schedule="cosine", warmup_steps=10, min_lr=1e-5), 110)
  assert float(cos(5)) == pytest.approx(1.5e-4)
  assert float(cos(10)) == pytest.approx(3e-4)
  assert float(cos(60)) == pytest.approx((3e-4 + 1e-5) / 2)
  assert float(cos(110)) == pytest.approx(1e-5)
  const = optim_lib.lr_schedule(_optim(schedule="constant", warmup_steps=0), 100)
  assert float(const(0)) == float(const(99)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="unknown lr schedule"):
    optim_lib.lr_schedule(_optim(schedule="linear"), 100)


# ------------------------------------------------------------------------------------------------
# In-process trainer on the runlocal LM.

def _config(**overrides):
  c = cfg_lib.load_config(os.path.join(ROOT, "configs", "lm_tiny.py:runlocal"))
  for key, value in overrides.items():
    node = c
    *parts, last = key.split(".")
    for p in parts:
      node = node[p]
    node[last] = value
  return c


FROZEN = ("embed_tokens/.*", "layers/mlp/.*")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  """The runlocal LM with its embeddings and MLPs frozen (stored in bf16)."""
  config, workdir = _config(frozen=FROZEN, frozen_dtype="bfloat16"), str(tmp_path_factory.mktemp("lm"))
  return Trainer(config, workdir, prepared_task(config, workdir))


@pytest.fixture(scope="module")
def state_and_batch(trainer):
  state, data, start = trainer.restore_or_init()
  assert start == 0
  return state, trainer.device_batch(next(data))


def _loss_fn(trainer, frozen):
  """The train step's objective: loss of the merged params, a function of the trained ones."""
  return lambda p, mb, r: trainer.task.loss(partition.merge(p, frozen), mb, r)


def test_trainable_mask_errors():
  params = {"embed_tokens": {"embedding": np.zeros(2)}, "layers": {"mlp": {"up_proj": {"kernel": np.zeros(2)}}}}
  mask = partition.trainable_mask(params, (".*",), ("layers/.*",))
  assert mask == {"embed_tokens": {"embedding": True}, "layers": {"mlp": {"up_proj": {"kernel": False}}}}
  with pytest.raises(ValueError, match=r"regex 'lora_.\*' matches no parameter"):
    partition.trainable_mask(params, ("lora_.*",))
  trained, frozen = partition.split(params, mask)
  assert partition.merge(trained, frozen) == params


def test_frozen_params_unchanged_and_without_gradients(trainer, state_and_batch):
  t, (state, batch) = trainer, state_and_batch
  assert {"/".join(k) for k in traverse_util.flatten_dict(state.frozen)} == {
      "embed_tokens/embedding", "layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel",
      "layers/mlp/down_proj/kernel"}
  assert "embed_tokens" not in state.trainable and "mlp" not in state.trainable["layers"]
  assert 0 < t.num_trainable < t.num_params
  # fp32 master copies of the trained params; frozen weights stored in bf16
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype("bfloat16")}
  # optimizer moments and gradients exist for the trained subtree only
  adam = state.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.trainable)
  grads, _ = jax.eval_shape(lambda s, b: accumulation.grads_and_metrics(_loss_fn(t, s.frozen), s.trainable, b, s.rng),
                            state, batch)
  assert jax.tree.structure(grads) == jax.tree.structure(state.trainable)
  frozen0, trained0 = jax.device_get((state.frozen, state.trainable))
  with jax.set_mesh(t.mesh):
    new, metrics = t.train_step(jax.tree.map(jnp.copy, state), batch)  # the step donates its input
    new, metrics = t.train_step(new, batch)
  assert int(new.step) == 2 and np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(jax.device_get(new.frozen))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for a, b in zip(jax.tree.leaves(trained0), jax.tree.leaves(jax.device_get(new.trainable))):
    assert not np.array_equal(a, b)


def test_load_pretrained_params(trainer, state_and_batch):
  t, (state, _) = trainer, state_and_batch
  emb = state.frozen["embed_tokens"]["embedding"]
  head = state.trainable["lm_head"]["kernel"]
  new = t.load_params(state, {"embed_tokens": {"embedding": np.ones(emb.shape, np.float32)},
                              "lm_head": {"kernel": np.full(head.shape, 2.0, np.float32)}})
  assert new.frozen["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  assert float(new.frozen["embed_tokens"]["embedding"].min()) == 1.0
  assert float(new.trainable["lm_head"]["kernel"].max()) == 2.0
  assert new.trainable["lm_head"]["kernel"].sharding == head.sharding
  np.testing.assert_array_equal(new.trainable["norm"]["scale"], state.trainable["norm"]["scale"])  # untouched
  with pytest.raises(ValueError, match=r"lm_head/kernel: shape \(3,\) != .*\n  vision/w: no such parameter"):
    t.load_params(state, {"lm_head": {"kernel": np.zeros(3)}, "vision": {"w": np.zeros(1)}})


def test_gradient_accumulation_equals_big_batch(trainer, state_and_batch):
  t, (state, batch) = trainer, state_and_batch
  tokens = np.asarray(batch["attention_mask"])[:, 1:].sum(1)
  assert len(set(tokens.tolist())) > 1  # rows of different lengths: the token weighting matters
  loss_fn = _loss_fn(t, state.frozen)
  fns = {k: jax.jit(lambda p, b, k=k: accumulation.grads_and_metrics(loss_fn, p, b, state.rng, k)) for k in (1, 4)}
  g1, m1 = fns[1](state.trainable, batch)
  g4, m4 = fns[4](state.trainable, batch)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)))
  assert diff < 1e-6, diff
  assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-6)
  assert float(m4["weight"]) == float(m1["weight"]) == tokens.sum()
  # the plain mean of the microbatch losses differs: the comparison above can fail
  micro = jax.jit(jax.vmap(lambda mb: loss_fn(state.trainable, mb, None)[0]))(
      jax.tree.map(lambda x: x.reshape(-1, 4, *x.shape[1:]).swapaxes(0, 1), batch))
  assert abs(float(micro.mean()) - float(m1["loss"])) > 1e-4


# ------------------------------------------------------------------------------------------------
# main.py end to end.

def _main(workdir, *overrides, cache_dir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", "configs/lm_tiny.py:runlocal",
                      "--workdir", workdir, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_main_runs_checkpoints_and_resumes(tmp_path):
  cache = str(tmp_path / "xla_cache")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  # an uninterrupted run of 8 steps: eval + checkpoints at 4 and 8
  r = _main(straight, cache_dir=cache)
  assert "done: step 8/8" in r.stdout
  assert _steps(straight) == [4, 8]
  assert len(os.listdir(os.path.join(straight, "best"))) == 1
  rows = read_metrics(straight)
  assert [m["step"] for m in rows if "train/loss" in m] == list(range(1, 9))
  assert [m["step"] for m in rows if "eval/loss" in m] == [4, 8]
  assert all(k in rows[0] for k in ("train/loss", "train/lr", "train/grad_norm", "train/step_time"))
  with open(os.path.join(straight, "config.json")) as fh:
    assert json.load(fh)["total_steps"] == 8
  assert os.path.exists(os.path.join(straight, "tokenizer", "tokenizer.json"))

  # the same job stopped after 5 steps (checkpoints 4, 5), then restarted: resumes at step 5
  r = _main(resumed, "--config.stop_after=5", cache_dir=cache)
  assert "done: step 5/8" in r.stdout
  assert _steps(resumed) == [4, 5]
  r = _main(resumed, cache_dir=cache)
  assert "resuming at step 5" in r.stdout and "done: step 8/8" in r.stdout
  assert "config differs from the previous run" in r.stderr and "stop_after: 5 -> -1" in r.stderr
  assert _steps(resumed) == [5, 8]
  rows_resumed = read_metrics(resumed)
  assert [m["step"] for m in rows_resumed if "train/loss" in m] == list(range(1, 9))
  # the resumed run continues exactly: same data order, optimizer state and rng
  last = {m["step"]: m for m in rows if "train/loss" in m}
  last_resumed = {m["step"]: m for m in rows_resumed if "train/loss" in m}
  for step in (6, 7, 8):
    assert last_resumed[step]["train/loss"] == pytest.approx(last[step]["train/loss"], abs=1e-5)
  # a third start has nothing left to do
  r = _main(resumed, cache_dir=cache)
  assert "nothing to do" in r.stdout
