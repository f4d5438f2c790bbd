"""Mesh and sharding: axis sizes from the config, logical rules -> param/opt-state/batch shardings on
8 host devices (data=2 x fsdp=2 x tensor=2), the same losses as on 1 device, and a checkpoint
written on the 8-device mesh resumed on 1 device."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlisa import config as cfg_lib
from jaxlisa import parallel
from jaxlisa.tasks import prepared_task
from jaxlisa.training import checkpoints as ckpt_lib
from jaxlisa.training.trainer import Trainer, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape():
  assert parallel.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
  assert parallel.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
  assert parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="do not divide"):
    parallel.mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(ValueError, match="needs 4 devices, have 8"):
    parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parallel.mesh_shape({"dp": 2}, 8)
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    parallel.axis_rules((("mlp", "model"),))
  mesh = parallel.make_mesh({"data": -1})
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


STEPS = 4
CONFIG = dict(total_steps=STEPS, log_every=1, ckpt_every=3, eval_every=-1, grad_accum=2)


def _config(**mesh):
  c = cfg_lib.load_config(os.path.join(ROOT, "configs", "lm_tiny.py:runlocal"))
  c.update(CONFIG)
  c.mesh.update(mesh)
  return c


SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r})
    import jax
    from tests.test_mesh import _config
    from jaxlisa.tasks import prepared_task
    from jaxlisa.training.trainer import Trainer
    c = _config(data=2, fsdp=2, tensor=2)
    t = Trainer(c, {workdir!r}, prepared_task(c, {workdir!r}))
    state, data, _ = t.restore_or_init()
    flat = jax.tree_util.tree_flatten_with_path
    spec = lambda tree: {{jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in flat(tree)[0]}}
    batch = t.device_batch(next(data))
    out = dict(devices=jax.device_count(), params=spec(state.trainable), mu=spec(state.opt_state[1][0].mu),
               batch=str(batch["input_ids"].sharding.spec),
               shard=list(state.trainable["embed_tokens"]["embedding"].addressable_shards[0].data.shape))
    t.fit()
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mesh8"))
  r = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, workdir=workdir)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return workdir, json.loads(line[len("RESULT "):])


def test_shardings_on_8_devices(sharded_run):
  _, out = sharded_run
  assert out["devices"] == 8
  params = out["params"]
  tp, fsdp = "'tensor'", "'fsdp'"
  # logical names -> mesh axes with configs/common.py rules (scanned layers lead with 'layers' -> None)
  assert params["['embed_tokens']['embedding']"] == f"P({tp}, {fsdp})"  # (vocab, embed)
  assert params["['lm_head']['kernel']"] == f"P({fsdp}, {tp})"  # (embed, vocab)
  assert params["['layers']['self_attn']['q_proj']['kernel']"] == f"P(None, {fsdp}, {tp}, None)"
  assert params["['layers']['self_attn']['o_proj']['kernel']"] == f"P(None, {tp}, None, {fsdp})"
  assert params["['layers']['mlp']['down_proj']['kernel']"] == f"P(None, {tp}, {fsdp})"
  assert params["['layers']['input_layernorm']['scale']"] == f"P(None, {tp})"
  assert out["mu"] == params  # Adam moments sharded like their params
  assert out["batch"] == "P(('data', 'fsdp'),)"
  assert out["shard"] == [256 // 2, 64 // 2]  # the embedding really is split 2 x 2


@pytest.fixture(scope="module")
def single_device_trainer(sharded_run, tmp_path_factory):
  workdir, _ = sharded_run  # reuses the tokenizer the 8-device run trained and saved
  return Trainer(_config(data=-1), workdir, prepared_task(_config(data=-1), workdir))


def test_same_losses_and_cross_mesh_resume(sharded_run, single_device_trainer):
  workdir, _ = sharded_run
  losses8 = {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}
  assert sorted(losses8) == list(range(1, STEPS + 1))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [3, 4]
  t = single_device_trainer
  # from scratch on 1 device: the same losses for steps 1..3
  state, data, start = t.restore_or_init()
  assert start == STEPS  # it found the 8-device run's last checkpoint
  fresh = t.init_state(t.rng)
  data = t.task.train_data()
  with jax.set_mesh(t.mesh):
    for step in range(1, 4):
      fresh, m = t.train_step(fresh, t.device_batch(next(data)))
      assert float(m["loss"]) == pytest.approx(losses8[step], abs=2e-5), step
    # resume the 8-device checkpoint of step 3 on this mesh and take step 4
    saved, data_state = t.checkpoints.restore(3, ckpt_lib.abstract(fresh.saved()))
    resumed = fresh.with_saved(saved)
    assert int(resumed.step) == 3
    data = t.task.train_data()
    data.set_state(data_state)
    resumed, m = t.train_step(resumed, t.device_batch(next(data)))
  assert float(m["loss"]) == pytest.approx(losses8[4], abs=2e-5)
  np.testing.assert_allclose(jax.device_get(resumed.trainable["lm_head"]["kernel"]),
                             jax.device_get(state.trainable["lm_head"]["kernel"]), atol=2e-5)
  assert resumed.trainable["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
