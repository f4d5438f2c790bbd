"""big_vision-style config helpers.

A config file exposes `get_config(arg=None)` returning an `ml_collections.ConfigDict`; the string
after `:` in `--config configs/x.py:variant=7b,runlocal` is parsed with `parse_arg`. Overrides
`--config.a.b=v` are checked against the loaded config by `validate_overrides` before absl sees
them, so a typo fails with the bad key and the closest valid keys instead of a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any, Iterator, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config argument or override that does not fit the config."""


def _to_bool(s: str) -> bool:
  v = s.strip().lower()
  if v in ("1", "true", "yes", "y", "on"):
    return True
  if v in ("0", "false", "no", "n", "off"):
    return False
  raise ValueError(f"not a boolean: {s!r}")


def _cast(key: str, value: str, default: Any) -> Any:
  """Cast the string `value` to the type of `default` (str when there is no default type)."""
  try:
    if isinstance(default, bool):
      return _to_bool(value)
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    raise ConfigError(f"config arg {key}={value!r}: expected {type(default).__name__}") from None
  return value


def parse_arg(arg: str | None, *, lazy: bool = False, **defaults) -> ConfigDict:
  """Parse 'variant=7b,runlocal,res=448' into a ConfigDict typed like `defaults`.

  A bare key (no '=') means True and must name a bool default. Keys not in `defaults` are an
  error unless `lazy` (then they are kept as strings).
  """
  out = ConfigDict(dict(defaults))
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults and not lazy:
      close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config arg {key!r}{hint} (known: {', '.join(sorted(defaults)) or 'none'})")
    default = defaults.get(key)
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _cast(key, value.strip(), default)
  return out


