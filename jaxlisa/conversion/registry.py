"""Model families known to the converter: how to recognise, configure, map and build each.

A family module (e.g. `conversion/llm.py`) calls `register(Family(...))` at import. Everything
else (the CLI, `load_pretrained`, detection) goes through this table.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import Rule


@dataclasses.dataclass(frozen=True)
class Family:
  """name: registry key. detect(config_json, keys) -> bool (config may be None).
  config_from_hf(config_json | None, source) -> model config (a dataclass with to_dict/from_dict).
  config_cls: the model config class (to rebuild it from JSON).
  rules(model_config, keys) -> key map; export_rules(model_config) -> key map for export (HF names).
  build(model_config) -> linen module; dummy_inputs(model_config) -> args for module.init.
  skip: regexes of source keys that are known buffers; keep_fp32: param paths kept in fp32.
  verify: optional (src_dir, module, params, model_config) -> max abs logit diff vs PyTorch.
  open_source: optional (src) -> TensorSource, for a family whose tensors are not all under src
    (LISA: the CLIP tower lives in its own directory); default open_checkpoint(src).
  """
  name: str
  detect: Callable[[dict | None, Sequence[str]], bool]
  config_from_hf: Callable[[dict | None, Any], Any]
  config_cls: type
  rules: Callable[[Any, Sequence[str]], Sequence[Rule]]
  build: Callable[[Any], nn.Module]
  dummy_inputs: Callable[[Any], tuple]
  skip: tuple[str, ...] = ()
  keep_fp32: tuple[str, ...] = ()
  export_rules: Callable[[Any], Sequence[Rule]] | None = None
  verify: Callable[..., float] | None = None
  priority: int = 0  # higher is tried first in detection
  open_source: Callable[[str], Any] | None = None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  _FAMILIES[family.name] = family
  return family


def _load_all():
  # Importing the family modules registers them.
  from jaxlisa.conversion import llm  # pylint: disable=import-outside-toplevel,unused-import
  for extra in ("vision", "sam", "llava", "lisa", "blip2", "blip"):
    try:
      __import__(f"jaxlisa.conversion.{extra}")
    except ModuleNotFoundError as e:
      if e.name != f"jaxlisa.conversion.{extra}":
        raise


def families() -> dict[str, Family]:
  _load_all()
  return dict(_FAMILIES)


def get_family(name: str) -> Family:
  fams = families()
  if name not in fams:
    raise CheckpointError(f"unknown family {name!r}; known families: {sorted(fams)}")
  return fams[name]


def detect_family(config_json: dict | None, keys: Sequence[str]) -> Family:
  """The family whose detector accepts this checkpoint (config.json first, then key patterns)."""
  for fam in sorted(families().values(), key=lambda f: -f.priority):
    if fam.detect(config_json, keys):
      return fam
  hint = ""
  if config_json:
    hint = f" (config.json: model_type={config_json.get('model_type')!r}, " \
           f"architectures={config_json.get('architectures')})"
  raise CheckpointError(f"cannot tell which model family this checkpoint is{hint}; "
                        f"sample keys: {list(keys)[:5]}; pass --family, one of {sorted(families())}")


def abstract_params(family: Family, model_config) -> dict:
  """Shapes of the model's parameters, without allocating them."""
  module = family.build(model_config)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *family.dummy_inputs(model_config)))
  return nn.meta.unbox(shapes["params"])


def any_key(keys: Sequence[str], pattern: str) -> bool:
  rx = re.compile(pattern)
  return any(rx.search(k) for k in keys)
