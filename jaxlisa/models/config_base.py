"""The shared behaviour of the frozen model-config dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigMixin:
  """replace / to_dict / from_dict for a frozen dataclass of plain fields (saved as JSON; lists
  read back as tuples, unknown fields are an error naming them)."""

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
