"""LLaMA's slow SentencePiece tokenizer as transformers 4.31 ran it (LISA's and LLaVA's pinned version).

Official LISA checkpoints (the merge script's `save_pretrained`) and LLaVA v1/v1.5/v1.6 (Vicuna,
LLaMA-2) checkpoints ship `tokenizer.model` + `tokenizer_config.json` + `special_tokens_map.json`
(+ `added_tokens.json`) and no `tokenizer.json`. transformers 5 loads them into a `tokenizers`
backend that splits differently around added tokens; this class reproduces 4.31's
`PreTrainedTokenizer.tokenize` + `LlamaTokenizer._tokenize`, which the models were trained with:

1. (legacy=False only) text = "▁" + text.replace("▁", " ").
2. Split on the no-split tokens (every added token and every special token; longest match first,
   transformers' Trie).
3. Around each no-split token: a special token given as an AddedToken strips the neighbouring
   whitespace as its `lstrip`/`rstrip` say (`<s>`, `</s>`, `<unk>` are lstrip=rstrip=False: no
   strip); any other one (`tokenizer.add_tokens("[SEG]")`, `add_tokens(["<im_start>",
   "<im_end>"], special_tokens=True)`: plain strings) strips whitespace on both sides.
4. Every remaining non-empty chunk is `sp_model.encode(chunk, out_type=str)`: SentencePiece's dummy
   prefix puts a "▁" in front of every chunk (legacy=True), e.g. " is [SEG]." -> "▁is" [SEG] "▁" ".".
   legacy=False drops that "▁" from chunks after the first unless the chunk starts with " ".
5. `<s>` in front (add_bos_token), `</s>` at the end when add_eos_token.

`load(directory)` reads those files as 4.31's `from_pretrained` did. Decoding follows 4.31's
`convert_tokens_to_string`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import sentencepiece as spm
from transformers.tokenization_python import PreTrainedTokenizer, Trie
from transformers.tokenization_utils_base import AddedToken

SPIECE_UNDERLINE = "▁"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _added_token(value) -> AddedToken | str | None:
  """A token from tokenizer_config / special_tokens_map: dicts become AddedTokens, strings stay."""
  if isinstance(value, dict):
    return AddedToken(value["content"], lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
                      single_word=value.get("single_word", False), normalized=value.get("normalized", True))
  return value


class SlowLlamaTokenizer(PreTrainedTokenizer):
  """transformers 4.31 `LlamaTokenizer` (slow, SentencePiece), `legacy` as saved (4.31's default True)."""

  vocab_files_names = {"vocab_file": "tokenizer.model"}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(self, vocab_file: str, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
               add_bos_token: bool = True, add_eos_token: bool = False, legacy: bool | None = True,
               added_tokens: dict[str, int] | None = None, additional_special_tokens=(),
               special_tokens_map: dict | None = None, sp_model_kwargs: dict | None = None, **kwargs):
    """Arguments as 4.31's LlamaTokenizer; `added_tokens` is added_tokens.json ({token: id});
    `special_tokens_map` is special_tokens_map.json, applied after construction as 4.31's
    from_pretrained did (setattr: its plain strings stay plain strings, so they strip both sides)."""
    self.sp_model_kwargs = dict(sp_model_kwargs or {})
    self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
    self.sp_model.Load(vocab_file)
    self.vocab_file = vocab_file
    self.legacy = True if legacy is None else bool(legacy)
    self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
    # 4.31's LlamaTokenizer.__init__ wraps string bos/eos/unk/pad as AddedToken(lstrip=False, rstrip=False).
    special: dict[str, Any] = {}
    for key, tok in zip(_SPECIAL_KEYS, (bos_token, eos_token, unk_token, pad_token)):
      tok = _added_token(tok)
      special[key] = AddedToken(tok, lstrip=False, rstrip=False) if isinstance(tok, str) else tok
    extra = [_added_token(t) for t in additional_special_tokens or ()]
    for key, value in (special_tokens_map or {}).items():
      if key == "additional_special_tokens":
        extra = [_added_token(t) for t in value or ()]
      elif key in special:
        special[key] = _added_token(value)
    self._saved_special = dict(special, additional_special_tokens=extra)  # for save_pretrained
    everything = [t for t in list(special.values()) + extra if t is not None]
    # The whitespace rule of step 3: (lstrip, rstrip) of the special tokens that are AddedTokens
    # (4.31's all_special_tokens_extended; a later one wins); every other no-split token strips both.
    self._strip: dict[str, tuple[bool, bool]] = {
        str(t): (t.lstrip, t.rstrip) for t in everything if isinstance(t, AddedToken)}
    n = self.sp_model.get_piece_size()
    added = dict(sorted((added_tokens or {}).items(), key=lambda kv: kv[1]))
    for k, (tok, idx) in enumerate(added.items()):
      if idx != n + k:  # 4.31's from_pretrained refuses the same
        raise ValueError(f"added token {tok!r} has id {idx}, expected {n + k} (non-consecutive added_tokens.json)")
    specials = {str(t) for t in everything}
    kwargs["added_tokens_decoder"] = {i: AddedToken(t, lstrip=False, rstrip=False, normalized=t not in specials,
                                                    special=t in specials) for t, i in added.items()}
    plain = {k: (str(v) if v is not None else None) for k, v in special.items()}
    super().__init__(**plain, extra_special_tokens=[str(t) for t in extra] or None,
                     clean_up_tokenization_spaces=kwargs.pop("clean_up_tokenization_spaces", False), **kwargs)
    self._trie, self._trie_tokens = Trie(), frozenset()

  @classmethod
  def load(cls, directory: str, **overrides) -> SlowLlamaTokenizer:
    """From a directory holding tokenizer.model (+ tokenizer_config.json, special_tokens_map.json,
    added_tokens.json), reading them as 4.31's from_pretrained did."""
    def read(name):
      f = os.path.join(directory, name)
      if not os.path.exists(f):
        return {}
      with open(f) as fh:
        return json.load(fh)
    cfg: dict[str, Any] = read("tokenizer_config.json")
    kw: dict[str, Any] = {k: cfg[k] for k in _SPECIAL_KEYS + (
        "additional_special_tokens", "add_bos_token", "add_eos_token", "legacy", "model_max_length",
        "padding_side", "sp_model_kwargs") if k in cfg}
    kw["special_tokens_map"] = read("special_tokens_map.json")
    added = read("added_tokens.json")
    if not added:  # saved by transformers >= 4.34: the added tokens are listed in tokenizer_config
      n = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model")).get_piece_size()
      added = {v["content"]: int(i) for i, v in (cfg.get("added_tokens_decoder") or {}).items() if int(i) >= n}
    kw["added_tokens"] = added
    kw.update(overrides)
    return cls(os.path.join(directory, "tokenizer.model"), name_or_path=directory, **kw)

  # --- vocabulary -------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self.sp_model.get_piece_size()

  def get_vocab(self) -> dict[str, int]:
    vocab = {self.sp_model.IdToPiece(i): i for i in range(self.vocab_size)}
    vocab.update(self._added_tokens_encoder)
    return vocab

  def _convert_token_to_id(self, token: str) -> int:
    return self.sp_model.piece_to_id(token)

  def _convert_id_to_token(self, index: int) -> str:
    return self.sp_model.IdToPiece(index)

  # --- 4.31 tokenize ----------------------------------------------------------------------------

  def _no_split_trie(self) -> frozenset[str]:
    """4.31's unique_no_split_tokens: every added token and every special token (also those added
    later with add_tokens, e.g. by LISA's train_ds.py setup), and the Trie over them."""
    tokens = frozenset(self._added_tokens_encoder) | frozenset(self.all_special_tokens)
    if tokens != self._trie_tokens:
      self._trie, self._trie_tokens = Trie(), tokens
      for t in sorted(tokens):
        self._trie.add(t)
    return tokens

  def tokenize(self, text: str, **kwargs) -> list[str]:
    """text -> pieces, 4.31's rules (module docstring, steps 1-4)."""
    del kwargs
    if not self.legacy:
      text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
    no_split = self._no_split_trie()
    chunks = self._trie.split(text)
    for i, chunk in enumerate(chunks):
      if chunk not in no_split:
        continue
      lstrip, rstrip = self._strip.get(chunk, (True, True))
      if rstrip and i + 1 < len(chunks) and chunks[i + 1]:
        chunks[i + 1] = chunks[i + 1].lstrip()
      if lstrip and i > 0 and chunks[i - 1]:
        chunks[i - 1] = chunks[i - 1].rstrip()
    out: list[str] = []
    for chunk in chunks:
      if not chunk:
        continue
      out.extend([chunk] if chunk in no_split else self._tokenize(chunk))
    return out

  def _tokenize(self, text: str, **kwargs) -> list[str]:
    del kwargs
    is_first = False
    if not self.legacy:
      is_first = text.startswith(SPIECE_UNDERLINE)
      if is_first:
        text = text[1:]
    tokens = self.sp_model.encode(text, out_type=str)
    if (not self.legacy and not is_first and not text.startswith(" ") and tokens
        and tokens[0].startswith(SPIECE_UNDERLINE)):
      tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
    return tokens

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    bos = [self.bos_token_id] if self.add_bos_token else []
    eos = [self.eos_token_id] if self.add_eos_token else []
    out = bos + list(token_ids_0) + eos
    if token_ids_1 is not None:
      out = out + bos + list(token_ids_1) + eos
    return out

  def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
    if already_has_special_tokens:
      return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
    bos = [1] if self.add_bos_token else []
    eos = [1] if self.add_eos_token else []
    out = bos + [0] * len(token_ids_0) + eos
    if token_ids_1 is not None:
      out = out + bos + [0] * len(token_ids_1) + eos
    return out

  def num_special_tokens_to_add(self, pair: bool = False) -> int:
    return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

  # --- decoding (4.31 convert_tokens_to_string) --------------------------------------------------

  def convert_tokens_to_string(self, tokens: list[str]) -> str:
    current, out, prev_is_special = [], "", False
    specials = set(self.all_special_tokens)
    for i, token in enumerate(tokens):
      if token in specials:
        if not prev_is_special and i != 0:
          out += " "
        out += self.sp_model.decode(current) + token
        prev_is_special, current = True, []
      else:
        current.append(token)
        prev_is_special = False
    return out + self.sp_model.decode(current)

  def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
              spaces_between_special_tokens: bool = True, **kwargs) -> str:
    """4.31's PreTrainedTokenizer._decode: added tokens are joined to the text around them with " "."""
    del kwargs
    if isinstance(token_ids, int):
      token_ids = [token_ids]
    tokens = self.convert_ids_to_tokens(list(token_ids), skip_special_tokens=skip_special_tokens)
    added = {t for t, i in self._added_tokens_encoder.items() if i >= self.vocab_size}  # 4.31: beyond the sp vocab
    sub_texts, current = [], []
    for token in tokens:
      if token in added:
        if current:
          sub_texts.append(self.convert_tokens_to_string(current))
          current = []
        sub_texts.append(token)
      else:
        current.append(token)
    if current:
      sub_texts.append(self.convert_tokens_to_string(current))
    text = (" " if spaces_between_special_tokens else "").join(sub_texts)
    clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
    return self.clean_up_tokenization(text) if clean else text

  def save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' save_pretrained, then tokenizer_config.json / special_tokens_map.json in the
    4.31 layout (LlamaTokenizer, legacy, AddedToken dicts vs plain strings), so `load` reads the
    directory back with the same behaviour."""
    out = super().save_pretrained(save_directory, *args, **kwargs)
    def rep(t):
      if isinstance(t, AddedToken):
        return {"content": str(t), "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                "single_word": t.single_word}
      return t
    special = {k: rep(v) for k, v in self._saved_special.items() if k != "additional_special_tokens"}
    extra = [rep(t) for t in self._saved_special["additional_special_tokens"]]
    stm = {k: v for k, v in special.items() if v is not None}
    if extra:
      stm["additional_special_tokens"] = extra
    cfg_file = os.path.join(save_directory, "tokenizer_config.json")
    with open(cfg_file) as fh:
      cfg = json.load(fh)
    cfg.update(special, tokenizer_class="LlamaTokenizer", legacy=self.legacy, add_bos_token=self.add_bos_token,
               add_eos_token=self.add_eos_token, sp_model_kwargs=self.sp_model_kwargs)
    for k in ("additional_special_tokens", "extra_special_tokens", "backend"):
      cfg.pop(k, None)
    with open(cfg_file, "w") as fh:
      json.dump(cfg, fh, indent=2, ensure_ascii=False)
    with open(os.path.join(save_directory, "special_tokens_map.json"), "w") as fh:
      json.dump(stm, fh, indent=2, ensure_ascii=False)
    return out

  def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
    out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
    if os.path.abspath(self.vocab_file) != os.path.abspath(out):
      with open(out, "wb") as fh:
        fh.write(self.sp_model.serialized_model_proto())
    return (out,)


def is_llama_sentencepiece_dir(directory: str) -> bool:
  """A LLaMA-family slow-tokenizer directory: tokenizer.model, no tokenizer.json, and a LLaMA
  tokenizer class (tokenizer_config.json) or a LLaMA-based model (config.json model_type)."""
  if not os.path.exists(os.path.join(directory, "tokenizer.model")) or \
      os.path.exists(os.path.join(directory, "tokenizer.json")):
    return False
  def read(name):
    try:
      with open(os.path.join(directory, name)) as fh:
        return json.load(fh)
    except (OSError, json.JSONDecodeError):
      return {}
  cls = str(read("tokenizer_config.json").get("tokenizer_class") or "")
  if cls:
    return cls in ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer")
  cfg = read("config.json")
  text_cfg = cfg.get("text_config") or {}
  return cfg.get("model_type") in ("llama", "llava", "llava_llama", "lisa") or text_cfg.get("model_type") == "llama"
