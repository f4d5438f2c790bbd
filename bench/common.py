"""Shared helpers for the side-by-side benchmarks: timing, a printed table, JSON results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timeit(fn: Callable[[], object], *, warmup: int = 1, iters: int = 5) -> float:
  """Median wall seconds of fn() after `warmup` calls (fn must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def parse_args(**defaults) -> argparse.Namespace:
  """The benchmark's sizes from the command line: one `--name` per keyword, typed as its default."""
  ap = argparse.ArgumentParser()
  for name, default in defaults.items():
    ap.add_argument(f"--{name}", type=type(default), default=default)
  return ap.parse_args()


def convert_reference(ref, filename: str | None = None, **kw):
  """jaxlisa's Converted of a PyTorch reference, as a user converts it: a transformers model through
  save_pretrained (filename None), any other module's state_dict as a .pth named `filename`; kw go to
  convert_checkpoint."""
  import torch  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as d:
    path = d
    if filename is None:
      ref.save_pretrained(d)
    else:
      path = os.path.join(d, filename)
      torch.save(ref.state_dict(), path)
    return convert_checkpoint(path, **kw)


def finish(name: str, rows: list[dict], extra: dict, started: float, notes: list[str]) -> str:
  """Notes (the shared-machine one first), total wall time and compile times into `extra`, then report."""
  extra["notes"] = ["2 shared CPU cores (other jobs running): timings are noisy", *notes]
  extra["total_wall_s"] = round(time.perf_counter() - started, 1)
  print("compile / first-call seconds (excluded from timings):", extra["compile_s"])
  return report(name, rows, extra)


def time_steps(step: Callable, state, batch, iters: int) -> tuple[float, list[float]]:
  """Median seconds of a compiled train step `state, metrics = step(state, batch)`, chained on its own
  state after one warmup step; and the 'loss' of every step run."""
  import jax  # pylint: disable=import-outside-toplevel
  box, losses = {"state": state}, []

  def run():
    box["state"], m = step(box["state"], batch)
    jax.block_until_ready(box["state"])
    losses.append(float(m["loss"]))

  return timeit(run, warmup=1, iters=iters), losses


def machine() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
          "jax": jax.__version__, "jax_backend": jax.default_backend(),
          "jax_devices": [str(d) for d in jax.devices()]}
  try:  # bench/gpu.py runs without PyTorch
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return info
  return {**info, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "torch_cuda": torch.cuda.is_available()}


def limit_fraction(roof: dict | None) -> str:
  """'58%' from a bench.roofline rate / bandwidth_fraction dict ('' without one)."""
  if not roof:
    return ""
  frac = roof.get("fraction_of_peak", roof.get("fraction_of_bandwidth"))
  return f"{100 * frac:.0f}%"


def report(name: str, rows: list[dict], extra: dict | None = None) -> str:
  """Print `rows` (each: case, unit, jaxlisa, torch, higher_is_better, optional jaxlisa_roofline)
  with ratios; save JSON."""
  print(f"\n{name}: jaxlisa vs PyTorch original (same machine, same run)")
  print(f"{'case':44s} {'jaxlisa':>12s} {'pytorch':>12s} {'unit':>8s} {'speedup':>8s} {'of limit':>9s}")
  for r in rows:
    hib = r.get("higher_is_better", False)
    r["speedup"] = (r["jaxlisa"] / r["torch"]) if hib else (r["torch"] / r["jaxlisa"])
    print(f"{r['case']:44s} {r['jaxlisa']:12.4g} {r['torch']:12.4g} {r['unit']:>8s} {r['speedup']:7.2f}x "
          f"{limit_fraction(r.get('jaxlisa_roofline')):>9s}")
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
               "rows": rows, **(extra or {})}, f, indent=2)
  print(f"(speedup > 1 means jaxlisa is faster; of limit: jaxlisa's fraction of the matmul peak, or for "
        f"decode of the copy bandwidth, measured in this run (bench/roofline.py); saved {path})")
  return path
