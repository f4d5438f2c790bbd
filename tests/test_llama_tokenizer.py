"""Official LISA / LLaVA tokenizer directories (slow SentencePiece files, no tokenizer.json) tokenize
as transformers 4.31's slow LlamaTokenizer did, on a real 32000-piece LLaMA-style vocabulary
(mistral-common's tokenizer.model.v1, read from the installed package).

The expected ids come from 4.31's rules written out below with the sentencepiece library
(`rule_ids`), independently of jaxlisa.data.llama_tokenizer:
  - split on the no-split tokens: every added token ([SEG], <im_start>, <im_end>) and the
    special tokens <s>, </s>, <unk>;
  - the added tokens are plain strings (LISA: `add_tokens("[SEG]")`, `add_tokens([<im_start>,
    <im_end>], special_tokens=True)`), so whitespace is stripped on both sides of them; the
    special tokens are AddedToken(lstrip=False, rstrip=False) in tokenizer_config.json: no strip;
  - every other chunk is `sp.encode(chunk, out_type=str)` with SentencePiece's dummy prefix
    (legacy=True), so a chunk after an added token starts with "▁"; legacy=False (LLaVA v1.5's
    tokenizer_config) removes that "▁" from every chunk after the first unless it starts with " ";
  - <s> in front.
The checkpoint directories are written in the official merge-script format (tokenizer.model,
tokenizer_config.json, special_tokens_map.json, added_tokens.json; the JSON as transformers
4.31's save_pretrained writes it).
"""

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from jaxlisa.conversion import convert
from jaxlisa.conversion.lisa import add_lisa_tokens
from jaxlisa.data import conversation as C
from jaxlisa.data import tokenization as T
from jaxlisa.data.llama_tokenizer import SlowLlamaTokenizer

ADDED = {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}
SPECIAL = ("<s>", "</s>", "<unk>")


def _sp_model_file():
  spec = importlib.util.find_spec("mistral_common")
  if spec is None:
    pytest.fail("the mistral-common package (requirements-dev.txt) provides the test vocabulary")
  return os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")


def _added_token(content):
  return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_official_dir(d, legacy=True, added=True):
  """tokenizer files as LISA's merge script (transformers 4.31 save_pretrained) writes them."""
  os.makedirs(d, exist_ok=True)
  shutil.copy(_sp_model_file(), os.path.join(d, "tokenizer.model"))
  cfg = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
         "legacy": legacy, "model_max_length": 512, "pad_token": None, "padding_side": "right",
         "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
  for key, tok in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
    cfg[key] = {"__type": "AddedToken", **_added_token(tok)}
  with open(os.path.join(d, "tokenizer_config.json"), "w") as fh:
    json.dump(cfg, fh)
  stm = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "unk_token": _added_token("<unk>"),
         "pad_token": "<unk>"}
  with open(os.path.join(d, "special_tokens_map.json"), "w") as fh:
    json.dump(stm, fh)
  if added:
    with open(os.path.join(d, "added_tokens.json"), "w") as fh:
      json.dump(ADDED, fh)
  return d


def rule_ids(text, sp, added=ADDED, legacy=True):
  """4.31's slow LlamaTokenizer(text).input_ids, from its rules (module docstring)."""
  if not legacy:
    text = "▁" + text.replace("▁", " ")
  names = sorted(set(added) | set(SPECIAL), key=len, reverse=True)
  parts = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
  for i, part in enumerate(parts):
    if part in added:  # plain-string added tokens eat the whitespace on both sides
      if i > 0:
        parts[i - 1] = parts[i - 1].rstrip()
      if i + 1 < len(parts):
        parts[i + 1] = parts[i + 1].lstrip()
  ids, first = [sp.piece_to_id("<s>")], True
  for part in parts:
    if not part:
      continue
    if part in added:
      ids.append(added[part])
    elif part in SPECIAL:
      ids.append(sp.piece_to_id(part))
    else:
      body = part[1:] if not legacy and first and part.startswith("▁") else part
      pieces = sp.encode(body, out_type=str)
      if not legacy and not (first and part.startswith("▁")) and not body.startswith(" ") and pieces \
          and pieces[0].startswith("▁"):
        pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
      ids.extend(sp.piece_to_id(p) for p in pieces)
    first = False
  return ids


def rule_image_ids(prompt, sp, **kw):
  """LLaVA/LISA tokenizer_image_token: chunks split on "<image>", one <s>, -200 between."""
  chunks = [rule_ids(c, sp, **kw) for c in prompt.split("<image>")]
  out = chunks[0]
  for c in chunks[1:]:
    out = out + [C.IMAGE_TOKEN_INDEX] + c[1:]
  return out


def lisa_strings():
  """LISA training / inference conversations (llava_v1; <image> -> <im_start><image><im_end>)."""
  out = []
  for k, (q, a) in enumerate(zip(C.SHORT_QUESTION_LIST + C.LONG_QUESTION_LIST, C.ANSWER_LIST * 2)):
    q = q.format(class_name="red circle", sent="Which shape could roll down a slope?")
    conv = C.llava_v1.append("USER", q).append("ASSISTANT", a if k % 3 else a + " Because it is round.")
    out.append(T.replace_image_tokens(conv.get_prompt(), True))
  # validation / chat prompts (ValDataset's leading space, an open assistant turn) and two rounds
  out.append(T.replace_image_tokens(C.llava_v1.append("USER", "<image>\n What is dog in this image? Please "
                                                     "output segmentation mask.").append("ASSISTANT", None)
                                    .get_prompt(), True))
  two = (C.llava_v1.append("USER", C.SHORT_QUESTION_LIST[0].format(class_name="cat")).append("ASSISTANT", "[SEG].")
         .append("USER", "What is the dog?").append("ASSISTANT", "Sure, it is [SEG]."))
  out.append(T.replace_image_tokens(two.get_prompt(), True))
  return out


