"""LISA-13B (LLaMA-2-13B-chat LLaVA, as xinlai/LISA-13B-llama2-v1): configs/lisa_7b.py with variant=13b."""

from configs import lisa_7b
from jaxlisa.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  return lisa_7b.get_config(f"variant=13b{',runlocal' if arg.runlocal else ''}")
