"""Declarative key maps: source tensor name <-> jaxlisa parameter path, with per-key transforms.

A `Rule` pairs a source template and a destination template, e.g.

    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/self_attn/q_proj/kernel", LINEAR)

`{name}` in the source matches a decimal index. In the destination a segment that is only
`{i}` means "stack along a leading axis" when layers are scanned (`layers/self_attn/...` with
index i at axis 0), or becomes part of the previous segment (`layers_3/self_attn/...`) when they
are not. Transforms know their inverse, so the same table exports back to PyTorch names.

`convert_state(source, rules, expected)` streams tensors one at a time into preallocated
(stacked) numpy arrays and checks the result against the model's abstract parameter tree:
every missing, unexpected or mis-shaped key is reported by name in one `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxlisa.conversion.checkpoint_io import CheckpointError

Path = tuple[str, ...]


# ----------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Transform:
  """fwd(torch_array, target_shape) -> jax_array; inv(jax_array) -> torch_array."""
  name: str
  fwd: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  inv: Callable[[np.ndarray], np.ndarray]


def _reshape_to(x, shape):
  if x.shape == tuple(shape):
    return x
  if math.prod(x.shape) != math.prod(shape):
    raise ValueError(f"cannot reshape {x.shape} to {tuple(shape)}")
  return x.reshape(shape)


IDENTITY = Transform("identity", lambda x, s: _reshape_to(x, s), lambda y: y)
FLAT = Transform("flat", lambda x, s: _reshape_to(x, s), lambda y: y.reshape(-1))


def linear(n_in: int = 1) -> Transform:
  """torch Linear weight [out, in] -> kernel [*in_dims, *out_dims] (first n_in dims are input)."""
  def inv(y):
    n = math.prod(y.shape[:n_in])
    return np.ascontiguousarray(y.reshape(n, -1).T)
  return Transform(f"linear{n_in}", lambda x, s: _reshape_to(np.ascontiguousarray(x.T), s), inv)


LINEAR = linear(1)
LINEAR_IN2 = linear(2)  # e.g. o_proj kernel [heads, head_dim, embed]

# Conv2d OIHW -> HWIO
CONV = Transform("conv", lambda x, s: _reshape_to(np.ascontiguousarray(x.transpose(2, 3, 1, 0)), s),
                 lambda y: np.ascontiguousarray(y.transpose(3, 2, 0, 1)))
# ConvTranspose2d weight [in, out, kh, kw] -> flax ConvTranspose(transpose_kernel=True) HWOI... see sam.py
CONV_TRANSPOSE = Transform(
    "conv_transpose", lambda x, s: _reshape_to(np.ascontiguousarray(x.transpose(2, 3, 1, 0)), s),
    lambda y: np.ascontiguousarray(y.transpose(3, 2, 0, 1)))


# ----------------------------------------------------------------------------- rules
_FIELD = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One source tensor -> one (or, with `split`, several) destination parameters.

  src:   source key template ("model.layers.{i}.mlp.up_proj.weight").
  dst:   destination path template ("layers/{i}/mlp/up_proj/kernel"), or a tuple of them
         when `split` cuts one source tensor into parts (fused qkv); an empty tuple marks a
         known tensor that is not a parameter here (e.g. a tied lm_head copy) and is dropped;
         an empty string in a split tuple drops that part (exported back as zeros).
  t:     transform applied to each part.
  split: (axis, sizes) of the source tensor, for fused tensors; None otherwise.
  """
  src: str
  dst: str | tuple[str, ...]
  t: Transform = IDENTITY
  split: tuple[int, tuple[int, ...]] | None = None

  @property
  def regex(self) -> re.Pattern:
    pat = re.escape(self.src)
    pat = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pat)
    return re.compile("^" + pat + "$")

  @property
  def dsts(self) -> tuple[str, ...]:
    return (self.dst,) if isinstance(self.dst, str) else tuple(self.dst)


