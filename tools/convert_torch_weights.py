#!/usr/bin/env python
"""Convert a PyTorch / HF checkpoint into a self-describing jaxlisa directory.

  python tools/convert_torch_weights.py --src /path/to/hf_dir_or_file --dst /path/to/out \
      [--dtype float32|bfloat16] [--family llama] [--verify] [--overwrite]

--src: a HF directory (model.safetensors, sharded safetensors + index, pytorch_model*.bin + index)
or one .safetensors/.bin/.pth file. The family is detected from config.json or from the key
names; --family overrides. The output is written to a temporary directory and renamed into
place at the end, so a failed run leaves nothing behind.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "checkpoint file or HF directory", required=True)
flags.DEFINE_string("dst", None, "output directory", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype")
flags.DEFINE_string("family", None, "force a model family (default: detect)")
flags.DEFINE_bool("verify", False, "compare logits with the PyTorch original on a random input")
flags.DEFINE_bool("overwrite", False, "replace a non-empty --dst")


def main(argv):
  del argv
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import convert, checkpoint_io  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  try:
    n = len(checkpoint_io.open_checkpoint(FLAGS.src))
    with tqdm(total=n, desc="converting", unit="tensor") as bar:
      conv = convert.convert_checkpoint(FLAGS.src, family=FLAGS.family, dtype=FLAGS.dtype,
                                        progress=lambda _: bar.update(1))
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


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
