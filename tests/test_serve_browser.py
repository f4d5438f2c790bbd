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
  task = tasks.get_task(config, workdir)
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
