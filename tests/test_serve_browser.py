"""The serving page in a real browser (Debian's headless Chromium driven by selenium's chromedriver)
against main.py --config.mode=serve as a subprocess, and the CLI's batch segmentation on the same
weights.

The weights are the tiny LISA's random init with the language model rewired so that every answer is
"[SEG]" and then eos (no training, no compile here): every layer's output projections are zero, so
the last hidden state is the current token's embedding; dimension 0 of every embedding is +1 except
[SEG]'s (-1); the final norm keeps dimension 0 only; lm_head maps +dim 0 to [SEG] and -dim 0 to eos.
So the page has one mask to overlay, decoded from the server's RLE in JavaScript.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, ServerProcess, png_bytes
from jaxlisa.serving.client import post_segment
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "Where is the red shape? Please output segmentation mask."
SPEC = os.path.join(ROOT, "configs/lisa_tiny.py:runlocal")
SERVE_ARGS = ("--config.serve.max_batch_size=2", "--config.max_new_tokens=4")


def write_seg_checkpoint(workdir: str) -> None:
  """A params checkpoint (workdir/checkpoints/1/state, as the trainer writes it) whose LM answers
  "[SEG]" then eos to every prompt; the vision towers, projector and SAM keep random values."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from jaxlisa import config as cfg_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa import tasks  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import optimizer as optim_lib  # pylint: disable=import-outside-toplevel
  config = cfg_lib.load_config(SPEC)
  task = tasks.prepared_task(config, workdir)  # the tokenizer the server reads from workdir/tokenizer
  abstract = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  flat = {}
  for k, v in traverse_util.flatten_dict(abstract).items():
    if k[-1] == "scale":
      flat[k] = np.ones(v.shape, np.float32)
    elif k[-1] == "bias":
      flat[k] = np.zeros(v.shape, np.float32)
    else:
      flat[k] = (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
  lm = ("llava", "language_model")
  seg, eos = task.model.config.seg_token_idx, task.tokenizer.eos_token_id
  for name in ("self_attn/o_proj", "mlp/down_proj"):
    key = lm + ("layers", *name.split("/"), "kernel")
    flat[key] = np.zeros_like(flat[key])
  emb = flat[lm + ("embed_tokens", "embedding")]
  emb *= 0.05
  emb[:, 0], emb[seg, 0] = 1.0, -1.0
  norm = np.zeros_like(flat[lm + ("norm", "scale")])
  norm[0] = 1.0
  flat[lm + ("norm", "scale")] = norm
  head = np.zeros_like(flat[lm + ("lm_head", "kernel")])
  head[0, seg], head[0, eos] = 1.0, -1.0
  flat[lm + ("lm_head", "kernel")] = head
  params = traverse_util.unflatten_dict(flat)
  trained, _ = optim_lib.split(params, task.trainable_mask(abstract))
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(workdir, "checkpoints", "1", "state")), {"trainable": trained})


@pytest.fixture(scope="module")
def seg_workdir(tmp_path_factory):
  work = tmp_path_factory.mktemp("serve_seg")
  write_seg_checkpoint(str(work))
  return work


@pytest.fixture(scope="module")
def seg_server(seg_workdir):
  srv = ServerProcess(seg_workdir, *SERVE_ARGS)
  yield srv
  srv.stop()


def _decode(rle: dict) -> np.ndarray:
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _shapes_png(path, h: int, w: int) -> np.ndarray:
  """A picture to ask about (grey gradient, a red disc, a blue square) written to `path`: uint8 [h, w, 3]."""
  y, x = np.mgrid[:h, :w]
  img = np.stack([np.broadcast_to(40 + 150 * x / w, (h, w))] * 3, -1).astype(np.uint8)
  img[(y - h * 0.5) ** 2 + (x - w * 0.3) ** 2 < (h * 0.25) ** 2] = (220, 30, 30)
  img[(abs(y - h * 0.4) < h * 0.15) & (abs(x - w * 0.75) < h * 0.15)] = (30, 60, 220)
  Image.fromarray(img).save(path)
  return img


