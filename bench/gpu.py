"""One prepared GPU run: MFU of the LLM and LISA train steps at 7B width, segment latency, compile times.

  python bench/gpu.py                # one GPU, ~6-8 min; writes bench/results/gpu.json
  python bench/gpu.py --dry          # tiny sizes on any backend (CPU CI: tests/test_bench_gpu_dry.py)

Sections (each prints one line per case and lands in the JSON; a case that fails, e.g. out of
memory, prints its error and the run goes on; past --budget_s the remaining cases are skipped):
  roofline   XLA bf16 matmul peak measured in this run (--matmul_n^3, best of 20), copy bandwidth,
             and the nominal H200 989 TFLOP/s bf16 dense as a reference line
  llm        LLM train step at LLaMA-7B width (d 4096, 32 heads, ffn 11008, vocab 32000) with
             --layers layers, bf16 compute / fp32 params, AdamW, [--batch, --seq] tokens, one case
             per --remat policy (the names of jaxlisa.models.layers.remat_policy)
  attention  the same step with attention_impl xla vs cudnn (remat --attention_remat)
  lisa       LISA-7B-shaped train step (configs/lisa_7b.py: LoRA r8 q/v, lm_head / embed / mask
             decoder / text_hidden_fcs trained, frozen towers bf16) at reduced depth (--lisa_layers
             LLM, --clip_layers CLIP, --sam_depth SAM ViT-H blocks), 2 images x 3 conversations;
             loss: next-token CE + BCE of the low-res masks against empty targets (a stand-in with
             the real loss's compute shape)
  segment    jaxlisa.inference.segment on that model (bf16 params): prefill + --new_tokens greedy
             tokens + one mask per prompt [SEG], batch 1 and 8, first call (compile) and warm median

MFU = model FLOPs (bench/roofline.py conventions: matmul + attention, train = 3x forward, remat
recompute not counted) / step time / peak, against both the measured and the nominal peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import roofline  # noqa: E402
from bench.common import RESULTS_DIR, machine  # noqa: E402
from bench.lm_step import make_train_step  # noqa: E402
from configs import lisa_7b  # noqa: E402
from jaxlisa.inference import segment as seg_lib  # noqa: E402
from jaxlisa.models import lisa as lisa_lib  # noqa: E402
from jaxlisa.models.llm import DecoderConfig, DecoderLM  # noqa: E402

LLAMA_7B_WIDTH = dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
DRY_WIDTH = dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512)
LISA_TRAINABLE = (r".*lora_.*", r".*/lm_head/.*", r".*/embed_tokens/.*", r"visual_model/mask_decoder/.*",
                  r"text_hidden_fcs/.*")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dry", action="store_true", help="tiny sizes, any backend (CI)")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--remat", default="none,full,save_dot_except_mlp", help="comma-separated remat policies")
  ap.add_argument("--attention_remat", default="full")
  ap.add_argument("--lisa_layers", type=int, default=4)
  ap.add_argument("--clip_layers", type=int, default=4)
  ap.add_argument("--sam_depth", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--seg_batches", default="1,8")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--matmul_n", type=int, default=8192)
  ap.add_argument("--budget_s", type=float, default=450.0, help="skip the remaining cases past this wall time")
  ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu.json; none with --dry)")
  a = ap.parse_args(argv)
  if a.dry:
    a.layers, a.batch, a.seq, a.lisa_layers, a.clip_layers, a.sam_depth = 2, 2, 32, 1, 1, 2
    a.new_tokens, a.seg_batches, a.iters, a.matmul_n = 4, "1,2", 2, 256
    a.remat = "none,full"
  return a


class Run:
  """Wall-clock budget, results and the printed lines."""

  def __init__(self, a):
    self.a, self.t0, self.results = a, time.perf_counter(), {}

  def over_budget(self) -> bool:
    return time.perf_counter() - self.t0 > self.a.budget_s

  def case(self, section: str, name: str, fn):
    """Run fn() -> dict, record it under results[section][name]; errors and the budget are recorded too."""
    if self.over_budget():
      out = {"skipped": f"time budget {self.a.budget_s:.0f} s spent"}
    else:
      try:
        out = fn()
      except Exception as e:  # pylint: disable=broad-except  (OOM or an unsupported kernel: report, go on)
        traceback.print_exc(limit=2)
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    self.results.setdefault(section, {})[name] = out
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())
    print(f"[{section}] {name}: {shown}", flush=True)
    return out


def timed(fn, iters: int) -> tuple[float, float]:
  """(first call seconds incl. compile, median of `iters` warm calls); fn must block."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def random_params(module, *inputs, seed: int = 0):
  """Parameters of module.init's shapes and dtypes, filled on the host (no init program to
  compile): norm scales 1, biases 0, every other leaf N(0, 0.02). Speed does not depend on values."""
  shapes = flax.core.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)["params"]))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      x = np.ones(leaf.shape, np.float32)
    elif name == "bias":
      x = np.zeros(leaf.shape, np.float32)
    else:
      x = 0.02 * rng.standard_normal(leaf.shape, np.float32)
    return jnp.asarray(x, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def mfu(limits, flops: float, step_s: float, nominal: float | None) -> dict:
  out = {"step_s": step_s, "model_tflop": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
         "mfu_measured_peak": flops / step_s / limits.peak_flops}
  if nominal:
    out["mfu_nominal_peak"] = flops / step_s / nominal
  return out


# ----------------------------------------------------------------------------- LLM train step
def llm_config(a, remat: str, attention: str) -> DecoderConfig:
  width = DRY_WIDTH if a.dry else LLAMA_7B_WIDTH
  return DecoderConfig(**width, num_hidden_layers=a.layers, dtype="bfloat16", param_dtype="float32",
                       scan_layers=True, remat_policy=remat, attention_impl=attention)


def llm_case(a, limits, nominal, remat: str, attention: str) -> dict:
  c = llm_config(a, remat, attention)
  module = DecoderLM(c)
  ids = jnp.asarray(np.random.RandomState(0).randint(3, c.vocab_size, (a.batch, a.seq)), jnp.int32)
  params = random_params(module, ids[:1, :8])
  tx = optax.adamw(1e-5)
  box = {"params": params, "opt": jax.jit(tx.init)(params)}
  step = make_train_step(module, tx)

  def run():
    box["params"], box["opt"], loss = step(box["params"], box["opt"], ids)
    loss.block_until_ready()

  first, step_s = timed(run, a.iters)
  out = {"compile_and_first_s": first, **mfu(limits, 3 * roofline.decoder_flops(c, a.batch, a.seq), step_s, nominal)}
  del box
  return out


# ----------------------------------------------------------------------------- LISA
def lisa_config(a) -> lisa_lib.LisaConfig:
  """configs/lisa_7b.py at reduced depth (--dry: tiny widths too)."""
  m = lisa_7b.get_config().model.to_dict()
  t, v, s = m["llava"]["text"], m["llava"]["vision"], m["sam"]
  t["num_hidden_layers"], v["num_hidden_layers"] = a.lisa_layers, a.clip_layers
  every = max(1, a.sam_depth // 4)  # ViT-H: a global block closing each quarter (7, 15, 23, 31)
  s.update(depth=a.sam_depth, global_attn_indexes=tuple(range(every - 1, a.sam_depth, every)))
  if a.dry:
    t.update(DRY_WIDTH, vocab_size=DRY_WIDTH["vocab_size"] + 4)
    v.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=28, patch_size=14)
    s.update(img_size=64, patch_size=16, embed_dim=32, num_heads=2, window_size=2, out_chans=16,
             prompt_embed_dim=16, mask_in_chans=4, decoder_mlp_dim=32, decoder_num_heads=2, iou_head_hidden_dim=16)
    m["out_dim"] = 16
  m["seg_token_idx"] = t["vocab_size"] - 3  # [SEG], <im_start>, <im_end> at the top, as the official vocab
  t["eos_token_id"] = None  # random weights: decode exactly new_tokens
  return lisa_lib.LisaConfig.from_dict(m)


def split_params(params, patterns):
  """-> (trainable, frozen) flat dicts {'a/b/c': array} by regex on the '/'-joined path."""
  flat = {"/".join(k): x for k, x in flax.traverse_util.flatten_dict(params).items()}
  hit = lambda k: any(re.fullmatch(p, k) for p in patterns)
  return {k: x for k, x in flat.items() if hit(k)}, {k: x for k, x in flat.items() if not hit(k)}


def join_params(*flats):
  merged = {}
  for f in flats:
    merged.update({tuple(k.split("/")): x for k, x in f.items()})
  return flax.traverse_util.unflatten_dict(merged)


def lisa_batch(c: lisa_lib.LisaConfig, n_img: int, n_conv: int, seq: int, rs):
  """input_ids [I, J, T] (BOS, the image's N placeholders, random text with one [SEG]), pixels."""
  n = c.num_image_tokens
  ids = rs.randint(3, c.seg_token_idx, (n_img, n_conv, seq)).astype(np.int32)
  ids[..., 0] = 1
  ids[..., 1:1 + n] = c.llava.image_token_index
  ids[..., seq - 4] = c.seg_token_idx
  v, s = c.llava.vision, c.sam
  return (jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)),
          jnp.asarray(rs.randn(n_img, v.image_size, v.image_size, 3), jnp.float32),
          jnp.asarray(rs.randn(n_img, s.img_size, s.img_size, 3), jnp.float32))


