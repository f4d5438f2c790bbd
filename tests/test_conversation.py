"""Templates, tokenizer_image_token and target masking vs LLaVA / LISA.

Templates are checked against literal renderings derived from LLaVA's conversation.py (and the
llava_v1 rendering quoted in official_lisa.md). Masking is checked against the original loops
(llava/train/train.py preprocess_*, LISA utils/dataset.py collate_fn) transcribed below with torch,
and, for the legacy tokenizer, against the meaning of the labels (the unmasked runs are exactly
the answers plus "</s>"). Tokenizers are trained in the test (stack_notes.md section 6).
"""

import string
from unittest import mock

import numpy as np
import pytest
import torch
from tokenizers import (SentencePieceBPETokenizer, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors, trainers)
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from jaxlisa.data import conversation as C
from jaxlisa.data import tokenization as T

IGNORE, IMAGE = -100, -200
ADDED_SPECIAL = ["<im_start>", "<im_end>", "<image>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    C.llava_v1.system, C.vicuna_v1.system, C.llava_llama_2.system,
    "USER: What is cat in this image?\nPlease output segmentation mask. ASSISTANT: It is [SEG].",
    "Can you segment the dog in this image? Sure, the segmentation result is [SEG].",
    "[INST] <<SYS>> <</SYS>> [/INST] user assistant system Answer the questions.",
    string.ascii_letters + string.digits + string.punctuation + " \n",
] * 3


def _wrap(backend, bos=True):
  if bos:
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<unk>")
  tok.add_tokens(["[SEG]"])
  tok.add_tokens(ADDED_SPECIAL, special_tokens=True)
  return tok


@pytest.fixture(scope="module")
def legacy_tok():
  """SentencePiece-BPE with a "▁" prepended to every text piece (LLaMA legacy behaviour)."""
  sp = SentencePieceBPETokenizer(unk_token="<unk>", add_prefix_space=True)
  sp.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                         special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  sp.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok = LlamaTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", pad_token="<unk>")
  tok.add_tokens(["[SEG]"])
  tok.add_tokens(ADDED_SPECIAL, special_tokens=True)
  return tok


def _nonlegacy_backend():
  """"▁" only at the start of the text (not after special tokens) and always its own token, so
  a round tokenized alone has exactly one token more than inside the conversation."""
  t = Tokenizer(models.BPE(unk_token="<unk>"))
  t.normalizer = normalizers.NFKC()
  t.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Split("▁", "isolated")])
  t.decoder = decoders.Metaspace(prepend_scheme="first")
  t.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
  return t


@pytest.fixture(scope="module")
def nonlegacy_tok():
  return _wrap(_nonlegacy_backend())


@pytest.fixture(scope="module")
def nobos_tok():
  return _wrap(_nonlegacy_backend(), bos=False)


# ---------------------------------------------------------------------------------------------
# The originals, transcribed (llava/mm_utils.py, llava/train/train.py, LISA utils/dataset.py).

def ref_tokenizer_image_token(prompt, tokenizer):
  prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

  def insert_separator(X, sep):
    return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

  input_ids = []
  offset = 0
  if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and (
      prompt_chunks[0][0] == tokenizer.bos_token_id):
    offset = 1
    input_ids.append(prompt_chunks[0][0])
  for x in insert_separator(prompt_chunks, [IMAGE] * (offset + 1)):
    input_ids.extend(x[offset:])
  return torch.tensor(input_ids, dtype=torch.long)


def _ref_ids(conversation, tokenizer, has_image, model_max_length):
  if has_image:
    return ref_tokenizer_image_token(conversation, tokenizer)[None]
  return tokenizer([conversation], return_tensors="pt", padding="longest",
                   max_length=model_max_length, truncation=True).input_ids


def _ref_len(text, tokenizer, has_image):
  if has_image:
    return len(ref_tokenizer_image_token(text, tokenizer))
  return len(tokenizer(text).input_ids)


