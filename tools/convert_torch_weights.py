#!/usr/bin/env python
"""Convert a PyTorch / HF checkpoint into a self-describing jaxlisa directory.

  python tools/convert_torch_weights.py --src /path/to/hf_dir_or_file --dst /path/to/out \
      [--dtype float32|bfloat16] [--family llama] [--verify] [--overwrite]

--src: a HF directory (model.safetensors, sharded safetensors + index, pytorch_model*.bin + index)
or one .safetensors/.bin/.pth file, or a .gguf file (dequantized by transformers' GGUF reader;
its tokenizer, chat template and eos/pad go to --dst). The family is detected from config.json
(a .gguf: its metadata) or from the key names; --family overrides. The output is written to a temporary directory and renamed into
place at the end, so a failed run leaves nothing behind.

  python tools/convert_torch_weights.py --family lisa --src LISA-7B-v1 --clip_src clip-vit-large-patch14 --dst ckpt/lisa7b
  python tools/convert_torch_weights.py --src sam_vit_b.pth --dst ckpt/sam --override decoder_num_heads=8

--override key=value (repeatable) sets a model config field that a checkpoint cannot say about
itself; it is passed to the conversion as a dict (config_overrides).
"""

import os
import sys
import time

try:
  import jaxlisa  # noqa: F401  installed (pip install .) or on the path
except ImportError:  # a source checkout: run from the repository without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

# Families as the converter's family table (jaxlisa/conversion/families.py) names them (listed here so that --help needs no jax import).
FAMILIES = ("llama", "mistral", "qwen2", "qwen", "opt", "clip_vision", "eva_vit", "sam", "sam_hf", "llava_hf",
            "llava_next_hf", "llava_original", "lisa", "blip2_opt_hf", "blip2_retrieval_hf", "blip2_lavis",
            "blip2_opt_lavis", "blip_hf", "blip_lavis", "minigpt4qwen")

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "checkpoint file (.safetensors/.bin/.pth/.gguf) or HF directory", required=True)
flags.DEFINE_string("dst", None, "output directory", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype")
flags.DEFINE_string("family", None, "force a model family (default: detect); one of " + ", ".join(FAMILIES))
flags.DEFINE_string("clip_src", None, "lisa: the CLIP vision tower's HF directory (the official code keeps it apart)")
flags.DEFINE_multi_string("override", [], "key=value model config field the checkpoint cannot say "
                          "(e.g. decoder_num_heads=8 for SAM); repeatable")
flags.DEFINE_bool("verify", False, "compare logits with the PyTorch original on a random input")
flags.DEFINE_bool("overwrite", False, "replace a non-empty --dst")


def parse_overrides(items) -> dict:
  """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'} (ints, floats, true/false parsed)."""
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"--override {item!r}: expected key=value")
    low = value.lower()
    if low in ("true", "false"):
      out[key] = low == "true"
      continue
    for cast in (int, float):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        pass
    else:
      out[key] = value
  return out


def main(argv):
  del argv
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import convert, checkpoint_io  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  try:
    overrides = parse_overrides(FLAGS.override)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    n = len(checkpoint_io.open_checkpoint(FLAGS.src))
    with tqdm(total=n, desc="converting", unit="tensor", disable=not sys.stderr.isatty()) as bar:
      if FLAGS.family == "lisa" or FLAGS.clip_src:
        from jaxlisa.conversion import lisa  # pylint: disable=import-outside-toplevel
        conv = lisa.convert_lisa(FLAGS.src, clip_src=FLAGS.clip_src, dtype=FLAGS.dtype,
                                 config_overrides=overrides or None, progress=lambda _: bar.update(1))
      else:
        conv = convert.convert_checkpoint(FLAGS.src, family=FLAGS.family, dtype=FLAGS.dtype,
                                          config_overrides=overrides or None, progress=lambda _: bar.update(1))
    out = convert.save_converted(FLAGS.dst, conv, source_dir=FLAGS.src, overwrite=FLAGS.overwrite)
  except checkpoint_io.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"family {conv.family}: wrote {out} in {time.time() - t0:.1f}s")
  if FLAGS.verify:
    from jaxlisa.conversion import verify  # pylint: disable=import-outside-toplevel
    pre = convert.load_pretrained(out, with_tokenizer=False)
    res = verify.verify(FLAGS.src, conv.family, pre.module, pre.params, pre.config)
    for k, v in res.items():
      print(f"verify {k}: {v:.3e}")
  return 0


def _help_ok(argv):
  """--help exits 0 listing the flags (absl's --help needs the required flags otherwise)."""
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    FLAGS.mark_as_parsed()
    print(__doc__)
    print("families:", ", ".join(FAMILIES), "\n")
    print(FLAGS.main_module_help())
    sys.exit(0)


if __name__ == "__main__":
  _help_ok(sys.argv)
  app.run(lambda argv: sys.exit(main(argv)))
