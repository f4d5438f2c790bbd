"""Test-wide settings: CPU, fp32 matmuls at highest precision, a stub torchvision for
segment-anything, and small helpers shared by the parity tests."""

import json
import os
import sys
import tempfile
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache per test session, inherited by the main.py subprocesses, so
# a program compiled once (e.g. the tiny LISA train step) is not compiled again by the next run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxlisa-xla-cache-"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def stub_torchvision():
  """segment-anything imports torchvision at package import; torchvision does not install
  beside torch 2.13 here. Only names are needed for the modules the tests use."""
  if "torchvision" in sys.modules:
    return
  try:  # transformers caches "torchvision available?" at import; let it look before the stub exists
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass
  tv = types.ModuleType("torchvision")
  tr = types.ModuleType("torchvision.transforms")
  fn = types.ModuleType("torchvision.transforms.functional")
  ops = types.ModuleType("torchvision.ops")
  boxes = types.ModuleType("torchvision.ops.boxes")

  def _unavailable(*a, **k):
    raise RuntimeError("torchvision is stubbed in tests")

  fn.resize = _unavailable
  fn.to_pil_image = _unavailable
  boxes.batched_nms = _unavailable
  boxes.box_area = _unavailable
  tr.functional = fn
  ops.boxes = boxes
  tv.transforms = tr
  tv.ops = ops
  sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                      "torchvision.transforms.functional": fn, "torchvision.ops": ops,
                      "torchvision.ops.boxes": boxes})


def tiny_reference_sam(depth: int, decoder_heads: int, img: int = 64, patch: int = 8):
  """A tiny segment_anything Sam (torch, eval mode), seeded: `depth` encoder blocks (block 1
  global), window 3 on the img/patch grid, a 2-layer two-way transformer with `decoder_heads`
  heads. Every tensor random and O(0.2) (the defaults, zero pos_embed / rel-pos and unit norms,
  leave mask logits too small for a 1e-4 check to bite)."""
  import functools  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  stub_torchvision()
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,  # pylint: disable=import-outside-toplevel
                                         TwoWayTransformer)
  grid = img // patch
  torch.manual_seed(0)
  enc = ImageEncoderViT(img_size=img, patch_size=patch, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=4,
                        out_chans=32, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                        use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
  pe = PromptEncoder(embed_dim=32, image_embedding_size=(grid, grid), input_image_size=(img, img), mask_in_chans=8)
  dec = MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32,
                    transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=decoder_heads))
  model = Sam(enc, pe, dec).eval().requires_grad_(False)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if "gaussian_matrix" in name:
        continue
      base = 1.0 if name.endswith("weight") and t.ndim == 1 else 0.0
      t.copy_(base + 0.2 * torch.randn_like(t))
  return model


def converted_sam(path: str):
  """(Converted, its `Sam` module, {'params': ...}) of a SAM checkpoint (.pth or HF directory)."""
  from jaxlisa.conversion.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel
  from jaxlisa.models.sam import Sam  # pylint: disable=import-outside-toplevel
  conv = convert_checkpoint(str(path))
  return conv, Sam(conv.config), {"params": conv.params}


def jitted_sam(model, variables) -> dict:
  """A Sam's parts under jit: encode(pixels), prompts(kwargs), dense_pe(), decode(embeddings, sparse,
  dense, multimask (static), *image_index)."""
  from jaxlisa.models.sam import Sam  # pylint: disable=import-outside-toplevel
  v = variables
  return dict(
      encode=jax.jit(lambda x: model.apply(v, x, method=Sam.encode_image)),
      prompts=jax.jit(lambda kw: model.apply(v, **kw, method=Sam.encode_prompts)),
      dense_pe=jax.jit(lambda: model.apply(v, method=Sam.get_dense_pe)),
      decode=jax.jit(lambda e, s, d, mm, *idx: model.apply(v, e, s, d, mm, *idx, method=Sam.decode),
                     static_argnums=3))


def max_abs_diff(a, b, mask=None) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  d = np.abs(a - b)
  if mask is not None:
    d = d[np.asarray(mask, bool)]
  return float(d.max()) if d.size else 0.0


