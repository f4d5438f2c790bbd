"""main.py --config.mode=caption (BLIP-2 stage 1) and --config.mode=chat (MiniGPT4-Qwen) as a user runs
them (subprocesses), on workdirs trained once per module from the configs' runlocal variants: the
printed captions / answers are those of the inference functions called directly on the same restored
params (beam search and nucleus sampling; greedy ChatML), a converted checkpoint given as
--config.init.pretrained captions as the workdir does, nothing but logs is written to the workdir,
and an empty workdir, a bad image or a config of another task end with exit 2 and one line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxlisa import config as cfg_lib
from jaxlisa import tasks
from jaxlisa.conversion import convert
from jaxlisa.conversion.family import Converted
from jaxlisa.data import chatml, synthetic_captions
from jaxlisa.inference import captioning, multimodal
from jaxlisa.training import inference_params as ip

BLIP2 = os.path.join(ROOT, "configs", "blip2_tiny.py") + ":runlocal"
M4Q = os.path.join(ROOT, "configs", "minigpt4qwen_tiny.py") + ":runlocal"
M4Q_STEPS = ("--config.total_steps=150", "--config.eval_every=0", "--config.ckpt_every=0")  # answers in words


def _main(spec, workdir, *args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", spec, "--workdir", str(workdir),
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _train(spec, workdir, *args):
  r = _main(spec, workdir, *args)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return workdir


def _restored(spec, workdir):
  """(task, params) as the CLI restores them (params only) from the latest checkpoint."""
  config = cfg_lib.load_config(spec)
  task = tasks.get_task(config, str(workdir))
  mesh, rules = ip.setup(config)
  params, step = ip.task_params(task, config, str(workdir), mesh, rules)
  assert step > 0
  return task, params


def _pixels(task, path):
  with Image.open(path) as im:  # as LAVIS reads an image
    return jnp.asarray(task.processor(np.asarray(im.convert("RGB")))[None])


def _files(d):
  return {os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs}


def _printed(stdout, paths):
  """{path: the text after "[path] "} of the result lines."""
  out = {}
  for line in stdout.splitlines():
    for p in paths:
      if line.startswith(f"[{p}] "):
        out[p] = line[len(p) + 3:]
  return out


@pytest.fixture(scope="module")
def blip2_run(tmp_path_factory):
  wd = _train(BLIP2, tmp_path_factory.mktemp("blip2"))
  images = [str(wd / "data" / "images" / n) for n in sorted(os.listdir(wd / "data" / "images"))[:2]]
  with jax.default_matmul_precision(None):
    task, params = _restored(BLIP2, wd)
  return wd, images, task, params


@pytest.fixture(scope="module")
def m4q_run(tmp_path_factory):
  wd = _train(M4Q, tmp_path_factory.mktemp("m4q"), *M4Q_STEPS)
  images = [str(wd / "data" / "images" / n) for n in sorted(os.listdir(wd / "data" / "images"))[:2]]
  with jax.default_matmul_precision(None):
    task, params = _restored(M4Q, wd)
  return wd, images, task, params


def test_caption_beams_are_the_qformer_decoder_and_write_nothing(blip2_run):
  wd, images, task, params = blip2_run
  before = _files(wd)
  r = _main(BLIP2, wd, "--config.mode=caption", "--config.image=" + ",".join(images))
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "caption 2/2 images" in r.stdout and "(3 beams; weights from step 30 of" in r.stdout
  got = _printed(r.stdout, images)
  assert sorted(got) == sorted(images), r.stdout
  with jax.default_matmul_precision(None):
    for path in images:
      seqs, lengths = captioning.qformer_captions(task.model, params, _pixels(task, path), num_beams=3,
                                                  max_length=30, min_length=10)
      n = int(lengths[0])
      want = task.tokenizer.decode(np.asarray(seqs)[0, 1:1 + n].tolist(), skip_special_tokens=True).strip()
      assert want and got[path] == want, (path, got[path], want)
  new = _files(wd) - before
  assert all(os.path.basename(f).startswith("main.") for f in new), new  # the absl log only


def test_caption_nucleus_sampling_follows_the_seed(blip2_run):
  wd, images, task, params = blip2_run
  r = _main(BLIP2, wd, "--config.mode=caption", f"--config.image={images[0]}", "--config.seed=7",
            "--config.caption.use_nucleus_sampling=True", "--config.caption.top_p=0.95")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "nucleus sampling top_p=0.95" in r.stdout
  got = _printed(r.stdout, images[:1])[images[0]]
  with jax.default_matmul_precision(None):
    x = _pixels(task, images[0])
    sampled = [captioning.qformer_caption_texts(task.model, params, task.tokenizer, x, use_nucleus_sampling=True,
                                                top_p=0.95, rng=jax.random.PRNGKey(seed))[0] for seed in (7, 8, 9)]
  assert got == sampled[0], (got, sampled)
  assert len(set(sampled)) > 1, sampled  # the key decides: this is sampling, not a fixed decode


def test_chat_answers_as_minigpt4qwen_generate(m4q_run):
  wd, images, task, params = m4q_run
  prompts = ["What colour is the circle?", "Describe the image briefly."]
  before = _files(wd)
  r = _main(M4Q, wd, "--config.mode=chat", "--config.image=" + ",".join(images),
            "--config.prompt=" + "||".join(prompts))
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "chat 2/2 images" in r.stdout and "weights from step 150 of" in r.stdout
  tok, q = task.tokenizer, task.model_config.num_query_tokens
  stop = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>"))
  lines = r.stdout.splitlines()
  for path, prompt in zip(images, prompts):
    i = lines.index(f"[{path}] {prompt}")
    assert lines[i + 1].startswith("  answer: ")
    got = lines[i + 1][len("  answer: "):]
    ids = chatml.chat_ids(tok, prompt, q)
    with jax.default_matmul_precision(None):
      out = multimodal.minigpt4qwen_generate(task.model, params, _pixels(task, path), jnp.asarray([ids]),
                                             jnp.ones((1, len(ids)), jnp.int32), max_new_tokens=64, stop_ids=stop)
    n = int(out.lengths[0])
    want = tok.decode(np.asarray(out.tokens)[0, :n].tolist(), skip_special_tokens=True).strip()
    assert want and got == want, (prompt, got, want)
  assert all(os.path.basename(f).startswith("main.") for f in _files(wd) - before)


def test_chat_ids_are_the_trained_chatml_tokens(m4q_run):
  """The chat prompt's tokens are those preprocess() trains on for the same user turn, up to the
  assistant's content; a question without <ImageHere> gets the image tag in front."""
  _, _, task, _ = m4q_run
  tok, q = task.tokenizer, task.model_config.num_query_tokens
  question = "How many shapes can you see in this image?"
  conv = [{"from": "user", "value": f"{synthetic_captions.IMAGE_TAG} {question}"}, {"from": "assistant", "value": "x"}]
  trained = chatml.preprocess([conv], tok, 128, image_len=q)
  row = trained["input_ids"][0][trained["attention_mask"][0] == 1].tolist()
  ids = chatml.chat_ids(tok, question, q)
  assert ids == row[:len(ids)] and ids == chatml.chat_ids(tok, f"{synthetic_captions.IMAGE_TAG} {question}", q)
  assert tok.decode(ids) == chatml.chat_prompt(f"<Img>{chatml.IMAGE_TOKEN * q}</Img> {question}")


