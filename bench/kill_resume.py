"""kill -9 during training, then resume: is the result bit-exact to an uninterrupted run? (issue 18)

Each trial starts main.py (lm_tiny or lisa_tiny runlocal, a few more steps), watches its workdir
and sends SIGKILL at a chosen moment: mid-interval, while orbax writes a latest or a best
checkpoint (its *.orbax-checkpoint-tmp* folder exists), during eval (the eval step's train row is
written, its eval row not yet), in the resumed run's restore (killed twice), or during an async
save. Then main.py runs again to the end, and the trial compares with the uninterrupted run:
every metrics.jsonl value (step times aside), and every array of the final latest and best
checkpoints, bit for bit (the data iterator's state comes through in the losses).

  python bench/kill_resume.py            # all trials (about 10-20 min on 2 loaded cores)
  python bench/kill_resume.py lm         # lm_tiny trials only ("lisa" for lisa_tiny's)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: jaxlisa from this checkout
  sys.path.insert(0, ROOT)
RUNS = {  # name -> main.py arguments of the run every trial interrupts
    "lm": ["--config", "configs/lm_tiny.py:runlocal", "--config.total_steps=16"],
    "lisa": ["--config", "configs/lisa_tiny.py:runlocal", "--config.total_steps=6"],
    "lm8": ["--config", "configs/lm_tiny.py:runlocal"],  # tests/test_reliability.py's uninterrupted run
}
TIMING_KEYS = ("train/step_time",)


def _metrics(workdir: str) -> dict[tuple[int, str], float]:
  from jaxlisa.training.trainer import read_metrics  # pylint: disable=import-outside-toplevel
  return {(r["step"], k): v for r in read_metrics(workdir) for k, v in r.items()
          if k != "step" and k not in TIMING_KEYS}


def _rows(workdir: str) -> list[dict]:
  from jaxlisa.training.trainer import read_metrics  # pylint: disable=import-outside-toplevel
  return read_metrics(workdir)


def _tmp_saving(workdir: str, sub: str) -> bool:
  d = os.path.join(workdir, sub)
  return os.path.isdir(d) and any("orbax-checkpoint-tmp" in n for n in os.listdir(d))


def _steps(workdir: str, sub: str = "checkpoints") -> list[int]:
  d = os.path.join(workdir, sub)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def after_step(k: int) -> Callable[[str], bool]:
  return lambda wd: any(r["step"] >= k and "train/loss" in r for r in _rows(wd))


def saving(sub: str, nth: int = 1) -> Callable[[str], bool]:
  """While orbax writes into workdir/<sub> (checkpoints or best), once `nth - 1` steps are there."""
  return lambda wd: _tmp_saving(wd, sub) and len(_steps(wd, sub)) >= nth - 1


def in_eval(step: int) -> Callable[[str], bool]:
  def check(wd):
    rows = [r for r in _rows(wd) if r["step"] == step]
    return any("train/loss" in r for r in rows) and not any(any(k.startswith("eval/") for k in r) for r in rows)
  return check


def unsummed(wd: str) -> bool:
  """A finalized latest step without its checksum file yet (the instant after orbax's rename)."""
  return any(not os.path.exists(os.path.join(wd, "checkpoints", str(s), "jaxlisa_checksum.json"))
             for s in _steps(wd))


def restored_by_a_new_run(wd: str) -> Callable[[str], bool]:
  """Once a run started after now has logged its restore (before its first step: metrics.jsonl
  is being truncated to the restored step)."""
  log = os.path.join(wd, "main.INFO")
  before = os.path.realpath(log) if os.path.exists(log) else None
  def check(w):
    return (os.path.exists(log) and os.path.realpath(log) != before
            and "restored checkpoint at step" in open(log, errors="replace").read())
  return check


@dataclasses.dataclass
class Trial:
  name: str
  run: str  # a RUNS key
  when: Callable[[str], bool]  # kill once this holds for the workdir
  extra: tuple[str, ...] = ()  # more main.py arguments (both runs)
  kill_resume_too: bool = False  # kill the first resume as well, right after its restore


TRIALS = [
    Trial("lm: mid-interval (after step 6)", "lm", after_step(6)),
    Trial("lm: during the 2nd latest save", "lm", saving("checkpoints", 2)),
    Trial("lm: during the 3rd latest save", "lm", saving("checkpoints", 3)),
    Trial("lm: during a best save", "lm", saving("best", 2)),
    Trial("lm: during eval at step 8", "lm", in_eval(8)),
    Trial("lm: between a save and its checksum", "lm", unsummed),
    Trial("lm: mid-interval, then in the resume's restore", "lm", after_step(10), kill_resume_too=True),
    Trial("lm: during an async save", "lm", saving("checkpoints", 2), extra=("--config.ckpt.async_save=True",)),
    Trial("lisa: during the 2nd latest save", "lisa", saving("checkpoints", 2)),
    Trial("lisa: during eval at step 4", "lisa", in_eval(4)),
    Trial("lisa: mid-interval (after step 3)", "lisa", after_step(3)),
]


def _env() -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("JAXLISA_DEBUG", None)
  return env


def run_main(args: list[str], workdir: str, timeout: float = 1800) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "main.py", *args, "--workdir", workdir], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=_env())


