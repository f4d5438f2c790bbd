"""Multi-host runs: when to call `jax.distributed.initialize`, which process writes, and which rows
of a batch each process feeds.

One process per host (a TPU VM worker, a GPU node). `initialize(mode)` runs before any JAX
computation (main.py calls it first). The mode comes from `config.distributed` when a config has that
field, else from the environment variable JAXLISA_DISTRIBUTED, else "auto":

  auto  initialize when the environment describes a multi-process run: JAX_COORDINATOR_ADDRESS
        (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or cluster auto-detection), SLURM with more
        than one task, Open MPI with more than one rank, or a multi-host Cloud TPU slice that names
        its workers (TPU_WORKER_HOSTNAMES with several hosts, MEGASCALE_COORDINATOR_ADDRESS)
  on    always (jax auto-detects coordinator, process count and id on Cloud TPU, SLURM, Open MPI)
  off   never (one process; the default outside clusters)

Process 0 alone writes what is written once per run (config.json, metrics.jsonl, TensorBoard
events, the progress bar); orbax checkpoints are written by every process, as orbax requires.
Batches (`global_batch`): a process feeds its share of the global batch (data pipelines split by
`jax.process_index()`), or the whole global batch, from which each device takes its own rows.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

MODES = ("auto", "on", "off")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def resolve_mode(mode: Any = None, env: Mapping[str, str] | None = None) -> str:
  """'auto' | 'on' | 'off' from a config value (bool or string), else JAXLISA_DISTRIBUTED, else 'auto'."""
  env = os.environ if env is None else env
  if mode is None or mode == "":
    mode = env.get("JAXLISA_DISTRIBUTED", "auto")
  if isinstance(mode, bool):
    return "on" if mode else "off"
  text = str(mode).strip().lower()
  if text == "auto":
    return "auto"
  if text in _TRUE:
    return "on"
  if text in _FALSE:
    return "off"
  raise ValueError(f"distributed mode {mode!r}: expected one of {MODES} (or a boolean)")


def _int(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env.get(key, "") or 0)
  except ValueError:
    return 0


def multi_process_env(env: Mapping[str, str] | None = None) -> str | None:
  """The environment variable that marks a multi-process run, or None."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if _int(env, "SLURM_NTASKS") > 1:
    return "SLURM_NTASKS"
  if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "OMPI_COMM_WORLD_SIZE"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return "TPU_WORKER_HOSTNAMES"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "MEGASCALE_COORDINATOR_ADDRESS"
  return None


def initialize_kwargs(env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """jax.distributed.initialize arguments the environment gives explicitly (the rest auto-detected;
  jax itself reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS)."""
  env = os.environ if env is None else env
  kw = {}
  if env.get("JAX_NUM_PROCESSES"):
    kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kw["process_id"] = int(env["JAX_PROCESS_ID"])
  return kw


_initialized = False


def initialize(mode: Any = None, env: Mapping[str, str] | None = None, init_fn=None) -> bool:
  """Call jax.distributed.initialize when `mode` (see the module docstring) asks for it; once per
  process. Returns whether this call initialized. `init_fn` replaces jax.distributed.initialize
  (tests)."""
  global _initialized  # pylint: disable=global-statement
  env = os.environ if env is None else env
  mode = resolve_mode(mode, env)
  why = "distributed=on" if mode == "on" else (multi_process_env(env) if mode == "auto" else None)
  if why is None or _initialized:
    return False
  kw = initialize_kwargs(env)
  logging.info("jax.distributed.initialize(%s) (%s)", ", ".join(f"{k}={v}" for k, v in kw.items()), why)
  (init_fn or jax.distributed.initialize)(**kw)
  _initialized = True
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """Whether this process writes the once-per-run files (process 0)."""
  return jax.process_index() == 0


def global_batch(batch: Any, sharding, global_rows: int) -> Any:
  """Host batch (a tree of [rows, ...] numpy arrays) -> global jax.Arrays sharded by `sharding`.

  A batch of `global_rows` rows on a multi-process run is the whole global batch, the same rows on
  every host (a task that does not split its data by process): each device takes its own rows
  from it. Any other batch is this process's share (`jax.make_array_from_process_local_data`)."""
  multi = jax.process_count() > 1

  def put(x):
    x = np.asarray(x)
    shape = x.shape if multi and x.shape and x.shape[0] == global_rows else None
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(put, batch)