def test_caption_from_a_converted_checkpoint(blip2_run, tmp_path):
  """--config.init.pretrained (a converted jaxlisa directory) + init.tokenizer on an empty workdir:
  the same caption as the trained workdir's; nothing but the log written."""
  wd, images, task, params = blip2_run
  ckpt = str(tmp_path / "converted")
  convert.save_converted(ckpt, Converted("blip2_lavis", task.model_config, jax.tree.map(np.asarray, params)))
  empty = tmp_path / "empty"
  r = _main(BLIP2, empty, "--config.mode=caption", f"--config.image={images[0]}", f"--config.init.pretrained={ckpt}",
            f"--config.init.tokenizer={wd / 'tokenizer'}")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "weights from init.pretrained" in r.stdout
  with jax.default_matmul_precision(None):
    want = captioning.qformer_caption_texts(task.model, params, task.tokenizer, _pixels(task, images[0]))[0]
  assert _printed(r.stdout, images[:1])[images[0]] == want
  assert all(f.startswith("main.") for f in _files(empty)), _files(empty)


@pytest.mark.parametrize("spec,mode", [(BLIP2, "caption"), (M4Q, "chat")])
def test_no_weights_exit_2_and_write_nothing(tmp_path, spec, mode):
  wd = tmp_path / "empty"
  r = _main(spec, wd, f"--config.mode={mode}", "--config.image=a.png",
            *(("--config.prompt=what is it?",) if mode == "chat" else ()), timeout=300)
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  assert "checkpoint" in r.stderr and str(wd) in r.stderr and "allow_random_init" in r.stderr
  assert "Traceback" not in r.stdout + r.stderr
  assert not os.path.exists(wd)


def test_bad_image_and_wrong_task_exit_2(tmp_path):
  """Images are read before anything is built (random init allowed here, so the weights are no reason to stop)."""
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  for spec, args in ((BLIP2, ("--config.mode=caption", f"--config.image={bad}")),
                     (M4Q, ("--config.mode=chat", f"--config.image={tmp_path}/gone.png", "--config.prompt=hi"))):
    wd = tmp_path / args[0][-4:]
    r = _main(spec, wd, *args, "--config.allow_random_init=True", timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and ("bad.png" in errors[0] or "gone.png" in errors[0]), r.stderr
    assert "Traceback" not in r.stderr and "loading weights" not in r.stdout
    assert not os.path.exists(wd / "data") and not os.path.exists(wd / "tokenizer")
  r = _main(os.path.join(ROOT, "configs", "lisa_tiny.py:runlocal"), tmp_path / "lisa", "--config.mode=caption",
            "--config.image=a.png", timeout=300)
  assert r.returncode == 2 and "caption mode runs task blip2_stage1" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "lisa")
