"""The LISA demo's learning curve: validation gIoU / cIoU against steps and wall-clock minutes.

  python main.py --config configs/lisa_tiny.py --workdir workdir/lisa_tiny   # the demo (README)
  python bench/demo_curve.py workdir/lisa_tiny                                # -> bench/results/lisa_demo.json

Wall-clock times come from the TensorBoard events main.py writes (minutes since the first logged
step, so compilation before step 1 is not counted; it is reported separately from main.INFO).
"""

import glob
import json
import os
import struct
import sys

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)

from bench.common import RESULTS_DIR  # noqa: E402


def read_events(path: str):
  """(wall_time, step, tag, value) from a TFRecord event file (framing: len, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  with open(path, "rb") as f:
    while True:
      head = f.read(12)
      if len(head) < 12:
        break
      (n,) = struct.unpack("<Q", head[:8])
      data = f.read(n)
      f.read(4)
      ev = event_pb2.Event.FromString(data)
      for v in ev.summary.value:
        out.append((ev.wall_time, ev.step, v.tag, v.simple_value))
  return out


def main(workdir: str):
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*"))):
    events += read_events(path)
  if not events:
    raise SystemExit(f"no TensorBoard events under {workdir}/tensorboard")
  t0 = min(t for t, _, _, _ in events)
  curve = {}
  for t, step, tag, value in events:
    if tag in ("eval/giou", "eval/ciou"):
      curve.setdefault(step, {"step": step, "minutes": round((t - t0) / 60, 2)})[tag.split("/")[1]] = value
  rows = [curve[s] for s in sorted(curve)]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  result = {"workdir": workdir, "curve": rows, "best_giou": max(r["giou"] for r in rows),
            "total_steps": config.get("total_steps"), "batch_size": config.get("batch_size")}
  os.makedirs(RESULTS_DIR, exist_ok=True)
  out = os.path.join(RESULTS_DIR, "lisa_demo.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{'step':>6s} {'minutes':>8s} {'gIoU':>7s} {'cIoU':>7s}")
  for r in rows:
    print(f"{r['step']:6d} {r['minutes']:8.1f} {r['giou']:7.4f} {r['ciou']:7.4f}")
  print(f"best gIoU {result['best_giou']:.4f}; saved {out}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "workdir/lisa_tiny")
