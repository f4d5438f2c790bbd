"""jaxlisa command line (main.py, `python -m jaxlisa` and the `jaxlisa` console script).

  python main.py                                             # the default job: the LISA demo (configs/lisa_tiny.py)
  python main.py --config configs/lisa_tiny.py:runlocal --workdir /tmp/lisa   # its smoke version
  python main.py --config configs/<name>.py:arg=v --config.optim.lr=1e-4 --workdir DIR
  python main.py --help                                      # modes and the config's main fields

`config.mode` picks what to run (MODES). The resolved config is written to DIR/config.json; a run
in a workdir that has checkpoints resumes from the latest one. eval, segment, serve, caption (BLIP-2)
and chat (MiniGPT4-Qwen) read parameters only (jaxlisa/training/inference_params.py) and refuse to
run on random weights unless --config.allow_random_init=True.

`--config configs/x.py` is a path relative to the working directory; when no such file exists there
the packaged configs (installed next to jaxlisa by `pip install .`) are used.

A bad input (config file, field value, workdir, checkpoint of another model, image, prompt) ends
with exit 2 and one line on stderr, `main.py: error: ...`; any other failure with exit 1 and one
line. `--debug` (or JAXLISA_DEBUG=1) shows the full Python traceback instead.
"""

from __future__ import annotations

import os
import sys

# Before jax / transformers are imported: transformers' import-time advice that PyTorch is missing
# (jaxlisa uses its tokenizers only).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import logging as py_logging  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from jaxlisa import config as cfg_lib  # noqa: E402

PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(PACKAGE_CONFIGS, "lisa_tiny.py")

MODE_HELP = {
    "train": "train (or resume) config.task to config.total_steps; checkpoints, metrics.jsonl, TensorBoard in the workdir",
    "eval": "validate the latest checkpoint of the workdir (or init.pretrained): prints the eval metrics",
    "segment": "answer --config.prompt about --config.image (or each of --config.images=DIR|GLOB|x.jsonl) "
               "and write a mask + overlay PNG per [SEG]",
    "serve": "HTTP service on --config.serve.host:port (GET /healthz, POST /v1/segment, GET / page); README Serving",
    "caption": "BLIP-2 (configs/blip2_*.py): print a caption of each --config.image (config.caption: beams or "
               "nucleus sampling)",
    "chat": "MiniGPT4-Qwen (configs/minigpt4qwen*.py): answer --config.prompt about each --config.image (ChatML)",
}

# Modes that run one kind of task (config.task), and the configs that have it.
MODE_TASKS = {"caption": (("blip2_stage1",), "configs/blip2_tiny.py, configs/blip2_stage1.py"),
              "chat": (("minigpt4qwen",), "configs/minigpt4qwen_tiny.py, configs/minigpt4qwen.py")}

# Fields --help shows (those the selected config has), with their defaults.
HELP_FIELDS = ("mode", "task", "total_steps", "batch_size", "grad_accum", "optim.lr", "eval_every", "ckpt_every",
               "seed", "init.pretrained", "init.clip", "data.base_dir", "image", "images", "prompt", "max_new_tokens",
               "segment_dir", "caption.num_beams", "caption.use_nucleus_sampling", "chat.do_sample",
               "allow_random_init", "mesh.data", "mesh.fsdp", "mesh.tensor")


class _QuietTpuProbe(py_logging.Filter):
  """Drop jax's 'Unable to initialize backend ...' info line (a CPU-only jaxlib probing for TPUs);
  a backend that was asked for (JAX_PLATFORMS) still fails loudly, as jax raises then."""

  def filter(self, record):
    return not str(record.msg).startswith("Unable to initialize backend")


class _QuietLongPrompt(py_logging.Filter):
  """Drop transformers' 'Token indices sequence length is longer than ...' warning: segment checks
  prompt lengths against the model's context itself (one error line, before loading weights)."""

  def filter(self, record):
    return not str(record.msg).startswith("Token indices sequence length")


def quiet_logs() -> None:
  py_logging.getLogger("jax._src.xla_bridge").addFilter(_QuietTpuProbe())
  py_logging.getLogger("transformers.tokenization_utils_base").addFilter(_QuietLongPrompt())


