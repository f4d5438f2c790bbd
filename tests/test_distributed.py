"""Multi-host plumbing with fake process values: when jax.distributed.initialize is called and with
what, process 0 alone writing metrics, and host batches (a process's share or the whole global
batch) becoming the same global array."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlisa import parallel
from jaxlisa.parallel import distributed
from jaxlisa.training import trainer as trainer_lib


@pytest.mark.parametrize("value, env, want", [
    (None, {}, "auto"), ("", {"JAXLISA_DISTRIBUTED": "1"}, "on"), (None, {"JAXLISA_DISTRIBUTED": "off"}, "off"),
    (True, {"JAXLISA_DISTRIBUTED": "off"}, "on"), (False, {}, "off"), ("auto", {}, "auto"), ("ON", {}, "on")])
def test_resolve_mode(value, env, want):
  assert distributed.resolve_mode(value, env) == want


def test_resolve_mode_rejects_unknown():
  with pytest.raises(ValueError, match="distributed mode"):
    distributed.resolve_mode("sometimes", {})


@pytest.mark.parametrize("env, want", [
    ({}, None), ({"SLURM_NTASKS": "1"}, None), ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS"), ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, "TPU_WORKER_HOSTNAMES"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "w0"}, "MEGASCALE_COORDINATOR_ADDRESS")])
def test_multi_process_env(env, want):
  assert distributed.multi_process_env(env) == want


@pytest.mark.parametrize("mode, env, kwargs", [
    (None, {}, None),  # auto, one process: no call
    ("off", {"JAX_COORDINATOR_ADDRESS": "h:1"}, None),
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"num_processes": 2, "process_id": 1}),
    ("on", {}, {}),  # everything auto-detected (Cloud TPU, SLURM, Open MPI)
    (None, {"JAXLISA_DISTRIBUTED": "on", "JAX_PROCESS_ID": "0"}, {"process_id": 0})])
def test_initialize_calls_jax_distributed_when_asked(monkeypatch, mode, env, kwargs):
  monkeypatch.setattr(distributed, "_initialized", False)
  calls = []
  assert distributed.initialize(mode, env, init_fn=lambda **kw: calls.append(kw)) == (kwargs is not None)
  assert calls == ([] if kwargs is None else [kwargs])
  if kwargs is not None:  # once per process
    assert not distributed.initialize(mode, env, init_fn=lambda **kw: calls.append(kw))
    assert len(calls) == 1


def test_only_process_0_writes_metrics(tmp_path, monkeypatch):
  w = trainer_lib.MetricWriter(str(tmp_path))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not parallel.is_primary()
  w.write(1, {"train/loss": 1.0})
  assert not (tmp_path / "metrics.jsonl").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  w.write(1, {"train/loss": 1.0})
  w.write(2, {"train/loss": 0.5})
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  w.truncate(1)  # a non-primary process leaves the file alone
  assert [r["step"] for r in trainer_lib.read_metrics(str(tmp_path))] == [1, 2]
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  w.truncate(1)
  assert [r["step"] for r in trainer_lib.read_metrics(str(tmp_path))] == [1]


def test_global_batch(monkeypatch):
  mesh = parallel.make_mesh({"data": -1})
  sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
  batch = {"x": np.arange(8 * 3).reshape(8, 3), "y": np.arange(8)}
  out = distributed.global_batch(batch, sharding, 8)  # one process: its share is the global batch
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  assert out["x"].sharding == sharding
  # two processes (faked): 8 rows = the whole global batch (each device takes its rows from it);
  # 4 rows = this process's share (global shape inferred by jax)
  seen = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "make_array_from_process_local_data", lambda s, x, shape=None: seen.append(shape))
  distributed.global_batch(batch, sharding, 8)
  distributed.global_batch({"x": batch["x"][:4]}, sharding, 8)
  assert seen == [(8, 3), (8,), None]


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  """main.py as 2 processes x 2 CPU devices (coordinator on localhost, gloo collectives) against 1
  process x 4 devices, same data=2 x fsdp=2 mesh: the same metrics, written once, by process 0."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "main.py", "--config", "configs/lm_tiny.py:runlocal", "--config.mesh.data=2",
         "--config.mesh.fsdp=2", "--alsologtostderr"]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS",
                                                                   "JAXLISA_DISTRIBUTED", "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  port = _free_port()
  procs = [subprocess.Popen(cmd + ["--workdir", str(tmp_path / "one")], cwd=root, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})]
  for i in range(2):
    procs.append(subprocess.Popen(
        cmd + ["--workdir", str(tmp_path / "two")], cwd=root, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                       "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                       "JAX_PROCESS_ID": str(i)}))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  assert "process 1 of 2, 2 local of 4 devices" in logs[2] and "done: step 8/8" in logs[1]

  def metrics(name):
    with open(tmp_path / name / "metrics.jsonl") as fh:
      return [{k: v for k, v in json.loads(l).items() if not k.endswith("step_time")} for l in fh]

  one, two = metrics("one"), metrics("two")
  assert [r["step"] for r in two] == [r["step"] for r in one]  # written once, not once per process
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for k in a:
      assert abs(a[k] - b[k]) <= 1e-5, (a["step"], k, a[k], b[k])
  assert (tmp_path / "two" / "config.json").exists()
  assert len(os.listdir(tmp_path / "two" / "tensorboard")) == 1
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == sorted(os.listdir(tmp_path / "one" / "checkpoints"))


class _FakeTpu:
  """Enough of a TPU device for mesh_utils: a slice, chip coordinates, one core per chip."""
  platform, device_kind, core_on_chip = "tpu", "fake tpu", 0

  def __init__(self, i, slice_index, coords):
    self.id, self.slice_index, self.coords, self.process_index = i, slice_index, coords, slice_index

  def __repr__(self):
    return f"tpu{self.id}(slice {self.slice_index})"


def test_multi_slice_mesh_puts_data_over_slices():
  devs = [_FakeTpu(4 * s + k, s, (k % 2, k // 2, 0)) for s in range(2) for k in range(4)]
  assert parallel.mesh.num_slices(devs) == 2
  grid = parallel.mesh.device_grid((2, 2, 2), devs)  # data=2 (one per slice) x fsdp=2 x tensor=2
  assert grid.shape == (2, 2, 2)
  assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]
  grid = parallel.mesh.device_grid((4, 2, 1), devs)  # data=4: 2 slices x 2 inside each
  assert [{d.slice_index for d in grid[i].ravel()} for i in range(4)] == [{0}, {0}, {1}, {1}]
  with pytest.raises(ValueError, match="multiple of 2"):
    parallel.mesh.device_grid((1, 8, 1), devs)  # fsdp across slices: refused
  assert parallel.mesh.device_grid((1, 1, 1), jax.devices()[:1]) is None  # one slice (any CPU/GPU)