def run_and_kill(args: list[str], workdir: str, when: Callable[[str], bool], timeout: float = 1800) -> str:
  """Start main.py, SIGKILL it (by its pid) once `when(workdir)` holds; what happened, in words."""
  proc = subprocess.Popen([sys.executable, "main.py", *args, "--workdir", workdir], cwd=ROOT,  # pylint: disable=consider-using-with
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
  t0 = time.time()
  try:
    while proc.poll() is None and time.time() - t0 < timeout:
      try:
        hit = when(workdir)
      except (OSError, ValueError):  # a file mid-write: look again
        hit = False
      if hit:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"killed after {time.time() - t0:.1f} s at steps {_steps(workdir)}"
      time.sleep(0.002)
    return f"missed: exited {proc.returncode} before the moment"
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()


def _arrays(item_dir: str) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(item_dir)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def compare(ref: str, got: str) -> list[str]:
  """Differences between two finished workdirs: metrics values, final latest and best arrays."""
  out = []
  a, b = _metrics(ref), _metrics(got)
  for k in sorted(set(a) | set(b)):
    if not (a.get(k) == b.get(k) or (a.get(k) != a.get(k) and b.get(k) != b.get(k))):  # NaN == NaN
      out.append(f"metrics {k}: {a.get(k)} vs {b.get(k)}")
  for sub, item in (("checkpoints", "state"), ("best", "params")):
    sa, sb = _steps(ref, sub), _steps(got, sub)
    if sa[-1:] != sb[-1:]:
      out.append(f"{sub}: steps {sa} vs {sb}")
      continue
    if not sa:
      continue
    xa = _arrays(os.path.join(ref, sub, str(sa[-1]), item))
    xb = _arrays(os.path.join(got, sub, str(sb[-1]), item))
    for k in sorted(set(xa) | set(xb)):
      if k not in xa or k not in xb or xa[k].dtype != xb[k].dtype or not np.array_equal(xa[k], xb[k], equal_nan=True):
        out.append(f"{sub}/{sb[-1]}/{item} {k} differs")
  return out


def trial(t: Trial, ref: str, tmp: str) -> tuple[bool, str]:
  wd = os.path.join(tmp, "wd")
  shutil.rmtree(wd, ignore_errors=True)
  args = RUNS[t.run] + list(t.extra)
  what = run_and_kill(args, wd, t.when)
  if t.kill_resume_too and what.startswith("killed"):
    what += "; resume " + run_and_kill(args, wd, restored_by_a_new_run(wd))
  r = run_main(args, wd)
  if r.returncode != 0:
    return False, f"{what}; the resume exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
  diffs = compare(ref, wd)
  return not diffs, what + ("; bit-exact" if not diffs else f"; {len(diffs)} differences: " + "; ".join(diffs[:4]))


def main(which: str = "all") -> int:
  trials = [t for t in TRIALS if which in ("all", t.run)]
  with tempfile.TemporaryDirectory() as tmp:
    refs = {}
    for run in sorted({t.run for t in trials}):
      refs[run] = os.path.join(tmp, f"ref-{run}")
      t0 = time.time()
      r = run_main(RUNS[run], refs[run])
      if r.returncode != 0:
        raise RuntimeError(f"the uninterrupted {run} run failed:\n{r.stderr[-3000:]}")
      print(f"reference {run}: {time.time() - t0:.0f} s, checkpoints {_steps(refs[run])}, best {_steps(refs[run], 'best')}",
            flush=True)
    exact = killed = 0
    for i, t in enumerate(trials):
      ok, what = trial(t, refs[t.run], os.path.join(tmp, f"t{i}"))
      hit = what.startswith("killed")  # else the run ended before the moment came (not a trial)
      killed += hit
      exact += ok and hit
      print(f"{'ok  ' if ok else 'FAIL'} {t.name}: {what}", flush=True)
      shutil.rmtree(os.path.join(tmp, f"t{i}"), ignore_errors=True)
    print(f"{exact} of {killed} killed-and-resumed runs bit-exact to the uninterrupted run"
          + (f" ({len(trials) - killed} missed their moment)" if killed < len(trials) else ""))
  return 0 if exact == killed == len(trials) else 1


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
