"""jaxlisa: LISA (reasoning segmentation) and its family in JAX/Flax.

Public entry points:
  load_pretrained(path)  -> Pretrained(module, params, config, family, tokenizer)
  load_model_and_preprocess(name, model_type)  -> (module, params, vis_processors, txt_processors)
  generate(module, params, input_ids, attention_mask, ...)  (jaxlisa.inference.generate)
"""

from jaxlisa.conversion.convert import Pretrained, load_pretrained  # noqa: F401

__version__ = "0.1.0"


def load_model_and_preprocess(name: str, model_type: str = "tiny", **kw):
  """LAVIS-style model zoo (jaxlisa/registry.py); imported on first use."""
  from jaxlisa.registry import load_model_and_preprocess as load  # pylint: disable=import-outside-toplevel
  return load(name, model_type, **kw)
