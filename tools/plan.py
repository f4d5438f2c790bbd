#!/usr/bin/env python
"""Plan a LISA training run without the hardware: compile the real train step ahead of time for N
devices and report memory and FLOPs per device (MaxText's train_compile.py idea).

  python tools/plan.py --config configs/lisa_7b.py --devices 16 --mesh fsdp=16 --per_device_batch 1
  python tools/plan.py --config configs/lisa_7b.py --target v5e-16 --search       # largest batch that fits
  python tools/plan.py --config configs/lisa_7b.py --target v5e-16 --platform tpu --libtpu ~/.cache/libtpu
  python tools/plan.py --config configs/lisa_13b.py --target h100x8 --per_device_batch 2 --mfu 0.4
  python tools/plan.py --config configs/lisa_tiny.py --devices 8 --mesh data=8 --json

Flags are absl's and the config is ml_collections' (--config FILE.py[:ARG], --config.a.b=v), as
main.py: an unknown config key exits 2 naming the closest keys. --help lists the flags.

How: the Trainer is built with the lisa task's pure part, not prepared (no tokenizer, no data;
vocab_size and seg_token_idx resolved from the config or flags); the train state is
`jax.eval_shape` of the Trainer's init (no weights are allocated); the Trainer's jitted
`train_step` (its in/out shardings, donated state) is lowered on `ShapeDtypeStruct`s that carry
those shardings and compiled.
`memory_analysis()` of the compiled executable is per device.

Devices: `--platform cpu` (default) fakes `--devices` CPU devices with XLA_FLAGS (set before jax is
imported) and compiles with XLA's CPU compiler, a proxy. `--platform tpu` compiles with the TPU
compiler for a TPU topology (`--topology v5e:4x4`, or the --target's; v4 and v5p as megacore chips,
one device per chip as on a real slice) on this machine, with no TPU attached. It needs libtpu: the
PyPI package `libtpu` at the version jax's `tpu` extra pins (jax 0.10.2: `libtpu==0.0.42.*`, i.e.
0.0.42.1, a ~200 MB manylinux x86_64 wheel for CPython >= 3.11). Keep it out of the project's venv
(installed there, jax looks for TPUs at start):

  pip install --no-deps --target ~/.cache/libtpu 'libtpu==0.0.42.*'
  python tools/plan.py --platform tpu --libtpu ~/.cache/libtpu --target v5e-16 --per_device_batch 3

(or set JAXLISA_LIBTPU=~/.cache/libtpu). libtpu prints warnings about TPU_ACCELERATOR_TYPE and
TPU_WORKER_HOSTNAMES at start: harmless here. A TPU compile of the 7B train step takes 8-16 min on
a 2-core machine; a plan that cannot fit HBM fails to compile and is reported as "does not fit".

Batch: `--per_device_batch` images per device per microbatch; the global batch is that times
data * fsdp * grad_accum. Each image carries `--convs` conversations (default
config.data.collate.max_conversations_per_image) of `--seq` tokens and gt masks of
`--mask_size`^2 (the mask bucket: the largest original image side of the batch).

Memory per device: parameters and optimizer state from the shardings; temporaries (activations,
gradients, gathered weights, workspace) and the peak (arguments + outputs - donated + temporaries,
MaxText's total) from the compiler. FLOPs per step per device: matmul and convolution FLOPs counted
on the train step's jaxpr (scan bodies times their length, remat recomputation included: what the
chips execute), divided by the number of devices; XLA's cost_analysis is printed beside it but
counts a scanned body once (it does not scale with the number of layers). Predicted step time =
FLOPs / (peak TFLOP/s x MFU).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # jaxlisa and the config files' `configs.*` imports

# Named targets: devices, HBM GiB per device, peak dense bf16 TFLOP/s per device, a default mesh and
# the TPU topology that --platform tpu compiles for (None: no TPU compiler; CPU proxy only).
TARGETS = {
    "v4-8": dict(devices=4, hbm_gib=32.0, peak_tflops=275.0, mesh="fsdp=4", topology="v4:2x2x1"),
    "v5e-16": dict(devices=16, hbm_gib=16.0, peak_tflops=197.0, mesh="fsdp=16", topology="v5e:4x4"),
    "v5p-8": dict(devices=4, hbm_gib=95.0, peak_tflops=459.0, mesh="fsdp=4", topology="v5p:2x2x1"),
    "h100x8": dict(devices=8, hbm_gib=80.0, peak_tflops=989.0, mesh="fsdp=8", topology=None),
}

CAVEATS = {
    "cpu": ("note: memory from XLA's CPU compiler on fake devices, a proxy for TPU/GPU: it upcasts bf16 work "
            "to f32 (f32 copies of stacked bf16 weights and saved activations) and has no flash attention, "
            "so it over-estimates; keep a margin"),
    "tpu": ("note: memory from the TPU compiler (libtpu) for this topology, compiled without the chips; "
            "the runtime keeps a little HBM for itself"),
}

GiB = 2.0 ** 30


# (name, absl definer, default, help); --config is defined by jaxlisa.cli.define_config_flag.
FLAG_SPECS = (
    ("target", "enum", None, "sets --devices, --hbm_gib, --peak_tflops, a default --mesh and --topology "
     "(each may still be given)"),
    ("platform", "enum", "cpu", "compiler: cpu (fake CPU devices, a proxy) or tpu (libtpu, --topology)"),
    ("topology", "string", None, "TPU topology for --platform tpu, e.g. v5e:4x4, v4:2x2x1, v5p:2x2x1"),
    ("libtpu", "string", os.environ.get("JAXLISA_LIBTPU", ""), "directory holding the libtpu package: pip install "
     "--no-deps --target DIR 'libtpu==0.0.42.*' (the version jax 0.10.2 pins; default $JAXLISA_LIBTPU)"),
    ("devices", "integer", None, "number of (fake) devices (cpu)"),
    ("mesh", "string", None, "e.g. 'fsdp=16' or 'data=2,fsdp=4,tensor=2' (axes not named are 1); default: config.mesh"),
    ("per_device_batch", "integer", 1, "images per device per microbatch"),
    ("grad_accum", "integer", 1, "microbatches per step (default 1)"),
    ("remat", "string", None, "LLM remat policy (config.model.llava.text.remat_policy): none, full, "
     "save_dots_no_batch_dims, save_dot_except_mlp, save_qkv_proj, save_out_proj, everything"),
    ("seq", "integer", None, "tokens per conversation (default config.data.collate.model_max_length)"),
    ("convs", "integer", None, "conversations per image (default collate max_conversations_per_image)"),
    ("mask_size", "integer", None, "gt mask side (default SAM img_size)"),
    ("vocab_size", "integer", None, "when the config says -1 (from the tokenizer); default "
     "config.data.synthetic.vocab_size"),
    ("hbm_gib", "float", None, "memory per device: say whether the plan fits"),
    ("usable", "float", 0.95, "fraction of --hbm_gib a plan may use (0.95)"),
    ("search", "bool", False, "find the largest per-device batch that fits --hbm_gib (from --per_device_batch: "
     "doubling, linear prediction, bisecting)"),
    ("max_batch", "integer", 64, "--search upper bound"),
    ("peak_tflops", "float", None, "peak TFLOP/s per device: print a predicted step time"),
    ("mfu", "float", 0.4, "model FLOPs utilisation for the prediction (0.4)"),
    ("no_compile", "bool", False, "shardings and FLOPs only (no compile: no temporaries or peak)"),
    ("json", "bool", False, "also print one line 'PLAN {json}' per plan"),
)
ENUMS = {"target": sorted(TARGETS), "platform": ["cpu", "tpu"]}
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "lisa_7b.py")


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  for name, kind, default, help_string in FLAG_SPECS:
    if name in flag_values:
      continue
    if kind == "enum":
      flags.DEFINE_enum(name, default, ENUMS[name], help_string, flag_values=flag_values)
    else:
      getattr(flags, f"DEFINE_{kind}")(name, default, help_string, flag_values=flag_values)


def _fail(msg: str) -> None:
  sys.stderr.write(f"plan.py: error: {msg}\n")
  sys.exit(2)


def parse_args(argv, flag_values=None):
  """argv (without the program name) -> the flags' values as a namespace, with `config` the
  ConfigDict of --config and its --config.a.b=v overrides (as main.py: an unknown key exits 2 with
  the closest keys). A --target fills in the flags not given. flag_values: where the flags are
  defined and parsed (default a fresh FlagValues, so each call starts from the defaults)."""
  import types  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from jaxlisa import cli  # pylint: disable=import-outside-toplevel
  fv = flags.FlagValues() if flag_values is None else flag_values
  argv, spec, _ = cli.define_config_flag(["plan.py", *argv], DEFAULT_CONFIG, fv)
  _define_flags(fv)
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):  # exit 0 (absl's --help exits 1)
    fv.mark_as_parsed()
    print(__doc__)
    print("flags:")
    print(f"  --config: config file, 'path.py' or 'path.py:arg' (get_config(arg)); any field: --config.a.b=VALUE\n"
          f"    (default: {os.path.relpath(DEFAULT_CONFIG)}; this run: {os.path.relpath(spec)})")
    print("\n".join(line for line in fv.module_help(sys.modules[__name__]).splitlines()
                    if line.startswith(" ")))  # without the module-name header
    sys.exit(0)
  try:
    rest = fv(argv)
  except flags.Error as e:
    _fail(f"{e} (overrides are --config.a.b=value; --help lists the flags)")
  if len(rest) > 1:
    _fail(f"unexpected arguments: {' '.join(rest[1:])}")
  args = types.SimpleNamespace(**{name: fv[name].value for name, *_ in FLAG_SPECS}, config=fv.config)
  if args.target:
    t = TARGETS[args.target]
    args.devices = args.devices or t["devices"]
    args.hbm_gib = args.hbm_gib or t["hbm_gib"]
    args.peak_tflops = args.peak_tflops or t["peak_tflops"]
    args.mesh = args.mesh or t["mesh"]
    args.topology = args.topology or t["topology"]
  if args.platform == "tpu" and not args.topology:
    _fail("--platform tpu needs --topology (or a TPU --target)")
  if args.platform == "cpu" and not args.devices:
    _fail("give --devices N (or --target)")
  if args.search and not args.hbm_gib:
    _fail("--search needs --hbm_gib (or --target)")
  if args.search and args.no_compile:
    _fail("--search needs the compiler")
  args.config_name = os.path.basename(spec)
  return args


def setup_platform(args) -> None:
  """Before jax is imported: fake CPU devices, or make libtpu importable for TPU AOT compiles."""
  os.environ["JAX_PLATFORMS"] = "cpu"  # never initialise a real accelerator backend
  if args.platform == "tpu":
    if args.libtpu:
      sys.path.insert(0, os.path.expanduser(args.libtpu))
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips to guard: plans may run side by side
    return
  n = args.devices
  if "jax" in sys.modules:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.device_count() != n:
      raise RuntimeError(f"jax already imported with {jax.device_count()} devices, need {n}")
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def get_devices(args):
  import jax  # pylint: disable=import-outside-toplevel
  if args.platform == "cpu":
    return jax.devices()
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    # v4 and v5p chips hold two TensorCores that run as one device (megacore), as on a real slice
    kw = {"chip_config_name": "megacore"} if args.topology.split(":")[0] in ("v4", "v5p") else {}
    return topologies.get_topology_desc(topology_name=args.topology, platform="tpu", **kw).devices
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"cannot get TPU topology {args.topology!r} ({type(e).__name__}: {e}); --platform tpu "
                     "needs libtpu (see --help: --libtpu)") from None


# ------------------------------------------------------------------------------------------------
# Config.

def parse_mesh(text: str) -> dict[str, int]:
  out = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, (s.strip() for s in text.split(","))):
    k, _, v = part.partition("=")
    if k not in out or not v:
      raise SystemExit(f"--mesh: bad entry {part!r}; use data=N,fsdp=N,tensor=N")
    out[k] = int(v)
  return out


def load(args):
  """args.config with --mesh and --remat applied (remat_policy may be a key the config lacks)."""
  config = args.config
  with config.unlocked():
    if args.mesh:
      config.mesh.update(parse_mesh(args.mesh))
    if args.remat:
      config.model.llava.text.remat_policy = args.remat
  return config


# ------------------------------------------------------------------------------------------------
# FLOPs on the jaxpr.

def _sub_jaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr


def jaxpr_flops(jaxpr) -> float:
  """Matmul + convolution FLOPs of a jaxpr (global shapes): 2 x MACs; scan bodies count `length`
  times, cond the costliest branch, while loops once (trip count unknown)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
      per_out = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
  return total


