"""jaxlisa command line.

  python main.py                                             # the default job: the LISA demo (configs/lisa_tiny.py)
  python main.py --config configs/lisa_tiny.py:runlocal --workdir /tmp/lisa   # its smoke version
  python main.py --config configs/<name>.py:arg=v --config.optim.lr=1e-4 --workdir DIR

`config.mode` picks what to run (MODES). The resolved config is written to DIR/config.json; a run
in a workdir that has checkpoints resumes from the latest one.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlisa import config as cfg_lib

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "lisa_tiny.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", default=DEFAULT_CONFIG,
    help_string="config file, 'path.py' or 'path.py:arg' (get_config(arg)); override fields with --config.a.b=v")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, config); "
                               "default ./workdir/<config name>")


def _config_spec(argv: list[str]) -> str:
  """The --config value in argv (last wins, as absl), else the default."""
  spec = DEFAULT_CONFIG
  for i, tok in enumerate(argv[1:], 1):
    if tok == "--":
      break
    if tok.lstrip("-") == "config" and tok.startswith("-") and i + 1 < len(argv):
      spec = argv[i + 1]
    elif tok.startswith("-") and tok.lstrip("-").startswith("config="):
      spec = tok.split("=", 1)[1]
  return spec


def parse_flags(argv: list[str]) -> list[str]:
  """Check --config.* overrides against the loaded config, then let absl parse everything."""
  try:
    cfg_lib.validate_overrides(cfg_lib.load_config(_config_spec(argv)), argv)
  except cfg_lib.ConfigError as e:
    sys.stderr.write(f"{os.path.basename(argv[0])}: error: {e}\n")
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"{os.path.basename(argv[0])}: error: {e}\nPass --helpfull to see the flags.\n")
    sys.exit(2)


def default_workdir(spec: str) -> str:
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "-" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in arg.replace(",", "-"))
  return os.path.join("workdir", name)


# ------------------------------------------------------------------------------------------------
# Modes.

class _ProgressBar:
  """Trainer hooks drawing a tqdm bar (loss, lr, step time, ETA), printing a run summary and
  writing every logged metric as TensorBoard scalars to workdir/tensorboard (tensorboardX; no
  TensorFlow needed)."""

  def __init__(self, workdir: str):
    self.workdir, self.bar, self.tb = workdir, None, None
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _scalars(self, step, metrics):
    for k, v in metrics.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def on_start(self, step, total_steps, info):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    width = max(len(k) for k in info) + 1
    lines = [f"  {k + ':':<{width}} {v}" for k, v in info.items()]
    print(f"train {self.workdir}" + (f" (resuming at step {step})" if step else ""), *lines, sep="\n", flush=True)
    self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, smoothing=0.1)

  def on_step(self, step):
    self.bar.update(step - self.bar.n)

  def on_log(self, step, metrics):
    self._scalars(step, metrics)
    self.bar.set_postfix_str(f"loss={metrics['train/loss']:.4f} lr={metrics['train/lr']:.2e} "
                             f"step={metrics['train/step_time'] * 1e3:.0f}ms", refresh=False)

  def on_eval(self, step, metrics):
    self._scalars(step, metrics)
    self.bar.write(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

  def on_checkpoint(self, step):
    pass

  def close(self):
    if self.bar is not None:
      self.bar.close()
    self.tb.close()


def run_train(config, workdir: str) -> None:
  from jaxlisa import parallel  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.trainer import Hooks, Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(config, workdir)
  bar = _ProgressBar(workdir) if parallel.is_primary() else Hooks()  # one progress bar / event file per run
  try:
    result = trainer.fit(bar)
  finally:
    bar.close()
    trainer.close()
  if result["step"] == result["start_step"]:
    print(f"nothing to do: {workdir} is at step {result['step']} of {config.total_steps}")
    return
  tr, ev = result["train"], result["eval"]
  parts = [f"done: step {result['step']}/{config.total_steps} in {result['seconds']:.1f} s",
           f"train loss {tr.get('train/loss', float('nan')):.4f}"]
  parts += [f"{k} {v:.4f}" for k, v in ev.items()]
  print(" | ".join(parts + [f"workdir {workdir}"]), flush=True)


def _log_to_workdir(workdir: str) -> None:
  """Full logs go to workdir/main.INFO (absl log files); the console gets warnings and errors,
  so the progress bar stays readable. --logtostderr / --alsologtostderr keep absl's behaviour."""
  if flags.FLAGS.logtostderr or flags.FLAGS.alsologtostderr:
    return
  logging.get_absl_handler().use_absl_log_file("main", workdir)
  if not flags.FLAGS["stderrthreshold"].present:
    flags.FLAGS.stderrthreshold = "warning"


