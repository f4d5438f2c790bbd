"""jaxlisa: LISA (reasoning segmentation) and its family in JAX/Flax.

Public entry points:
  load_pretrained(path)  -> Pretrained(module, params, config, family, tokenizer)
  load_model_and_preprocess(name, model_type)  -> (module, params, vis_processors, txt_processors)
  generate(module, params, input_ids, attention_mask, ...)  (jaxlisa.inference.generate)
"""

__version__ = "0.1.0"


def __getattr__(name):
  """Pretrained / load_pretrained on first use (keeps `import jaxlisa` and the CLI's --help light)."""
  if name in ("Pretrained", "load_pretrained"):
    from jaxlisa.conversion import convert  # pylint: disable=import-outside-toplevel
    return getattr(convert, name)
  raise AttributeError(f"module 'jaxlisa' has no attribute {name!r}")


def load_model_and_preprocess(name: str, model_type: str = "tiny", **kw):
  """LAVIS-style model zoo (jaxlisa/zoo.py); imported on first use."""
  from jaxlisa.zoo import load_model_and_preprocess as load  # pylint: disable=import-outside-toplevel
  return load(name, model_type, **kw)
