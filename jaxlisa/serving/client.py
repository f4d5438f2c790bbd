"""A loopback client of the serving contract (jaxlisa.serving.server): start main.py's serve mode as a
subprocess, wait for /healthz, POST /v1/segment. Used by tests/test_serve*.py and bench/serve.py.

  proc = launch(["--config", "configs/lisa_tiny.py", "--workdir", W, "--config.allow_random_init=True"],
                port, log_file)
  wait_ready(url, proc, timeout_s=600)
  status, body = post_segment(url, {"image": png_bytes, "prompt": "Where is the red shape?"})
  stop(proc)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class NotReadyError(RuntimeError):
  """The server exited or did not answer /healthz in time."""


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (bound and released)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def multipart(fields: dict) -> tuple[bytes, str]:
  """{name: bytes (sent as a PNG file) or str} -> (multipart/form-data body, its Content-Type)."""
  boundary = uuid.uuid4().hex
  out = b""
  for name, value in fields.items():
    if isinstance(value, bytes):
      head = f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\nContent-Type: image/png'
    else:
      head, value = f'Content-Disposition: form-data; name="{name}"', str(value).encode()
    out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
  return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_segment(url: str, fields: dict, timeout: float = 120) -> tuple[int, dict]:
  """POST url/v1/segment with `fields` -> (HTTP status, JSON body)."""
  body, ctype = multipart(fields)
  req = urllib.request.Request(url + "/v1/segment", data=body, headers={"Content-Type": ctype})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def launch(args: list[str], port: int, log_file, env: dict | None = None) -> subprocess.Popen:
  """main.py --config.mode=serve --config.serve.port=PORT *args, output to the open `log_file`."""
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args, "--config.mode=serve", f"--config.serve.port={port}"]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
  """Return once GET url/healthz answers 200; NotReadyError if `proc` exits or time runs out."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise NotReadyError(f"server exited with code {proc.returncode}")
    try:
      with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(1)
  raise NotReadyError(f"server not ready in {timeout_s} s")


def stop(proc: subprocess.Popen, timeout_s: float = 20) -> None:
  """SIGTERM by PID, SIGKILL after timeout_s."""
  if proc.poll() is not None:
    return
  os.kill(proc.pid, signal.SIGTERM)
  try:
    proc.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