def test_server_answers_seg(seg_server):
  status, body = post_segment(seg_server.url, {"image": png_bytes(50, 70), "prompt": PROMPT})
  assert status == 200, body
  assert body["answer"].count("[SEG]") == 1 and len(body["masks"]) == 1, body
  assert body["masks"][0]["size"] == [50, 70]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"no {CHROMIUM}: install Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver) to run the browser test")
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  profile = tmp_path_factory.mktemp("chromium-profile")
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,900"):
    opts.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


def test_page_in_chromium(seg_server, browser, tmp_path):
  """Open /, upload a PNG, type the question, submit; the answer and one overlay canvas per mask
  appear, and each overlay is opaque exactly where the server's RLE mask is set."""
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  img_path = tmp_path / "upload.png"
  image = _shapes_png(img_path, 120, 180)
  status, ref = post_segment(seg_server.url, {"image": img_path.read_bytes(), "prompt": PROMPT})
  assert status == 200 and len(ref["masks"]) == 1, ref
  want = _decode(ref["masks"][0])

  browser.get(seg_server.url + "/")
  assert "jaxlisa" in browser.title
  browser.find_element(By.ID, "image").send_keys(str(img_path))
  question = browser.find_element(By.ID, "q")
  question.clear()
  question.send_keys(PROMPT)
  WebDriverWait(browser, 30).until(lambda d: d.execute_script(
      "return document.getElementById('canvas').width") == image.shape[1])  # the upload is drawn
  browser.find_element(By.ID, "submit").click()
  WebDriverWait(browser, 120).until(lambda d: d.execute_script("return document.body.dataset.done") == "1"
                                    or d.find_element(By.ID, "error").text)
  assert browser.find_element(By.ID, "error").text == ""
  assert browser.find_element(By.ID, "answer").text == ref["answer"]
  assert "1 mask(s)" in browser.find_element(By.ID, "nmasks").text
  overlays = browser.find_elements(By.CSS_SELECTOR, "#overlays canvas.mask")
  assert len(overlays) == len(ref["masks"]) == 1
  # the overlay's alpha channel, read back from the page: [H, W]
  alpha = np.asarray(browser.execute_script(
      "const c=document.querySelector('#overlays canvas.mask');"
      "const d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;"
      "const a=[];for(let i=3;i<d.length;i+=4)a.push(d[i]);return [c.height,c.width,a];")[2]).reshape(want.shape)
  assert want.any(), "the random SAM decoder gave an empty mask: nothing to overlay"
  assert not want.all(), "the mask covers the whole image: the overlay's pixel order would go untested"
  np.testing.assert_array_equal(alpha > 0, want)
  base = np.asarray(browser.execute_script(
      "const c=document.getElementById('canvas');"
      "return Array.from(c.getContext('2d').getImageData(0,0,c.width,c.height).data);")).reshape(*want.shape, 4)
  np.testing.assert_array_equal(base[..., :3], image)  # the uploaded image under the overlay
  shot = tmp_path / "serve_page.png"
  assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
  if os.environ.get("JAXLISA_SAVE_SCREENSHOT"):
    shutil.copy(shot, os.environ["JAXLISA_SAVE_SCREENSHOT"])


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
  """3 PNGs of different sizes and list.jsonl naming them with a question each."""
  root = tmp_path_factory.mktemp("batch_inputs")
  (root / "pics").mkdir()
  lines = []
  for i, (h, w) in enumerate([(40, 60), (64, 64), (75, 50)]):
    (root / "pics" / f"img{i}.png").write_bytes(png_bytes(h, w, seed=10 + i))
    lines.append(json.dumps({"image": f"pics/img{i}.png", "prompt": f"Where is shape {i}? Please output segmentation mask."}))
  (root / "list.jsonl").write_text("\n".join(lines) + "\n")
  return root