def linear_rules(src: str, dst: str, t: Transform = LINEAR) -> list[Rule]:
  """A torch Linear (`{src}.weight` [out, in], `{src}.bias`) -> a DenseGeneral (`{dst}/kernel` by `t`,
  `{dst}/bias` in whatever feature shape the module has: [D], or [N, H] for attention projections)."""
  return [Rule(f"{src}.weight", f"{dst}/kernel", t), Rule(f"{src}.bias", f"{dst}/bias", FLAT)]


def norm_rules(src: str, dst: str) -> list[Rule]:
  """A torch LayerNorm (`{src}.weight`, `{src}.bias`) -> `{dst}/scale`, `{dst}/bias`."""
  return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def resolve_dst(template: str, fields: Mapping[str, str], scan: bool) -> tuple[Path, tuple[int, ...]]:
  """Destination template -> (param path, stack indices). See module docstring."""
  path: list[str] = []
  index: list[int] = []
  for seg in template.split("/"):
    m = _FIELD.fullmatch(seg)
    if m:
      val = int(fields[m.group(1)])
      if scan:
        index.append(val)
      else:
        path[-1] = f"{path[-1]}_{val}"
    else:
      path.append(_FIELD.sub(lambda mm: fields[mm.group(1)], seg))
  return tuple(path), tuple(index)