def load_config(spec: str) -> ConfigDict:
  """'path/to/config.py[:arg]' -> get_config(arg), as ml_collections' --config flag loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  name = "jaxlisa_cfg_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path}: syntax error at line {e.lineno}: {e.msg}") from e
  except Exception as e:  # pylint: disable=broad-except  (the config file is user code)
    raise ConfigError(f"config file {path} fails on import: {type(e).__name__}: {_one_line(e)}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path} defines no get_config(arg=None) function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{path}: get_config({arg!r}) raised {type(e).__name__}: {_one_line(e)}" if arg else
                      f"{path}: get_config() raised {type(e).__name__}: {_one_line(e)}") from e
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not an ml_collections.ConfigDict")
  return config


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _int_at_least(config: ConfigDict, key: str, minimum: int) -> list[str]:
  if key not in config:
    return []
  v = config[key]
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    return [f"--config.{key}={v!r}: must be an integer >= {minimum}"]
  return []


def check_run_config(config: ConfigDict) -> None:
  """Values a run cannot start with (ConfigError naming every bad field): sizes and step counts,
  init.* paths that do not exist. (Checks that need the devices, such as the mesh and batch
  shards, are the trainer's: main.py reports their ValueError in one line.)"""
  problems = []
  problems += _int_at_least(config, "batch_size", 1)
  problems += _int_at_least(config, "grad_accum", 1)
  for key in ("total_steps", "log_every", "eval_every", "ckpt_every"):
    problems += _int_at_least(config, key, 0)
  init = config.get("init")
  if isinstance(init, ConfigDict):
    for key in ("pretrained", "clip"):
      path = init.get(key)
      if isinstance(path, str) and path and not os.path.exists(path):
        problems.append(f"--config.init.{key}={path}: no such file or directory")
  if problems:
    raise ConfigError("; ".join(problems))


def make_workdir(workdir: str) -> None:
  """Create `workdir` (ConfigError naming it when it cannot be created or written)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} exists and is not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be written: {e.strerror or _one_line(e)}") from None


def iter_paths(config: ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted path, value) for every field, groups included, depth first."""
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    yield path, value
    if isinstance(value, ConfigDict):
      yield from iter_paths(value, path + ".")


def leaf_paths(config: ConfigDict) -> list[str]:
  return [p for p, v in iter_paths(config) if not isinstance(v, ConfigDict)]


def closest_keys(key: str, config: ConfigDict, n: int = 3) -> list[str]:
  """Closest valid dotted keys: by the whole path, then by the last component anywhere."""
  paths = leaf_paths(config)
  close = difflib.get_close_matches(key, paths, n=n, cutoff=0.6)
  last = key.rsplit(".", 1)[-1]
  by_name = {p.rsplit(".", 1)[-1]: p for p in paths}
  for name in difflib.get_close_matches(last, list(by_name), n=n, cutoff=0.6):
    if by_name[name] not in close:
      close.append(by_name[name])
  return close[:n]


def _override_keys(argv: Sequence[str], flag: str) -> Iterator[str]:
  """Dotted keys of `--flag.a.b=v`, `--flag.a.b v`, `--noflag.a.b` in argv (stops at '--')."""
  for tok in argv[1:]:
    if tok == "--":
      return
    name = tok.lstrip("-").split("=", 1)[0]
    if not tok.startswith("-"):
      continue
    if name.startswith(f"no{flag}."):
      name = name[2:]
    if name.startswith(f"{flag}."):
      yield name[len(flag) + 1:]


def validate_overrides(config: ConfigDict, argv: Sequence[str], flag: str = "config") -> None:
  """Raise ConfigError naming every `--config.key` in argv that does not exist in `config`."""
  values = dict(iter_paths(config))
  problems = []
  for key in _override_keys(argv, flag):
    if key not in values:
      close = closest_keys(key, config)
      hint = f" Did you mean: {', '.join(f'--{flag}.{c}' for c in close)}?" if close else ""
      problems.append(f"unknown config key --{flag}.{key}.{hint}")
    elif isinstance(values[key], ConfigDict):
      sub = ", ".join(f"{key}.{k}" for k in values[key].keys())
      problems.append(f"--{flag}.{key} is a group; set one of its keys: {sub}")
    elif values[key] is None:
      problems.append(f"--{flag}.{key} is None in the config and cannot be overridden from the command "
                      "line; give it a typed default (ml_collections.config_dict.placeholder)")
  if problems:
    raise ConfigError("\n".join(problems))


def to_dict(config: ConfigDict) -> dict:
  """Plain JSON-friendly nested dict (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} where two config dicts differ."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def write_config(config: ConfigDict, workdir: str, argv: Sequence[str] | None = None) -> str:
  """Write the resolved config as workdir/config.json (and the command line); returns the path.

  An existing config.json is moved to config.prev.json, so a resumed run can be compared.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:  # written whole before it replaces anything
    json.dump(to_dict(config), fh, indent=2, sort_keys=True)
    fh.write("\n")
  if os.path.exists(path):
    os.replace(path, os.path.join(workdir, "config.prev.json"))
  os.replace(tmp, path)
  if argv is not None:
    with open(os.path.join(workdir, "command.txt"), "w") as fh:
      fh.write(" ".join([os.path.basename(sys.executable), *argv]) + "\n")
  return path


def read_json(path: str, error: type[Exception] = ValueError) -> Any:
  """The JSON object in `path` (None when there is no such file); an unreadable or corrupt file
  raises `error` naming it."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as fh:
      return json.load(fh)
  except (OSError, ValueError) as e:
    raise error(f"cannot read {path}: {e}") from None


def read_config(workdir: str, name: str = "config.json") -> dict | None:
  """The JSON config of a run (None when there is none); a corrupt file is a ConfigError naming it."""
  return read_json(os.path.join(workdir, name), ConfigError)


# Leaves (by last name, under model.* and data.*) that change what a checkpoint holds: a run with
# another value cannot resume the workdir's checkpoints.
STRUCTURAL_KEYS = frozenset((
    "family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "depth", "embed_dim", "num_heads", "mlp_dim", "image_size", "img_size",
    "patch_size", "out_chans", "prompt_embed_dim", "decoder_mlp_dim", "decoder_num_heads", "iou_head_hidden_dim",
    "mask_in_chans", "out_dim", "num_query_tokens", "encoder_hidden_size", "max_position_embeddings",
    "scan_layers", "lora_rank", "projector_type", "attention_bias", "window_size", "global_attn_indexes",
    "cross_attention_freq", "lm_head", "learn_temp"))

RUN_FILES = ("checkpoints", "best", "metrics.jsonl", "tokenizer", "data", "tensorboard", "config.json",
             "config.prev.json", "command.txt")


def has_checkpoints(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def structural_changes(previous: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """The part of `diff(previous, new)` that a checkpoint of `previous` cannot resume into."""
  def structural(key):
    top, _, _ = key.partition(".")
    return key == "task" or (top in ("model", "data") and key.rsplit(".", 1)[-1] in STRUCTURAL_KEYS)
  return {k: v for k, v in diff(previous, new).items() if structural(k)}


def accept_run(config: ConfigDict, workdir: str, argv: Sequence[str] | None = None) -> dict[str, tuple]:
  """Check a training run against what `workdir` already holds, then write config.json.

  With checkpoints in `workdir`, a config whose task, model family or shapes differ from the
  recorded one is refused (ConfigError naming the fields) and nothing is written, unless
  `config.fresh_start` asks to move the old run aside (workdir/previous-<time>/). Checkpoints
  without a config.json cannot be checked here: then nothing is written, and the caller writes
  config.json once the checkpoint has restored (`write_config`). Returns the other
  (non-structural) differences, which the caller may warn about."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} exists and is not a folder")
  new = to_dict(config)
  previous = read_config(workdir) if os.path.isdir(workdir) else None
  changed = diff(previous, new) if previous is not None else {}
  structural = structural_changes(previous, new) if previous is not None else {}
  if structural and has_checkpoints(workdir):
    first = sorted(structural, key=lambda k: (k not in ("task", "model.family"), k))  # the telling ones first
    fields = ", ".join(f"{k}: {structural[k][0]!r} -> {structural[k][1]!r}" for k in first[:6])
    if not config.get("fresh_start", False):
      raise ConfigError(f"{workdir} holds checkpoints of another model ({fields}); use another --workdir, "
                        "or --config.fresh_start=True to move the old run aside and start over")
  if config.get("fresh_start", False) and os.path.isdir(workdir):
    import time  # pylint: disable=import-outside-toplevel
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
    if present:
      aside = os.path.join(workdir, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
      os.makedirs(aside)
      for n in present:
        os.replace(os.path.join(workdir, n), os.path.join(aside, n))
      sys.stderr.write(f"fresh start: moved {', '.join(present)} to {aside}\n")
      changed = {}
  make_workdir(workdir)
  if previous is None and has_checkpoints(workdir):
    return {}  # config.json is the caller's to write once the checkpoint has restored
  try:
    write_config(config, workdir, argv)
  except OSError as e:
    raise ConfigError(f"cannot write {workdir}/config.json: {e.strerror or _one_line(e)}") from None
  return {k: v for k, v in changed.items() if k not in structural}
