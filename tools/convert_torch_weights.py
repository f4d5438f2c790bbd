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

Every tensor is checked while it is read: an integer tensor where a float weight belongs, or NaN /
Inf values, stop the conversion naming the tensor (--allow_nonfinite converts NaN/Inf anyway, with
a warning); values beyond 1e4 (garbage bytes read as floats) are a warning, refused with --strict.
--verify is checked to be available for the family and source before anything is written, and
runs on the converted parameters before they are saved. Temporary folders left by a killed
conversion to the same --dst are removed at the next run. Any failure: exit 2 and one line
(`error: ...`); --debug shows the Python traceback instead.
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
flags.DEFINE_bool("allow_nonfinite", False, "convert weights with NaN/Inf values (a warning instead of an error)")
flags.DEFINE_bool("strict", False, "refuse weights with values beyond 1e4 (a warning otherwise)")
flags.DEFINE_bool("debug", False, "show the Python traceback of a failure instead of one line")


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


def one_line(e: BaseException) -> str:
  """An exception's message on one line (multi-line problem lists joined with '; ')."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = "; ".join(lines).replace(":; ", ": ") or type(e).__name__
  builtin = type(e).__module__ == "builtins" and not isinstance(e, OSError)
  return f"{type(e).__name__}: {text}" if builtin else text


def main(argv):
  del argv
  try:
    return convert_main()
  except Exception as e:  # pylint: disable=broad-except  (one line unless --debug)
    if FLAGS.debug or os.environ.get("JAXLISA_DEBUG", "") not in ("", "0"):
      raise
    if isinstance(e, OSError) and e.filename:
      print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
    else:
      print(f"error: {one_line(e)}", file=sys.stderr)
    return 2


def convert_main() -> int:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import convert, checkpoint_io  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  overrides = parse_overrides(FLAGS.override)
  if FLAGS.verify and FLAGS.family:
    from jaxlisa.conversion import verify  # pylint: disable=import-outside-toplevel
    verify.check_available(FLAGS.src, FLAGS.family)  # before reading anything
  checks = dict(allow_nonfinite=FLAGS.allow_nonfinite, strict=FLAGS.strict)
  n = len(checkpoint_io.open_checkpoint(FLAGS.src))
  with tqdm(total=n, desc="converting", unit="tensor", disable=not sys.stderr.isatty()) as bar:
    if FLAGS.family == "lisa" or FLAGS.clip_src:
      from jaxlisa.conversion import lisa  # pylint: disable=import-outside-toplevel
      conv = lisa.convert_lisa(FLAGS.src, clip_src=FLAGS.clip_src, dtype=FLAGS.dtype,
                               config_overrides=overrides or None, progress=lambda _: bar.update(1), **checks)
    else:
      conv = convert.convert_checkpoint(FLAGS.src, family=FLAGS.family, dtype=FLAGS.dtype,
                                        config_overrides=overrides or None, progress=lambda _: bar.update(1),
                                        **checks)
  if FLAGS.verify:  # on the converted parameters, before anything is written
    from jaxlisa.conversion import verify  # pylint: disable=import-outside-toplevel
    verify.check_available(FLAGS.src, conv.family)
    res = verify.verify(FLAGS.src, conv.family, convert.build_module(conv), conv.params, conv.config)
    for k, v in res.items():
      print(f"verify {k}: {v:.3e}")
  out = convert.save_converted(FLAGS.dst, conv, source_dir=FLAGS.src, overwrite=FLAGS.overwrite)
  print(f"family {conv.family}: wrote {out} in {time.time() - t0:.1f}s")
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