def resolve_config_path(path: str) -> str:
  """`path` if it exists (relative to the working directory), else the packaged config of that name."""
  if os.path.isfile(path) or not path.endswith(".py"):
    return path
  packaged = os.path.join(PACKAGE_CONFIGS, os.path.basename(path))
  return packaged if os.path.isfile(packaged) else path


def resolve_spec(spec: str) -> str:
  path, colon, arg = spec.partition(":")
  return resolve_config_path(path) + colon + arg


def _config_spec(argv: list[str], default: str = DEFAULT_CONFIG) -> str:
  """The --config value in argv (last wins, as absl), else `default`."""
  spec = default
  for i, tok in enumerate(argv[1:], 1):
    if tok == "--":
      break
    if tok.lstrip("-") == "config" and tok.startswith("-") and i + 1 < len(argv):
      spec = argv[i + 1]
    elif tok.startswith("-") and tok.lstrip("-").startswith("config="):
      spec = tok.split("=", 1)[1]
  return spec


def _resolve_argv(argv: list[str]) -> list[str]:
  """argv with every --config value resolved by resolve_spec (what ml_collections will load)."""
  out = list(argv)
  for i, tok in enumerate(out[1:], 1):
    if tok == "--":
      break
    if tok.lstrip("-") == "config" and tok.startswith("-") and i + 1 < len(out):
      out[i + 1] = resolve_spec(out[i + 1])
    elif tok.startswith("-") and tok.lstrip("-").startswith("config="):
      head, value = tok.split("=", 1)
      out[i] = f"{head}={resolve_spec(value)}"
  return out


def default_workdir(spec: str) -> str:
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "-" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in arg.replace(",", "-"))
  return os.path.join("workdir", name)


def help_text(prog: str, spec: str, config) -> str:
  values = dict(cfg_lib.iter_paths(config))
  width = max(len(k) for k in HELP_FIELDS) + len("--config.")
  lines = [f"usage: {prog} [--config FILE.py[:ARG]] [--workdir DIR] [--config.KEY=VALUE ...]", "",
           "jaxlisa: train, validate and run LISA and its family (JAX/Flax).", "", "modes (--config.mode=MODE):"]
  lines += [f"  {m:<8} {h}" for m, h in MODE_HELP.items()]
  lines += ["", "flags:",
            f"  {'--config FILE.py[:ARG]':<{width}}  config file (default {os.path.relpath(DEFAULT_CONFIG)}); "
            "relative to the working directory, else the packaged configs/",
            f"  {'--workdir DIR':<{width}}  run directory (default ./{default_workdir(spec)})",
            f"  {'--debug':<{width}}  a failure shows its Python traceback (also JAXLISA_DEBUG=1); "
            "otherwise one line, exit 2 for bad input",
            "", f"main fields of {spec} (any field: --config.a.b=VALUE; an unknown key is an error):"]
  for k in HELP_FIELDS:
    if k in values:
      lines.append(f"  {'--config.' + k:<{width}}  {values[k]!r}")
  lines += ["", "examples:",
            f"  {prog} --config configs/lisa_tiny.py:runlocal --workdir /tmp/lisa      # a 4-step smoke run",
            f"  {prog} --config configs/lisa_tiny.py --workdir W --config.mode=segment "
            "--config.image=a.jpg --config.prompt='Which shape is red? Please output segmentation mask.'",
            f"  {prog} --config configs/blip2_tiny.py --workdir W --config.mode=caption --config.image=a.jpg,b.jpg",
            f"  {prog} --config configs/minigpt4qwen_tiny.py --workdir W --config.mode=chat --config.image=a.jpg "
            "--config.prompt='What colour is the circle?'",
            "", "--helpfull lists every absl flag (logging etc.)."]
  return "\n".join(lines) + "\n"


def _fail(prog: str, msg: str, code: int = 2, hard: bool = False) -> None:
  """The one error line, then exit `code`. hard: skip the interpreter's teardown (os._exit), where
  orbax's background threads would otherwise print 'Event loop is closed' tracebacks after it."""
  sys.stderr.write(f"{prog}: error: {msg}\n")
  if hard:
    sys.stdout.flush()
    sys.stderr.flush()
    py_logging.shutdown()  # flush the absl log file
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


DEBUG_ENV = "JAXLISA_DEBUG"
_LOG_FILE = []  # non-empty once absl logs to workdir/main.INFO


