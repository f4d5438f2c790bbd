"""Bad-input probes of main.py and the converter, as a user meets them: each must exit 2 with one
clear line on stderr and no Python traceback (issue 18). Prints "N of M" and the failing probes.

  python bench/error_probes.py            # all probes (about 2-4 min on 2 loaded cores)
  python bench/error_probes.py main       # main.py probes only ("convert" for the converter's)

tests/test_cli_errors.py and tests/test_convert_errors.py run the same probes (PROBES below).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = "configs/lm_tiny.py:runlocal"
LISA = "configs/lisa_tiny.py:runlocal"
# absl's log prefix (W1202 18:29:18.123 ...), which the one error line is counted without
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


@dataclasses.dataclass
class Probe:
  name: str
  tool: str  # "main" | "convert"
  args: Callable[[str, "Fixtures"], list[str]]  # (scratch dir, fixtures) -> argv after the script
  expect: str = ""  # a fragment the error line must contain (case-insensitive)
  absent: str = ""  # a fragment stdout must not contain (work the error should come before)


@dataclasses.dataclass
class Fixtures:
  """Shared inputs: a trained lm_tiny workdir (None for probes that need none) and tiny checkpoints."""
  lm_workdir: str | None = None
  llama_ckpt: str | None = None  # a tiny HF llama directory (config.json + model.safetensors)


def _write(path: str, text: str | bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(text, bytes) else "w") as fh:
    fh.write(text)
  return path


def _copy_workdir(src: str, dst: str, drop_config: bool = False) -> str:
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("main.*", "tensorboard"))
  if drop_config:
    for n in ("config.json", "config.prev.json"):
      if os.path.exists(os.path.join(dst, n)):
        os.remove(os.path.join(dst, n))
  return dst


def _seg(tmp, *extra):
  return ["--config", LISA, "--workdir", os.path.join(tmp, "wd"), "--config.mode=segment",
          "--config.allow_random_init=True", *extra]


MAIN_PROBES = [
    Probe("config syntax error", "main",
          lambda t, f: ["--config", _write(os.path.join(t, "bad.py"), "def get_config(:\n  pass\n")], "syntax"),
    Probe("config without get_config", "main",
          lambda t, f: ["--config", _write(os.path.join(t, "noget.py"), "X = 1\n")], "get_config"),
    Probe("get_config raising", "main",
          lambda t, f: ["--config", _write(os.path.join(t, "raise.py"),
                                           "def get_config(arg=None):\n  raise RuntimeError('boom')\n")], "boom"),
    Probe("grad_accum not dividing the batch", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(t, "wd"), "--config.grad_accum=3"], "grad_accum"),
    Probe("mesh larger than the devices", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(t, "wd"), "--config.mesh.data=64"], "mesh"),
    Probe("batch_size=0", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(t, "wd"), "--config.batch_size=0"], "batch_size"),
    Probe("total_steps=-5", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(t, "wd"), "--config.total_steps=-5"],
          "total_steps"),
    Probe("grad_accum=0", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(t, "wd"), "--config.grad_accum=0"], "grad_accum"),
    Probe("workdir is a file", "main",
          lambda t, f: ["--config", LM, "--workdir", _write(os.path.join(t, "afile"), "x")], "workdir"),
    Probe("workdir under a file (not writable)", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(_write(os.path.join(t, "afile2"), "x"), "sub")],
          "workdir"),
    Probe("workdir under /proc", "main",
          lambda t, f: ["--config", LM, "--workdir", "/proc/jaxlisa_probe/wd"], "workdir"),
    Probe("eval workdir under /proc", "main",
          lambda t, f: ["--config", LM, "--workdir", "/proc/jaxlisa_probe/wd", "--config.mode=eval",
                        "--config.allow_random_init=True"], "workdir"),
    Probe("checkpoint of another width", "main",
          lambda t, f: ["--config", LM, "--workdir", _copy_workdir(f.lm_workdir, os.path.join(t, "wd")),
                        "--config.model.hidden_size=96"], "hidden_size"),
    Probe("checkpoint of another depth", "main",
          lambda t, f: ["--config", LM, "--workdir", _copy_workdir(f.lm_workdir, os.path.join(t, "wd")),
                        "--config.model.num_hidden_layers=3"], "num_hidden_layers"),
    Probe("checkpoint of another width, config.json gone", "main",
          lambda t, f: ["--config", LM, "--workdir", _copy_workdir(f.lm_workdir, os.path.join(t, "wd"), True),
                        "--config.model.hidden_size=96"], "checkpoint"),
    Probe("lisa_tiny run in an lm_tiny workdir", "main",
          lambda t, f: ["--config", LISA, "--workdir", _copy_workdir(f.lm_workdir, os.path.join(t, "wd"))], "task"),
    Probe("model.family=mistral over a llama checkpoint", "main",
          lambda t, f: ["--config", LM, "--workdir", _copy_workdir(f.lm_workdir, os.path.join(t, "wd")),
                        "--config.model.family=mistral"], "family"),
    Probe("eval with another width than its checkpoint", "main",
          lambda t, f: ["--config", LM, "--workdir", _copy_workdir(f.lm_workdir, os.path.join(t, "wd")),
                        "--config.mode=eval", "--config.model.hidden_size=96"], "does not fit the model"),
    Probe("segment with a directory as image", "main",
          lambda t, f: _seg(t, f"--config.image={t}", "--config.prompt=Which shape is red?"), "image"),
    Probe("segment with a missing image", "main",
          lambda t, f: _seg(t, f"--config.image={t}/nope.png", "--config.prompt=Which shape is red?"), "nope.png"),
    Probe("segment with a text file as image", "main",
          lambda t, f: _seg(t, "--config.image=" + _write(os.path.join(t, "a.png"), "not an image"),
                            "--config.prompt=Which shape is red?"), "a.png"),
    Probe("nonexistent init.pretrained", "main",
          lambda t, f: ["--config", LISA, "--workdir", os.path.join(t, "wd"),
                        f"--config.init.pretrained={t}/no_such_model"], "no_such_model"),
    Probe("segment: nonexistent init.pretrained", "main",
          lambda t, f: ["--config", LISA, "--workdir", os.path.join(t, "wd"), "--config.mode=segment",
                        f"--config.init.pretrained={t}/no_such_model", "--config.image=" + _png(os.path.join(t, "ok.png")),
                        "--config.prompt=q"], "no_such_model"),
    Probe("segment: prompt too long", "main",
          lambda t, f: _seg(t, "--config.image=" + _png(os.path.join(t, "ok.png")),
                            "--config.prompt=" + " ".join(["Which shape is red?"] * 400)), "prompt",
          absent="loading weights"),
    Probe("unknown mode", "main", lambda t, f: ["--config", LM, "--config.mode=fly"], "mode"),
    Probe("unknown task", "main",
          lambda t, f: ["--config", LM, "--workdir", os.path.join(t, "wd"), "--config.task=nope"], "task"),
]


def _png(path: str) -> str:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(path)
  return path


def _conv(t, f, *extra, dst=None):
  return ["--dst", dst or os.path.join(t, "out"), *extra]


CONVERT_PROBES = [
    Probe("missing src", "convert", lambda t, f: ["--src", f"{t}/nope", *_conv(t, f)], "nope"),
    Probe("wrong family", "convert", lambda t, f: ["--src", f.llama_ckpt, "--family", "sam", *_conv(t, f)], "sam"),
    Probe("unknown family", "convert", lambda t, f: ["--src", f.llama_ckpt, "--family", "gpt9", *_conv(t, f)],
          "gpt9"),
    Probe("not a checkpoint", "convert",
          lambda t, f: ["--src", _write(os.path.join(t, "x.safetensors"), b"hello world" * 10), *_conv(t, f)],
          "x.safetensors"),
    Probe("truncated safetensors", "convert",
          lambda t, f: ["--src", _truncated(f.llama_ckpt, t), *_conv(t, f)], "model.safetensors"),
    Probe("torch .pth with the wrong keys", "convert",
          lambda t, f: ["--src", _pth(os.path.join(t, "w.pth"), {"foo.weight": [[1.0]]}), *_conv(t, f)], "w.pth"),
    Probe("config.json syntax error", "convert",
          lambda t, f: ["--src", _bad_config(f.llama_ckpt, t), *_conv(t, f)], "config.json"),
    Probe("dst is an existing file", "convert",
          lambda t, f: ["--src", f.llama_ckpt, "--dst", _write(os.path.join(t, "dstfile"), "x")], "dstfile"),
    Probe("dst parent not writable", "convert",
          lambda t, f: ["--src", f.llama_ckpt, "--dst", os.path.join(_write(os.path.join(t, "pf"), "x"), "out")],
          "out"),
    Probe("dst under /proc", "convert", lambda t, f: ["--src", f.llama_ckpt, "--dst", "/proc/jaxlisa_probe"],
          "jaxlisa_probe"),
    Probe("non-finite weights", "convert",
          lambda t, f: ["--src", _llama_variant(f.llama_ckpt, t, "nan"), *_conv(t, f)], "model.norm.weight"),
    Probe("integer weights", "convert",
          lambda t, f: ["--src", _llama_variant(f.llama_ckpt, t, "int"), *_conv(t, f)], "model.norm.weight"),
    Probe("--verify with a single weights file", "convert",
          lambda t, f: ["--src", os.path.join(f.llama_ckpt, "model.safetensors"), "--verify", *_conv(t, f)],
          "--verify"),
    Probe("--verify with a single .pth", "convert",
          lambda t, f: ["--src", _as_pth(f.llama_ckpt, t, with_config=True), "--verify", *_conv(t, f)], "--verify"),
    Probe("single .pth, no config.json, heads not inferable", "convert",
          lambda t, f: ["--src", _as_pth(f.llama_ckpt, t, with_config=False), *_conv(t, f)], "config.json"),
    Probe("--strict with out-of-range weights", "convert",
          lambda t, f: ["--src", _llama_variant(f.llama_ckpt, t, "huge"), "--strict", *_conv(t, f)],
          "model.norm.weight"),
    Probe("--verify for a family without a verifier", "convert",
          lambda t, f: ["--src", f.llama_ckpt, "--family", "clip_vision", "--verify", *_conv(t, f)], "--verify"),
    Probe("bad --override", "convert", lambda t, f: ["--src", f.llama_ckpt, "--override", "x", *_conv(t, f)],
          "override"),
    Probe("unknown --override field", "convert",
          lambda t, f: ["--src", f.llama_ckpt, "--override", "no_such_field=1", *_conv(t, f)], "no_such_field"),
]

PROBES = MAIN_PROBES + CONVERT_PROBES


def _pth(path: str, state: dict) -> str:
  import torch  # pylint: disable=import-outside-toplevel
  torch.save({k: torch.tensor(v) for k, v in state.items()}, path)
  return path


def _truncated(ckpt: str, t: str) -> str:
  import shutil  # pylint: disable=import-outside-toplevel
  d = os.path.join(t, "trunc")
  shutil.copytree(ckpt, d)
  f = os.path.join(d, "model.safetensors")
  data = open(f, "rb").read()
  _write(f, data[: len(data) * 2 // 3])
  return d


def _bad_config(ckpt: str, t: str) -> str:
  import shutil  # pylint: disable=import-outside-toplevel
  d = os.path.join(t, "badcfg")
  shutil.copytree(ckpt, d)
  _write(os.path.join(d, "config.json"), '{"model_type": "llama", ')
  return d


def _as_pth(ckpt: str, t: str, with_config: bool) -> str:
  """The tiny llama's weights as one torch .pth file (its config.json beside it, or not)."""
  import shutil  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  d = os.path.join(t, "pth")
  os.makedirs(d)
  if with_config:
    shutil.copy(os.path.join(ckpt, "config.json"), d)
  torch.save(load_file(os.path.join(ckpt, "model.safetensors")), os.path.join(d, "model.pth"))
  return os.path.join(d, "model.pth")