def flatten_tree(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten_tree(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out


def _fmt(path: Path) -> str:
  return "/".join(path)


def convert_state(source, rules: Sequence[Rule], expected: Mapping[str, Any], *,
                  scan: bool = True, dtype: Any = np.float32,
                  skip: Iterable[str] = (), keep_dtype: Iterable[str] = (),
                  progress: Callable[[str], None] | None = None) -> dict:
  """Convert `source` (a TensorSource or {key: array}) into a param tree shaped like `expected`.

  expected: nested dict of arrays / ShapeDtypeStructs (the model's abstract params).
  skip: regexes of source keys that are known non-parameters (buffers) and are ignored.
  keep_dtype: regexes of destination paths kept in float32 whatever `dtype` is.
  Raises CheckpointError naming every unmatched source key, missing destination and shape
  mismatch.
  """
  exp = {p: tuple(v.shape) for p, v in flatten_tree(expected).items()}
  compiled = [(r, r.regex) for r in rules]
  skip_re = [re.compile(s) for s in skip]
  keep_re = [re.compile(s) for s in keep_dtype]
  keys = list(source.keys())
  out: dict[Path, np.ndarray] = {}
  filled: dict[Path, set] = {}
  unexpected, bad_shape, unmapped = [], [], []

  def target_dtype(path):
    return np.float32 if any(r.search(_fmt(path)) for r in keep_re) else dtype

  for key in keys:
    for rule, rx in compiled:
      m = rx.match(key)
      if m:
        break
    else:
      if not any(s.search(key) for s in skip_re):
        unmapped.append(key)
      continue
    if not rule.dsts:
      continue
    x = source.get(key) if hasattr(source, "get") else source[key]
    x = np.asarray(x)
    parts = [x] if rule.split is None else np.split(
        x, np.cumsum(rule.split[1])[:-1].tolist(), axis=rule.split[0])
    for dst_t, part in zip(rule.dsts, parts):
      if not dst_t:  # a split part with an empty destination is dropped (e.g. HF BLIP-2's zero k bias)
        continue
      path, idx = resolve_dst(dst_t, m.groupdict(), scan)
      if path not in exp:
        unexpected.append(f"{key} -> {_fmt(path)}")
        continue
      full = exp[path]
      leaf_shape = full[len(idx):]
      try:
        y = rule.t.fwd(part, leaf_shape)
      except ValueError as e:
        bad_shape.append(f"{key} {tuple(part.shape)} -> {_fmt(path)} {leaf_shape}: {e}")
        continue
      if tuple(y.shape) != tuple(leaf_shape):
        bad_shape.append(f"{key} {tuple(part.shape)} -> {_fmt(path)} {leaf_shape}")
        continue
      if any(i >= n for i, n in zip(idx, full)):
        unexpected.append(f"{key} -> {_fmt(path)}[{idx}] (index beyond {full[:len(idx)]})")
        continue
      if path not in out:
        out[path] = np.zeros(full, target_dtype(path)) if idx else None
        filled[path] = set()
      if idx:
        out[path][idx] = y.astype(out[path].dtype)
      else:
        out[path] = y.astype(target_dtype(path))
      filled[path].add(idx)
    if progress:
      progress(key)

  missing = []
  for path, shape in exp.items():
    if path not in out:
      missing.append(_fmt(path))
      continue
    n_idx = len(next(iter(filled[path])))
    want = math.prod(shape[:n_idx]) if n_idx else 1
    if len(filled[path]) != want:
      got = sorted(filled[path])
      missing.append(f"{_fmt(path)} (only {len(got)} of {want} stacked slices: got {got[:8]}...)")
  problems = []
  if unmapped:
    problems.append(f"unexpected source keys ({len(unmapped)}): {unmapped[:20]}")
  if unexpected:
    problems.append(f"keys mapped outside the model ({len(unexpected)}): {unexpected[:20]}")
  if bad_shape:
    problems.append(f"shape mismatches ({len(bad_shape)}): {bad_shape[:20]}")
  if missing:
    problems.append(f"missing parameters ({len(missing)}): {missing[:20]}")
  if problems:
    raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
  return unflatten_tree(out)


def export_state(params: Mapping[str, Any], rules: Sequence[Rule], *, scan: bool = True) -> dict[str, np.ndarray]:
  """Inverse of `convert_state`: param tree -> {source key: numpy array} (PyTorch layout)."""
  flat = {p: np.asarray(v) for p, v in flatten_tree(params).items()}
  out: dict[str, np.ndarray] = {}
  used: set[Path] = set()
  for rule in rules:
    if not rule.dsts:
      continue
    fields = sorted(set(_FIELD.findall(rule.src)))
    # enumerate index values from the params present
    for combo in _index_combos(rule, flat, scan, fields):
      parts = []
      for dst_t in rule.dsts:
        if not dst_t:  # dropped split part: exported as zeros shaped like its neighbour
          parts.append(None)
          continue
        path, idx = resolve_dst(dst_t, combo, scan)
        if path not in flat:
          parts = None
          break
        used.add(path)
        parts.append(rule.t.inv(flat[path][idx] if idx else flat[path]))
      if not parts:
        continue
      like = next(p for p in parts if p is not None)
      parts = [np.zeros_like(like) if p is None else p for p in parts]
      x = parts[0] if rule.split is None else np.concatenate(parts, axis=rule.split[0])
      out[rule.src.format(**combo)] = x
  leftover = sorted(_fmt(p) for p in flat if p not in used)
  if leftover:
    raise CheckpointError(f"parameters with no export rule: {leftover[:20]}")
  return out


def _index_combos(rule: Rule, flat: Mapping[Path, np.ndarray], scan: bool, fields: list[str]):
  if not fields:
    yield {}
    return
  # Probe with the first destination; stacked axes give the ranges, unscanned names the values.
  dst_t = rule.dsts[0]
  # Only whole-segment fields are stacked; inline ones (`blocks_{i}`) are read off the names.
  if scan and any(_FIELD.fullmatch(seg) for seg in dst_t.split("/")):
    probe, _ = resolve_dst(dst_t, {f: "0" for f in fields}, True)
    if probe not in flat:
      return
    dst_fields = _FIELD.findall(dst_t)
    ranges = [range(n) for n in flat[probe].shape[:len(dst_fields)]]
    import itertools  # pylint: disable=import-outside-toplevel
    for vals in itertools.product(*ranges):
      yield {f: str(v) for f, v in zip(dst_fields, vals)}
  else:
    pat = re.escape(dst_t)
    pat = re.sub(r"/\\\{(\w+)\\\}", r"_(?P<\1>\\d+)", pat)
    pat = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pat)
    rx = re.compile("^" + pat + "$")
    seen = set()
    for p in flat:
      m = rx.match(_fmt(p))
      if m and tuple(sorted(m.groupdict().items())) not in seen:
        seen.add(tuple(sorted(m.groupdict().items())))
        yield m.groupdict()