def debug() -> bool:
  """--debug / JAXLISA_DEBUG=1: failures raise with their traceback instead of one line."""
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _take_debug_flag(argv: list[str]) -> list[str]:
  """argv without --debug (which sets JAXLISA_DEBUG=1 for this process)."""
  out = []
  for i, tok in enumerate(argv):
    if tok == "--":
      return out + argv[i:]
    if i and tok in ("--debug", "-debug"):
      os.environ[DEBUG_ENV] = "1"
      continue
    out.append(tok)
  return out


def _fail_on(prog: str, e: BaseException) -> None:
  """One line for an exception: exit 2 for bad input (ValueError, OSError, the library's input
  errors), 1 for anything else; the traceback goes to the absl log (workdir/main.INFO)."""
  if _LOG_FILE:  # the console gets the one line; the log file (INFO: not echoed) keeps the traceback
    import traceback  # pylint: disable=import-outside-toplevel
    logging.info("failed:\n%s", "".join(traceback.format_exception(e)))
  from jaxlisa.training.checkpoints import CheckpointError  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.inference_params import NoWeightsError  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.trainer import NonFiniteError  # pylint: disable=import-outside-toplevel
  msg = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, (cfg_lib.ConfigError, CheckpointError, NoWeightsError, NonFiniteError)):
    _fail(prog, msg, hard=True)
  if isinstance(e, OSError) and getattr(e, "filename", None):
    _fail(prog, f"{e.filename}: {e.strerror or msg}", hard=True)
  if isinstance(e, (ValueError, OSError, KeyError)):  # the library's own error classes say what they are
    _fail(prog, f"{type(e).__name__}: {msg}" if type(e).__module__ == "builtins" else msg, hard=True)
  _fail(prog, f"internal error {type(e).__name__}: {msg} (--debug shows the traceback)", code=1, hard=True)


def define_config_flag(argv: list[str], default_spec: str = DEFAULT_CONFIG, flag_values=None):
  """For a program whose config comes from `--config FILE.py[:ARG]` and `--config.a.b=v`
  overrides (main.py, tools/plan.py): resolve the --config values in argv (resolve_spec), load the
  config and check the overrides against it (an unknown key exits 2 with one line naming the
  closest keys), then define the --config flag on flag_values (default absl's FLAGS) for that argv.
  Returns (resolved argv, config spec, the config as loaded without overrides)."""
  prog = os.path.basename(argv[0])
  argv = _resolve_argv(_take_debug_flag(argv))
  spec = _config_spec(argv, resolve_spec(default_spec))
  try:
    config = cfg_lib.load_config(spec)
    cfg_lib.validate_overrides(config, argv)
  except cfg_lib.ConfigError as e:
    if debug():
      raise
    _fail(prog, str(e))
  flag_values = flags.FLAGS if flag_values is None else flag_values
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  if "config" not in flag_values:
    config_flags.DEFINE_config_file(
        "config", default=resolve_spec(default_spec), flag_values=flag_values, sys_argv=argv,
        help_string="config file, 'path.py' or 'path.py:arg' (get_config(arg)); override fields with --config.a.b=v")
  return argv, spec, config


def parse_flags(argv: list[str]) -> list[str]:
  """Validate the config and its --config.* overrides (clean exit 2), print --help, then define
  the --config flag (its default is loaded, with argv's overrides, at definition) and let absl parse."""
  prog = os.path.basename(argv[0])
  argv, spec, config = define_config_flag(argv)
  if any(a in ("-h", "--help", "-help", "--h") for a in argv[1:]):
    sys.stdout.write(help_text(prog, spec, config))
    sys.exit(0)
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, config); default ./workdir/<config name>")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(prog, f"{e}\nPass --help to see the flags.")
  return []


# ------------------------------------------------------------------------------------------------
# Progress: a tqdm bar on a terminal, one line per log interval otherwise.