def lisa_train_case(a, limits, nominal, c, params) -> dict:
  model = lisa_lib.Lisa(c)
  n_img, n_conv = 2, 3
  seq = c.num_image_tokens + (64 if a.dry else 256)
  ids, mask, clip_px, sam_px = lisa_batch(c, n_img, n_conv, seq, np.random.RandomState(1))
  trained, frozen = split_params(params, LISA_TRAINABLE)
  frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)  # config.frozen_dtype
  tx = optax.adamw(1e-5)

  def loss_fn(tr, fr):
    out = model.apply({"params": join_params(tr, fr)}, ids, mask, clip_px, sam_px)
    logits = out.logits[:, :, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, :, 1:].clip(0)).mean()
    bce = optax.sigmoid_binary_cross_entropy(out.low_res_masks.astype(jnp.float32), 0.0).mean()
    return ce + 2.0 * bce

  @jax.jit
  def step(tr, fr, opt):
    loss, g = jax.value_and_grad(loss_fn)(tr, fr)
    upd, opt = tx.update(g, opt, tr)
    return optax.apply_updates(tr, upd), opt, loss

  box = {"tr": trained, "opt": jax.jit(tx.init)(trained)}

  def run():
    box["tr"], box["opt"], loss = step(box["tr"], frozen, box["opt"])
    loss.block_until_ready()

  first, step_s = timed(run, a.iters)
  flops = (roofline.clip_vision_flops(c.llava.vision, n_img) + roofline.sam_encoder_flops(c.sam, n_img)
           + 3 * roofline.decoder_flops(c.llava.text, n_img * n_conv, seq))
  n_trained = sum(x.size for x in trained.values())
  n_all = n_trained + sum(x.size for x in frozen.values())
  return {"compile_and_first_s": first, **mfu(limits, flops, step_s, nominal), "seq": seq,
          "params": n_all, "trained_params": n_trained}


