"""tools/convert_torch_weights.py on bad input (issue 18): every converter probe of
bench/error_probes.py exits 2 with one line naming the file / tensor / flag, no traceback, nothing
written; NaN weights convert only with --allow_nonfinite; temporary folders of a killed
conversion are removed by the next one."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import error_probes as ep  # noqa: E402
from jaxlisa.conversion import convert  # noqa: E402


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  return ep.Fixtures(llama_ckpt=ep.tiny_llama(str(tmp_path_factory.mktemp("llama") / "llama")))


@pytest.mark.parametrize("probe", ep.CONVERT_PROBES, ids=[p.name for p in ep.CONVERT_PROBES])
def test_bad_input_is_exit_2_and_one_line(probe, fixtures, tmp_path):
  r = ep.run_tool("convert", probe.args(str(tmp_path), fixtures), timeout=300)
  assert ep.verdict(probe, r) == "", r.stderr[-3000:]
  assert not (tmp_path / "out").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_nonfinite_weights_convert_with_the_flag_and_a_warning(fixtures, tmp_path):
  src = ep._llama_variant(fixtures.llama_ckpt, str(tmp_path), "nan")  # pylint: disable=protected-access
  r = ep.run_tool("convert", ["--src", src, "--dst", str(tmp_path / "out"), "--allow_nonfinite"], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "non-finite weights in 1 tensor(s): model.norm.weight (2 of 32 values NaN/Inf)" in r.stderr
  assert convert.is_converted(str(tmp_path / "out"))


def test_out_of_range_weights_warn_and_strict_refuses(fixtures):
  state = {"a": np.full((3,), 2.9e38, np.float32), "b": np.ones((2,), np.float32)}
  check = convert.WeightCheck(state, "x.safetensors")
  for k in state:
    check.get(k)
  check.finish()  # a warning only
  assert check.out_of_range == ["a (|max| 2.9e+38)"]
  strict = convert.WeightCheck(state, "x.safetensors", strict=True)
  strict.get("a")
  with pytest.raises(convert.CheckpointError, match="x.safetensors: 1 tensor.*beyond 10000.*a .*--strict"):
    strict.finish()


def test_stale_tmp_folders_of_a_killed_conversion_are_cleaned(fixtures, tmp_path):
  dst = tmp_path / "out"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # a pid that no longer runs
  host = socket.gethostname()
  stale = tmp_path / ".tmp-out-abcd1234"
  alive = tmp_path / ".tmp-out-live5678"
  other = tmp_path / ".tmp-outer-abcd1234"  # another destination's
  for d, owner in ((stale, f"{host} {dead.pid}"), (alive, f"{host} {os.getpid()}"), (other, f"{host} {dead.pid}")):
    d.mkdir()
    (d / convert.TMP_OWNER_FILE).write_text(owner)
    (d / "params").mkdir()
  r = ep.run_tool("convert", ["--src", fixtures.llama_ckpt, "--dst", str(dst)], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not stale.exists() and alive.exists() and other.exists()
  assert convert.is_converted(str(dst)) and not (dst / convert.TMP_OWNER_FILE).exists()
  assert "removed" in r.stderr and ".tmp-out-abcd1234" in r.stderr


def test_verify_runs_before_writing(fixtures, tmp_path):
  r = ep.run_tool("convert", ["--src", fixtures.llama_ckpt, "--dst", str(tmp_path / "out"), "--verify"], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  first_verify = next(i for i, l in enumerate(lines) if l.startswith("verify max_abs_logit_diff"))
  wrote = next(i for i, l in enumerate(lines) if l.startswith("family llama: wrote"))
  assert first_verify < wrote
  assert float(lines[first_verify].split()[-1]) < 1e-4


def test_out_of_range_weights_convert_with_a_warning_naming_them(fixtures, tmp_path):
  src = ep._llama_variant(fixtures.llama_ckpt, str(tmp_path), "huge")  # pylint: disable=protected-access
  r = ep.run_tool("convert", ["--src", src, "--dst", str(tmp_path / "out")], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "model.norm.weight" in r.stderr and "--strict" in r.stderr
  assert convert.is_converted(str(tmp_path / "out"))


def test_kill_9_during_an_overwrite_then_the_next_start_cleans(fixtures, tmp_path):
  """A real SIGKILL (by pid) while `--overwrite` writes: the destination is still a whole
  conversion, and the next conversion leaves no .tmp-<dst>- folder behind."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  dst = tmp_path / "out"
  args = ["--src", fixtures.llama_ckpt, "--dst", str(dst), "--overwrite"]
  assert ep.run_tool("convert", args, timeout=300).returncode == 0
  tmps = lambda: [n for n in os.listdir(tmp_path) if n.startswith(".tmp-out-")]  # noqa: E731
  killed = False
  for _ in range(5):  # the write takes a fraction of a second: try until the kill lands in it
    argv, env = ep.tool_command("convert", args)
    proc = subprocess.Popen(argv, cwd=ep.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not any((tmp_path / n / convert.TMP_OWNER_FILE).exists() for n in tmps()):
      time.sleep(0.001)
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      killed = True
      break
  assert killed and tmps()
  assert convert.is_converted(str(dst))
  r = ep.run_tool("convert", args, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not tmps() and convert.is_converted(str(dst)) and not (dst / convert.TMP_OWNER_FILE).exists()