def _isatty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class Progress:
  """A progress display of `total` units: tqdm when stdout is a terminal; else a plain line each
  `every` units (and at the end) so that logs hold no carriage-return frames."""

  def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: int | None = None):
    self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, initial, ""
    self.every = every or max(1, total // 10)
    self.tty = _isatty(sys.stdout)
    self.bar = None
    if self.tty:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                      file=sys.stdout)
    import time  # pylint: disable=import-outside-toplevel
    self._time, self._t0, self._n0 = time.time, time.time(), initial

  def update_to(self, n: int) -> None:
    prev, self.n = self.n, n
    if self.bar is not None:
      self.bar.update(n - prev)

  def set_postfix(self, text: str) -> None:
    self.postfix = text
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=False)

  def line(self) -> None:
    """The non-terminal progress line (call once per log interval)."""
    if self.tty:
      return
    elapsed = self._time() - self._t0
    done = self.n - self._n0
    eta = elapsed / done * (self.total - self.n) if done > 0 else float("nan")
    eta_s = f"{int(eta // 60)}:{int(eta % 60):02d}" if eta == eta else "?"
    print(f"{self.desc} {self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%, "
          f"{int(elapsed // 60)}:{int(elapsed % 60):02d} elapsed, ETA {eta_s})"
          + (f" {self.postfix}" if self.postfix else ""), flush=True)

  def tick(self, n: int) -> None:
    """update_to(n), with a line every `every` units when not on a terminal."""
    self.update_to(n)
    if n % self.every == 0 or n == self.total:
      self.line()

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# ------------------------------------------------------------------------------------------------
# Modes.

class _TrainProgress:
  """Trainer hooks: a progress display (loss, lr, step time, ETA), a run summary, and every logged
  metric as TensorBoard scalars in workdir/tensorboard (tensorboardX; no TensorFlow needed)."""

  def __init__(self, workdir: str, pending_config=None):
    """pending_config: a config to write as workdir/config.json once the checkpoint has restored
    (a workdir whose checkpoints came without one; see config.accept_run)."""
    self.workdir, self.bar, self.pending_config = workdir, None, pending_config
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _scalars(self, step, metrics):
    for k, v in metrics.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def on_start(self, step, total_steps, info):
    if self.pending_config is not None:
      cfg_lib.write_config(self.pending_config, self.workdir, sys.argv)
      self.pending_config = None
    width = max(len(k) for k in info) + 1
    lines = [f"  {k + ':':<{width}} {v}" for k, v in info.items()]
    print(f"train {self.workdir}" + (f" (resuming at step {step})" if step else ""), *lines, sep="\n", flush=True)
    self.bar = Progress(total_steps, "train", "step", initial=step)

  def on_step(self, step):
    self.bar.update_to(step)

  def on_log(self, step, metrics):
    self._scalars(step, metrics)
    skipped = int(metrics.get("train/skipped_steps", 0))  # non-finite steps left out
    self.bar.set_postfix(f"loss={metrics['train/loss']:.4f} lr={metrics['train/lr']:.2e} "
                         f"step={metrics['train/step_time'] * 1e3:.0f}ms"
                         + (f" skipped={skipped}" if skipped else ""))
    self.bar.line()

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
  from jaxlisa import parallel, tasks  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.trainer import Hooks, Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(config, workdir, tasks.prepared_task(config, workdir))
  pending = None if os.path.exists(os.path.join(workdir, "config.json")) else config
  bar = _TrainProgress(workdir, pending) if parallel.is_primary() else Hooks()  # one progress display / event file per run
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
  so the progress display stays readable. --logtostderr / --alsologtostderr keep absl's behaviour."""
  if flags.FLAGS.logtostderr or flags.FLAGS.alsologtostderr:
    return
  logging.get_absl_handler().use_absl_log_file("main", workdir)
  _LOG_FILE.append(workdir)
  if not flags.FLAGS["stderrthreshold"].present:
    flags.FLAGS.stderrthreshold = "warning"


def _inference_params(config, workdir: str, prepare: bool = False, task=None):
  """(task, params, step, mesh, rules) for eval / segment / serve: params only (inference_params).
  `task`: one already built for this config (default: built here). The task's prepare() (dataset,
  tokenizer) runs when `prepare` (eval reads the dataset) or on random weights (allow_random_init:
  a fresh workdir has no tokenizer); segment and serve on a trained workdir or on init.pretrained
  write nothing."""
  from jaxlisa import tasks  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import inference_params as ip  # pylint: disable=import-outside-toplevel
  trained = ip.ckpt_lib.find_params(workdir)
  print(f"loading weights ({'checkpoint in ' + workdir if trained else 'init.pretrained'})", flush=True)
  mesh, rules = ip.setup(config)
  task = task or tasks.get_task(config, workdir)
  if prepare or (trained is None and not ip.has_pretrained(config)):
    task.prepare()
  params, step = ip.task_params(task, config, workdir, mesh, rules)
  return task, params, step, mesh, rules


