"""The shared behaviour of the frozen model-config dataclasses: ConfigMixin (replace / to_dict /
from_dict, nested configs, checked attention / remat names), LayerStackConfig (the numerics and
layer-stack fields of a transformer stack) and VisionTowerConfig (a ViT tower's derived sizes and
dummy input). Every model config has `dummy_inputs()`: the arguments of its module's init."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

import jax.numpy as jnp

from jaxlisa.models import attention as attn_lib
from jaxlisa.models import layers


def _tuples(v):
  """JSON lists back to tuples, nested lists included ([[336, 672]] -> ((336, 672),))."""
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


class ConfigMixin:
  """replace / to_dict / from_dict for a frozen dataclass (saved as JSON; lists read back as
  tuples, unknown fields are an error naming them). Fields typed as another ConfigMixin dataclass
  (`vision: CLIPVisionConfig`, `text: DecoderConfig | None`) nest: to_dict writes them as dicts,
  from_dict reads them back. `attention_impl` and `remat_policy` fields, where a config has them,
  are checked when it is built."""

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
  @functools.cache
  def nested_fields(cls) -> dict[str, type]:
    """{field name: its ConfigMixin class} for the fields that hold a sub-config."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
      for t in typing.get_args(hints[f.name]) or (hints[f.name],):
        if isinstance(t, type) and issubclass(t, ConfigMixin):
          out[f.name] = t
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    nested = cls.nested_fields()
    return cls(**{k: nested[k].from_dict(v) if k in nested and isinstance(v, dict) else _tuples(v)
                  for k, v in d.items()})

  def dummy_inputs(self) -> tuple:
    """The smallest arguments the model's `init` takes (a subclass that builds a module says which)."""
    raise NotImplementedError(f"{type(self).__name__} has no dummy_inputs")


@dataclasses.dataclass(frozen=True)
class LayerStackConfig(ConfigMixin):
  """Numerics and layer-stack fields of a transformer stack (CLIP, EVA, decoder LMs); a subclass's
  own fields come after these."""
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"


class VisionTowerConfig(LayerStackConfig):
  """A ViT tower's derived sizes and dummy input, from the subclass's hidden_size,
  num_attention_heads, image_size, patch_size and num_channels."""

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def dummy_inputs(self) -> tuple:
    return (jnp.zeros((1, self.image_size, self.image_size, self.num_channels), jnp.float32),)