def _llama_variant(ckpt: str, t: str, kind: str) -> str:
  """A copy of the tiny llama whose model.norm.weight is NaN/Inf ("nan"), int64 ("int") or
  garbage-sized (2.9e38, "huge")."""
  import shutil  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  d = os.path.join(t, kind)
  shutil.copytree(ckpt, d)
  f = os.path.join(d, "model.safetensors")
  state = load_file(f)
  w = state["model.norm.weight"]
  if kind == "nan":
    w = w.copy()
    w[0], w[1] = np.nan, np.inf
  elif kind == "huge":
    w = np.full(w.shape, 2.9e38, w.dtype)
  else:
    w = np.ones(w.shape, np.int64)
  state["model.norm.weight"] = w
  save_file(state, f)
  return d


def tiny_llama(path: str) -> str:
  """A 2-layer, 32-wide HF LlamaForCausalLM directory (config.json + model.safetensors), built with
  transformers on the spot (seconds)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path


def train_lm(workdir: str) -> str:
  """An 8-step lm_tiny:runlocal run (checkpoints at 4 and 8; ~20 s on 2 cores)."""
  r = run_tool("main", ["--config", LM, "--workdir", workdir], timeout=600)
  if r.returncode != 0:
    raise RuntimeError(f"training the probe workdir failed:\n{r.stderr[-3000:]}")
  return workdir


def tool_command(tool: str, args: list[str], debug: bool = False) -> tuple[list[str], dict]:
  """(argv, environment) that run main.py or the converter from the repository root on CPU."""
  script = "main.py" if tool == "main" else os.path.join("tools", "convert_torch_weights.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAXLISA_DEBUG", None)
  env["PYTHONPATH"] = ROOT
  return [sys.executable, script, *args, *(["--debug"] if debug else [])], env


def run_tool(tool: str, args: list[str], timeout: float = 600, debug: bool = False) -> subprocess.CompletedProcess:
  argv, env = tool_command(tool, args, debug)
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(stderr: str) -> list[str]:
  """stderr without absl log records (and their continuation lines) and blank lines."""
  out, in_log = [], False
  for line in stderr.splitlines():
    if _LOG_LINE.match(line):
      in_log = True
      continue
    if in_log and (line.startswith(" ") or not line.strip()):
      continue
    in_log = False
    if line.strip():
      out.append(line)
  return out


def verdict(probe: Probe, r: subprocess.CompletedProcess) -> str:
  """'' when the probe exited 2 with one clear line naming what it should, else what is wrong."""
  lines = error_lines(r.stderr)
  if "Traceback" in r.stderr:
    return f"traceback (rc {r.returncode}): {lines[-1] if lines else ''}"
  if r.returncode != 2:
    return f"rc {r.returncode}: {(lines or [''])[-1]}"
  if len(lines) != 1:
    return f"{len(lines)} stderr lines: {lines[:3]}"
  if probe.expect and probe.expect.lower() not in lines[0].lower():
    return f"error line does not name {probe.expect!r}: {lines[0]}"
  if probe.absent and probe.absent in r.stdout:
    return f"stdout has {probe.absent!r}: the error came after that work"
  return ""


def main(which: str = "all") -> int:
  probes = [p for p in PROBES if which in ("all", p.tool)]
  with tempfile.TemporaryDirectory() as tmp:
    fx = Fixtures()
    if any(p.tool == "main" for p in probes):
      fx.lm_workdir = train_lm(os.path.join(tmp, "lm"))
    if any(p.tool == "convert" for p in probes):
      fx.llama_ckpt = tiny_llama(os.path.join(tmp, "llama"))
    bad = []
    for i, p in enumerate(probes):
      t = os.path.join(tmp, f"p{i}")
      os.makedirs(t)
      try:
        r = run_tool(p.tool, p.args(t, fx), timeout=150)
        why = verdict(p, r)
      except subprocess.TimeoutExpired:
        why = "timeout"
      print(f"{'ok  ' if not why else 'FAIL'} {p.tool:7} {p.name}" + (f"  -- {why}" if why else ""), flush=True)
      if why:
        bad.append(p.name)
    for tool in ("main", "convert"):
      sel = [p for p in probes if p.tool == tool]
      if sel:
        print(f"{tool}: {sum(p.name not in bad for p in sel)} of {len(sel)} probes exit 2 with one clear line")
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
