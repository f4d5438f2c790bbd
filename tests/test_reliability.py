"""Data-loss cases on the runlocal LM, as main.py runs them: non-finite steps are skipped and stop
the run, a corrupt latest checkpoint falls back to the previous good one, a torn metrics line or a
corrupt tokenizer does not block a resume, a refused run leaves config.json as it was."""

import glob
import json
import os
import subprocess
import sys

import pytest

from jaxlisa import config as cfg_lib
from jaxlisa.training.trainer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *overrides, rc=0):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("JAXLISA_DEBUG", None)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", "configs/lm_tiny.py:runlocal",
                      "--workdir", str(workdir), *overrides], cwd=ROOT, capture_output=True, text=True,
                     timeout=400, env=env)
  assert r.returncode == rc, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def _error_line(r):
  """The one stderr line of a refused run (absl warnings aside)."""
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in lines if l.startswith("error: ") or l.startswith("main.py: error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  return errors[0]


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 8-step run (checkpoints at 4 and 8)."""
  wd = tmp_path_factory.mktemp("straight")
  _main(wd)
  assert _steps(wd) == [4, 8]
  return wd


def test_nonfinite_learning_rates_refused(tmp_path):
  for lr in ("nan", "-1", "0", "inf"):
    r = _main(tmp_path / lr, f"--config.optim.lr={lr}", rc=2)
    assert "optim.lr" in _error_line(r)
    assert not os.path.exists(tmp_path / lr / "config.json")


def test_nonfinite_steps_skipped_then_stop(tmp_path):
  wd = tmp_path / "nan"
  r = _main(wd, "--config.optim.lr=1e6", "--config.optim.max_consecutive_nonfinite=2", rc=2)
  assert "consecutive" in _error_line(r) and "max_consecutive_nonfinite" in r.stderr
  rows = read_metrics(str(wd))
  skipped = [m["train/skipped_steps"] for m in rows if "train/skipped_steps" in m]
  assert skipped and skipped[-1] >= 2
  # whatever was saved holds finite numbers, and a NaN eval never became `best`
  for m in rows:
    if "eval/loss" in m and m["eval/loss"] != m["eval/loss"]:
      assert not glob.glob(str(wd / "best" / str(m["step"])))
  for best in glob.glob(str(wd / "best" / "*" / "_CHECKPOINT_METADATA")):
    meta = json.load(open(best))
    assert all(v == v for v in (meta.get("metrics") or {}).values()), meta


def _flip_bytes(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  assert files
  for f in files:
    data = bytearray(open(f, "rb").read())
    for i in range(len(data) // 3, len(data), max(1, len(data) // 50)):
      data[i] ^= 0xFF
    open(f, "wb").write(bytes(data))


def test_corrupt_latest_falls_back_to_previous(straight, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "flipped"
  shutil.copytree(straight, wd)
  _flip_bytes(str(wd / "checkpoints" / "8"))
  r = _main(wd)  # the same 8-step job: the corrupt step 8 is set aside, steps 5..8 run again from 4
  assert "checkpoint at step 8 is corrupt" in r.stderr and "falling back to the checkpoint at step 4" in r.stderr
  assert "resuming at step 4" in r.stdout and "done: step 8/8" in r.stdout
  assert _steps(wd) == [4, 8] and os.listdir(wd / "checkpoints.corrupt")
  # bit-exact: the same losses as the uninterrupted run
  a = {m["step"]: m["train/loss"] for m in read_metrics(str(straight)) if "train/loss" in m}
  b = {m["step"]: m["train/loss"] for m in read_metrics(str(wd)) if "train/loss" in m}
  assert sorted(b) == list(range(1, 9))
  for s in range(5, 9):
    assert b[s] == a[s], (s, a[s], b[s])


def test_torn_metrics_and_corrupt_tokenizer(straight, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "torn"
  shutil.copytree(straight, wd)
  tok = wd / "tokenizer" / "tokenizer.json"
  good = tok.read_bytes()
  tok.write_bytes(good[: len(good) // 2])
  r = _main(wd, "--config.total_steps=10", rc=2)
  assert str(tok) in _error_line(r) and "corrupt tokenizer" in r.stderr
  tok.write_bytes(good)
  with open(wd / "metrics.jsonl", "a") as fh:
    fh.write('{"step": 9, "train/lo')  # a kill mid-write
  r = _main(wd, "--config.total_steps=10")
  assert "resuming at step 8" in r.stdout and "done: step 10/10" in r.stdout
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  assert all(json.loads(l) for l in lines)  # repaired
  assert [m["step"] for m in read_metrics(str(wd)) if "train/loss" in m] == list(range(1, 11))


def test_checkpoints_without_config_json(straight, tmp_path):
  """Nothing to check the config against but the checkpoint itself: a misfit is refused naming
  the parameters, the checkpoints stay where they are (not set aside as corrupt) and no
  config.json is written; one that fits resumes and then writes it."""
  import shutil  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "noconfig"
  shutil.copytree(straight, wd)
  (wd / "config.json").unlink()
  r = _main(wd, "--config.model.hidden_size=96", rc=2)
  assert "checkpoints/8 does not fit the model" in _error_line(r) and "[256, 64] vs model [256, 96]" in r.stderr
  assert _steps(wd) == [4, 8] and not os.path.exists(wd / "checkpoints.corrupt")
  assert not os.path.exists(wd / "config.json")
  r = _main(wd, "--config.total_steps=9")
  assert "resuming at step 8" in r.stdout and "done: step 9/9" in r.stdout
  assert json.load(open(wd / "config.json"))["model"]["hidden_size"] == 64


def test_refused_runs_leave_config_json(straight, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "refused"
  shutil.copytree(straight, wd)
  before = {n: (wd / n).read_text() for n in ("config.json", "command.txt")}
  for _ in range(2):
    r = _main(wd, "--config.model.hidden_size=96", rc=2)
    assert "model.hidden_size: 64 -> 96" in _error_line(r) and "fresh_start" in r.stderr
  assert {n: (wd / n).read_text() for n in before} == before
  assert not os.path.exists(wd / "config.prev.json")
  r = _main(wd, "--config.model.family=mistral", rc=2)
  assert "model.family: 'llama' -> 'mistral'" in _error_line(r)
  # the explicit switch moves the old run aside (no training here: the library call alone)
  config = cfg_lib.load_config(os.path.join(ROOT, "configs", "lm_tiny.py:runlocal"))
  config.model.hidden_size, config.fresh_start = 96, True
  cfg_lib.accept_run(config, str(wd))
  assert json.load(open(wd / "config.json"))["model"]["hidden_size"] == 96
  assert not os.path.exists(wd / "checkpoints")
  aside = glob.glob(str(wd / "previous-*"))
  assert len(aside) == 1 and _steps(aside[0]) == [4, 8]


def test_restore_failure_of_a_verified_checkpoint_is_an_error_not_corruption(tmp_path, monkeypatch):
  """A step whose checksum verifies but which does not restore (the model or program differs)
  stops with CheckpointError and stays in place; without a checksum it counts as corrupt and the
  previous step is used."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  state = {"trainable": {"w": np.ones((3,), np.float32)}}
  ck = ckpt_lib.Checkpoints(str(tmp_path), max_to_keep=3)
  ck.save(1, state)
  ck.save(2, {"trainable": {"w": np.full((3,), 2.0, np.float32)}})
  ck.wait()
  real = ck.restore

  def restore(step, target):
    if step == 2:
      raise RuntimeError("boom")
    return real(step, target)
  monkeypatch.setattr(ck, "restore", restore)
  target = ckpt_lib.abstract(state)
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints/2, whose checksum verifies: RuntimeError: boom"):
    ck.restore_latest(target)
  assert ck.latest.all_steps() == [1, 2]
  os.remove(tmp_path / "checkpoints" / "2" / ckpt_lib.CHECKSUM_FILE)
  step, restored, _ = ck.restore_latest(target)
  assert step == 1 and np.asarray(restored["trainable"]["w"]).tolist() == [1.0] * 3
  assert ck.latest.all_steps() == [1] and os.listdir(tmp_path / "checkpoints.corrupt")
  ck.close()


def test_tokenizer_saves_are_all_or_nothing(tmp_path):
  """A kill in the middle of saving the run's tokenizer leaves no tokenizer.json (so the next run
  trains it again) instead of a torn one that stops every resume."""
  from jaxlisa.data import synthetic_text  # pylint: disable=import-outside-toplevel
  from jaxlisa.data.tokenization import load_saved_tokenizer, save_tokenizer  # pylint: disable=import-outside-toplevel
  tok = synthetic_text.train_tokenizer(["the red circle is left of the blue square"] * 20, 64)

  class KilledMidSave:
    def save_pretrained(self, d):
      tok.save_pretrained(d)
      path = os.path.join(d, "tokenizer.json")
      data = open(path, "rb").read()
      open(path, "wb").write(data[: len(data) // 2])
      raise KeyboardInterrupt  # the process dies here

  d = tmp_path / "tokenizer"
  with pytest.raises(KeyboardInterrupt):
    save_tokenizer(KilledMidSave(), str(d))
  assert not (d / "tokenizer.json").exists()
  d.mkdir()
  (d / "tokenizer_config.json").write_text("{")  # an older interrupted save's leftovers
  save_tokenizer(tok, str(d))
  assert load_saved_tokenizer(str(d)).encode("red circle") == tok.encode("red circle")
  assert os.listdir(tmp_path) == ["tokenizer"]


def test_kill_9_during_a_save_resumes_bit_exactly(straight, tmp_path):
  """One trial of bench/kill_resume.py: SIGKILL while orbax writes the step-8 checkpoint, resume,
  then every metric and every array of the final latest and best checkpoints as `straight`'s."""
  sys.path.insert(0, ROOT)
  from bench import kill_resume as kr  # pylint: disable=import-outside-toplevel
  t = kr.Trial("during the 2nd latest save", "lm8", kr.saving("checkpoints", 2))
  ok, what = kr.trial(t, str(straight), str(tmp_path))
  assert what.startswith("killed") and ok, what
