"""The command line as a user meets it (subprocesses; fast paths only): --help of main.py, the
converter and the planner, typo overrides, eval / segment refusing to run without weights,
python -m jaxlisa, non-terminal progress lines."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("Unable to initialize backend", "PyTorch was not found")


def _run(*args, cwd=ROOT, timeout=120):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
  env["PYTHONPATH"] = ROOT
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_exits_0_and_lists_modes_and_fields():
  r = _run("main.py", "--help")
  assert r.returncode == 0, r.stderr
  for mode in ("train", "eval", "segment", "serve", "caption", "chat"):
    assert f"\n  {mode} " in r.stdout
  for field in ("--config.mode", "--config.total_steps", "--config.batch_size", "--config.init.pretrained",
                "--config.image", "--config.prompt", "--config.allow_random_init", "--workdir"):
    assert field in r.stdout
  assert "Traceback" not in r.stderr


def test_python_m_jaxlisa_help_from_another_directory(tmp_path):
  r = _run("-m", "jaxlisa", "--help", "--config", "configs/lm_tiny.py", cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "lm_tiny.py" in r.stdout and "segment" in r.stdout  # the packaged config, resolved


def test_typo_override_without_config_is_a_clean_exit_2():
  r = _run("main.py", "--config.imgae=x")
  assert r.returncode == 2
  assert "unknown config key --config.imgae. Did you mean: --config.image" in r.stderr
  assert "Traceback" not in r.stderr


def test_eval_and_segment_without_weights_stop(tmp_path):
  for mode in ("eval", "segment"):
    wd = tmp_path / mode
    r = _run("main.py", "--config", "configs/lisa_tiny.py:runlocal", "--workdir", str(wd), f"--config.mode={mode}",
             "--config.image=a.jpg", "--config.prompt=Which shape is red?")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "checkpoint" in r.stderr and str(wd) in r.stderr and "allow_random_init" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not os.path.exists(wd / "data") and not os.path.exists(wd / "checkpoints")
    assert not any(n in r.stdout + r.stderr for n in NOISE)


def test_converter_help_lists_families():
  r = _run("tools/convert_torch_weights.py", "--help")
  assert r.returncode == 0, r.stderr
  for fam in ("llama", "sam", "lisa", "llava_hf", "blip2_opt_hf"):
    assert fam in r.stdout
  assert "--clip_src" in r.stdout and "--override" in r.stdout


def test_planner_help_exits_0_with_main_py_flag_style():
  r = _run("tools/plan.py", "--help")
  assert r.returncode == 0, r.stderr
  for flag in ("--config:", "--config.a.b=VALUE", "--devices:", "--target:", "--mesh:", "--remat:"):
    assert flag in r.stdout
  assert "save_dots_no_batch_dims" in r.stdout and "minimal" not in r.stdout  # remat names as models/layers.py
  assert "Traceback" not in r.stderr and not any(n in r.stdout + r.stderr for n in NOISE)


def test_progress_off_a_terminal_is_one_line_per_interval():
  code = ("import sys; sys.path.insert(0, %r)\n"
          "from jaxlisa.cli import Progress\n"
          "p = Progress(100, 'train', 'step')\n"
          "for i in range(1, 101):\n"
          "  p.update_to(i)\n"
          "  if i %% 10 == 0: p.set_postfix('loss=1'); p.line()\n"
          "p.close()\n") % ROOT
  r = _run("-c", code)
  assert r.returncode == 0, r.stderr
  assert "\r" not in r.stdout + r.stderr
  lines = [line for line in r.stdout.splitlines() if line.startswith("train ")]
  assert len(lines) == 10 and lines[-1].startswith("train 100/100 steps") and "loss=1" in lines[-1]


def test_converter_family_list_is_the_family_table():
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import convert_torch_weights  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import families  # pylint: disable=import-outside-toplevel
  assert sorted(convert_torch_weights.FAMILIES) == sorted(families.families())
  assert convert_torch_weights.parse_overrides(["decoder_num_heads=8", "x=0.5", "b=true", "s=abc"]) == {
      "decoder_num_heads": 8, "x": 0.5, "b": True, "s": "abc"}