def closed_jaxpr_flops(closed) -> float:
  jaxpr = closed.jaxpr
  try:  # drop what no output needs (XLA would too)
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=import-outside-toplevel
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  except Exception:  # pylint: disable=broad-except
    pass
  return jaxpr_flops(jaxpr)


# ------------------------------------------------------------------------------------------------
# Planning.

def shape_model_config(config, vocab_size: int | None = None):
  """LisaConfig from config.model alone (no tokenizer, no checkpoint): vocab_size -1 ->
  `vocab_size` or config.data.synthetic.vocab_size, seg_token_idx -1 -> vocab_size - 1."""
  from jaxlisa.models.lisa import LisaConfig  # pylint: disable=import-outside-toplevel
  d = config.model.to_dict()
  text = dict(d["llava"]["text"])
  if text.get("vocab_size", -1) == -1:
    text["vocab_size"] = int(vocab_size or config.data.synthetic.vocab_size)
  d["llava"] = {**d["llava"], "text": text}
  if d.get("seg_token_idx", -1) == -1:
    d["seg_token_idx"] = text["vocab_size"] - 1
  return LisaConfig.from_dict(d)


def shape_task(config, workdir: str, vocab_size: int | None = None):
  """The lisa task's pure part (init, loss, collate shapes) at shape_model_config's architecture:
  not prepared (no data, no tokenizer), and its pretrained() is never called here."""
  from jaxlisa.tasks import lisa as lisa_task  # pylint: disable=import-outside-toplevel
  return lisa_task.Task(config, workdir, model_config=shape_model_config(config, vocab_size))


