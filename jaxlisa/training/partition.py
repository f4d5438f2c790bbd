"""Parameter partitioning: which leaves train, the trained / frozen subtrees, their dtypes and sizes.

Params are nested dicts; a '/'-joined path (`llava/language_model/layers/self_attn/q_proj/kernel`)
names a leaf. `trainable_mask` turns config.trainable / config.frozen regexes into a bool tree,
`split` / `merge` cut params into disjoint trained and frozen subtrees and put them back.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util


def path_str(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def trainable_mask(params: Any, trainable: Sequence[str] = (".*",), frozen: Sequence[str] = ()) -> Any:
  """Tree of bools like `params`: True where '/'-joined path fully matches a `trainable` regex and
  no `frozen` regex. A regex that matches no parameter is an error (it is almost always a typo)."""
  flat = traverse_util.flatten_dict(params)
  paths = {k: path_str(k) for k in flat}
  for pattern in (*trainable, *frozen):
    if not any(re.fullmatch(pattern, p) for p in paths.values()):
      sample = ", ".join(sorted(paths.values())[:8])
      raise ValueError(f"trainable/frozen regex {pattern!r} matches no parameter (paths look like: {sample}, ...)")
  def is_trained(p):
    return any(re.fullmatch(t, p) for t in trainable) and not any(re.fullmatch(f, p) for f in frozen)
  return traverse_util.unflatten_dict({k: is_trained(p) for k, p in paths.items()})


def split(params: Any, mask: Any) -> tuple[dict, dict]:
  """(trained, frozen) nested dicts holding the leaves where `mask` is True / False."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trained = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def merge(trained: Any, frozen: Any) -> dict:
  """Inverse of `split`."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trained))
  return traverse_util.unflatten_dict(flat)


def cast_floats(tree: Any, dtype: str | None) -> Any:
  """Cast floating leaves (boxed or not) to `dtype`; '' or None keeps them."""
  if not dtype:
    return tree
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))


