"""Mesh from the config and NamedShardings from logical axis names (MaxText style).

`config.mesh` gives axis sizes for ('data', 'fsdp', 'tensor'); one may be -1 (fill with the devices
left). `config.logical_axis_rules` maps the logical names that parameters and activations carry
(see models/layers.py) to mesh axes. Parameters get their shardings from an abstract init:
`nn.get_partition_spec(jax.eval_shape(init, rng))` -> `nn.logical_to_mesh_sharding`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from absl import logging
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dim of inputs is split over these


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve -1 in {'data': -1, 'fsdp': 1, 'tensor': 1} against the device count."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; known: {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(shape) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes "
                       f"{dict(zip(MESH_AXES, shape))} (product {known})")
    shape[fill[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"have {num_devices}")
  return tuple(shape)


def num_slices(devices: Sequence[Any]) -> int:
  """TPU slices the devices span (multi-slice over DCN); 1 for other platforms."""
  if not devices or getattr(devices[0], "platform", "") != "tpu":
    return 1
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
  """Devices laid out for a multi-slice ('data', 'fsdp', 'tensor') mesh, or None for one slice.

  Slices talk over DCN, much slower than the ICI inside a slice, so only `data` crosses them (data
  parallelism all-reduces gradients once per step): `data` = slices x data-per-slice, each slice a
  fsdp x tensor (x data-per-slice) block laid out for its ICI (`create_hybrid_device_mesh`)."""
  n = num_slices(devices)
  if n == 1:
    return None
  if shape[0] % n:
    raise ValueError(f"the devices span {n} slices: mesh data={shape[0]} must be a multiple of {n} "
                     f"(only data parallelism crosses slices); got {dict(zip(MESH_AXES, shape))}")
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  ici = (shape[0] // n,) + tuple(shape[1:])
  return mesh_utils.create_hybrid_device_mesh(ici, (n,) + (1,) * (len(shape) - 1), list(devices))


def make_mesh(sizes: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (sharding propagated by the compiler);
  across TPU slices a hybrid ICI/DCN mesh with `data` over the slices (`device_grid`)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(dict(sizes), len(devices))
  grid = device_grid(shape, devices)
  if grid is not None:
    logging.info("mesh over %d slices: data %d = %d slices x %d", num_slices(devices), shape[0],
                 num_slices(devices), shape[0] // num_slices(devices))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axis_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Config rules (tuples/lists, MaxText style) -> flax rules ((logical, mesh axes | None), ...)."""
  out = []
  for rule in rules:
    logical, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if axes else None
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"logical axis rule {logical!r} -> {axes!r}: unknown mesh axis {a!r}")
    out.append((logical, axes))
  return tuple(out)


@contextlib.contextmanager
def use(mesh: Mesh, rules):
  """Trace/run under the mesh and the logical axis rules (activation constraints need both)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree from `jax.eval_shape(init)` whose leaves may be LogicallyPartitioned.

  Boxed leaves get their logical names mapped through `rules`; plain leaves are replicated. A dim
  whose size does not divide by its mesh axes is replicated instead (with a warning), e.g. a
  vocabulary of 32003 over tensor=2 or a 1-channel conv over tensor=2.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.tree.map(lambda s, a: divisible_sharding(s, tuple(a.shape)), shardings, nn.meta.unbox(abstract_tree),
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def divisible_sharding(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """`sharding` with the mesh axes of every dim they do not divide dropped (that dim replicated)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  changed = False
  for i, axes in enumerate(spec[:len(shape)]):
    if axes is None:
      continue
    n = math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if shape[i] % n:
      logging.warning("dim %d of a %s parameter does not divide by mesh axes %s (%d): replicated", i, shape, axes, n)
      spec[i], changed = None, True
  return NamedSharding(sharding.mesh, P(*spec[:len(sharding.spec)])) if changed else sharding


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dim is split (data x fsdp)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + f" ({mesh.devices.size} devices)"
