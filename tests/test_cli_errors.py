"""main.py on bad input (issue 18): every probe of bench/error_probes.py exits 2 with one clear line
on stderr naming what is wrong, and no Python traceback; --debug shows the traceback instead.
Subprocesses; the probes that need a trained workdir share one 8-step lm_tiny:runlocal run."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import error_probes as ep  # noqa: E402


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  return ep.Fixtures(lm_workdir=ep.train_lm(str(tmp_path_factory.mktemp("lm") / "wd")))


@pytest.mark.parametrize("probe", ep.MAIN_PROBES, ids=[p.name for p in ep.MAIN_PROBES])
def test_bad_input_is_exit_2_and_one_line(probe, fixtures, tmp_path):
  r = ep.run_tool("main", probe.args(str(tmp_path), fixtures), timeout=300)
  assert ep.verdict(probe, r) == "", r.stderr[-3000:]


def test_refused_runs_write_nothing(tmp_path):
  wd = tmp_path / "wd"
  for bad in ("--config.batch_size=0", "--config.total_steps=-5", f"--config.init.pretrained={tmp_path}/none"):
    r = ep.run_tool("main", ["--config", ep.LM, "--workdir", str(wd), bad], timeout=300)
    assert r.returncode == 2 and not wd.exists(), (bad, r.stderr[-2000:])


def test_debug_shows_the_traceback(tmp_path):
  probe = ep.MAIN_PROBES[2]  # get_config raising
  r = ep.run_tool("main", probe.args(str(tmp_path), ep.Fixtures()), debug=True, timeout=300)
  assert r.returncode != 0 and "Traceback" in r.stderr and "RuntimeError: boom" in r.stderr


def test_help_documents_debug():
  r = ep.run_tool("main", ["--help"], timeout=300)
  assert r.returncode == 0 and "--debug" in r.stdout and "JAXLISA_DEBUG" in r.stdout