def _trained_params(config, workdir: str):
  """(task, params): the latest checkpoint in workdir over the task's init and pretrained weights."""
  from jaxlisa.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(config, workdir)
  try:
    state, _, step = trainer.restore_or_init()
  finally:
    trainer.close()
  if step == 0 and not config.init.get("pretrained", ""):
    logging.warning("no checkpoint in %s and no init.pretrained: using untrained weights", workdir)
  return trainer.task, state.params, step


def run_eval(config, workdir: str) -> None:
  """Validation only (the official --eval_only): metrics of the latest checkpoint."""
  from jaxlisa.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(config, workdir)
  try:
    state, _, step = trainer.restore_or_init()
    metrics = trainer.evaluate(state)
  finally:
    trainer.close()
  print(f"eval at step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)


def run_segment(config, workdir: str) -> None:
  """Segment images from questions: --config.image=a.jpg[,b.jpg] --config.prompt="q1[||q2]".
  Prints each answer and writes {name}_mask_{k}.png and {name}_overlay_{k}.png per [SEG]."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from jaxlisa.data.preprocess import ImageError, load_image  # pylint: disable=import-outside-toplevel
  from jaxlisa.inference import segment as seg_lib  # pylint: disable=import-outside-toplevel
  paths = [p for p in config.image.split(",") if p]
  prompts = [p for p in config.prompt.split("||") if p.strip()]
  if not paths or not prompts:
    raise app.UsageError("segment mode needs --config.image=PATH[,PATH...] and --config.prompt=TEXT[||TEXT...]")
  if len(prompts) == 1:
    prompts = prompts * len(paths)
  if len(paths) == 1:
    paths = paths * len(prompts)
  if len(paths) != len(prompts):
    raise app.UsageError(f"{len(paths)} images for {len(prompts)} prompts")
  try:
    images = [load_image(p) for p in paths]
  except (ImageError, FileNotFoundError) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  task, params, step = _trained_params(config, workdir)
  out_dir = config.segment_dir or os.path.join(workdir, "segment")
  os.makedirs(out_dir, exist_ok=True)
  col = config.data.collate
  try:
    results = seg_lib.segment(task.model, params, task.tokenizer, images, prompts,
                              max_new_tokens=config.max_new_tokens, conv_type=col.conv_type,
                              use_mm_start_end=col.use_mm_start_end, max_length=col.model_max_length)
  except seg_lib.PromptTooLongError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  for i, (path, prompt, image, res) in enumerate(zip(paths, prompts, images, results)):
    name = f"{i}_{os.path.splitext(os.path.basename(path))[0]}"
    print(f"[{path}] {prompt}\n  answer: {res.text}")
    if not res.has_seg:
      print("  no [SEG] in the answer: no mask")
    for k, m in enumerate(res.masks):
      Image.fromarray((m * 255).astype(np.uint8)).save(os.path.join(out_dir, f"{name}_mask_{k}.png"))
      Image.fromarray(seg_lib.overlay(image, m)).save(os.path.join(out_dir, f"{name}_overlay_{k}.png"))
      print(f"  mask {k}: {int(m.sum())} pixels -> {out_dir}/{name}_mask_{k}.png, {name}_overlay_{k}.png")
  print(f"(weights from step {step} of {workdir})")


MODES = {
    "train": run_train,
    "eval": run_eval,
    "segment": run_segment,
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  mode = config.get("mode", "train")
  if mode not in MODES:
    raise app.UsageError(f"unknown config.mode {mode!r}; known: {', '.join(MODES)}")
  workdir = _WORKDIR.value or default_workdir(_config_spec(sys.argv))
  from jaxlisa.parallel import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(config.get("distributed"))  # multi-host: before any JAX computation
  # process 0 writes config.json; other modes read a run's workdir and leave its config.json as it is
  if mode == "train" and distributed.is_primary():
    previous = cfg_lib.read_config(workdir)
    if previous is not None:
      changed = cfg_lib.diff(previous, cfg_lib.to_dict(config))
      if changed:
        logging.warning("config differs from the previous run in %s: %s", workdir,
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    cfg_lib.write_config(config, workdir, sys.argv)
  else:
    os.makedirs(workdir, exist_ok=True)
  _log_to_workdir(workdir)
  logging.info("mode %s, workdir %s", mode, workdir)
  MODES[mode](config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