def ref_preprocess_two(conversation, tokenizer, sep, sep2, has_image, model_max_length,
                       shift_later_rounds):
  """preprocess_v1 (shift_later_rounds = not legacy) and preprocess_llama_2 (False)."""
  input_ids = _ref_ids(conversation, tokenizer, has_image, model_max_length)
  target = input_ids[0].clone()
  total_len = int(target.ne(tokenizer.pad_token_id).sum())
  rounds = conversation.split(sep2)
  cur_len = 1
  target[:cur_len] = IGNORE
  for i, rou in enumerate(rounds):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = _ref_len(rou, tokenizer, has_image)
    instruction_len = _ref_len(parts[0], tokenizer, has_image) - 2
    if i != 0 and shift_later_rounds:
      round_len -= 1
      instruction_len -= 1
    target[cur_len:cur_len + instruction_len] = IGNORE
    cur_len += round_len
  target[cur_len:] = IGNORE
  dropped = cur_len < model_max_length and cur_len != total_len
  if dropped:
    target[:] = IGNORE
  return (input_ids[0][:model_max_length].numpy(), target[:model_max_length].numpy(), dropped)


def ref_preprocess_mpt(conversation, tokenizer, conv_sep, role1, has_image, model_max_length,
                       legacy):
  input_ids = _ref_ids(conversation, tokenizer, has_image, model_max_length)
  target = input_ids[0].clone()
  sep = conv_sep + role1
  total_len = int(target.ne(tokenizer.pad_token_id).sum())
  rounds = conversation.split(conv_sep)
  re_rounds = [conv_sep.join(rounds[:3])]
  for conv_idx in range(3, len(rounds), 2):
    re_rounds.append(conv_sep.join(rounds[conv_idx:conv_idx + 2]))
  cur_len = 0
  target[:cur_len] = IGNORE
  for i, rou in enumerate(re_rounds):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = _ref_len(rou, tokenizer, has_image)
    instruction_len = _ref_len(parts[0], tokenizer, has_image) - 1
    if i != 0 and legacy:
      round_len += 1
      instruction_len += 1
    target[cur_len:cur_len + instruction_len] = IGNORE
    cur_len += round_len
  target[cur_len:] = IGNORE
  dropped = cur_len < model_max_length and cur_len != total_len
  if dropped:
    target[:] = IGNORE
  return input_ids[0][:model_max_length].numpy(), target[:model_max_length].numpy(), dropped