def _check_weights(config, workdir: str) -> None:
  from jaxlisa.training import inference_params as ip  # pylint: disable=import-outside-toplevel
  try:
    spec = _config_spec(sys.argv)
    ip.check_weights(config, workdir, config_spec=os.path.relpath(spec) if os.path.isabs(spec) else spec)
  except ip.NoWeightsError as e:
    _fail(os.path.basename(sys.argv[0]), str(e))


def run_eval(config, workdir: str) -> None:
  """Validation only (the official --eval_only): metrics of the latest checkpoint's params."""
  from jaxlisa.training import inference_params as ip  # pylint: disable=import-outside-toplevel
  task, params, step, mesh, rules = _inference_params(config, workdir, prepare=True)
  total = None
  try:
    data = task.eval_data()
    total = len(data) if data is not None and hasattr(data, "__len__") else None
  except TypeError:
    pass
  bar = Progress(total or 0, "eval", "batch") if total else None
  orig = task.eval_data
  task.eval_data = lambda: data  # the pass built above
  try:
    metrics = ip.evaluate(task, params, config, mesh, rules, progress=bar.tick if bar else None)
  finally:
    task.eval_data = orig
    if bar:
      bar.close()
  print(f"eval at step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)


def _images_and_prompts(config, mode: str, with_prompts: bool = True) -> tuple[list[str], list[str]]:
  """--config.image=a.jpg[,b.jpg] and --config.prompt="q1[||q2]" paired (one of either goes with every
  one of the other); exit 2 with one line when they are missing or do not pair."""
  prog = os.path.basename(sys.argv[0])
  paths = [p for p in config.image.split(",") if p]
  if not with_prompts:
    if not paths:
      _fail(prog, f"{mode} mode needs --config.image=PATH[,PATH...]")
    return paths, []
  prompts = [p for p in config.prompt.split("||") if p.strip()]
  if not paths or not prompts:
    _fail(prog, f"{mode} mode needs --config.image=PATH[,PATH...] and --config.prompt=TEXT[||TEXT...]")
  if len(prompts) == 1:
    prompts = prompts * len(paths)
  if len(paths) == 1:
    paths = paths * len(prompts)
  if len(paths) != len(prompts):
    _fail(prog, f"{len(paths)} images for {len(prompts)} prompts")
  return paths, prompts


def _load_images(paths: list[str], exif_transpose: bool = True) -> list:
  """uint8 RGB arrays of `paths`; a missing or unreadable image: exit 2 with one line naming it."""
  from jaxlisa.data.preprocess import ImageError, load_image  # pylint: disable=import-outside-toplevel
  try:
    return [load_image(p, exif_transpose=exif_transpose) for p in paths]
  except (ImageError, FileNotFoundError) as e:
    _fail(os.path.basename(sys.argv[0]), str(e))
  return []


def _weights_note(step, workdir: str) -> str:
  return f"(weights from step {step} of {workdir})" if step else "(weights from init.pretrained / init)"


def run_segment(config, workdir: str) -> None:
  """Segment images from questions: --config.image=a.jpg[,b.jpg] --config.prompt="q1[||q2]".
  Prints each answer and writes {name}_mask_{k}.png and {name}_overlay_{k}.png per [SEG].
  --config.images=DIR|GLOB|list.jsonl: batch segmentation (jaxlisa.serving.batch)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from jaxlisa.inference import segment as seg_lib  # pylint: disable=import-outside-toplevel
  prog = os.path.basename(sys.argv[0])
  if config.get("images", ""):
    return _run_batch_segment(config, workdir)
  paths, prompts = _images_and_prompts(config, "segment")
  images = _load_images(paths)
  from jaxlisa import tasks  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import inference_params as ip  # pylint: disable=import-outside-toplevel
  task = tasks.get_task(config, workdir)
  if config.allow_random_init and ip.ckpt_lib.find_params(workdir) is None and not ip.has_pretrained(config):
    task.prepare()  # random weights on a fresh workdir: the tokenizer the prompt check reads comes from prepare()
  col = config.data.collate
  try:  # before the weights are loaded: the tokenizer and the model config say whether prompts fit
    seg_lib.check_prompts(task.model.config, task.tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                          conv_type=col.conv_type, use_mm_start_end=col.use_mm_start_end,
                          max_length=col.model_max_length)
  except seg_lib.PromptTooLongError as e:
    _fail(prog, str(e))
  task, params, step, _, _ = _inference_params(config, workdir, task=task)
  out_dir = config.segment_dir or os.path.join(workdir, "segment")
  os.makedirs(out_dir, exist_ok=True)
  bar = Progress(len(images), "segment", "image", every=1)
  results = []
  try:
    for i, (image, prompt) in enumerate(zip(images, prompts)):
      results += seg_lib.segment(task.model, params, task.tokenizer, [image], [prompt],
                                 max_new_tokens=config.max_new_tokens, conv_type=col.conv_type,
                                 use_mm_start_end=col.use_mm_start_end, max_length=col.model_max_length)
      bar.tick(i + 1)
  except seg_lib.PromptTooLongError as e:
    bar.close()
    _fail(prog, str(e))
  bar.close()
  for i, (path, prompt, image, res) in enumerate(zip(paths, prompts, images, results)):
    name = f"{i}_{os.path.splitext(os.path.basename(path))[0]}"
    print(f"[{path}] {prompt}\n  answer: {res.text}")
    if not res.has_seg:
      print("  no [SEG] in the answer: no mask")
    for k, m in enumerate(res.masks):
      Image.fromarray((m * 255).astype(np.uint8)).save(os.path.join(out_dir, f"{name}_mask_{k}.png"))
      Image.fromarray(seg_lib.overlay(image, m)).save(os.path.join(out_dir, f"{name}_overlay_{k}.png"))
      print(f"  mask {k}: {int(m.sum())} pixels -> {out_dir}/{name}_mask_{k}.png, {name}_overlay_{k}.png")
  print(_weights_note(step, workdir))


def _quantize_mode(config) -> str:
  """config.serve.quantize, checked (a ConfigError names the choices)."""
  from jaxlisa.inference import quantize as quant_lib  # pylint: disable=import-outside-toplevel
  mode = config.serve.get("quantize", "")
  if mode not in quant_lib.MODES:
    raise cfg_lib.ConfigError(f"serve.quantize must be one of {', '.join(map(repr, quant_lib.MODES))}, got {mode!r}")
  return mode


def _segment_engine(config, task, params, batch_size: int):
  """The serving engine (fixed batch buckets and mask sizes: compiled once) for serve and batch segment."""
  from jaxlisa.inference import quantize as quant_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa.serving import server as server_lib  # pylint: disable=import-outside-toplevel
  col = config.data.collate
  if _quantize_mode(config) == "int8":  # the LLM's dense kernels: int8 + a float32 scale per output channel
    before = quant_lib.param_bytes(params)
    params = quant_lib.quantize_params(params, where=("llava", "language_model"))
    print(f"int8 weights for the language model: parameters {before / 2**20:.2f} MiB -> "
          f"{quant_lib.param_bytes(params) / 2**20:.2f} MiB", flush=True)
  return server_lib.SegmentEngine(
      task.model, params, task.tokenizer, max_new_tokens=config.max_new_tokens,
      max_prompt_tokens=config.serve.max_prompt_tokens, conv_type=col.conv_type,
      use_mm_start_end=col.use_mm_start_end, max_length=col.model_max_length,
      mask_size_multiple=config.serve.mask_size_multiple, max_batch_size=batch_size)


def _run_batch_segment(config, workdir: str) -> None:
  """--config.images=DIR|GLOB|list.jsonl, config.segment_batch_size at a time, with a progress bar."""
  from jaxlisa.serving import batch as batch_lib  # pylint: disable=import-outside-toplevel
  prog = os.path.basename(sys.argv[0])
  try:
    items = batch_lib.list_inputs(config.images, config.prompt)
  except batch_lib.InputError as e:
    _fail(prog, str(e))
  _quantize_mode(config)
  task, params, step, _, _ = _inference_params(config, workdir)
  engine = _segment_engine(config, task, params, int(config.segment_batch_size))
  too_long = [it.prompt for it in items if engine.prompt_tokens(it.prompt) > engine.max_prompt_tokens]
  if too_long:
    _fail(prog, f"{len(too_long)} prompt(s) over {engine.max_prompt_tokens} tokens, e.g. {too_long[0][:80]!r}")
  out_dir = config.segment_dir or os.path.join(workdir, "segment")
  bar = Progress(len(items), "segment", "image", every=int(config.segment_batch_size))
  try:
    rows = batch_lib.run(engine, items, out_dir, progress=bar.tick)
  finally:
    bar.close()
  with_mask = sum(1 for r in rows if r.get("masks"))
  failed = sum(1 for r in rows if "error" in r)
  print(f"segmented {len(rows) - failed} of {len(rows)} images ({with_mask} with a mask, {failed} unreadable) "
        f"-> {out_dir}/results.jsonl " + _weights_note(step, workdir), flush=True)


def run_serve(config, workdir: str) -> None:
  """HTTP service on config.serve.host:port (jaxlisa.serving.server; README "Serving"); weights as
  segment loads them (params only, refuses random weights unless allow_random_init)."""
  from jaxlisa.serving import server as server_lib  # pylint: disable=import-outside-toplevel
  sv = config.serve
  _quantize_mode(config)  # before the weights load
  task, params, step, _, _ = _inference_params(config, workdir)
  engine = _segment_engine(config, task, params, sv.max_batch_size)
  try:
    server = server_lib.make_server(engine, sv, model_name=config.get("task", "lisa"),
                                    step=int(step) if step else None)
  except OSError as e:
    _fail(os.path.basename(sys.argv[0]), f"cannot listen on {sv.host}:{sv.port}: {e}")
  if sv.warmup:
    print("warming up (compiling batch sizes " + ", ".join(map(str, server_lib.batch_buckets(sv.max_batch_size)))
          + ")", flush=True)
    engine.warmup()
  host, port = server.server_address[:2]
  print(f"serving on http://{host}:{port}/ (weights from step {step} of {workdir})", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    server.app.close()


def run_caption(config, workdir: str) -> None:
  """Captions of --config.image=a.jpg[,b.jpg]: BLIP-2 stage 1's Q-Former ITG decoder (LAVIS
  `Blip2Qformer.generate`: config.caption's beams, or nucleus sampling with top_p), one line per image.
  Images are read as LAVIS reads them (PIL RGB, no EXIF rotation) and resized by the task's eval transform."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxlisa.inference import captioning  # pylint: disable=import-outside-toplevel
  paths, _ = _images_and_prompts(config, "caption", with_prompts=False)
  images = _load_images(paths, exif_transpose=False)
  task, params, step, _, _ = _inference_params(config, workdir)
  c = config.caption
  opts = dict(num_beams=int(c.num_beams), max_length=int(c.max_length), min_length=int(c.min_length),
              repetition_penalty=float(c.repetition_penalty), use_nucleus_sampling=bool(c.use_nucleus_sampling),
              top_p=float(c.top_p))
  bar = Progress(len(images), "caption", "image", every=1)
  captions = []
  try:
    for i, image in enumerate(images):
      captions += captioning.qformer_caption_texts(task.model, params, task.tokenizer, task.processor(image)[None],
                                                   rng=jax.random.PRNGKey(config.seed + i), **opts)
      bar.tick(i + 1)
  finally:
    bar.close()
  for path, text in zip(paths, captions):
    print(f"[{path}] {text}")
  how = f"nucleus sampling top_p={opts['top_p']}" if opts["use_nucleus_sampling"] else (
      f"{opts['num_beams']} beams" if opts["num_beams"] > 1 else "greedy")
  print(f"({how}; {_weights_note(step, workdir)[1:]}", flush=True)


def run_chat(config, workdir: str) -> None:
  """MiniGPT4-Qwen answers: one ChatML turn per image (--config.image=a.jpg[,b.jpg]
  --config.prompt="q1[||q2]"; "<Img><ImageHere></Img> " goes in front of a question without
  <ImageHere>, as the original chat demo), greedy unless config.chat.do_sample."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxlisa import tasks  # pylint: disable=import-outside-toplevel
  from jaxlisa.data import chatml  # pylint: disable=import-outside-toplevel
  from jaxlisa.inference import multimodal  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import inference_params as ip  # pylint: disable=import-outside-toplevel
  prog = os.path.basename(sys.argv[0])
  paths, prompts = _images_and_prompts(config, "chat")
  images = _load_images(paths, exif_transpose=False)
  task = tasks.get_task(config, workdir)
  if config.allow_random_init and ip.ckpt_lib.find_params(workdir) is None and not ip.has_pretrained(config):
    task.prepare()  # random weights on a fresh workdir: the tokenizer comes from prepare()
  mc = task.model_config
  longest = max(len(chatml.chat_ids(task.tokenizer, p, mc.num_query_tokens)) for p in prompts)
  if longest + config.max_new_tokens > mc.llm.max_position_embeddings:  # before the weights load
    _fail(prog, f"a prompt of {longest} tokens (with the image's {mc.num_query_tokens}) plus max_new_tokens "
          f"{config.max_new_tokens} is more than the model's {mc.llm.max_position_embeddings} positions")
  task, params, step, _, _ = _inference_params(config, workdir, task=task)
  c = config.chat
  opts = dict(max_new_tokens=int(config.max_new_tokens), do_sample=bool(c.do_sample), top_p=float(c.top_p),
              top_k=int(c.top_k), temperature=float(c.temperature), repetition_penalty=float(c.repetition_penalty))
  bar = Progress(len(images), "chat", "image", every=1)
  answers = []
  try:
    for i, (image, prompt) in enumerate(zip(images, prompts)):
      answers += multimodal.minigpt4qwen_chat(task.model, params, task.tokenizer, task.processor(image)[None],
                                              [prompt], rng=jax.random.PRNGKey(config.seed + i), **opts)
      bar.tick(i + 1)
  finally:
    bar.close()
  for path, prompt, answer in zip(paths, prompts, answers):
    print(f"[{path}] {prompt}\n  answer: {answer}")
  print(_weights_note(step, workdir), flush=True)


MODES = {
    "train": run_train,
    "eval": run_eval,
    "segment": run_segment,
    "serve": run_serve,
    "caption": run_caption,
    "chat": run_chat,
}


def main(argv):
  prog = os.path.basename(argv[0])
  if len(argv) > 1:
    _fail(prog, f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    _main(prog, flags.FLAGS.config)
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except  (one line unless --debug)
    if debug():
      raise
    _fail_on(prog, e)


def _main(prog: str, config) -> None:
  mode = config.get("mode", "train")
  if mode not in MODES:
    _fail(prog, f"unknown config.mode {mode!r}; known: {', '.join(MODES)}")
  if mode in MODE_TASKS and config.get("task", "lisa") not in MODE_TASKS[mode][0]:
    _fail(prog, f"{mode} mode runs task {' / '.join(MODE_TASKS[mode][0])} ({MODE_TASKS[mode][1]}); "
          f"this config's task is {config.get('task', 'lisa')!r}")
  cfg_lib.check_run_config(config)  # sizes, step counts, init.* paths: before anything is built
  workdir = flags.FLAGS.workdir or default_workdir(_config_spec(sys.argv))
  if mode != "train":
    _check_weights(config, workdir)  # before anything is built or written
  from jaxlisa.parallel import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(config.get("distributed"))  # multi-host: before any JAX computation
  # process 0 writes config.json; other modes read a run's workdir and leave its config.json as it is
  if mode == "train" and distributed.is_primary():
    from jaxlisa.training.trainer import check_optim  # pylint: disable=import-outside-toplevel
    # refuses bad rates, and a model change against the workdir's checkpoints, before writing anything
    check_optim(config)
    changed = cfg_lib.accept_run(config, workdir, sys.argv)
    if changed:
      logging.warning("config differs from the previous run in %s: %s", workdir,
                      ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
  else:
    cfg_lib.make_workdir(workdir)
  _log_to_workdir(workdir)
  logging.info("mode %s, workdir %s", mode, workdir)
  MODES[mode](config, workdir)


def run() -> None:
  """The console entry point."""
  quiet_logs()
  app.run(main, flags_parser=parse_flags)
