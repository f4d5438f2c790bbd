"""Vision encoders: jaxlisa vs the PyTorch originals on the same machine, in one run.

  python bench/vision.py [--iters 3]

Cases (batch 1, fp32, random weights shared through jaxlisa's converters), each also as achieved
FLOP/s and fraction of XLA's fp32 matmul peak measured in the same run (bench/roofline.py; model
FLOPs from the config's shapes):
  SAM image encoder ViT-B at 1024 px   vs segment-anything's ImageEncoderViT (build_sam_vit_b)
  CLIP ViT-L/14 at 224 px             vs transformers' CLIPVisionModel
"""

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import roofline  # noqa: E402
from bench.common import convert_reference, parse_args, report, timeit  # noqa: E402
from jaxlisa.models import clip as clip_lib  # noqa: E402
from jaxlisa.models import sam as sam_lib  # noqa: E402


def bench_sam(iters, limits):
  from tests.conftest import stub_torchvision  # pylint: disable=import-outside-toplevel
  stub_torchvision()
  from segment_anything import build_sam_vit_b  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = build_sam_vit_b().eval()
  conv = convert_reference(ref, "sam_vit_b.pth", family="sam")
  module = sam_lib.Sam(conv.config)
  params = jax.device_put(conv.params)
  x = np.random.RandomState(0).randn(1, 1024, 1024, 3).astype(np.float32)
  enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method=sam_lib.Sam.encode_image))
  xj = jnp.asarray(x)
  out = enc(params, xj).block_until_ready()
  tj = timeit(lambda: enc(params, xj).block_until_ready(), warmup=0, iters=iters)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  with torch.inference_mode():
    want = ref.image_encoder(xt)
    tt = timeit(lambda: ref.image_encoder(xt), warmup=0, iters=iters)
  err = float(np.abs(np.asarray(out) - want.permute(0, 2, 3, 1).numpy()).max())
  flops = roofline.sam_encoder_flops(conv.config)
  return {"case": "SAM ViT-B image encoder, 1x1024x1024", "unit": "s", "jaxlisa": tj, "torch": tt,
          "max_abs_diff": err, "jaxlisa_roofline": limits.rate("jaxlisa SAM image encoder", flops, tj),
          "torch_roofline": limits.rate("pytorch SAM image encoder", flops, tt)}


def bench_clip(iters, limits):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
  ref = tf.CLIPVisionModel(cfg).eval()
  conv = convert_reference(ref)
  module = clip_lib.CLIPVisionModel(conv.config)
  params = jax.device_put(conv.params)
  x = np.random.RandomState(0).randn(1, 224, 224, 3).astype(np.float32)
  # LLaVA's use: all hidden states, feature layer -2
  fwd = jax.jit(lambda p, x: clip_lib.select_features(
      module.apply({"params": p}, x, output_hidden_states=True).hidden_states, -2, "patch"))
  xj = jnp.asarray(x)
  out = fwd(params, xj).block_until_ready()
  tj = timeit(lambda: fwd(params, xj).block_until_ready(), warmup=0, iters=iters)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  with torch.inference_mode():
    run = lambda: ref(xt, output_hidden_states=True).hidden_states[-2][:, 1:]
    want = run()
    tt = timeit(run, warmup=0, iters=iters)
  err = float(np.abs(np.asarray(out) - want.numpy()).max())
  flops = roofline.clip_vision_flops(conv.config)
  return {"case": "CLIP ViT-L/14 vision tower, 1x224x224", "unit": "s", "jaxlisa": tj, "torch": tt,
          "max_abs_diff": err, "jaxlisa_roofline": limits.rate("jaxlisa CLIP vision tower", flops, tj),
          "torch_roofline": limits.rate("pytorch CLIP vision tower", flops, tt)}


def main():
  a = parse_args(iters=3)
  limits = roofline.Roofline.measure()
  rows = [bench_sam(a.iters, limits), bench_clip(a.iters, limits)]
  report("vision", rows, {"config": vars(a), "roofline": limits.as_dict()})


if __name__ == "__main__":
  main()