class WordTokenizer:
  """A stand-in tokenizer (no vocabulary files on a bare GPU machine): BOS + one id per word;
  '[SEG]', '<im_start>', '<im_end>' map to the model's ids; decode writes ids."""

  def __init__(self, c: lisa_lib.LisaConfig):
    s = c.seg_token_idx
    self.special = {"[SEG]": s, "<im_start>": s + 1, "<im_end>": s + 2}
    self.top, self.bos_token_id = s, 1

  def __call__(self, text, **kw):
    del kw
    words = re.findall(r"\[SEG\]|<im_start>|<im_end>|\S+", text)
    ids = [1] + [self.special.get(w, 3 + sum(w.encode()) % (self.top - 3)) for w in words]
    return type("Encoding", (), {"input_ids": ids})()

  def decode(self, ids, **kw):
    del kw
    return " ".join(str(int(i)) for i in ids)


def segment_case(a, c, params, batch: int) -> dict:
  model = lisa_lib.Lisa(c)
  tok = WordTokenizer(c)
  rs = np.random.RandomState(batch)
  images = [rs.randint(0, 256, (480, 640, 3)).astype(np.uint8) for _ in range(batch)]
  prompts = ["What is the largest object in this image? It is [SEG] . Please output segmentation mask."] * batch
  run = lambda: seg_lib.segment(model, params, tok, images, prompts, max_new_tokens=a.new_tokens,
                                prompt_seg_masks=True)
  box = {}

  def go():
    box["res"] = run()
  first, warm = timed(go, max(2, a.iters // 2))
  n_masks = sum(len(r.masks) for r in box["res"])
  return {"first_call_s": first, "warm_s": warm, "per_token_ms": 1e3 * warm / a.new_tokens,
          "masks": n_masks}


# ----------------------------------------------------------------------------- main
def main(argv=None):
  a = parse_args(argv)
  if a.dry:  # CI checks that the script works, not its speed: compile fast (before the backend starts)
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  run = Run(a)
  backend = jax.default_backend()
  kind = jax.devices()[0].device_kind
  print(f"bench/gpu.py on {backend} ({kind}, {jax.device_count()} device(s)){' --dry' if a.dry else ''}", flush=True)
  limits = roofline.Roofline.measure(n=a.matmul_n, dtype=jnp.bfloat16, iters=20)
  nominal = roofline.NOMINAL_PEAKS["H200 bf16 dense"]
  run.results["roofline"] = {**limits.as_dict(), "nominal_h200_bf16_tflops": nominal / 1e12,
                             "measured_vs_nominal": limits.peak_flops / nominal}
  print(f"[roofline] measured bf16 matmul {limits.peak_flops / 1e12:.4g} TFLOP/s "
        f"({100 * limits.peak_flops / nominal:.1f}% of the nominal H200 989 TFLOP/s), "
        f"copy {limits.bandwidth / 1e9:.4g} GB/s", flush=True)
  on_gpu = backend == "gpu"
  nominal_ref = nominal if on_gpu else None  # the nominal H200 line only means something on a GPU

  done = {}  # (remat, attention) -> result: the attention xla case is a remat case already run

  def llm(remat, impl):
    if (remat, impl) not in done:
      done[remat, impl] = llm_case(a, limits, nominal_ref, remat, impl)
    return done[remat, impl]

  for remat in a.remat.split(","):
    run.case("llm", f"remat={remat}", lambda r=remat: llm(r, "xla"))
  for impl in ("xla", "cudnn"):
    if impl == "cudnn" and not on_gpu:
      run.results.setdefault("attention", {})[impl] = {"skipped": f"cudnn needs a GPU (backend {backend})"}
      print(f"[attention] {impl}: skipped (backend {backend})", flush=True)
      continue
    run.case("attention", f"{impl} (remat={a.attention_remat})", lambda i=impl: llm(a.attention_remat, i))

  c = lisa_config(a)
  params = random_params(lisa_lib.Lisa(c), *c.dummy_inputs())
  run.case("lisa", "train_step", lambda: lisa_train_case(a, limits, nominal_ref, c, params))
  infer = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  del params
  for b in (int(x) for x in a.seg_batches.split(",")):
    run.case("segment", f"batch={b}", lambda b=b: segment_case(a, c, infer, b))

  run.results.update(machine=machine(), config=vars(a), total_wall_s=time.perf_counter() - run.t0)
  out = a.out or (None if a.dry else os.path.join(RESULTS_DIR, "gpu.json"))
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(run.results, f, indent=2, default=str)
    print(f"saved {out}")
  print(f"total {run.results['total_wall_s']:.0f} s")
  failed = [f"{s}/{n}" for s, cases in run.results.items() if isinstance(cases, dict)
            for n, r in cases.items() if isinstance(r, dict) and "error" in r]
  if failed:
    print("failed cases:", ", ".join(failed))
  return 1 if (a.dry and failed) else 0


if __name__ == "__main__":
  sys.exit(main())
