"""The converter's family table: every model family the converter knows, by name. The family
modules are listed here explicitly (each one's `FAMILIES`); the CLI, `load_pretrained` and
detection go through this table. (The LAVIS-style model zoo is jaxlisa/zoo.py.)
"""

from __future__ import annotations

from typing import Sequence

from jaxlisa.conversion import blip, blip2, lisa, llava, llm, minigpt4qwen, sam, vision
from jaxlisa.conversion.checkpoint_io import CheckpointError
from jaxlisa.conversion.family import Family, abstract_params  # noqa: F401  (abstract_params: re-exported)

# In the order detection breaks priority ties.
FAMILY_MODULES = (llm, vision, sam, llava, lisa, blip2, minigpt4qwen, blip)
_FAMILIES: dict[str, Family] = {f.name: f for m in FAMILY_MODULES for f in m.FAMILIES}


def families() -> dict[str, Family]:
  return dict(_FAMILIES)


def get_family(name: str) -> Family:
  if name not in _FAMILIES:
    raise CheckpointError(f"unknown family {name!r}; known families: {sorted(_FAMILIES)}")
  return _FAMILIES[name]


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