def ref_lisa_collate(conversation_list, tokenizer, conv_type, model_max_length, truncate):
  """LISA collate_fn's text half; the `assert cur_len == total_len` is recorded, not raised."""
  conversation_list = [c.replace("<image>", "<im_start><image><im_end>")
                       for c in conversation_list]
  input_ids = [ref_tokenizer_image_token(p, tokenizer) for p in conversation_list]
  input_ids = torch.nn.utils.rnn.pad_sequence(input_ids, batch_first=True,
                                              padding_value=tokenizer.pad_token_id)
  conv = C.get_template(conv_type)
  targets = input_ids.clone()
  sep = conv.sep + conv.roles[1] + ": " if conv_type == "llava_v1" else "[/INST] "
  ok = []
  for conversation, target in zip(conversation_list, targets):
    total_len = int(target.ne(tokenizer.pad_token_id).sum())
    rounds = conversation.split(conv.sep2)
    cur_len = 1
    target[:cur_len] = IGNORE
    for i, rou in enumerate(rounds):
      if rou == "":
        break
      parts = rou.split(sep)
      assert len(parts) == 2, (len(parts), rou)
      parts[0] += sep
      if "<image>" in conversation:
        round_len = len(ref_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(ref_tokenizer_image_token(parts[0], tokenizer)) - 2
      else:
        round_len = len(tokenizer(rou).input_ids)
        instruction_len = len(tokenizer(parts[0]).input_ids) - 2
      target[cur_len:cur_len + instruction_len] = IGNORE
      cur_len += round_len
    target[cur_len:] = IGNORE
    ok.append(not cur_len < model_max_length or cur_len == total_len)
  if truncate and input_ids.shape[1] > model_max_length - 255:
    input_ids = input_ids[:, :model_max_length - 255]
    targets = targets[:, :model_max_length - 255]
  return input_ids.numpy(), targets.numpy(), ok


# ---------------------------------------------------------------------------------------------
# Templates.

Q = "<image>\nWhat is cat in this image? Please output segmentation mask."
A = "It is [SEG]."


def _conv(name, *messages):
  conv = C.get_template(name)
  for j, m in enumerate(messages):
    conv = conv.append(conv.roles[j % 2], m)
  return conv


def test_llava_v1_matches_lisa_rendering():
  system = ("A chat between a curious human and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the human's questions.")
  assert _conv("llava_v1", Q, A).get_prompt() == f"{system} USER: {Q} ASSISTANT: {A}</s>"
  assert _conv("llava_v1", Q, None).get_prompt() == f"{system} USER: {Q} ASSISTANT:"


def test_vicuna_v1_multi_turn():
  system = ("A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions.")
  got = _conv("vicuna_v1", "q1", "a1", "q2", "").get_prompt()
  assert got == f"{system} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
  assert C.get_template("v1") is C.get_template("vicuna_v1")


def test_llama_2_styles():
  system = ("You are a helpful language and vision assistant. You are able to understand the "
            "visual content that the user provides, and assist the user with a variety of tasks "
            "using natural language.")
  got = _conv("llava_llama_2", "q1", "a1", "q2", None).get_prompt()
  assert got == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST]"
  assert _conv("mistral_instruct", "q1", "a1", "q2").get_prompt() == (
      "[INST] q1 [/INST] a1 </s>[INST] q2 [/INST]")
  meta = _conv("llama_2", "q").get_prompt()
  assert meta.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
  assert meta.endswith("please don't share false information.\n<</SYS>>\n\nq [/INST]")
  with pytest.raises(ValueError):
    _conv("llava_llama_2", None, "a").get_prompt()


def test_chatml_and_plain():
  assert _conv("chatml_direct", "q1", "a1", "q2", None).get_prompt() == (
      "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nq1<|im_end|>"
      "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n")
  assert C.get_template("mistral_direct") is C.get_template("chatml_direct")
  assert _conv("plain", "<image>").get_prompt() == "<image>\n"
  with pytest.raises(KeyError):
    C.get_template("nope")


def test_with_source_skips_leading_gpt_and_checks_alternation():
  src = [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"},
         {"from": "gpt", "value": "a"}]
  assert C.llava_v1.with_source(src).messages == (("USER", "q"), ("ASSISTANT", "a"))
  with pytest.raises(ValueError):
    C.llava_v1.with_source([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}])


def test_lisa_lists():
  assert C.SHORT_QUESTION_LIST[0] == "<image>\nCan you segment the {class_name} in this image?"
  assert C.LONG_QUESTION_LIST[1] == "<image>\n{sent} Please output segmentation mask."
  assert len(C.EXPLANATORY_QUESTION_LIST) == 3 and len(C.ANSWER_LIST) == 5
  assert all("[SEG]" in a for a in C.ANSWER_LIST)
  assert (C.IGNORE_INDEX, C.IMAGE_TOKEN_INDEX, C.DEFAULT_SEG_TOKEN) == (-100, -200, "[SEG]")


# ---------------------------------------------------------------------------------------------
# tokenizer_image_token and small text helpers.

PROMPTS = ["<image>\nWhat is cat?", "Is <image> a dog? And <image>?", "no image here", "<image>",
           "<im_start><image><im_end>\nPlease segment the dog."]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_image_token(prompt, legacy_tok, nonlegacy_tok, nobos_tok):
  for tok in (legacy_tok, nonlegacy_tok, nobos_tok):
    got = T.tokenizer_image_token(prompt, tok)
    np.testing.assert_array_equal(got, ref_tokenizer_image_token(prompt, tok).numpy())
    assert got.count(IMAGE) == prompt.count("<image>")
    assert got.count(tok.bos_token_id) == (tok is not nobos_tok)
  # With "▁" after special tokens the chunks tokenize as the whole prompt does.
  image_id = legacy_tok.convert_tokens_to_ids("<image>")
  whole = [IMAGE if t == image_id else t for t in legacy_tok(prompt).input_ids]
  assert T.tokenizer_image_token(prompt, legacy_tok) == whole


