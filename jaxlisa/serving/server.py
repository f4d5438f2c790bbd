"""LISA as an HTTP service: a bounded, batching queue in front of jaxlisa.inference.segment.

  engine = SegmentEngine(model, params, tokenizer, ...)      # jitted, bucketed decode
  server = make_server(engine, serve_config, model_name, step)
  server.serve_forever()

The contract (README "Serving"):
  GET  /healthz     -> 200 {"status": "ok", "model": str, "step": int | null}
  POST /v1/segment  multipart/form-data: image (file), prompt (text), max_new_tokens (optional int)
                    -> 200 {"answer": str, "masks": [{"size": [H, W], "counts": str}, ...], ...}
                    one COCO RLE (pycocotools, Fortran-ordered uint8 [H, W]) per [SEG] in the answer,
                    at the image's original size.
  GET  /            -> an HTML page (upload, question, answer, masks overlaid; RLE decoded in the page).
Errors are JSON {"error": str} without tracebacks: 400 corrupt image / bad field, 422 missing field,
413 body over serve.max_body_bytes or prompt over serve.max_prompt_tokens, 503 queue full, 504 timeout.

Batching: one worker thread takes up to serve.max_batch_size requests that arrive within
serve.batch_wait_ms, pads the batch to a power of two (repeating the last row) and decodes them
together with the configured max_new_tokens (each row's own cap applied to its answer), so after
warm-up the compiled programs are reused: batch sizes 1, 2, 4 .. max_batch_size, prompt-length
buckets, and mask sizes rounded to serve.mask_size_multiple.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.parser
import email.policy
import http.server
import json
import os
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging

from jaxlisa.data import tokenization as tok_lib
from jaxlisa.data.preprocess import ImageError, load_image
from jaxlisa.inference import segment as seg_lib

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


class RequestError(Exception):
  """A client error: HTTP status and a one-line message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


def encode_rle(mask: np.ndarray) -> dict:
  """bool/uint8 [H, W] -> COCO compressed RLE {"size": [H, W], "counts": str}."""
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


def batch_buckets(max_batch_size: int) -> list[int]:
  """1, 2, 4 .. up to max_batch_size (the last one is max_batch_size itself)."""
  out, b = [], 1
  while b < max_batch_size:
    out.append(b)
    b *= 2
  return out + [max_batch_size]