def tree_bytes_per_device(abstract, shardings) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  leaves, shards = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
  assert len(leaves) == len(shards), (len(leaves), len(shards))
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shards))


def plan(config, per_device_batch: int = 1, *, grad_accum: int = 1, seq: int | None = None,
         convs: int | None = None, mask_size: int | None = None, vocab_size: int | None = None,
         devices=None, compile: bool = True, name: str = "") -> dict:  # pylint: disable=redefined-builtin
  """Trace (and compile) config's train step for `devices` (default jax.devices()): memory per
  device from the shardings and the compiler, FLOPs per device from the jaxpr."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlisa import parallel  # pylint: disable=import-outside-toplevel
  from jaxlisa.data import lisa_collate  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.trainer import Trainer  # pylint: disable=import-outside-toplevel

  devices = list(jax.devices() if devices is None else devices)
  config = config.copy_and_resolve_references()
  mesh_shape = parallel.mesh_shape(config.mesh.to_dict(), len(devices))
  shards = mesh_shape[0] * mesh_shape[1]  # data x fsdp
  config.grad_accum = grad_accum
  config.batch_size = per_device_batch * shards * grad_accum
  workdir = tempfile.mkdtemp(prefix="jaxlisa_plan_")
  seconds, oom = {}, None
  try:
    t0 = time.time()
    task = shape_task(config, workdir, vocab_size)
    trainer = Trainer(config, workdir, task=task, devices=devices)
    with parallel.use(trainer.mesh, trainer.rules):
      abstract = jax.eval_shape(trainer._init_state, trainer.rng)  # pylint: disable=protected-access
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                         trainer.state_sharding)
    mc = task.model_config
    seq = seq or int(config.data.collate.model_max_length)
    mask_size = mask_size or mc.sam.img_size
    shapes = lisa_collate.batch_shapes(task.collate, seq, mask_size, convs=convs)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=trainer.batch_sharding)
             for k, (shape, dt) in shapes.items()}
    seconds["setup"] = time.time() - t0
    t0 = time.time()
    with parallel.use(trainer.mesh, trainer.rules):
      traced = trainer.train_step.trace(state, batch)
      flops = closed_jaxpr_flops(traced.jaxpr) / len(devices)
      seconds["trace"] = time.time() - t0
      mem = xla_flops = None
      if compile:
        t0 = time.time()
        lowered = traced.lower()
        seconds["lower"] = time.time() - t0
        t0 = time.time()
        try:
          compiled = lowered.compile()
        except Exception as e:  # pylint: disable=broad-except
          # the TPU compiler refuses a program that cannot fit HBM: that plan does not fit
          if not any(m in str(e) for m in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")):
            raise
          compiled, oom = None, " ".join(str(e).split())[:400]
        seconds["compile"] = time.time() - t0
        if compiled is not None:
          mem = compiled.memory_analysis()
          cost = compiled.cost_analysis()
          cost = cost[0] if isinstance(cost, (list, tuple)) else cost
          xla_flops = float((cost or {}).get("flops", 0.0))
    trainer.close()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  sh = trainer.state_sharding
  trained_b = tree_bytes_per_device(abstract.trainable, sh.trainable)
  frozen_b = tree_bytes_per_device(abstract.frozen, sh.frozen)
  opt_b = tree_bytes_per_device(abstract.opt_state, sh.opt_state)
  batch_b = sum(math.prod(trainer.batch_sharding.shard_shape(shape)) * np.dtype(dt).itemsize
                for shape, dt in shapes.values())
  mem_b = {"peak": math.inf} if oom else {}
  if mem is not None:
    # MaxText's total: arguments + outputs - aliased (donated) + temporaries. The CPU backend's own
    # peak_memory_in_bytes leaves temporaries out (it reads below temp_size) and TPU has none.
    total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes)
    mem_b = {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
             "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
             "generated_code": int(mem.generated_code_size_in_bytes), "peak": total}
  text = mc.llava.text
  return {
      "config": name, "platform": devices[0].platform, "device_kind": getattr(devices[0], "device_kind", ""),
      "devices": len(devices), "mesh": dict(zip(parallel.MESH_AXES, mesh_shape)),
      "per_device_batch": per_device_batch, "grad_accum": grad_accum, "global_batch": config.batch_size,
      "convs": shapes["input_ids"][0][1], "seq": seq, "mask_size": mask_size,
      "remat": text.remat_policy, "llm_layers": text.num_hidden_layers,
      "params": trainer.num_params, "trained_params": trainer.num_trainable,
      "bytes": {"trained_params": trained_b, "frozen_params": frozen_b, "params": trained_b + frozen_b,
                "opt_state": opt_b, "batch": batch_b, **mem_b},
      "flops": flops, "xla_flops": xla_flops, "compile_error": oom,
      "seconds": {k: round(v, 2) for k, v in seconds.items()},
  }


def _gib(b: float) -> str:
  return f"{b / GiB:8.3f} GiB"


def step_time(r: dict, peak_tflops: float, mfu: float) -> float:
  return r["flops"] / (peak_tflops * 1e12 * mfu)


def report(r: dict, args) -> str:
  b, s = r["bytes"], r["seconds"]
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"plan: {r['config']}  {r['devices']} x {r['device_kind'] or r['platform']} ({mesh})",
      f"  batch: {r['per_device_batch']} image(s)/device/microbatch x {r['grad_accum']} microbatch(es) = "
      f"{r['global_batch']} images/step; {r['convs']} conversations x {r['seq']} tokens per image; "
      f"masks {r['mask_size']}^2; LLM remat {r['remat']}, {r['llm_layers']} layers",
      f"  params: {r['params']:,} ({r['trained_params']:,} trained)",
      "  per device:",
      f"    parameters      {_gib(b['params'])}  (trained {b['trained_params'] / GiB:.3f}, frozen "
      f"{b['frozen_params'] / GiB:.3f})",
      f"    optimizer state {_gib(b['opt_state'])}",
      f"    batch           {_gib(b['batch'])}",
  ]
  if r.get("compile_error"):
    lines.append(f"    peak            does not fit: the compiler ran out of memory ({r['compile_error'][:300]})")
  elif "peak" in b:
    lines += [
        f"    temporaries     {_gib(b['temp'])}  (activations, gradients, gathered weights, workspace)",
        f"    peak            {_gib(b['peak'])}  (arguments + outputs - donated + temporaries)",
    ]
  xla = f"; XLA cost_analysis {r['xla_flops']:.4g}, scan bodies once" if r.get("xla_flops") else ""
  lines.append(f"  FLOPs per step per device: {r['flops']:.4g} (matmuls + convs incl. remat recompute{xla})")
  lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()))
  if args.hbm_gib and "peak" in b and not r.get("compile_error"):
    budget = args.hbm_gib * GiB * args.usable
    verdict = "FITS" if b["peak"] <= budget else "DOES NOT FIT"
    lines.append(f"  {verdict} in {args.hbm_gib:g} GiB x {args.usable:g} usable = {budget / GiB:.2f} GiB "
                 f"(peak is {b['peak'] / budget:.0%} of it)")
  if args.peak_tflops and r["flops"]:
    t = step_time(r, args.peak_tflops, args.mfu)
    lines.append(f"  predicted step time: {t:.3f} s at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s "
                 f"({r['global_batch'] / t:.2f} images/s, {r['global_batch'] / t / r['devices']:.2f} per device)")
  if "peak" in b:
    lines.append("  " + CAVEATS[r["platform"] if r["platform"] in CAVEATS else "cpu"])
  return "\n".join(lines)


def fits(r: dict, args) -> bool:
  return r["bytes"]["peak"] <= args.hbm_gib * GiB * args.usable


def search(probe_fn, start: int, max_batch: int, peak_fn, budget: float) -> tuple[int | None, dict]:
  """Largest n in [start, max_batch] with peak_fn(probe_fn(n)) <= budget (peak assumed increasing
  in n). Doubles from `start` and bisects; once two sizes are known it tries the size the line
  through them predicts (memory is close to linear in the batch), which usually ends the search
  in four compiles. Returns (n or None, {n: result})."""
  cache = {}

  def ok(n):
    if n not in cache:
      cache[n] = probe_fn(n)
    return peak_fn(cache[n]) <= budget

  if not ok(start):
    return None, cache
  lo, fail = start, None  # lo fits; fail: the smallest size known not to fit
  while fail is None or fail - lo > 1:
    upper = max_batch if fail is None else fail - 1
    if lo >= upper:
      break
    cand = lo * 2 if fail is None else (lo + fail) // 2
    other = [n for n in cache if n != lo]
    if other:  # the line through lo and the nearest other probe
      n2 = min(other, key=lambda n: abs(n - lo))
      slope = (peak_fn(cache[n2]) - peak_fn(cache[lo])) / (n2 - lo)
      if slope > 0:
        cand = lo + int((budget - peak_fn(cache[lo])) // slope)
        cand = cand if cand > lo else lo + 1
    cand = max(lo + 1, min(cand, upper))
    if ok(cand):
      lo = cand
    else:
      fail = cand
  return lo, cache


def main(argv=None) -> int:
  """Plan from argv (default sys.argv[1:]); the exit status."""
  return run(parse_args(sys.argv[1:] if argv is None else argv))


def run(args) -> int:
  setup_platform(args)
  config = load(args)
  devices = get_devices(args)
  kw = dict(grad_accum=args.grad_accum, seq=args.seq, convs=args.convs, mask_size=args.mask_size,
            vocab_size=args.vocab_size, devices=devices, name=args.config_name)

  def emit(r):
    if args.json:
      print("PLAN " + json.dumps(r), flush=True)

  if args.search:
    def probe(n):
      r = plan(config, n, **kw)
      print(f"search: {n} image(s)/device: peak {r['bytes']['peak'] / GiB:.3f} GiB -> "
            f"{'fits' if fits(r, args) else 'does not fit'} (compile {r['seconds']['compile']:.0f} s)", flush=True)
      emit(r)
      return r

    best, cache = search(probe, args.per_device_batch, args.max_batch, lambda r: r["bytes"]["peak"],
                         args.hbm_gib * GiB * args.usable)
    if best is None:
      print(f"search: {args.per_device_batch} image(s) per device do not fit {args.hbm_gib:g} GiB x {args.usable:g}; "
            "try more fsdp devices, tensor parallelism (--mesh ...,tensor=N), --remat full, a shorter --seq, "
            "fewer --convs, a smaller --mask_size or bf16 master weights (--config.master_dtype=bfloat16)")
      print(report(cache[args.per_device_batch], args))
      return 1
    print(f"search: largest per-device batch that fits: {best}")
    print(report(cache[best], args))
    return 0
  r = plan(config, args.per_device_batch, compile=not args.no_compile, **kw)
  print(report(r, args), flush=True)
  emit(r)
  return 0


def _fake_devices_early(argv) -> None:
  """The config file (parsed with the flags) imports models/ and so jax: the CPU proxy's device count
  must be in XLA_FLAGS before that, so read --devices / --target from argv here."""
  opts = {}
  for i, a in enumerate(argv):
    for name in ("devices", "target", "platform"):
      if a == f"--{name}" and i + 1 < len(argv):
        opts[name] = argv[i + 1]
      elif a.startswith(f"--{name}="):
        opts[name] = a.split("=", 1)[1]
  if opts.get("platform", "cpu") != "cpu" or "jax" in sys.modules:
    return
  n = opts.get("devices") or (TARGETS.get(opts.get("target", ""), {}).get("devices"))
  if n and str(n).isdigit():
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _absl_main() -> None:
  """As main.py: absl's app.run, with the flags (and absl's own: --help, logging) in absl's FLAGS."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  _fake_devices_early(sys.argv[1:])
  parsed = {}

  def parser(argv):
    parsed["args"] = parse_args(argv[1:], flags.FLAGS)
    return argv[:1]

  app.run(lambda _: sys.exit(run(parsed["args"])), flags_parser=parser)


if __name__ == "__main__":
  _absl_main()
