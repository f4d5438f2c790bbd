"""What a converter family is (`Family`: recognise, configure, map and build one model family),
what converting yields (`Converted`), and the helpers every family module uses. The table of
all families is conversion/families.py; each family module (llm.py, vision.py, ...) lists its own
in a module-level `FAMILIES` tuple.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.keymap import Rule

DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class Family:
  """name: the family table's key. detect(config_json, keys) -> bool (config may be None).
  config_from_hf(config_json | None, source) -> model config (a dataclass with to_dict/from_dict).
  config_cls: the model config class (to rebuild it from JSON).
  rules(model_config, keys) -> key map; export_rules(model_config) -> key map for export (HF names).
  build(model_config) -> linen module (initialised on model_config.dummy_inputs()).
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
  skip: tuple[str, ...] = ()
  keep_fp32: tuple[str, ...] = ()
  export_rules: Callable[[Any], Sequence[Rule]] | None = None
  verify: Callable[..., float] | None = None
  priority: int = 0  # higher is tried first in detection
  open_source: Callable[[str], Any] | None = None


@dataclasses.dataclass
class Converted:
  family: str
  config: Any  # the model config dataclass
  params: dict  # nested numpy arrays


def np_dtype(name: str):
  """The numpy dtype of a --dtype name (bfloat16: ml_dtypes')."""
  if name not in DTYPES:
    raise CheckpointError(f"unsupported --dtype {name!r}; choose from {sorted(DTYPES)}")
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return ml_dtypes.bfloat16 if name == "bfloat16" else DTYPES[name]


def abstract_params(family: Family, model_config) -> dict:
  """Shapes of the model's parameters, without allocating them."""
  module = family.build(model_config)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *model_config.dummy_inputs()))
  return nn.meta.unbox(shapes["params"])


def any_key(keys: Sequence[str], pattern: str) -> bool:
  rx = re.compile(pattern)
  return any(rx.search(k) for k in keys)
