"""Reading PyTorch/HF checkpoints tensor by tensor.

`open_checkpoint(path)` accepts a HF directory (`model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, `pytorch_model.bin`, sharded `.bin` with its index) or one
`.safetensors` / `.bin` / `.pth` / `.pt` file (or a `.gguf` file: `gguf_io`, dequantized through
transformers' and gguf's readers), and returns a `TensorSource`: the key list and
shapes up front, each tensor read only when asked for, as numpy (bf16 kept as ml_dtypes
bfloat16, bit-exact). Safetensors are memory-mapped; pickled files are loaded with
`torch.load(mmap=True, weights_only=True)`, so peak memory stays near one tensor plus output.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxlisa.config import read_json
from jaxlisa.conversion.errors import CheckpointError  # noqa: F401  (re-exported: most modules import it here)


# File names, in the order they are looked for inside a directory.
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class TensorSource:
  """Read-only view of a checkpoint: `keys()`, `shape(k)`, `dtype(k)`, `get(k) -> np.ndarray`."""

  def __init__(self, files: list[str]):
    self.files = files
    self._where: dict[str, str] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._dtypes: dict[str, str] = {}
    self._torch_cache: dict[str, dict] = {}
    for f in files:
      for k, shape, dtype in _list_file(f, self):
        if k in self._where:
          raise CheckpointError(f"tensor {k!r} appears in both {self._where[k]} and {f}")
        self._where[k], self._shapes[k], self._dtypes[k] = f, tuple(shape), dtype

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, k: str) -> bool:
    return k in self._where

  def __len__(self) -> int:
    return len(self._where)

  def shape(self, k: str) -> tuple[int, ...]:
    return self._shapes[k]

  def dtype(self, k: str) -> str:
    return self._dtypes[k]

  def get(self, k: str) -> np.ndarray:
    f = self._where[k]
    try:
      if f.endswith(".safetensors"):
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel
        with safe_open(f, framework="numpy") as sf:
          return sf.get_tensor(k)
      return _torch_to_numpy(self._torch_state(f)[k])
    except CheckpointError:
      raise
    except Exception as e:  # corrupt payload behind a readable header
      raise CheckpointError(f"cannot read tensor {k!r} from {f}: {e}") from e

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for k in self.keys():
      yield k, self.get(k)

  def _torch_state(self, f: str) -> dict:
    if f not in self._torch_cache:
      self._torch_cache[f] = _torch_load(f)
    return self._torch_cache[f]


def open_checkpoint(path: str) -> TensorSource:
  """Open a checkpoint file or HF directory (see module docstring)."""
  if path.endswith(".gguf") and os.path.isfile(path):
    from jaxlisa.conversion import gguf_io  # pylint: disable=import-outside-toplevel
    return gguf_io.open_gguf(path)
  return TensorSource(checkpoint_files(path))


def checkpoint_files(path: str) -> list[str]:
  """The weight files that make up the checkpoint at `path` (file or directory)."""
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  if os.path.isfile(path):
    if not path.endswith((".safetensors", ".bin", ".pth", ".pt", ".gguf")):
      raise CheckpointError(f"unsupported checkpoint file {path} (expected .safetensors/.bin/.pth/.pt/.gguf)")
    return [path]
  for name in _INDEX_FILES:
    idx = os.path.join(path, name)
    if os.path.exists(idx):
      try:
        with open(idx) as fh:
          weight_map = json.load(fh)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"bad index file {idx}: {e}") from e
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
      if missing:
        raise CheckpointError(f"{idx} lists shards that are not there: {missing}")
      return [os.path.join(path, f) for f in files]
  for name in _SINGLE_FILES:
    if os.path.exists(os.path.join(path, name)):
      return [os.path.join(path, name)]
  found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pth", ".pt")))
  if not found:
    raise CheckpointError(f"no weight files (.safetensors/.bin/.pth) in {path}")
  return [os.path.join(path, f) for f in found]


def read_config_json(path: str) -> dict | None:
  """`config.json` next to (or inside) a checkpoint path, or None; for a .gguf file, the config
  transformers derives from its metadata."""
  if path.endswith(".gguf") and os.path.isfile(path):
    from jaxlisa.conversion import gguf_io  # pylint: disable=import-outside-toplevel
    return gguf_io.gguf_config(path)
  d = path if os.path.isdir(path) else os.path.dirname(path)
  return read_json(os.path.join(d, "config.json"), CheckpointError)


def _list_file(f: str, src: TensorSource):
  if f.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    try:
      with safe_open(f, framework="numpy") as sf:
        out = []
        for k in sf.keys():
          sl = sf.get_slice(k)
          out.append((k, sl.get_shape(), sl.get_dtype()))
        return out
    except Exception as e:
      raise CheckpointError(f"cannot read safetensors file {f} (truncated or corrupt?): {e}") from e
  state = src._torch_state(f)  # pylint: disable=protected-access
  return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()]


def _torch_load(f: str) -> dict:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f"reading pickled checkpoint {f} needs torch (pip install torch)") from e
  if not zipfile.is_zipfile(f):
    # Legacy (pre-1.6) pickles are not zip files; a truncated zip is not one either.
    try:
      state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
      raise CheckpointError(f"cannot read {f} (truncated or not a PyTorch checkpoint): {e}") from e
  else:
    try:
      state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
      raise CheckpointError(f"cannot read {f} (truncated or not a PyTorch checkpoint): {e}") from e
  # Training scripts often wrap the state dict.
  for wrapper in ("state_dict", "model", "module"):
    if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict) and \
        not any(hasattr(v, "shape") for v in state.values()):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise CheckpointError(f"{f} does not hold a state dict (got {type(state).__name__})")
  tensors = {k: v for k, v in state.items() if hasattr(v, "shape")}
  return tensors


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()
