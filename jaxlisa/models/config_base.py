"""The shared behaviour of the frozen model-config dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlisa.models import attention as attn_lib
from jaxlisa.models import layers


class ConfigMixin:
  """replace / to_dict / from_dict for a frozen dataclass of plain fields (saved as JSON; lists
  read back as tuples, unknown fields are an error naming them). `attention_impl` and
  `remat_policy` fields, where a config has them, are checked when it is built."""

  def __post_init__(self):
    impl = getattr(self, "attention_impl", "xla")
    if impl not in attn_lib.ATTENTION_IMPLS:
      raise ValueError(f"{type(self).__name__}.attention_impl {impl!r} is not one of {attn_lib.ATTENTION_IMPLS}"
                       + (" (TPU splash attention is not wired in; use 'xla')" if impl == "splash" else ""))
    policy = getattr(self, "remat_policy", "none")
    if policy != "none":
      layers.remat_policy(policy)  # raises naming the known policies (and a renamed one's new name)

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