def _batch_segment(workdir, jsonl, out, *extra: str) -> tuple[str, list[dict]]:
  """main.py --config.mode=segment --config.images=jsonl in batches of 2 -> (stdout, results.jsonl rows)."""
  env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  t = time.time()
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", SPEC, "--workdir", str(workdir),
                      "--config.mode=segment", f"--config.images={jsonl}", f"--config.segment_dir={out}",
                      "--config.segment_batch_size=2", *SERVE_ARGS[1:], *extra], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, env=env)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  print(f"batch segment {' '.join(extra)} of 3 images: {time.time() - t:.1f} s (process, weights, compiles)")
  return r.stdout, [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_batch_segment_cli(seg_server, batch_inputs, tmp_path):
  """main.py --config.mode=segment --config.images=list.jsonl on 3 images (batches of 2, the
  server's buckets: the session's compilation cache serves them): one answer json + mask and overlay
  PNG per image, and each mask equals the server's for the same image and question."""
  out = tmp_path / "out"
  stdout, rows = _batch_segment(seg_server.workdir, batch_inputs / "list.jsonl", out)
  assert "segment 3/3 images" in stdout and "segmented 3 of 3 images (3 with a mask" in stdout, stdout
  assert len(rows) == 3 and sorted(glob.glob(str(out / "*.json"))) == [str(out / f"0000{i}_img{i}.json") for i in range(3)]
  for i, row in enumerate(rows):
    assert row["answer"].count("[SEG]") == 1 and len(row["masks"]) == 1, row
    mask = np.asarray(Image.open(out / f"0000{i}_img{i}_mask_0.png")) > 0
    assert (out / f"0000{i}_img{i}_overlay_0.png").exists()
    np.testing.assert_array_equal(mask, _decode(row["masks"][0]))
    status, ref = post_segment(seg_server.url, {"image": (batch_inputs / "pics" / f"img{i}.png").read_bytes(),
                                                "prompt": row["prompt"]})
    assert status == 200 and ref["answer"] == row["answer"], ref
    np.testing.assert_array_equal(_decode(ref["masks"][0]), mask)


def test_batch_segment_int8(seg_workdir, batch_inputs, tmp_path):
  """--config.serve.quantize=int8 through the whole segment path: these weights' LM kernels are
  exact in int8 (zeros, and a one-hot lm_head), so answers and masks equal the fp32 run's."""
  _, ref = _batch_segment(seg_workdir, batch_inputs / "list.jsonl", tmp_path / "fp32")
  stdout, rows = _batch_segment(seg_workdir, batch_inputs / "list.jsonl", tmp_path / "int8",
                                "--config.serve.quantize=int8")
  assert "int8 weights for the language model" in stdout, stdout
  assert [(r["answer"], r["masks"]) for r in rows] == [(r["answer"], r["masks"]) for r in ref]


def test_batch_inputs(tmp_path):
  from jaxlisa.serving.batch import InputError, list_inputs  # pylint: disable=import-outside-toplevel
  for name in ("b.png", "a.jpg", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  assert [os.path.basename(i.image) for i in list_inputs(str(tmp_path), "q")] == ["a.jpg", "b.png"]
  assert [os.path.basename(i.image) for i in list_inputs(str(tmp_path / "*.png"), "q")] == ["b.png"]
  (tmp_path / "l.jsonl").write_text('{"image": "a.jpg", "prompt": "one"}\n\n{"image": "b.png"}\n')
  items = list_inputs(str(tmp_path / "l.jsonl"), "default")
  assert [(i.image, i.prompt) for i in items] == [(str(tmp_path / "a.jpg"), "one"), (str(tmp_path / "b.png"), "default")]
  for spec, prompt, msg in [(str(tmp_path), "", "needs --config.prompt"), (str(tmp_path / "*.gif"), "q", "no images"),
                            (str(tmp_path / "l.jsonl"), "", "no prompt"), (str(tmp_path / "none.jsonl"), "q", "no such")]:
    with pytest.raises(InputError, match=msg):
      list_inputs(spec, prompt)
  (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
  with pytest.raises(InputError, match="bad.jsonl:1"):
    list_inputs(str(tmp_path / "bad.jsonl"), "q")