def llava_strings():
  """LLaVA v1.5 / v1.6 (vicuna_v1, llava_llama_2) conversations, <image> in front."""
  src = [{"from": "human", "value": "<image>\nWhat is shown here?"}, {"from": "gpt", "value": "A cat on a mat."},
         {"from": "human", "value": "And its colour? Answer the question using a single word or phrase."},
         {"from": "gpt", "value": "Orange."}]
  return [C.vicuna_v1.with_source(src).get_prompt(), C.vicuna_v1.with_source(src[:1]).append("ASSISTANT", None)
          .get_prompt(), C.llava_llama_2.with_source(src).get_prompt(), "<image>\nA photo of a dog.\n"]


@pytest.fixture(scope="module")
def sp():
  return spm.SentencePieceProcessor(model_file=_sp_model_file())


@pytest.fixture(scope="module")
def lisa_dir(tmp_path_factory):
  return write_official_dir(str(tmp_path_factory.mktemp("lisa_tok")))


@pytest.fixture(scope="module")
def lisa_tok(lisa_dir):
  return convert.load_tokenizer(lisa_dir)


def test_official_lisa_dir_gives_4_31_ids(lisa_tok, sp):
  assert isinstance(lisa_tok, SlowLlamaTokenizer) and lisa_tok.legacy
  strings = lisa_strings() + llava_strings()
  got = [lisa_tok(s).input_ids for s in strings]
  want = [rule_ids(s, sp) for s in strings]
  same = sum(g == w for g, w in zip(got, want))
  assert same == len(strings), f"{same}/{len(strings)} template strings get the official ids"
  # what the rules mean, piece by piece
  pieces = lisa_tok.convert_ids_to_tokens(lisa_tok(" is [SEG].").input_ids)
  assert pieces == ["<s>", "▁", "▁is", "[SEG]"] + sp.encode(".", out_type=str)  # "▁" before ".": dummy prefix
  assert lisa_tok("[SEG]", add_special_tokens=False).input_ids == [32000]  # train_ds.py's seg_token_idx
  pieces = lisa_tok.convert_ids_to_tokens(lisa_tok(strings[0]).input_ids)
  assert pieces[1].startswith("▁") and pieces[1] != "▁"  # "<s>▁A": a "▁" after <s>
  i = pieces.index("<im_start>")
  assert pieces[i - 1] == "▁USER:" or pieces[i - 1].endswith(":")  # no "▁" before <im_start>
  j = pieces.index("<im_end>")
  assert "\n" not in pieces[j + 1] and not pieces[j + 1].startswith("<0x0A>")  # "\n" after <im_end> dropped
  assert pieces[j + 1].startswith("▁")  # and the next chunk gets a dummy-prefix "▁"


def test_image_token_path_and_lisa_labels(lisa_tok, sp):
  strings = lisa_strings()
  got = [T.tokenizer_image_token(s, lisa_tok) for s in strings]
  assert got == [rule_image_ids(s, sp) for s in strings]
  conv = C.llava_v1.append("USER", C.SHORT_QUESTION_LIST[3].format(class_name="cat")).append("ASSISTANT", "It is [SEG].")
  tc = T.preprocess_lisa(conv.get_prompt(), lisa_tok, C.llava_v1)
  assert not tc.dropped
  np.testing.assert_array_equal(tc.input_ids, rule_image_ids(tc.prompt, sp))
  kept = tc.input_ids[tc.labels != C.IGNORE_INDEX]
  assert lisa_tok.convert_ids_to_tokens(kept.tolist()) == ["▁It", "▁is", "[SEG]"] + sp.encode(".", out_type=str) + ["</s>"]


def test_llava_v15_nonlegacy_and_lisa_setup(tmp_path, sp):
  """LLaVA v1.5 tokenizer_config says legacy=false; LISA's compose adds its tokens in place."""
  d = write_official_dir(str(tmp_path / "v15"), legacy=False, added=False)
  tok = convert.load_tokenizer(d)
  assert isinstance(tok, SlowLlamaTokenizer) and tok.legacy is False
  strings = llava_strings() + lisa_strings()
  assert [tok(s).input_ids for s in llava_strings()] == [rule_ids(s, sp, added={}, legacy=False)
                                                         for s in llava_strings()]
  assert add_lisa_tokens(tok) == 32000 and len(tok) == 32003
  assert [tok(s).input_ids for s in strings] == [rule_ids(s, sp, legacy=False) for s in strings]


def test_save_and_reload_keeps_behaviour(lisa_tok, sp, tmp_path):
  lisa_tok.save_pretrained(str(tmp_path / "re"))
  assert not os.path.exists(tmp_path / "re" / "tokenizer.json")
  again = convert.load_tokenizer(str(tmp_path / "re"))
  strings = lisa_strings()
  assert isinstance(again, SlowLlamaTokenizer) and len(again) == 32003
  assert [again(s).input_ids for s in strings] == [rule_ids(s, sp) for s in strings]
  ids = lisa_tok(strings[0]).input_ids
  # 4.31's decode: added tokens joined with spaces, <s> glued to the text
  text = lisa_tok.decode(ids)
  assert text.startswith("<s>A chat between") and "USER: <im_start> <image> <im_end> Can you segment" in text