class SegmentEngine:
  """segment() with fixed shapes: batch padded to a bucket, one max_new_tokens, bucketed mask sizes."""

  def __init__(self, model, params, tokenizer, *, max_new_tokens: int, max_prompt_tokens: int,
               conv_type: str, use_mm_start_end: bool, max_length: int, mask_size_multiple: int,
               max_batch_size: int):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_new_tokens, self.max_batch_size = max_new_tokens, max_batch_size
    self.conv_type, self.use_mm_start_end, self.max_length = conv_type, use_mm_start_end, max_length
    self.mask_size_multiple = mask_size_multiple
    # a prompt may use what is left of the context after the image tokens and the answer
    ctx = max_length - max_new_tokens - model.config.num_image_tokens
    self.max_prompt_tokens = min(max_prompt_tokens, ctx) if max_prompt_tokens > 0 else ctx

  def prompt_tokens(self, prompt: str) -> int:
    """Text tokens of the full chat prompt (template included, image placeholder excluded)."""
    ids = tok_lib.tokenizer_image_token(seg_lib.build_prompt(prompt, self.conv_type, self.use_mm_start_end),
                                        self.tokenizer)
    return len(ids) - 1

  def run(self, images: Sequence[np.ndarray], prompts: Sequence[str],
          max_new_tokens: Sequence[int]) -> list[seg_lib.SegmentResult]:
    n = len(images)
    size = next(b for b in batch_buckets(self.max_batch_size) if b >= n)
    pad = size - n
    images, prompts = list(images) + [images[-1]] * pad, list(prompts) + [prompts[-1]] * pad
    caps = list(max_new_tokens) + [1] * pad
    res = seg_lib.segment(self.model, self.params, self.tokenizer, images, prompts,
                          max_new_tokens=self.max_new_tokens, conv_type=self.conv_type,
                          use_mm_start_end=self.use_mm_start_end, max_length=self.max_length,
                          row_max_new_tokens=caps, mask_size_multiple=self.mask_size_multiple)
    return res[:n]

  def warmup(self, image_hw=(256, 256), prompt: str = "What is in the image? Please output segmentation mask."):
    """Compile every batch bucket (and the mask program for one size) before serving."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, image_hw + (3,), dtype=np.uint8)
    for b in batch_buckets(self.max_batch_size):
      t = time.time()
      self.run([img] * b, [prompt] * b, [self.max_new_tokens] * b)
      logging.info("warm-up: batch %d compiled in %.1f s", b, time.time() - t)


@dataclasses.dataclass
class _Job:
  image: np.ndarray
  prompt: str
  max_new_tokens: int
  future: concurrent.futures.Future
  enqueued: float


class Batcher:
  """A bounded queue and one worker thread that runs up to max_batch_size jobs together."""

  def __init__(self, run: Callable, max_batch_size: int, batch_wait_ms: float, queue_size: int):
    self._run, self.max_batch_size, self.wait = run, max_batch_size, batch_wait_ms / 1000.0
    self._q: queue.Queue = queue.Queue(maxsize=queue_size)
    self._stop = threading.Event()
    self.batches = 0
    self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
    self._thread.start()

  def submit(self, image, prompt, max_new_tokens) -> concurrent.futures.Future:
    """Raises queue.Full when the queue is full (the caller answers 503)."""
    job = _Job(image, prompt, max_new_tokens, concurrent.futures.Future(), time.time())
    self._q.put_nowait(job)
    return job.future

  def _loop(self):
    while not self._stop.is_set():
      try:
        first = self._q.get(timeout=0.1)
      except queue.Empty:
        continue
      jobs, deadline = [first], time.time() + self.wait
      while len(jobs) < self.max_batch_size:
        left = deadline - time.time()
        if left <= 0:
          break
        try:
          jobs.append(self._q.get(timeout=left))
        except queue.Empty:
          break
      t = time.time()
      try:
        results = self._run([j.image for j in jobs], [j.prompt for j in jobs], [j.max_new_tokens for j in jobs])
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("batch of %d failed", len(jobs))
        for j in jobs:
          j.future.set_exception(e)
        continue
      self.batches += 1
      for j, r in zip(jobs, results):
        j.future.set_result((r, len(jobs), time.time() - t, t - j.enqueued))

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None]]:
  """multipart/form-data body -> {field: (bytes, filename or None)}; RequestError(400) if malformed."""
  if not content_type.lower().startswith("multipart/form-data"):
    raise RequestError(400, "expected Content-Type multipart/form-data (fields image, prompt)")
  msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
      b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
  if not msg.is_multipart():
    raise RequestError(400, "malformed multipart/form-data body")
  fields = {}
  for part in msg.iter_parts():
    name = part.get_param("name", header="content-disposition")
    if name:
      fields[name] = (part.get_payload(decode=True) or b"", part.get_filename())
  return fields


class _Handler(http.server.BaseHTTPRequestHandler):
  server_version = "jaxlisa"
  protocol_version = "HTTP/1.1"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info("%s %s", self.address_string(), format % args)

  def _send(self, status: int, body: bytes, content_type: str, close: bool = False):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    if close:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, obj, close: bool = False):
    self._send(status, json.dumps(obj).encode(), "application/json", close)

  def do_GET(self):  # pylint: disable=invalid-name
    app = self.server.app
    path = self.path.split("?", 1)[0]
    if path == "/healthz":
      self._json(200, {"status": "ok", "model": app.model_name, "step": app.step})
    elif path in ("/", "/index.html"):
      self._send(200, app.page, "text/html; charset=utf-8")
    else:
      self._json(404, {"error": f"no such path: {path}"})

  def do_POST(self):  # pylint: disable=invalid-name
    app = self.server.app
    path = self.path.split("?", 1)[0]
    try:
      length = int(self.headers.get("Content-Length", "-1"))
    except ValueError:
      length = -1
    if path != "/v1/segment":
      return self._json(404, {"error": f"no such path: {path}"}, close=True)
    if length < 0:
      return self._json(411, {"error": "Content-Length required"}, close=True)
    if length > app.cfg.max_body_bytes:
      # do not read it; close the connection so the unread body is not taken for a next request
      return self._json(413, {"error": f"body of {length} bytes exceeds the limit of {app.cfg.max_body_bytes}"},
                        close=True)
    body = self.rfile.read(length)
    try:
      out = app.segment(self.headers.get("Content-Type", ""), body)
    except RequestError as e:
      return self._json(e.status, {"error": e.message})
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("request failed")
      return self._json(500, {"error": f"internal error: {type(e).__name__}"})
    return self._json(200, out)


class App:
  """Request -> validated job -> batcher -> JSON."""

  def __init__(self, engine: SegmentEngine, cfg, model_name: str, step):
    self.engine, self.cfg, self.model_name, self.step = engine, cfg, model_name, step
    with open(PAGE, "rb") as f:
      self.page = f.read()
    self.batcher = Batcher(engine.run, cfg.max_batch_size, cfg.batch_wait_ms, cfg.queue_size)

  def segment(self, content_type: str, body: bytes) -> dict:
    fields = parse_multipart(content_type, body)
    for name in ("image", "prompt"):
      if name not in fields:
        raise RequestError(422, f"missing form field {name!r} (need image and prompt)")
    try:
      prompt = fields["prompt"][0].decode("utf-8").strip()
    except UnicodeDecodeError:
      raise RequestError(400, "prompt is not UTF-8 text") from None
    if not prompt:
      raise RequestError(422, "empty prompt")
    max_new = self.engine.max_new_tokens
    if "max_new_tokens" in fields:
      raw = fields["max_new_tokens"][0].decode("latin-1").strip()
      if not raw.isdigit() or not 1 <= int(raw) <= self.engine.max_new_tokens:
        raise RequestError(400, f"max_new_tokens must be an integer in 1..{self.engine.max_new_tokens}")
      max_new = int(raw)
    n_tok = self.engine.prompt_tokens(prompt)
    if n_tok > self.engine.max_prompt_tokens:
      raise RequestError(413, f"prompt of {n_tok} tokens exceeds the limit of {self.engine.max_prompt_tokens}")
    try:
      image = load_image(fields["image"][0])
    except ImageError:
      raise RequestError(400, "image field is not a readable image (corrupt, truncated or not an image)") from None
    h, w = image.shape[:2]
    if h * w > self.cfg.max_image_pixels:
      raise RequestError(413, f"image of {w}x{h} pixels exceeds the limit of {self.cfg.max_image_pixels}")
    t0 = time.time()
    try:
      future = self.batcher.submit(image, prompt, max_new)
    except queue.Full:
      raise RequestError(503, f"server busy: {self.cfg.queue_size} requests already queued; retry later") from None
    try:
      res, batch, run_s, wait_s = future.result(timeout=self.cfg.request_timeout_s)
    except concurrent.futures.TimeoutError:
      future.cancel()
      raise RequestError(504, f"no answer within {self.cfg.request_timeout_s} s") from None
    return {"answer": res.text, "masks": [encode_rle(m) for m in res.masks],
            "timing": {"total_s": round(time.time() - t0, 4), "queue_s": round(wait_s, 4),
                       "batch_s": round(run_s, 4), "batch_size": batch}}

  def close(self):
    self.batcher.close()


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 128  # listen backlog: bursts of connections wait in the kernel, not reset

  def __init__(self, address, app: App):
    super().__init__(address, _Handler)
    self.app = app


def make_server(engine: SegmentEngine, cfg, model_name: str, step) -> Server:
  """A bound (not yet serving) server on (cfg.host, cfg.port); cfg.port 0 picks a free port."""
  return Server((cfg.host, cfg.port), App(engine, cfg, model_name, step))
