"""The README's Python example runs as written on a tiny converted model with a tokenizer."""

import os
import re

import numpy as np
import torch
import transformers as tf
from tokenizers import SentencePieceBPETokenizer

from jaxlisa.conversion import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example(tmp_path):
  sp = SentencePieceBPETokenizer(unk_token="<unk>")
  sp.train_from_iterator(["The capital of France is Paris ."] * 20, vocab_size=60,
                         special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  tok = tf.PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
  torch.manual_seed(0)
  ref = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=1, num_attention_heads=2)).eval()
  ref.save_pretrained(tmp_path / "hf")
  tok.save_pretrained(tmp_path / "hf")
  convert.save_converted(str(tmp_path / "jax"), convert.convert_checkpoint(str(tmp_path / "hf")),
                         source_dir=str(tmp_path / "hf"))
  readme = open(os.path.join(ROOT, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1).replace("/path/to/jax_model", str(tmp_path / "jax"))
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  ids = tok(["The capital of France is"], return_tensors="pt")
  with torch.no_grad():
    want = ref(**ids).logits.numpy()
  assert np.abs(np.asarray(scope["logits"]) - want).max() <= 1e-4
  assert scope["out"].tokens.shape == (1, 16)
