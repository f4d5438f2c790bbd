"""jaxlisa: LISA (reasoning segmentation) and its family in JAX/Flax.

Public entry points:
  load_pretrained(path)  -> Pretrained(module, params, config, family, tokenizer)
  generate(module, params, input_ids, attention_mask, ...)  (jaxlisa.inference.generate)
"""

from jaxlisa.conversion.convert import Pretrained, load_pretrained  # noqa: F401

__version__ = "0.1.0"
