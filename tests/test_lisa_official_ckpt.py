"""An official-format LISA checkpoint (the merge script's names, CLIP in its own directory) trains,
evaluates and segments through main.py."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import lisa_tiny
from jaxlisa.conversion import convert
from jaxlisa.conversion.lisa import export_lisa
from jaxlisa.data import synthetic_shapes
from jaxlisa.models import lisa as lisa_lib
from jaxlisa.tasks.lisa import model_config_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  data = root / "data"
  synthetic_shapes.write_dataset(str(data), num_train=16, num_val=4, image_size=64)
  ckpt, clip_dir = root / "LISA-tiny", root / "clip"
  tok = synthetic_shapes.train_tokenizer(synthetic_shapes.read_corpus(str(data)), str(ckpt), vocab_size=600)
  config = lisa_tiny.get_config()
  config.model.sam.decoder_num_heads = 8  # what every published SAM has: a .pth cannot say otherwise
  cfg = model_config_from(config, tok)
  params = nn.meta.unbox(jax.jit(lisa_lib.Lisa(cfg).init)(jax.random.PRNGKey(0), *cfg.dummy_inputs())["params"])
  params = jax.tree.map(np.asarray, params)
  save_file({k: np.ascontiguousarray(v) for k, v in export_lisa(params, cfg).items()},
            str(ckpt / "model.safetensors"))
  t, v = cfg.llava.text, cfg.llava.vision
  with open(ckpt / "config.json", "w") as f:
    json.dump({"model_type": "llava", "architectures": ["LISAForCausalLM"], "vocab_size": t.vocab_size,
               "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
               "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
               "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.norm_eps,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "mm_vision_tower": "openai/clip-vit-large-patch14",
               "mm_hidden_size": v.hidden_size, "mm_use_im_start_end": True, "mm_vision_select_layer": -2,
               "out_dim": cfg.out_dim, "train_mask_decoder": True, "use_cache": False}, f)
  os.makedirs(clip_dir)
  convert.export_checkpoint(params["llava"]["vision_tower"], "clip_vision", v, str(clip_dir / "model.safetensors"))
  with open(clip_dir / "config.json", "w") as f:
    json.dump({"model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
               "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
               "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5}, f)
  return dict(root=root, data=str(data), ckpt=str(ckpt), clip=str(clip_dir), params=params)


def _main(workdir, official, *args):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config", os.path.join(ROOT, "configs", "lisa_tiny.py") + ":runlocal",
         "--workdir", str(workdir), f"--config.init.pretrained={official['ckpt']}", f"--config.init.clip={official['clip']}",
         f"--config.data.base_dir={official['data']}", "--config.data.sem_seg_data=ade20k",
         "--config.data.refer_seg_data=refcoco", "--config.trainable=('text_hidden_fcs/.*', 'visual_model/mask_decoder/.*')",
         *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_official_checkpoint_loads_exactly(official):
  from jaxlisa.conversion.loaders import load_lisa  # pylint: disable=import-outside-toplevel
  got = load_lisa(official["ckpt"], clip_src=official["clip"])
  flat_a = jax.tree_util.tree_leaves_with_path(got.params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(official["params"]))
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_array_equal(np.asarray(x), flat_b[path], err_msg=jax.tree_util.keystr(path))
  assert got.tokenizer is not None and got.config.seg_token_idx == synthetic_shapes.seg_token_index(got.tokenizer)


def test_official_checkpoint_trains_evaluates_segments(official, tmp_path):
  wd = tmp_path / "run"
  out = _main(wd, official)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "done: step 4/4" in out.stdout and "eval/giou" in out.stdout
  out = _main(wd, official, "--config.mode=eval")
  assert out.returncode == 0 and "eval at step 4" in out.stdout, out.stderr[-3000:]
  img = sorted(os.listdir(os.path.join(official["data"], "reason_seg", "ReasonSeg", "val")))
  img = os.path.join(official["data"], "reason_seg", "ReasonSeg", "val", [f for f in img if f.endswith(".jpg")][0])
  out = _main(wd, official, "--config.mode=segment", f"--config.image={img}",
              "--config.prompt=Please segment the circle in this image.", "--config.max_new_tokens=4")
  assert out.returncode == 0 and "answer:" in out.stdout, out.stderr[-3000:]
