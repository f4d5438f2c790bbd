"""Checkpoint conversion end to end: detect -> configure -> map -> validate -> save (atomic),
and loading a converted (or raw HF/PyTorch) checkpoint back as (module, params, config).

A converted directory is self-describing:
  jaxlisa_config.json   {"format": 1, "family": ..., "config": {...}, "source": ...}
  params/               orbax PyTree checkpoint of the parameter tree
  tokenizer files       copied from the source when it had them (from a .gguf: its tokenizer,
                        chat template and generation_config.json, written by transformers)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from absl import logging

from jaxlisa.conversion import families
from jaxlisa.conversion.checkpoint_io import CheckpointError, open_checkpoint, read_config_json
from jaxlisa.conversion.family import DTYPES, Converted, np_dtype  # noqa: F401  (re-exported)
from jaxlisa.conversion.keymap import convert_state, export_state
from jaxlisa.conversion.weight_check import WeightCheck
from jaxlisa.models.lora import merge_lora

CONFIG_FILE = "jaxlisa_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "qwen.tiktoken",
                   "generation_config.json", "preprocessor_config.json", "chat_template.jinja")
def _check_overrides(model_config, overrides: dict) -> None:
  names = [f.name for f in dataclasses.fields(model_config)] if dataclasses.is_dataclass(model_config) else []
  unknown = [k for k in overrides if k not in names]
  if unknown:
    import difflib  # pylint: disable=import-outside-toplevel
    close = sorted({c for k in unknown for c in difflib.get_close_matches(k, names, n=3)})
    raise CheckpointError(f"unknown config override(s) {', '.join(unknown)} for {type(model_config).__name__}"
                          + (f"; did you mean {', '.join(close)}?" if close else ""))


def convert_checkpoint(src: str, family: str | None = None, dtype: str = "float32",
                       config_overrides: dict | None = None, progress=None, *,
                       allow_nonfinite: bool = False, strict: bool = False) -> Converted:
  """Read a PyTorch/HF checkpoint (file or directory) into jaxlisa params (numpy, in memory).

  config_overrides: model-config fields replacing what was read or assumed (e.g. SAM's
  {"decoder_num_heads": 4}, which a .pth cannot say); a family whose config_from_hf takes
  `overrides` sees them while it reads the shapes. Every tensor is checked (WeightCheck):
  integer dtypes and NaN/Inf are refused (allow_nonfinite: NaN/Inf only warned about), values
  beyond MAX_ABS_WEIGHT warned about (strict: refused)."""
  source = open_checkpoint(src)
  cfg_json = read_config_json(src)
  try:
    fam = families.get_family(family) if family else families.detect_family(cfg_json, source.keys())
  except (CheckpointError, KeyError, ValueError) as e:
    raise CheckpointError(f"{src}: {e}") from None
  if fam.open_source is not None:
    source = fam.open_source(src)
  try:
    if config_overrides and "overrides" in inspect.signature(fam.config_from_hf).parameters:
      # families whose config cannot be read entirely off the checkpoint (SAM's decoder heads)
      model_config = fam.config_from_hf(cfg_json, source, overrides=dict(config_overrides))
    else:
      model_config = fam.config_from_hf(cfg_json, source)
  except CheckpointError as e:
    raise CheckpointError(f"{src}: {e}") from None
  model_config = _generation_ids(model_config, src)
  if config_overrides:
    _check_overrides(model_config, config_overrides)
    model_config = dataclasses.replace(model_config, **config_overrides)
  expected = families.abstract_params(fam, model_config)
  scan = getattr(model_config, "scan_layers", True)
  checked = WeightCheck(source, src, allow_nonfinite=allow_nonfinite, strict=strict)
  params = convert_state(checked, fam.rules(model_config, source.keys()), expected, scan=scan,
                         dtype=np_dtype(dtype), skip=fam.skip, keep_dtype=fam.keep_fp32, progress=progress)
  checked.finish()
  logging.info("converted %d tensors of %s as family %s", len(source), src, fam.name)
  return Converted(fam.name, model_config, params)


def _generation_ids(model_config, src: str):
  """eos / pad ids from generation_config.json beside the checkpoint (what HF generate stops at and
  pads with) into a decoder config, so `inference.generate` defaults to them."""
  names = {f.name for f in dataclasses.fields(model_config)} if dataclasses.is_dataclass(model_config) else set()
  d = src if os.path.isdir(src) else os.path.dirname(src)
  f = os.path.join(d, "generation_config.json")
  if "eos_token_id" not in names or src.endswith(".gguf") or not os.path.exists(f):
    return model_config
  try:
    with open(f) as fh:
      gen = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"bad {f}: {e}") from e
  changes = {}
  if gen.get("eos_token_id") is not None:
    eos = gen["eos_token_id"]
    changes["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
  if gen.get("pad_token_id") is not None and "pad_token_id" in names:
    changes["pad_token_id"] = gen["pad_token_id"]
  return dataclasses.replace(model_config, **changes) if changes else model_config


TMP_OWNER_FILE = ".jaxlisa-owner"  # "<host> <pid>" of the conversion writing a temporary folder


def _tmp_prefix(dst: str) -> str:
  return ".tmp-" + os.path.basename(dst) + "-"


def clean_stale_tmp(dst: str) -> list[str]:
  """Remove the temporary folders of earlier conversions to `dst` that died (kill -9) before their
  rename: `.tmp-<dst>-XXXXXXXX` siblings whose owner process (same host) is gone, or which have
  no owner file and are older than an hour. Returns the removed paths."""
  import re  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  parent = os.path.dirname(os.path.abspath(dst))
  pattern = re.compile(re.escape(_tmp_prefix(dst)) + r"[A-Za-z0-9_]{8}$")
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in names:
    path = os.path.join(parent, name)
    if not pattern.match(name) or not os.path.isdir(path) or os.path.islink(path):
      continue
    try:
      with open(os.path.join(path, TMP_OWNER_FILE)) as fh:
        host, pid = fh.read().split()
      if host != socket.gethostname():
        continue  # another machine's conversion on a shared filesystem: not ours to judge
      try:
        os.kill(int(pid), 0)
        continue  # still running
      except ProcessLookupError:
        pass
      except PermissionError:
        continue  # alive, another user's
    except (OSError, ValueError):
      if time.time() - os.path.getmtime(path) < 3600:
        continue  # no owner yet (just created) or unreadable: leave it unless old
    shutil.rmtree(path, ignore_errors=True)
    logging.warning("removed %s, left by an interrupted conversion", path)
    removed.append(path)
  return removed


def save_converted(dst: str, conv: Converted, source_dir: str | None = None, overwrite: bool = False) -> str:
  """Write `conv` to `dst` atomically (temporary sibling directory, renamed at the end); the
  temporary folders of earlier conversions to `dst` that were killed are removed first."""
  import socket  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise CheckpointError(f"destination {dst} exists and is not a folder")
  if os.path.exists(dst) and not overwrite:
    if os.listdir(dst):
      raise CheckpointError(f"destination {dst} exists and is not empty (pass --overwrite)")
  parent = os.path.dirname(dst)
  try:
    os.makedirs(parent, exist_ok=True)
    clean_stale_tmp(dst)
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(dst), dir=parent)
    owner = f"{socket.gethostname()} {os.getpid()}\n"
    with open(os.path.join(tmp, TMP_OWNER_FILE), "w") as fh:
      fh.write(owner)
  except OSError as e:
    raise CheckpointError(f"cannot write {dst}: {e.strerror or e}") from None
  old = None  # the previous output while it is replaced (overwrite)
  try:
    meta = {"format": FORMAT_VERSION, "family": conv.family, "config": conv.config.to_dict(),
            "source": source_dir}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
      json.dump(meta, fh, indent=2, default=str)
    with ocp.PyTreeCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, PARAMS_DIR), conv.params)
    if source_dir and source_dir.endswith(".gguf") and os.path.isfile(source_dir):
      from jaxlisa.conversion import gguf_io  # pylint: disable=import-outside-toplevel
      gguf_io.save_gguf_extras(source_dir, tmp)  # tokenizer + chat template + generation_config
    elif source_dir:
      sdir = source_dir if os.path.isdir(source_dir) else os.path.dirname(source_dir)
      for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(sdir, name)):
          shutil.copy2(os.path.join(sdir, name), os.path.join(tmp, name))
    # Overwrite: the old output moves aside (one rename) and the new one in (another), then the
    # old is deleted; a kill while it is deleted leaves a .tmp-<dst>- folder the next start removes.
    if os.path.exists(dst):
      old = tempfile.mkdtemp(prefix=_tmp_prefix(dst), dir=parent)
      os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
      with open(os.path.join(old, TMP_OWNER_FILE), "w") as fh:
        fh.write(owner)
    os.remove(os.path.join(dst, TMP_OWNER_FILE))
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    if old is not None and os.path.isdir(old) and not os.path.exists(dst):
      os.replace(old, dst)  # the new one did not go in: the old output back
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


def build_module(conv: Converted):
  """The linen module of a conversion (for --verify on the in-memory params)."""
  return families.get_family(conv.family).build(conv.config)


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_meta(path: str) -> dict:
  with open(os.path.join(path, CONFIG_FILE)) as fh:
    meta = json.load(fh)
  if meta.get("format") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: unsupported jaxlisa checkpoint format {meta.get('format')}")
  return meta


def load_params(path: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.PyTreeCheckpointer() as ckpt:
    return ckpt.restore(os.path.join(os.path.abspath(path), PARAMS_DIR))


@dataclasses.dataclass
class Pretrained:
  module: Any
  params: dict
  config: Any
  family: str
  tokenizer: Any = None

  def __iter__(self):  # module, params, config = load_pretrained(...)
    return iter((self.module, self.params, self.config))


def load_tokenizer(path: str):
  """A transformers tokenizer from `path` when it has tokenizer files, else None.

  tokenizer.json: loaded as saved (exact round trip). A LLaMA-family SentencePiece directory
  without one (official LISA / LLaVA checkpoints: tokenizer.model + tokenizer_config.json +
  special_tokens_map.json + added_tokens.json): `data.llama_tokenizer.SlowLlamaTokenizer`, the
  transformers 4.31 slow LlamaTokenizer those models were trained with (transformers 5's
  AutoTokenizer splits differently around added tokens). Anything else: AutoTokenizer.
  """
  if not any(os.path.exists(os.path.join(path, f)) for f in
             ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
    return None
  from transformers import AutoTokenizer, PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  from jaxlisa.data import llama_tokenizer  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return PreTrainedTokenizerFast.from_pretrained(path)  # exact round trip of the saved tokenizer
  if llama_tokenizer.is_llama_sentencepiece_dir(path):
    return llama_tokenizer.SlowLlamaTokenizer.load(path)
  return AutoTokenizer.from_pretrained(path)


def _cast_params(params: dict, np_dt, keep_fp32=()) -> dict:
  """Floating leaves cast to np_dt, except paths matching `keep_fp32` (as the converter keeps them)."""
  import re  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  keep = [re.compile(k) for k in keep_fp32]
  def cast(path, x):
    x = np.asarray(x)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if x.dtype.kind != "f" and x.dtype != np_dtype("bfloat16") or any(r.search(name) for r in keep):
      return x
    return x.astype(np_dt)
  return jax.tree_util.tree_map_with_path(cast, params)


def with_dtype(config, dtype: str):
  """`config` with compute `dtype` and `param_dtype` set to `dtype`, in it and in every nested model
  config (LLaVA's text/vision, LISA's llava/sam, ...). Returns (config, whether any field was set)."""
  if not dataclasses.is_dataclass(config):
    return config, False
  changes, found = {}, False
  names = {f.name for f in dataclasses.fields(config)}
  for name in ("dtype", "param_dtype"):
    if name in names and isinstance(getattr(config, name), str):
      changes[name], found = dtype, True
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      sub, hit = with_dtype(v, dtype)
      if hit:
        changes[f.name], found = sub, True
  return (dataclasses.replace(config, **changes) if changes else config), found


def load_pretrained(path: str, *, family: str | None = None, dtype: str | None = None,
                    config_overrides: dict | None = None, with_tokenizer: bool = True) -> Pretrained:
  """Load a converted jaxlisa directory, or convert a HF/PyTorch checkpoint in memory.

  Returns Pretrained(module, params, config, family, tokenizer); it also unpacks as
  `module, params, config = load_pretrained(path)`. `dtype` ("bfloat16", "float16", "float32")
  is the one switch for numerics: parameters are cast to it and the model computes in it (the
  config's `dtype` / `param_dtype`, nested configs included). `config_overrides` replace model
  config fields (e.g. remat_policy="full") before the module is built. Decoder LMs' tokenizers
  pad on the left, as batched generation needs.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  if is_converted(path):
    meta = read_meta(path)
    fam = families.get_family(meta["family"])
    config = fam.config_cls.from_dict(meta["config"])
    params = load_params(path)
  else:
    conv = convert_checkpoint(path, family=family, dtype=dtype or "float32")
    fam, config, params = families.get_family(conv.family), conv.config, conv.params
  if dtype is not None:
    np_dtype(dtype)  # validates the name
    config, has_dtype = with_dtype(config, dtype)
    if has_dtype or hasattr(config, "param_dtype"):
      params = _cast_params(params, np_dtype(dtype), fam.keep_fp32)
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  tok = None
  if with_tokenizer:
    if path.endswith(".gguf") and os.path.isfile(path):
      from jaxlisa.conversion import gguf_io  # pylint: disable=import-outside-toplevel
      tok = gguf_io.load_tokenizer(path)
    else:
      tok = load_tokenizer(path if os.path.isdir(path) else os.path.dirname(path))
    if tok is not None and fam.name in ("llama", "mistral", "qwen2", "qwen", "opt"):
      tok.padding_side = "left"  # batched generation: real tokens at the right end
  return Pretrained(fam.build(config), params, config, fam.name, tok)


def export_checkpoint(params: dict, family: str, config, dst_file: str) -> dict[str, np.ndarray]:
  """Write params back as a PyTorch-named safetensors file (HF layout); returns the state dict.
  A decoder LM's LoRA adapters (config.lora_rank > 0) are merged into their kernels."""
  fam = families.get_family(family)
  if fam.export_rules is None:
    raise CheckpointError(f"family {family} has no export map")
  if getattr(config, "lora_rank", 0):
    params = merge_lora(params, config.lora_alpha, config.lora_rank)
  state = export_state(params, fam.export_rules(config, ()), scan=getattr(config, "scan_layers", True))
  if dst_file:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, dst_file)
  return state
