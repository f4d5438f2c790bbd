"""main.py --config.mode=serve as a subprocess on a loopback port: every line of the HTTP contract."""

import concurrent.futures
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, ServerProcess, png_bytes
from jaxlisa.serving.client import post_segment

MAX_BODY = 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  srv = ServerProcess(tmp_path_factory.mktemp("serve"), "--config.allow_random_init=True",
                      "--config.serve.max_batch_size=2", "--config.max_new_tokens=8", "--config.serve.queue_size=4",
                      f"--config.serve.max_body_bytes={MAX_BODY}")
  yield srv.url
  srv.stop()


def test_refuses_without_weights(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                      os.path.join(ROOT, "configs/lisa_tiny.py:runlocal"), "--workdir", str(tmp_path),
                      "--config.mode=serve", "--config.serve.port=1"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_healthz(server):
  with urllib.request.urlopen(server + "/healthz", timeout=10) as r:
    body = json.loads(r.read())
  assert body["status"] == "ok" and isinstance(body["model"], str) and body["step"] is None


def test_page(server):
  with urllib.request.urlopen(server + "/", timeout=10) as r:
    page = r.read().decode()
  assert r.headers["Content-Type"].startswith("text/html")
  assert 'type="file"' in page and "/v1/segment" in page and "<canvas" in page


def test_segment(server):
  status, body = post_segment(server, {"image": png_bytes(), "prompt": "What is the red shape? Please output segmentation mask."})
  assert status == 200, body
  assert isinstance(body["answer"], str) and isinstance(body["masks"], list)
  for m in body["masks"]:
    assert m["size"] == [100, 140] and isinstance(m["counts"], str)
  if "[SEG]" not in body["answer"]:
    assert body["masks"] == []
  # max_new_tokens caps the answer; the server still answers after it
  status, short = post_segment(server, {"image": png_bytes(), "prompt": "hi", "max_new_tokens": "1"})
  assert status == 200, short
  assert isinstance(short["answer"], str)


@pytest.mark.parametrize("fields,codes", [
    ({"image": b"not an image at all", "prompt": "hi"}, (400,)),
    ({"image": png_bytes()[:60], "prompt": "hi"}, (400,)),
    ({"prompt": "hi"}, (400, 422)),
    ({"image": png_bytes()}, (400, 422)),
    ({"image": png_bytes(), "prompt": "word " * 400}, (400, 413)),
    ({"image": png_bytes(), "prompt": "hi", "max_new_tokens": "many"}, (400, 422)),
    ({"image": os.urandom(MAX_BODY + 10), "prompt": "hi"}, (413,)),
])
def test_bad_requests(server, fields, codes):
  status, body = post_segment(server, fields)
  assert status in codes, (status, body)
  assert isinstance(body["error"], str) and "Traceback" not in body["error"]
  with urllib.request.urlopen(server + "/healthz", timeout=10) as r:  # still serving
    assert r.status == 200


def test_concurrent(server):
  """16 at once against a queue of 4: every one answers 200 or 503 (JSON), none hangs."""
  def one(i):
    return post_segment(server, {"image": png_bytes(80 + i, 90), "prompt": f"Where is shape {i}? Please output segmentation mask."},
                 timeout=120)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    results = list(pool.map(one, range(16), timeout=180))
  codes = [s for s, _ in results]
  assert set(codes) <= {200, 503}, codes
  assert 200 in codes
  for s, b in results:
    assert ("answer" in b) if s == 200 else isinstance(b["error"], str)
  assert any(b.get("timing", {}).get("batch_size", 0) > 1 for s, b in results if s == 200) or 503 in codes


def test_rle_roundtrip():
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  from jaxlisa.serving.server import encode_rle  # pylint: disable=import-outside-toplevel
  m = np.random.default_rng(1).random((37, 53)) > 0.6
  rle = encode_rle(m)
  assert rle["size"] == [37, 53]
  back = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
  np.testing.assert_array_equal(back.astype(bool), m)
