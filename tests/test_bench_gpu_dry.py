"""bench/gpu.py --dry: the prepared GPU run must keep working on CPU (tiny sizes, every section)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_dry_runs_every_section(tmp_path):
  out = tmp_path / "gpu.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry", "--budget_s", "1e9", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for line in ("[roofline] measured bf16 matmul", "[llm] remat=none: compile_and_first_s",
               "[llm] remat=full: compile_and_first_s", "[attention] xla (remat=full): compile_and_first_s",
               "[attention] cudnn: skipped", "[lisa] train_step: compile_and_first_s",
               "[segment] batch=1: first_call_s", "[segment] batch=2: first_call_s"):
    assert line in proc.stdout, f"missing {line!r} in:\n{proc.stdout[-3000:]}"
  res = json.loads(out.read_text())
  assert res["roofline"]["peak_gflops"] > 0 and res["roofline"]["nominal_h200_bf16_tflops"] == 989
  for case in (res["llm"]["remat=none"], res["llm"]["remat=full"], res["lisa"]["train_step"]):
    assert 0 < case["mfu_measured_peak"] and case["step_s"] > 0 and case["compile_and_first_s"] > 0, case
  assert res["lisa"]["train_step"]["trained_params"] < res["lisa"]["train_step"]["params"]
  for b in (1, 2):
    seg = res["segment"][f"batch={b}"]
    assert seg["masks"] == b and seg["warm_s"] > 0, seg  # one mask per prompt [SEG]
