"""Config helpers: parse_arg typing and errors, override validation (in process and through
main.py), the resolved config written to the workdir."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from jaxlisa import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types():
  a = cfg.parse_arg("variant=7b,runlocal,res=448,lr=0.5,fsdp=false", variant="13b", runlocal=False, res=224,
                    lr=1.0, fsdp=True, name="x")
  assert a.variant == "7b" and isinstance(a.variant, str)
  assert a.runlocal is True
  assert a.res == 448 and isinstance(a.res, int)
  assert a.lr == 0.5 and isinstance(a.lr, float)
  assert a.fsdp is False
  assert a.name == "x"  # untouched default
  assert cfg.parse_arg(None, runlocal=False).runlocal is False
  assert cfg.parse_arg("", res=1).res == 1
  assert cfg.parse_arg("other=3", lazy=True, res=1).other == "3"


@pytest.mark.parametrize("arg,match", [
    ("runlocl", r"unknown config arg 'runlocl'; did you mean runlocal"),
    ("res", r"config arg 'res' needs a value"),
    ("res=big", r"res='big': expected int"),
    ("runlocal=maybe", r"expected bool"),
])
def test_parse_arg_errors(arg, match):
  with pytest.raises(cfg.ConfigError, match=match):
    cfg.parse_arg(arg, runlocal=False, res=224)


def _config():
  c = ml_collections.ConfigDict()
  c.total_steps = 10
  c.optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=5, b1=0.9))
  c.model = ml_collections.ConfigDict(dict(hidden_size=8, num_hidden_layers=2))
  return c


def test_validate_overrides():
  c = _config()
  cfg.validate_overrides(c, ["main.py", "--config=x.py", "--config.optim.lr=3", "--config.total_steps", "5",
                             "--workdir=/tmp", "--", "--config.not_checked=1"])
  with pytest.raises(cfg.ConfigError) as e:
    cfg.validate_overrides(c, ["main.py", "--config.optim.lrr=3", "--config.warmup_steps=1", "--config.model=1"])
  msg = str(e.value)
  assert "unknown config key --config.optim.lrr. Did you mean: --config.optim.lr" in msg
  assert "unknown config key --config.warmup_steps. Did you mean: --config.optim.warmup_steps" in msg
  assert "--config.model is a group; set one of its keys: model.hidden_size, model.num_hidden_layers" in msg


def test_write_config_round_trip(tmp_path):
  c = _config()
  path = cfg.write_config(c, str(tmp_path), ["main.py", "--config.optim.lr=0.1"])
  with open(path) as fh:
    assert json.load(fh) == cfg.to_dict(c) == {"total_steps": 10, "optim": {"lr": 0.1, "warmup_steps": 5, "b1": 0.9},
                                               "model": {"hidden_size": 8, "num_hidden_layers": 2}}
  c.optim.lr = 0.2
  cfg.write_config(c, str(tmp_path))
  assert cfg.diff(cfg.read_config(str(tmp_path), "config.prev.json"), cfg.read_config(str(tmp_path))) == {
      "optim.lr": (0.1, 0.2)}
  assert "--config.optim.lr=0.1" in open(tmp_path / "command.txt").read()


def test_lm_tiny_config_loads():
  c = cfg.load_config(os.path.join(ROOT, "configs", "lm_tiny.py:runlocal"))
  assert c.mode == "train" and c.task == "lm" and c.total_steps < 50
  full = cfg.load_config(os.path.join(ROOT, "configs", "lm_tiny.py"))
  assert full.total_steps > c.total_steps
  assert set(cfg.leaf_paths(c)) == set(cfg.leaf_paths(full))  # variants change values, not keys
  with pytest.raises(cfg.ConfigError, match="unknown config arg 'runlcoal'"):
    cfg.load_config(os.path.join(ROOT, "configs", "lm_tiny.py:runlcoal"))


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_main_rejects_unknown_override(tmp_path):
  r = _main("--config", "configs/lm_tiny.py:runlocal", "--workdir", str(tmp_path / "w"),
            "--config.optim.lrr=1e-3", "--config.total_step=5")
  assert r.returncode == 2, r.stderr
  assert "unknown config key --config.optim.lrr. Did you mean: --config.optim.lr" in r.stderr
  assert "unknown config key --config.total_step. Did you mean: --config.total_steps" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w")  # nothing ran


def test_main_rejects_unknown_config_arg(tmp_path):
  r = _main("--config", "configs/lm_tiny.py:runlokal", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2
  assert "unknown config arg 'runlokal'; did you mean runlocal" in r.stderr


@pytest.mark.parametrize("field, value, match", [
    ("attention_impl", "splash", "splash attention is not wired in"),
    ("remat_policy", "minimal", "now called 'save_dots_no_batch_dims'"),
    ("remat_policy", "bogus", "unknown remat_policy"),
])
def test_model_configs_refuse_unknown_attention_and_remat(field, value, match):
  from jaxlisa.models import clip, llm, sam  # pylint: disable=import-outside-toplevel
  for config_cls in (clip.CLIPVisionConfig, llm.DecoderConfig, sam.SamConfig):
    with pytest.raises(ValueError, match=match):
      config_cls(**{field: value})
  assert llm.DecoderConfig(remat_policy="save_dots_no_batch_dims").remat_policy == "save_dots_no_batch_dims"
