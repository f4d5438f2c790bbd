"""tools/plan.py: the tiny LISA planned on 8 fake CPU devices (subprocesses), its FLOP counter, the
batch search and the argument handling."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import plan  # noqa: E402  pylint: disable=wrong-import-position

FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = os.path.join(ROOT, "configs", "lisa_tiny.py")


def _spawn(*args):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--config", TINY, *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "XLA_FLAGS": FAST_XLA})


def _result(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:] + err[-3000:]
  plans = [json.loads(l[len("PLAN "):]) for l in out.splitlines() if l.startswith("PLAN ")]
  return out, plans[-1]


@pytest.fixture(scope="module")
def tiny_plans():
  procs = [_spawn("--devices", "8", "--mesh", "fsdp=8", "--hbm_gib", "1", "--peak_tflops", "100", "--json"),
           _spawn("--devices", "8", "--mesh", "data=8", "--no_compile", "--json")]
  return [_result(p) for p in procs]


def test_tiny_plan_on_8_devices(tiny_plans):
  (out, fsdp), (_, data) = tiny_plans
  assert fsdp["devices"] == 8 and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert fsdp["global_batch"] == 8 and fsdp["per_device_batch"] == 1
  b = fsdp["bytes"]
  assert 0 < b["params"] < b["peak"] and b["temp"] > 0 and b["opt_state"] > b["params"]  # Adam: 2 moments
  assert b["peak"] == b["argument"] + b["output"] - b["alias"] + b["temp"]
  assert fsdp["flops"] > 0 and fsdp["xla_flops"] > 0
  assert "FITS in 1 GiB" in out and "predicted step time" in out and "CPU compiler" in out
  # fsdp=8 splits parameters and optimizer state 8 ways; data=8 replicates them
  d = data["bytes"]
  assert "peak" not in d  # --no_compile
  assert b["params"] < d["params"] / 4 and b["opt_state"] < d["opt_state"] / 4
  assert d["params"] == pytest.approx(4 * data["params"], rel=1e-6)  # f32 master weights, whole on every device
  assert fsdp["flops"] == pytest.approx(data["flops"], rel=1e-6)  # same work per device either way


def test_jaxpr_flops_counts_scans_and_convs():
  w = jnp.ones((5, 16, 16))

  def f(x):
    return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

  assert plan.closed_jaxpr_flops(jax.make_jaxpr(f)(jnp.ones((8, 16)))) == 5 * 2 * 8 * 16 * 16
  # loss and input gradient: forward + dX per layer, and with remat the recomputed forward too
  for layer, passes in ((lambda a, wi: jnp.tanh(a @ wi), 2), (jax.checkpoint(lambda a, wi: jnp.tanh(a @ wi)), 3)):
    g = jax.value_and_grad(lambda x, layer=layer: jax.lax.scan(lambda h, wi: (layer(h, wi), None), x, w)[0].sum())
    assert plan.closed_jaxpr_flops(jax.make_jaxpr(g)(jnp.ones((8, 16)))) == 5 * passes * 2 * 8 * 16 * 16

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  n = plan.closed_jaxpr_flops(jax.make_jaxpr(conv)(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))))
  assert n == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)


@pytest.mark.parametrize("fixed,slope,budget", [(10.0, 3.0, 40.0), (10.0, 3.0, 12.0), (10.0, 3.0, 9.0),
                                                (5.0, 1.0, 1e6), (10.0, 3.3, 41.0)])
def test_search_finds_largest_fitting_batch(fixed, slope, budget):
  calls = []

  def peak(n):  # slightly convex, as memory can be
    calls.append(n)
    return fixed + slope * n + 0.05 * n * n

  best, cache = plan.search(peak, 1, 64, lambda r: r, budget)
  fitting = [n for n in range(1, 65) if fixed + slope * n + 0.05 * n * n <= budget]
  assert best == (max(fitting) if fitting else None)
  assert len(calls) == len(set(calls)) <= 7 and set(cache) == set(calls)


def test_arguments(capsys):
  args = plan.parse_args(["--target", "v5e-16", "--per_device_batch", "2",
                          "--config.model.llava.text.num_hidden_layers=8"])
  assert (args.devices, args.hbm_gib, args.peak_tflops, args.mesh, args.topology) == \
      (16, 16.0, 197.0, "fsdp=16", "v5e:4x4")
  assert args.config.model.llava.text.num_hidden_layers == 8 and args.config_name == "lisa_7b.py"
  assert plan.parse_mesh("data=2,tensor=2") == {"data": 2, "fsdp": 1, "tensor": 2}
  for bad in (["--devices", "8", "--bogus"], ["--devices", "8", "--search"]):  # --search needs --hbm_gib
    with pytest.raises(SystemExit) as e:
      plan.parse_args(bad)
    assert e.value.code == 2
  config = plan.load(plan.parse_args(["--config", TINY, "--devices", "8", "--remat", "full", "--mesh", "fsdp=8",
                                      "--config.model.llava.text.num_hidden_layers=3", "--config.optim.lr=0.5"]))
  assert config.model.llava.text.num_hidden_layers == 3 and config.optim.lr == 0.5
  assert config.model.llava.text.remat_policy == "full" and config.mesh.fsdp == 8 and config.mesh.data == 1
  assert plan.parse_args(["--config", TINY, "--devices", "8"]).config.model.llava.text.num_hidden_layers != 3
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:  # an unknown key: main.py's one line, exit 2
    plan.parse_args(["--config", TINY, "--devices", "8", "--config.model.llava.text.num_layers=3"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "unknown config key --config.model.llava.text.num_layers" in err and "num_hidden_layers" in err
  assert len(err.strip().splitlines()) == 1


def _result_dict(**over):
  r = {"config": "lisa_7b.py", "platform": "tpu", "device_kind": "TPU v4", "devices": 4,
       "mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "per_device_batch": 9, "grad_accum": 1, "global_batch": 36,
       "convs": 3, "seq": 512, "mask_size": 1024, "remat": "full", "llm_layers": 32, "params": 7, "trained_params": 1,
       "bytes": {"trained_params": 1, "frozen_params": 2, "params": 3, "opt_state": 2, "batch": 1, "peak": float("inf")},
       "flops": 1e15, "xla_flops": None, "seconds": {"compile": 1.0},
       "compile_error": "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm"}
  r.update(over)
  return r


def test_compile_out_of_memory_reads_does_not_fit():
  args = plan.parse_args(["--target", "v4-8"])
  r = _result_dict()
  text = plan.report(r, args)
  assert "does not fit: the compiler ran out of memory" in text and "FITS" not in text
  assert not plan.fits(r, args)
  assert json.loads(json.dumps(r))["bytes"]["peak"] == float("inf")  # PLAN lines stay readable
  # the search treats it as any plan above the budget
  best, _ = plan.search(lambda n: _result_dict(bytes={"peak": 10.0 * n if n < 4 else float("inf")}), 1, 64,
                        lambda x: x["bytes"]["peak"], 35.0)
  assert best == 3


def test_tpu_topologies_megacore(monkeypatch):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  seen = []

  def fake(topology_name, platform, **kw):
    seen.append((topology_name, platform, kw))
    return type("Topology", (), {"devices": ["d"] * 4})()

  monkeypatch.setattr(topologies, "get_topology_desc", fake)
  for target in ("v4-8", "v5p-8", "v5e-16"):
    plan.get_devices(plan.parse_args(["--target", target, "--platform", "tpu"]))
  assert seen == [("v4:2x2x1", "tpu", {"chip_config_name": "megacore"}),
                  ("v5p:2x2x1", "tpu", {"chip_config_name": "megacore"}), ("v5e:4x4", "tpu", {})]