def assert_trees_equal(a, b):
  """Two param trees with the same paths and bit-identical leaves."""
  fa = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(a)}
  fb = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(b)}
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def write_checkpoint_dir(d, state: dict, config: dict | None = None, files: dict | None = None) -> str:
  """A HF-style checkpoint directory: model.safetensors from `state` ({name: numpy or torch
  array}), config.json from `config` when given, and other JSON files ({file name: object})."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(d, exist_ok=True)
  save_file({k: np.ascontiguousarray(v.detach().numpy() if hasattr(v, "detach") else np.asarray(v))
             for k, v in state.items()}, os.path.join(d, "model.safetensors"))
  for name, obj in {**({"config.json": config} if config is not None else {}), **(files or {})}.items():
    with open(os.path.join(d, name), "w") as f:
      json.dump(obj, f)
  return str(d)


def run_main_then_resume(spec: str, workdir, stop_after: int):
  """main.py (a subprocess, as a user runs it) on `spec`, stopped after `stop_after` steps, then the
  same job resumed in process until done (at the CLI's matmul precision, so the persistent
  compilation cache serves main.py's programs). Returns (main.py's stdout, Trainer.fit's result)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  from jaxlisa import config as cfg_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks import prepared_task  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  cli = subprocess.run([sys.executable, os.path.join(root, "main.py"), "--config", spec, "--workdir", str(workdir),
                        f"--config.stop_after={stop_after}"], cwd=root, capture_output=True, text=True,
                       timeout=600, env=env)
  assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-3000:]
  with jax.default_matmul_precision(None):
    config = cfg_lib.load_config(spec)
    trainer = Trainer(config, str(workdir), prepared_task(config, str(workdir)))
    try:
      result = trainer.fit()
    finally:
      trainer.close()
  return cli.stdout, result


@pytest.fixture(scope="module")
def resumed_run(request, tmp_path_factory):
  """main.py on the test module's SPEC (a runlocal config of 30 steps), stopped after 15; then the
  same job resumed in process: (workdir, main.py's stdout, Trainer.fit's result)."""
  wd = tmp_path_factory.mktemp("run")
  stdout, result = run_main_then_resume(request.module.SPEC, wd, stop_after=15)
  return wd, stdout, result


def check_resumed_run(workdir, cli: str, result: dict, stop_after: int = 15, total: int = 30):
  """What every run_main_then_resume job of a caption-data task shows: resumed at `stop_after`,
  done at `total`, checkpoints at both, a train row every step, eval rows at both, the trained
  tokenizer and the synthetic corpus in the workdir. Returns (metrics rows, train rows)."""
  from jaxlisa.training.trainer import read_metrics  # pylint: disable=import-outside-toplevel
  assert result["start_step"] == stop_after and result["step"] == total
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [stop_after, total]
  rows = read_metrics(str(workdir))
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == list(range(1, total + 1))
  assert f"done: step {stop_after}/{total}" in cli
  assert [r["step"] for r in rows if "eval/loss" in r] == [stop_after, total]
  assert os.path.isfile(workdir / "tokenizer" / "tokenizer.json") and os.path.isfile(workdir / "data" / "corpus.json")
  return rows, train


# ------------------------------------------------------------------------------------------------
# main.py --config.mode=serve as a subprocess (tests/test_serve*.py), via jaxlisa.serving.client.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_bytes(h: int = 100, w: int = 140, seed: int = 0) -> bytes:
  """A random RGB image [h, w] as PNG bytes."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def tiny_lisa(tokenizer):
  """(model, params as writable numpy arrays) of configs/lisa_tiny.py at random init for `tokenizer`
  (synthetic_shapes.train_tokenizer: [SEG] and the image tokens)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from configs import lisa_tiny  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import lisa as lisa_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks.lisa import model_config_from  # pylint: disable=import-outside-toplevel
  model = lisa_lib.Lisa(model_config_from(lisa_tiny.get_config(), tokenizer))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *model.config.dummy_inputs())["params"]
  return model, jax.tree.map(np.array, nn.meta.unbox(params))


class ServerProcess:
  """main.py --config.mode=serve (lisa_tiny runlocal, extra `args`) on a free loopback port, ready
  when /healthz answers 200 (pytest.fail otherwise); stop() ends it by its PID. Output in
  workdir/server.log. Every program goes to the session's persistent compilation cache."""

  def __init__(self, workdir, *args: str, ready_timeout: float = 600):
    from jaxlisa.serving import client  # pylint: disable=import-outside-toplevel
    self.workdir, self.port = workdir, client.free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log_path = os.path.join(str(workdir), "server.log")
    os.makedirs(str(workdir), exist_ok=True)
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    self.proc = client.launch(["--config", os.path.join(ROOT, "configs/lisa_tiny.py:runlocal"),
                               "--workdir", str(workdir), *args], self.port, self._log, env)
    try:
      client.wait_ready(self.url, self.proc, ready_timeout)
    except client.NotReadyError as e:
      self.stop()
      pytest.fail(f"{e}: " + self.log()[-2000:])

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def stop(self) -> None:
    from jaxlisa.serving import client  # pylint: disable=import-outside-toplevel
    client.stop(self.proc)
    if not self._log.closed:
      self._log.close()


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
  try:
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
  except ImportError:
    pass
