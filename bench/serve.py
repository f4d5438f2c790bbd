"""Loopback load on the HTTP service: requests/s and p50/p99 latency vs serve batch size and client
concurrency, and whether batched answers equal the unbatched ones.

  python bench/serve.py                                  # tiny LISA, random init (allowed explicitly)
  python bench/serve.py --batch_sizes 1,4 --concurrency 1,8 --requests 64 --max_seconds 60

For each serve.max_batch_size a server (main.py --config.mode=serve) starts on a free loopback port
(all of them share one persistent compilation cache); for each client concurrency C, C threads post
requests back to back until --requests have answered or --max_seconds have passed (closed loop, so
it always stops). Request i uses image i % 8 and question i % 4, so every run asks the same questions:
answers at batch size B are compared with batch size 1's. Prints a table, writes
bench/results/serve.json with the machine and its load (os.getloadavg()).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS_DIR  # noqa: E402
from jaxlisa.serving import client  # noqa: E402

QUESTIONS = ["Where is the red shape? Please output segmentation mask.", "What is in the image?",
             "Can you segment the circle in this image?", "Which shape is the largest? Please explain."]


def _images(n: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96 + 8 * i, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    out.append(buf.getvalue())
  return out


def load(url: str, concurrency: int, requests: int, max_seconds: float, images: list[bytes]) -> dict:
  """Closed-loop load: `concurrency` threads, `requests` in all or until max_seconds."""
  lock, next_i, rows = threading.Lock(), [0], []
  t0 = time.perf_counter()

  def worker():
    while True:
      with lock:
        i = next_i[0]
        if i >= requests or time.perf_counter() - t0 > max_seconds:
          return
        next_i[0] += 1
      t = time.perf_counter()
      status, body = client.post_segment(url, {"image": images[i % len(images)], "prompt": QUESTIONS[i % 4]})
      rows.append((i, status, time.perf_counter() - t, body.get("answer"), body.get("timing", {}).get("batch_size")))

  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    for f in [pool.submit(worker) for _ in range(concurrency)]:
      f.result()
  wall = time.perf_counter() - t0
  ok = [r for r in rows if r[1] == 200]
  lat = np.asarray([r[2] for r in ok]) * 1e3
  return {"concurrency": concurrency, "requests": len(rows), "ok": len(ok), "wall_s": round(wall, 3),
          "req_per_s": round(len(ok) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(ok) else None,
          "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(ok) else None,
          "mean_batch": round(float(np.mean([r[4] for r in ok])), 2) if ok else None,
          "answers": {(r[0] % len(images), r[0] % 4): r[3] for r in ok}}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/lisa_tiny.py:runlocal")
  ap.add_argument("--batch_sizes", default="1,4,8")
  ap.add_argument("--concurrency", default="1,4,8")
  ap.add_argument("--requests", type=int, default=48, help="requests per (batch size, concurrency)")
  ap.add_argument("--max_seconds", type=float, default=60.0, help="time cap per (batch size, concurrency)")
  ap.add_argument("--max_new_tokens", type=int, default=8)
  ap.add_argument("--batch_wait_ms", type=float, default=20.0)
  args = ap.parse_args()
  batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
  concurrency = [int(x) for x in args.concurrency.split(",")]
  images = _images(8)
  tmp = tempfile.mkdtemp(prefix="jaxlisa-bench-serve-")
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "xla-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  rows, reference = [], None
  for b in batch_sizes:
    port = client.free_port()
    url = f"http://127.0.0.1:{port}"
    with open(os.path.join(tmp, f"server_b{b}.log"), "w") as log:
      t = time.time()
      proc = client.launch(["--config", args.config, "--workdir", os.path.join(tmp, "w"), "--config.allow_random_init=True",
                            f"--config.max_new_tokens={args.max_new_tokens}", f"--config.serve.max_batch_size={b}",
                            f"--config.serve.batch_wait_ms={args.batch_wait_ms}", "--config.serve.queue_size=64"],
                           port, log, env)
      try:
        client.wait_ready(url, proc, 900)
        print(f"batch size {b}: server ready in {time.time() - t:.0f} s (compile + warm-up)", flush=True)
        for c in concurrency:
          r = load(url, c, args.requests, args.max_seconds, images)
          answers = r.pop("answers")
          if reference is None:
            reference = dict(answers)
          same = [answers[k] == reference[k] for k in answers if k in reference]
          r.update(batch_size=b, answers_equal_unbatched=f"{sum(same)}/{len(same)}", loadavg=os.getloadavg())
          rows.append(r)
          print(f"  concurrency {c}: {r['req_per_s']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                f"mean batch {r['mean_batch']}, answers = unbatched {r['answers_equal_unbatched']}", flush=True)
      finally:
        client.stop(proc)
  load_avg = os.getloadavg()
  print(f"\nserve: tiny LISA (random init), max_new_tokens {args.max_new_tokens}, loopback, "
        f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} on {os.cpu_count()} CPUs")
  print(f"{'batch':>5s} {'clients':>7s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>10s} "
        f"{'= unbatched':>11s}")
  for r in rows:
    print(f"{r['batch_size']:5d} {r['concurrency']:7d} {r['req_per_s']:7.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
          f"{r['mean_batch']:10.2f} {r['answers_equal_unbatched']:>11s}")
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, "serve.json")
  with open(path, "w") as f:
    json.dump({"name": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": args.config,
               "max_new_tokens": args.max_new_tokens, "batch_wait_ms": args.batch_wait_ms,
               "cpu_count": os.cpu_count(), "loadavg_end": load_avg, "rows": rows}, f, indent=2)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
