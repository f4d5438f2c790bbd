"""Captions and instructions about the synthetic shapes scenes, in LAVIS's annotation layouts, and
the tokenizers BLIP-2 stage 1 and MiniGPT4-Qwen train with on them.

Scene i of seed s is `synthetic_shapes.make_scene(i, s)` (1..max_shapes coloured shapes on grey).
  caption(scene, rng)        "a big red circle and a small blue square on a grey background" (the
                             shapes in a random order, one of a few phrasings)
  instruction(scene, rng)    MiniGPT4-Qwen instruction data: {"instruction": [q1, q2, ...],
                             "output": [a1, a2, ...]}, the first question carrying
                             "<Img><ImageHere></Img>" (turns from synthetic_shapes.chat_turns)
`write_dataset(out_dir, ...)` writes (same arguments -> identical files; train scenes 0..n-1,
val scenes after them):
  images/{name}.png                 the scenes, lossless
  captions_{train,val}.json         LAVIS coco-caption annotations [{"image", "caption", "image_id"}]
                                    (captions_per_image entries per train image, one per val image)
  instructions_{train,val}.json     MiniGPT4-Qwen InstructionDataset annotations [{"image",
                                    "instruction", "output"}]
  corpus.json                       every text (tokenizer training); written last, so its presence
                                    means the dataset is complete
`conversations(ann)` turns an instruction annotation into the user/assistant list `preprocess` takes.
"""

from __future__ import annotations

import io
import json
import os
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image

from jaxlisa.data import synthetic_shapes as shapes_lib

IMAGE_TAG = "<Img><ImageHere></Img>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4; "[DEC]" (the ITG bos) is added last
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>")  # ids 0..3

_CAPTION_TEMPLATES = ("{listing} on a grey background", "a grey picture with {listing}", "{count}: {listing}")


def caption(scene: shapes_lib.Scene, rng: np.random.Generator) -> str:
  """One caption listing every shape (size, colour, kind) in a random order."""
  order = rng.permutation(len(scene.shapes))
  listing = shapes_lib._listing([scene.shapes[k] for k in order])  # pylint: disable=protected-access
  n = len(scene.shapes)
  count = "one shape" if n == 1 else f"{shapes_lib.NUMBER_WORDS[n]} shapes"
  template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
  return template.format(listing=listing, count=count)


def instruction(scene: shapes_lib.Scene, rng: np.random.Generator) -> dict:
  """{"instruction": [...], "output": [...]}: 2-3 question/answer turns about the scene; the image
  tag goes before or after the first question."""
  turns = shapes_lib.chat_turns(scene, rng)
  first = f"{IMAGE_TAG} {turns[0][0]}" if rng.random() < 0.5 else f"{turns[0][0]} {IMAGE_TAG}"
  return {"instruction": [first] + [q for q, _ in turns[1:]], "output": [a for _, a in turns]}


def conversations(ann: dict) -> list[dict]:
  """MiniGPT4-Qwen InstructionDataset: an annotation -> [{"from": "user" | "assistant", "value"}]."""
  ins, out = ann["instruction"], ann["output"]
  if isinstance(ins, str):
    ins, out = [ins], [out]
  conv = []
  for q, a in zip(ins, out):
    conv += [{"from": "user", "value": q}, {"from": "assistant", "value": a}]
  return conv


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def write_dataset(out_dir: str, num_train: int = 2000, num_val: int = 256, image_size: int = 64, seed: int = 0,
                  max_shapes: int = 3, captions_per_image: int = 2) -> dict:
  """Writes the files listed in the module docstring. Returns {"out_dir", "num_train", "num_val"}."""
  anns = {s: {"captions": [], "instructions": []} for s in ("train", "val")}
  corpus = [IMAGE_TAG, "You are a helpful assistant.", "user", "assistant", "system"]
  for i in range(num_train + num_val):
    split = "train" if i < num_train else "val"
    sc = shapes_lib.make_scene(i, seed, image_size, max_shapes)
    rng = np.random.default_rng([seed, i, 7])
    rel = f"images/{sc.name}.png"
    shapes_lib.write_file(os.path.join(out_dir, rel), _png(sc.image))
    for _ in range(captions_per_image if split == "train" else 1):
      cap = caption(sc, rng)
      anns[split]["captions"].append({"image": rel, "caption": cap, "image_id": i})
      corpus.append(cap)
    ins = instruction(sc, rng)
    anns[split]["instructions"].append({"image": rel, **ins})
    corpus += ins["instruction"] + ins["output"]
  for split, kinds in anns.items():
    for kind, rows in kinds.items():
      shapes_lib.write_file(os.path.join(out_dir, f"{kind}_{split}.json"), json.dumps(rows))
  shapes_lib.write_file(os.path.join(out_dir, "corpus.json"), json.dumps(corpus))
  logging.info("synthetic captions: %d train + %d val scenes of %dpx written to %s", num_train, num_val, image_size,
               out_dir)
  return {"out_dir": out_dir, "num_train": num_train, "num_val": num_val}


def ensure_dataset(out_dir: str, **kw) -> None:
  """write_dataset once: a directory with corpus.json is complete and left alone."""
  if not os.path.exists(os.path.join(out_dir, "corpus.json")):
    write_dataset(out_dir, **kw)


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# Tokenizers (deterministic, trained in-process on the corpus).

def train_bert_tokenizer(texts: Sequence[str], vocab_size: int = 400, model_max_length: int = 512):
  """A lower-casing WordPiece tokenizer shaped like LAVIS's BLIP-2 one (bert-base-uncased + "[DEC]"
  as bos_token): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, "[CLS] text [SEP]", [DEC] the last id.

  The vocabulary is built directly (the `tokenizers` WordPiece trainer numbers its alphabet in hash
  order, so its ids change from run to run): the specials, every character and its "##"
  continuation, then whole words by frequency (ties alphabetical) up to vocab_size. Words left out
  split into characters, as WordPiece does."""
  from collections import Counter  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
  chars = sorted({ch for w in words for ch in w})
  vocab = list(BERT_SPECIALS) + chars + ["##" + ch for ch in chars]
  if len(vocab) > vocab_size:
    raise ValueError(f"vocab_size {vocab_size} < the {len(vocab)} specials and characters of the corpus")
  known = set(vocab)
  vocab += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known][
      :vocab_size - len(vocab)]
  wp = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  wp.normalizer, wp.pre_tokenizer, wp.decoder = norm, pre, decoders.WordPiece()
  wp.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
  tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)
  tok.add_special_tokens({"bos_token": "[DEC]"})
  return tok


def train_chatml_tokenizer(texts: Sequence[str], vocab_size: int = 600, model_max_length: int = 512):
  """A byte-level BPE tokenizer shaped like Qwen's chat tokenizer: <|endoftext|>=0 (pad and eos),
  <|im_start|>=1, <|im_end|>=2, <|extra_0|>=3 (the image placeholder), no bos; "\\n" is one token."""
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  bpe = ByteLevelBPETokenizer(add_prefix_space=False)
  bpe.train_from_iterator(list(texts) + ["\n"], vocab_size=vocab_size, min_frequency=1,
                          special_tokens=list(CHATML_SPECIALS), show_progress=False)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<|endoftext|>",  # pylint: disable=protected-access
                                eos_token="<|endoftext|>", additional_special_tokens=list(CHATML_SPECIALS[1:]),
                                model_max_length=model_max_length)
  if len(tok("\n").input_ids) != 1:
    raise ValueError("the ChatML tokenizer must encode '\\n' as one token")
  return tok