def test_text_helpers():
  assert T.replace_image_tokens("<image>\nq", True) == "<im_start><image><im_end>\nq"
  assert T.replace_image_tokens("<image>\nq", False) == "<image>\nq"
  assert T.move_image_token_first("What is <image> this?") == "<image>\nWhat is  this?"
  assert T.move_image_token_first("plain") == "plain"


# ---------------------------------------------------------------------------------------------
# LLaVA preprocess_*.

SOURCES = [
    [{"from": "human", "value": Q}, {"from": "gpt", "value": A}],
    [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
     {"from": "human", "value": "Can you segment it?"}, {"from": "gpt", "value": "Sure, [SEG]."},
     {"from": "human", "value": "And the dog?"}, {"from": "gpt", "value": "It is [SEG]."}],
    [{"from": "gpt", "value": "skipped"}, {"from": "human", "value": "Hi there"},
     {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Why?"},
     {"from": "gpt", "value": "Because."}],
]


def _check(got, ref):
  ids, labels, dropped = ref
  np.testing.assert_array_equal(got.input_ids, ids)
  np.testing.assert_array_equal(got.labels, labels)
  assert got.dropped == dropped


def _answers(source):
  return [s["value"] for s in (source[1:] if source[0]["from"] == "gpt" else source)[1::2]]


def _label_runs(labels):
  runs, cur = [], []
  for t in list(labels) + [IGNORE]:
    if t == IGNORE:
      if cur:
        runs.append(cur)
      cur = []
    else:
      cur.append(int(t))
  return runs


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_llama_2", "llama_2"])
@pytest.mark.parametrize("k", range(len(SOURCES)))
def test_preprocess_two_and_llama_2(name, k, legacy_tok):
  source, tmpl = SOURCES[k], C.get_template(name)
  has_image = "<image>" in source[0]["value"]
  got = T.preprocess_conversation(source, legacy_tok, tmpl, has_image, 2048, legacy=True)
  assert got.prompt == tmpl.with_source(source).get_prompt()
  llama = tmpl.sep_style is C.SepStyle.LLAMA_2
  sep = "[/INST] " if llama else " ASSISTANT: "
  _check(got, ref_preprocess_two(got.prompt, legacy_tok, sep, "</s>", has_image, 2048, False))
  assert not got.dropped
  # The loss falls exactly on the answers and their "</s>".
  runs = [legacy_tok.decode(r).replace(" ", "") for r in _label_runs(got.labels)]
  tail = " </s>" if llama else "</s>"
  assert runs == [(a + tail).replace(" ", "") for a in _answers(source)]


@pytest.mark.parametrize("k", range(len(SOURCES)))
def test_preprocess_v1_legacy_correction(k, nonlegacy_tok):
  source, tmpl = SOURCES[k], C.llava_v1
  has_image = "<image>" in source[0]["value"]
  prompt = tmpl.with_source(source).get_prompt()
  for legacy in (False, True):
    got = T.preprocess_conversation(source, nonlegacy_tok, tmpl, has_image, 2048, legacy=legacy)
    _check(got, ref_preprocess_two(prompt, nonlegacy_tok, " ASSISTANT: ", "</s>", has_image, 2048,
                                   not legacy))
    # Non-legacy tokenizers need LLaVA's -1 on later rounds; single-round sources do not care.
    assert got.dropped == (legacy and len(source) > 3)
  with mock.patch.object(nonlegacy_tok, "legacy", False, create=True):
    inferred = T.preprocess_conversation(source, nonlegacy_tok, tmpl, has_image, 2048)
  assert not inferred.dropped


def test_preprocess_mpt(legacy_tok):
  tmpl, kept = C.get_template("chatml_direct"), 0
  for source in SOURCES:
    has_image = "<image>" in source[0]["value"]
    prompt = tmpl.with_source(source).get_prompt()
    for legacy in (False, True):
      got = T.preprocess_conversation(source, legacy_tok, tmpl, has_image, 2048, legacy=legacy)
      _check(got, ref_preprocess_mpt(prompt, legacy_tok, "<|im_end|>", "<|im_start|>assistant\n",
                                     has_image, 2048, legacy))
      kept += not got.dropped
  assert kept  # LLaVA's chatml counting only lines up for some tokenizers / round counts


def test_preprocess_plain(legacy_tok):
  source = [{"from": "human", "value": "<image>\nignored question"},
            {"from": "gpt", "value": "A cat on a mat."}]
  got = T.preprocess_conversation(source, legacy_tok, C.plain, has_image=True)
  assert got.prompt == "<image>A cat on a mat.\n"
  caption = legacy_tok("A cat on a mat.\n").input_ids
  np.testing.assert_array_equal(got.input_ids, [caption[0], IMAGE] + caption[1:])
  np.testing.assert_array_equal(got.labels, [IGNORE, IGNORE] + caption[1:])
  with pytest.raises(ValueError):
    T.preprocess_conversation(source[:1], legacy_tok, C.plain, has_image=True)


def test_truncation(legacy_tok):
  source = SOURCES[2]
  full = T.preprocess_conversation(source, legacy_tok, C.llava_v1, False, legacy=True)
  for max_length in (7, len(full.input_ids) - 3, len(full.input_ids)):
    got = T.preprocess_conversation(source, legacy_tok, C.llava_v1, False, max_length,
                                    legacy=True)
    assert len(got.input_ids) == len(got.labels) == max_length
    np.testing.assert_array_equal(got.input_ids, full.input_ids[:max_length])
    _check(got, ref_preprocess_two(got.prompt, legacy_tok, " ASSISTANT: ", "</s>", False,
                                   max_length, False))
    np.testing.assert_array_equal(got.labels, full.labels[:max_length])
  # With an image, the whole conversation is counted, then cut as LLaVA's DataCollator does.
  full = T.preprocess_conversation(SOURCES[1], legacy_tok, C.llava_v1, True, legacy=True)
  got = T.preprocess_conversation(SOURCES[1], legacy_tok, C.llava_v1, True, 60, legacy=True)
  assert len(full.input_ids) > 60 == len(got.input_ids) and IMAGE in got.input_ids
  _check(got, ref_preprocess_two(got.prompt, legacy_tok, " ASSISTANT: ", "</s>", True, 60, False))


def test_mismatch_is_dropped_with_warning(legacy_tok):
  # "€" is not in the vocabulary: it becomes <unk> = the pad id, which the count leaves out.
  source = [{"from": "human", "value": "What costs 5€?"}, {"from": "gpt", "value": A}]
  with mock.patch.object(T.logging, "warning") as warn:
    got = T.preprocess_conversation(source, legacy_tok, C.llava_v1, False, 2048, legacy=True)
  assert got.dropped and warn.call_count == 1
  assert (got.labels == IGNORE).all()
  _check(got, ref_preprocess_two(got.prompt, legacy_tok, " ASSISTANT: ", "</s>", False, 2048,
                                 False))


# ---------------------------------------------------------------------------------------------
# LISA collate.

LISA_CONVS = [
    _conv("llava_v1", Q, A).get_prompt(),
    _conv("llava_v1", "<image>\nWhat is shown?", "A cat.", "Segment it.", "Sure, [SEG].")
    .get_prompt(),
    _conv("llava_v1", "No image, just text.", "Fine.").get_prompt(),
]


@pytest.mark.parametrize("conv_type", ["llava_v1", "llava_llama_2"])
def test_lisa_collate(conv_type, legacy_tok):
  tmpl = C.get_template(conv_type)
  convs = LISA_CONVS if conv_type == "llava_v1" else [
      _conv(conv_type, Q, A).get_prompt(), _conv(conv_type, "q1", "a1", "q2", "a2").get_prompt()]
  for model_max_length, truncate in ((512, False), (255 + 12, True)):
    ref_ids, ref_labels, ok = ref_lisa_collate(convs, legacy_tok, conv_type, model_max_length,
                                               truncate)
    for i, conv in enumerate(convs):
      got = T.preprocess_lisa(conv, legacy_tok, tmpl, model_max_length,
                              model_max_length - 255 if truncate else None)
      n = len(got.input_ids)
      np.testing.assert_array_equal(got.input_ids, ref_ids[i, :n])
      np.testing.assert_array_equal(got.labels, ref_labels[i, :n])
      assert (ref_labels[i, n:] == IGNORE).all()
      assert (ref_ids[i, n:] == legacy_tok.pad_token_id).all()
      assert got.dropped == (not ok[i]) and not got.dropped
      assert "<im_start><image><im_end>" in got.prompt or "<image>" not in conv
  runs = [legacy_tok.decode(r) for r in _label_runs(T.preprocess_lisa(
      LISA_CONVS[1], legacy_tok, C.llava_v1).labels)]
  assert [r.replace(" ", "") for r in runs] == ["Acat.</s>", "Sure,[SEG].</s>"]


def test_lisa_mismatch_and_bad_round(legacy_tok):
  conv = _conv("llava_v1", "<image>\nWhere is the €?", A).get_prompt()
  _, _, ok = ref_lisa_collate([conv], legacy_tok, "llava_v1", 512, False)
  with mock.patch.object(T.logging, "warning") as warn:
    got = T.preprocess_lisa(conv, legacy_tok, C.llava_v1, 512)
  assert not ok[0] and got.dropped and warn.called and (got.labels == IGNORE).all()
  with pytest.raises(ValueError):
    T.preprocess_lisa(C.llava_v1.system + " USER: q ASSISTANT: a</s>no separator</s>",
                      legacy_tok, C.llava_v1, 512)


# ---------------------------------------------------------------------------------------------
# Image-token expansion (data half of prepare_inputs_labels_for_multimodal).

def ref_expand(ids, labels, counts, placeholder, max_len):
  image_token_indices = [-1] + [i for i, t in enumerate(ids) if t == IMAGE] + [len(ids)]
  new_ids, new_labels, pos = [], [], []
  for i in range(len(image_token_indices) - 1):
    seg = slice(image_token_indices[i] + 1, image_token_indices[i + 1])
    new_ids += ids[seg]
    new_labels += labels[seg]
    pos += [False] * len(ids[seg])
    if i < len(image_token_indices) - 2:
      new_ids += [placeholder] * counts[i]
      new_labels += [IGNORE] * counts[i]
      pos += [True] * counts[i]
  return new_ids[:max_len], new_labels[:max_len], pos[:max_len]


@pytest.mark.parametrize("counts,max_len", [((4, 4), None), ((3, 7), None), ((5, 2), 9),
                                            ((256, 256), 300)])
def test_expand_image_tokens(counts, max_len):
  ids = [1, 5, IMAGE, 6, 7, IMAGE, 8, 2]
  labels = [IGNORE, IGNORE, IGNORE, 6, 7, IGNORE, 8, 2]
  num = counts[0] if counts[0] == counts[1] else counts
  got = T.expand_image_tokens(ids, labels, num, placeholder_id=3, max_length=max_len)
  ref_ids, ref_labels, ref_pos = ref_expand(ids, labels, counts, 3, max_len)
  np.testing.assert_array_equal(got.input_ids, ref_ids)
  np.testing.assert_array_equal(got.labels, ref_labels)
  np.testing.assert_array_equal(got.image_positions, ref_pos)
  assert got.input_ids.dtype == np.int32 and got.image_positions.dtype == bool
  assert T.expand_image_tokens(ids, None, num).labels is None
  with pytest.raises(ValueError):
    T.expand_image_tokens(ids, labels, [4, 4, 4])
