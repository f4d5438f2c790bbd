"""Synthetic shapes: the embedded default LISA dataset, written in the native layouts.

Scene i of seed s (a function of (s, i) alone): a grey square image with 1..max_shapes
non-overlapping shapes (circle, square, triangle, diamond, hexagon), each a distinct colour, small
or big. Pixel (y, x) belongs to a shape when its centre (x + 0.5, y + 0.5) lies inside it
(circle: distance to the centre <= r; the other shapes are convex polygons within radius r),
so the masks are exact and the shapes fill exactly their masks.

`write_dataset(out_dir, ...)` writes every kind of LISA question about these scenes into the trees
the real loaders read (lisa_datasets/), so the same code reads synthetic and real data:
  ade20k/        class maps (0 = background, 1 + kind index) + classes.json: class-name questions
  refer_seg/refcoco/  refs(unc).p + instances.json (exact RLE masks): referring expressions
                 ("small red circle left of the blue square", "red shape"), splits train / val
  reason_seg/ReasonSeg/{train,val}/  json polygons tracing the masks exactly (reasoning queries,
                 "Which shape could roll down a slope?") + explanatory/train.json (explanations)
  llava_dataset/llava_instruct_150k.json + coco/train2017/: text-only multi-turn chat
                 ("How many shapes are there?" -> "There are three shapes."; reasoning questions
                 answered in LLaVA-1.5's short form: "Which shape has the colour of a lemon?\n
                 Answer the question using a single word or phrase." -> "yellow circle")
  shapes_meta.json (every scene's shapes and reasoning target)
  corpus.json (every text, for the tokenizer)
Train scenes are 0..num_train-1, val scenes follow. `train_tokenizer` trains a tiny LLaMA-style
tokenizer on the corpus with LISA's added tokens.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import string
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image

from jaxlisa.data import conversation as conv_lib
from jaxlisa.data.lisa_collate import seg_token_index
from jaxlisa.data.lisa_datasets.common import fill_polygon
from jaxlisa.data.lisa_datasets.val import val_question

KINDS = ("circle", "square", "triangle", "diamond", "hexagon")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30)}
SIZES = {"small": (0.08, 0.12), "big": (0.16, 0.22)}  # radius as a fraction of the image side
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Reasoning about a shape's kind: (query phrasings, explanation).
KIND_REASONS = {
    "circle": (("Which shape could roll down a slope?", "What here would roll if you pushed it?",
                "Which shape has no corners at all?"),
               "The {color} circle could roll because it is perfectly round and has no corners."),
    "square": (("Which shape has four equal sides and four right angles?",
                "What here looks like a tile of a chessboard?"),
               "The {color} square has four equal sides and four right angles."),
    "triangle": (("Which shape has exactly three corners?",
                  "What here looks like a slice of pizza or a warning sign?"),
                 "The {color} triangle is the only shape with exactly three corners."),
    "diamond": (("Which shape looks like the diamond suit on a playing card?",
                 "What here looks like a square standing on one of its corners?"),
                "The {color} diamond is a rhombus standing on one corner, like the card suit."),
    "hexagon": (("Which shape has six sides like a cell of a honeycomb?",
                 "What here looks like the head of a bolt?"),
                "The {color} hexagon has six sides, like a honeycomb cell."),
}
COLOR_THINGS = {"red": ("a ripe tomato", "a fire truck"), "green": ("fresh grass", "a lime"),
                "blue": ("a clear sky", "the deep sea"), "yellow": ("a banana", "a lemon"),
                "purple": ("grapes", "an eggplant"), "orange": ("a pumpkin", "a carrot")}
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA suffix
HYBRID_KWARGS = dict(sem_seg_data="ade20k", refer_seg_data="refcoco",
                     vqa_data="llava_instruct_150k", reason_seg_data="ReasonSeg|train")


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  size: str
  cx: float
  cy: float
  r: float

  def vertices(self) -> np.ndarray | None:
    """[V, 2] (x, y) corners in order, None for the circle."""
    deg = {"square": (45, 135, 225, 315), "triangle": (-90, 30, 150),
           "hexagon": (0, 60, 120, 180, 240, 300)}
    if self.kind == "circle":
      return None
    if self.kind == "diamond":
      return np.array([[self.cx, self.cy - self.r], [self.cx + 0.75 * self.r, self.cy],
                       [self.cx, self.cy + self.r], [self.cx - 0.75 * self.r, self.cy]])
    t = np.deg2rad(deg[self.kind])
    return np.stack([self.cx + self.r * np.cos(t), self.cy + self.r * np.sin(t)], -1)

  def mask(self, h: int, w: int) -> np.ndarray:
    """uint8 [h, w]: 1 where the pixel centre is inside the shape."""
    py, px = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    v = self.vertices()
    if v is None:
      return ((px - self.cx) ** 2 + (py - self.cy) ** 2 <= self.r ** 2).astype(np.uint8)
    inside = np.ones((h, w), bool)
    for a, b in zip(v, np.roll(v, -1, axis=0)):  # clockwise on screen (y down): cross >= 0 inside
      inside &= (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0]) >= -1e-9
    return inside.astype(np.uint8)

  def describe(self) -> str:
    return f"{self.size} {self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """image uint8 [S, S, 3]; masks uint8 [n, S, S] (0/1), masks[k] is shapes[k]."""
  index: int
  name: str
  image: np.ndarray
  shapes: tuple[Shape, ...]
  masks: np.ndarray
  background: int


def make_scene(index: int, seed: int = 0, image_size: int = 64, max_shapes: int = 4) -> Scene:
  rng = np.random.default_rng([seed, index])
  s = image_size
  n = int(rng.integers(1, max_shapes + 1))
  colors = [list(COLORS)[k] for k in rng.choice(len(COLORS), size=n, replace=False)]
  shapes: list[Shape] = []
  for color in colors:
    kind, size = KINDS[int(rng.integers(len(KINDS)))], ("small", "big")[int(rng.integers(2))]
    r = float(rng.uniform(*SIZES[size])) * s
    for _ in range(100):
      cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
      if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.r + 2 for o in shapes):
        shapes.append(Shape(kind, color, size, round(float(cx), 3), round(float(cy), 3), round(r, 3)))
        break
  background = int(rng.integers(200, 241))
  image = np.full((s, s, 3), background, np.uint8)
  masks = np.stack([sh.mask(s, s) for sh in shapes])
  for sh, m in zip(shapes, masks):
    image[m.astype(bool)] = COLORS[sh.color]
  return Scene(index, f"shapes_{seed:03d}_{index:06d}", image, tuple(shapes), masks, background)


# ----------------------------------------------------------------------------------------------
# Texts.

def _relation(a: Shape, b: Shape) -> str:
  dx, dy = b.cx - a.cx, b.cy - a.cy
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def referring_sentences(scene: Scene, k: int, rng: np.random.Generator) -> list[str]:
  """Expressions that single out shapes[k] (colours are unique within a scene)."""
  sh = scene.shapes[k]
  out = [f"{sh.color} {sh.kind}", f"{sh.size} {sh.color} {sh.kind}", f"{sh.color} shape"]
  others = [o for j, o in enumerate(scene.shapes) if j != k]
  if others:
    o = others[int(rng.integers(len(others)))]
    out.append(f"{sh.size} {sh.color} {sh.kind} {_relation(sh, o)} the {o.color} {o.kind}")
  return [out[i] for i in sorted(rng.choice(len(out), size=min(2, len(out)), replace=False))]


def reasoning_query(scene: Scene, rng: np.random.Generator) -> tuple[list[str], list[int], str]:
  """(phrasings of one reasoning query, indices of the target shapes, explanation)."""
  kinds = [sh.kind for sh in scene.shapes]
  options = [("kind", k) for k, sh in enumerate(scene.shapes) if kinds.count(sh.kind) == 1]
  options += [("color", k) for k in range(len(scene.shapes))]
  areas = scene.masks.reshape(len(scene.shapes), -1).sum(1)
  order = np.argsort(-areas, kind="stable")
  if len(areas) >= 2 and areas[order[0]] > 1.3 * areas[order[1]]:
    options.append(("largest", int(order[0])))
  how, k = options[int(rng.integers(len(options)))]
  sh = scene.shapes[k]
  if how == "kind":
    texts, why = KIND_REASONS[sh.kind]
    return list(texts), [k], why.format(color=sh.color)
  if how == "color":
    thing = COLOR_THINGS[sh.color][int(rng.integers(2))]
    return ([f"Which shape has the colour of {thing}?",
             f"Find the shape that is the same colour as {thing}."], [k],
            f"The {sh.color} {sh.kind} has the colour of {thing}.")
  return (["Which shape takes up the most space in the picture?", "What is the biggest object here?"],
          [k], f"The {sh.color} {sh.kind} is the largest shape in the image.")


def _count_answer(n: int, noun: str = "shape") -> str:
  return f"There is one {noun}." if n == 1 else f"There are {NUMBER_WORDS[n]} {noun}s."


def _listing(shapes: Sequence[Shape]) -> str:
  parts = [f"a {sh.describe()}" for sh in shapes]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def chat_turns(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
  """Two or three text-only (question, answer) turns about the scene: a short-answer reasoning
  question first, then one or two others."""
  shapes, kinds = scene.shapes, [sh.kind for sh in scene.shapes]
  n = len(shapes)
  asked = KINDS[int(rng.integers(len(KINDS)))]
  c = kinds.count(asked)
  exists = (f"No, there is no {asked}." if c == 0 else f"Yes, there is a {asked}." if c == 1
            else f"Yes, there are {NUMBER_WORDS[c]} {asked}s.")
  pick = shapes[int(rng.integers(n))]
  pool = [("How many shapes are there?", _count_answer(n)),
          ("How many shapes can you see in this image?", _count_answer(n)),
          (f"Is there a {asked} in this image?", exists),
          (f"What shape is the {pick.color} object?", f"It is a {pick.kind}."),
          ("Describe the image briefly.", f"The image shows {_listing(shapes)} on a grey background.")]
  pool += [(f"What colour is the {sh.kind}?", f"The {sh.kind} is {sh.color}.")
           for sh in shapes if kinds.count(sh.kind) == 1]
  turns = int(rng.integers(1, 3))
  chat = [reasoning_short_answer(scene, pick, rng)]  # first, right after the image, like a [SEG] query
  return chat + [pool[i] for i in rng.choice(len(pool), size=min(turns, len(pool)), replace=False)]


def reasoning_short_answer(scene: Scene, target: Shape, rng: np.random.Generator) -> tuple[str, str]:
  """A reasoning question of reason_seg about `target`, answered in LLaVA-1.5's short-answer VQA
  form ("... Answer the question using a single word or phrase." -> "yellow circle"): the answer
  names the target from its first token, so the state of the role token before it must carry which
  shape the question means (with seg_lstrip, the state validation reads as the [SEG] embedding)."""
  kinds = [sh.kind for sh in scene.shapes]
  if kinds.count(target.kind) == 1 and rng.random() < 0.5:
    texts = KIND_REASONS[target.kind][0]
    q = texts[int(rng.integers(len(texts)))]
  else:
    q = f"Which shape has the colour of {COLOR_THINGS[target.color][int(rng.integers(2))]}?"
  return f"{q}\n{SHORT_ANSWER_PROMPT}", f"{target.color} {target.kind}"


# ----------------------------------------------------------------------------------------------
# Exact polygons for the ReasonSeg json.

def _runs(mask: np.ndarray):
  rows = np.flatnonzero(mask.any(1))
  spans = []
  for y in rows:
    xs = np.flatnonzero(mask[y])
    spans.append((int(y), int(xs[0]), int(xs[-1]), len(xs) == xs[-1] - xs[0] + 1))
  return spans


def _trace(spans) -> list[list[int]]:
  """One polygon whose fill + outline is exactly a row-convex blob (rows contiguous, runs
  overlapping): boundary steps move diagonally by one pixel so the outline never leaves it."""
  left = [[spans[0][1], spans[0][0]]]
  for (y, a, _, _), (_, b, _, _) in zip(spans, spans[1:]):
    if b < a:
      left += [[a - 1, y + 1]] + ([[b, y + 1]] if a - 1 != b else [])
    elif b > a:
      left += ([[b - 1, y]] if b - 1 != a else []) + [[b, y + 1]]
    else:
      left.append([b, y + 1])
  right = [[spans[-1][2], spans[-1][0]]]
  for (y, a), (_, b) in zip([(s[0], s[2]) for s in spans[::-1]], [(s[0], s[2]) for s in spans[-2::-1]]):
    if b > a:
      right += [[a + 1, y - 1]] + ([[b, y - 1]] if a + 1 != b else [])
    elif b < a:
      right += ([[b + 1, y]] if b + 1 != a else []) + [[b, y - 1]]
    else:
      right.append([b, y - 1])
  return left + right


def mask_to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
  """Integer polygons whose rasterization (lisa_datasets.common.fill_polygon, LISA's fillPoly +
  polylines) is exactly `mask`: one traced outline when that reproduces it, else one degenerate
  polygon per row run."""
  mask = (np.asarray(mask) > 0).astype(np.uint8)
  spans = _runs(mask)
  if not spans:
    return []
  contiguous = all(b[0] == a[0] + 1 and b[1] <= a[2] + 1 and a[1] <= b[2] + 1
                   for a, b in zip(spans, spans[1:]))
  if contiguous and all(s[3] for s in spans):
    poly = _trace(spans)
    if np.array_equal(fill_polygon(np.zeros_like(mask), poly, 1), mask):
      return [poly]
  polys = []
  for y in np.flatnonzero(mask.any(1)):
    xs = np.flatnonzero(mask[y])
    breaks = np.flatnonzero(np.diff(xs) > 1)
    for s, e in zip(np.r_[0, breaks + 1], np.r_[breaks, len(xs) - 1]):
      polys.append([[int(xs[s]), int(y)], [int(xs[e]), int(y)]])
  return polys


# ----------------------------------------------------------------------------------------------
# Writing.

def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt, **kw)
  return buf.getvalue()


def write_file(path: str, data: bytes | str) -> None:
  """Write `path` whole: a temporary file renamed over it, so a kill leaves no torn file (the
  datasets' last file, corpus.json, marks them complete)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)


def template_texts() -> list[str]:
  """The fixed text the collate adds around the data (system prompt, roles, question lists)."""
  t = conv_lib.llava_v1
  out = [t.system, f"{t.roles[0]}: ", f"{t.roles[1]}: ", "</s>"]
  out += conv_lib.SHORT_QUESTION_LIST + conv_lib.LONG_QUESTION_LIST
  out += conv_lib.EXPLANATORY_QUESTION_LIST + conv_lib.ANSWER_LIST + [SHORT_ANSWER_PROMPT]
  out += [string.ascii_letters + string.digits + string.punctuation + " \n"]
  return out


def write_dataset(out_dir: str, num_train: int = 64, num_val: int = 16, image_size: int = 64,
                  seed: int = 0, max_shapes: int = 4, jpeg_quality: int = 95) -> dict:
  """Writes the trees listed in the module docstring; same arguments -> identical files.
  Returns {"out_dir", "train": [names], "val": [names], "corpus": [texts]}."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  refs, images, anns, explanations, llava, meta = [], [], [], [], [], {}
  corpus = template_texts()
  names = {"train": [], "val": []}
  for i in range(num_train + num_val):
    split = "train" if i < num_train else "val"
    sc = make_scene(i, seed, image_size, max_shapes)
    rng = np.random.default_rng([seed, i, 1])
    names[split].append(sc.name)
    meta[sc.name] = {"split": split, "background": sc.background,
                     "shapes": [dataclasses.asdict(sh) for sh in sc.shapes]}
    jpg = _encode(sc.image, "JPEG", quality=jpeg_quality)
    # Referring expressions (REFER layout, exact RLE masks).
    image_id = i + 1
    write_file(os.path.join(out_dir, "refer_seg/images/mscoco/images/train2014", sc.name + ".jpg"), jpg)
    images.append({"id": image_id, "file_name": sc.name + ".jpg", "height": image_size,
                   "width": image_size})
    for k, (sh, m) in enumerate(zip(sc.shapes, sc.masks)):
      ann_id = image_id * 10 + k
      rle = mask_utils.encode(np.asfortranarray(m))
      ys, xs = np.nonzero(m)
      anns.append({"id": ann_id, "image_id": image_id, "category_id": KINDS.index(sh.kind) + 1,
                   "segmentation": {"size": [int(x) for x in rle["size"]],
                                    "counts": rle["counts"].decode()},
                   "area": int(m.sum()), "iscrowd": 0,
                   "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
      sents = referring_sentences(sc, k, rng)
      refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                   "category_id": KINDS.index(sh.kind) + 1, "file_name": sc.name + ".jpg",
                   "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": ann_id * 10 + j}
                                 for j, s in enumerate(sents)]})
      corpus += sents
    # Reasoning (ReasonSeg layout, polygons tracing the masks).
    texts, targets, why = reasoning_query(sc, rng)
    meta[sc.name]["reason_targets"] = targets
    target = np.max(sc.masks[targets], axis=0)
    shapes = [{"label": "target", "points": p, "group_id": None, "shape_type": "polygon", "flags": {}}
              for p in mask_to_polygons(target)]
    rdir = os.path.join(out_dir, "reason_seg/ReasonSeg", split)
    write_file(os.path.join(rdir, sc.name + ".jpg"), jpg)
    write_file(os.path.join(rdir, sc.name + ".json"),
           json.dumps({"text": texts, "is_sentence": True, "shapes": shapes}))
    corpus += texts + [why] + [val_question(t, True) for t in texts]
    if split == "train":
      explanations.append({"image": sc.name + ".jpg", "query": texts[0], "outputs": why})
      # Class names (ADE20K layout: 0 = background -> ignore, 1 + kind index).
      label = np.zeros((image_size, image_size), np.uint8)
      for sh, m in zip(sc.shapes, sc.masks):
        label[m.astype(bool)] = KINDS.index(sh.kind) + 1
      write_file(os.path.join(out_dir, "ade20k/images/training", sc.name + ".jpg"), jpg)
      write_file(os.path.join(out_dir, "ade20k/annotations/training", sc.name + ".png"),
             _encode(label, "PNG"))
      # Text-only chat (LLaVA-Instruct layout).
      turns = chat_turns(sc, rng)
      q0 = f"<image>\n{turns[0][0]}" if rng.random() < 0.5 else f"{turns[0][0]}\n<image>"
      conv = []
      for j, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": q0 if j == 0 else q}, {"from": "gpt", "value": a}]
        corpus += [q, a]
      llava.append({"id": sc.name, "image": sc.name + ".jpg", "conversations": conv})
      write_file(os.path.join(out_dir, "coco/train2017", sc.name + ".jpg"), jpg)
  cats = [{"id": k + 1, "name": kind, "supercategory": "shape"} for k, kind in enumerate(KINDS)]
  corpus += list(KINDS)
  write_file(os.path.join(out_dir, "ade20k/classes.json"), json.dumps(list(KINDS)))
  write_file(os.path.join(out_dir, "refer_seg/refcoco/instances.json"),
         json.dumps({"images": images, "annotations": anns, "categories": cats}))
  write_file(os.path.join(out_dir, "refer_seg/refcoco/refs(unc).p"), pickle.dumps(refs, protocol=2))
  write_file(os.path.join(out_dir, "reason_seg/ReasonSeg/explanatory/train.json"), json.dumps(explanations))
  write_file(os.path.join(out_dir, "llava_dataset/llava_instruct_150k.json"), json.dumps(llava))
  write_file(os.path.join(out_dir, "shapes_meta.json"), json.dumps(meta, sort_keys=True))
  write_file(os.path.join(out_dir, "corpus.json"), json.dumps(corpus))
  logging.info("synthetic shapes: %d train + %d val scenes of %dpx written to %s", num_train, num_val,
               image_size, out_dir)
  return {"out_dir": out_dir, "train": names["train"], "val": names["val"], "corpus": corpus}


def read_corpus(out_dir: str) -> list[str]:
  with open(os.path.join(out_dir, "corpus.json"), encoding="utf-8") as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# Tokenizer.

def train_tokenizer(corpus: Sequence[str], out_dir: str | None = None, vocab_size: int = 600,
                    model_max_length: int = 512, template_weight: int = 1000, seg_lstrip: bool = False):
  """A deterministic SentencePiece-BPE tokenizer (<unk>=0 = pad, <s>=1 prepended, </s>=2; see
  stack_notes.md section 6) with LISA's added tokens: "[SEG]" (not special), then "<im_start>",
  "<im_end>" (special). Saved to out_dir (reload with PreTrainedTokenizerFast.from_pretrained).

  The template texts (system prompt, roles, question and answer lists) recur in every sample but
  once in the corpus: counted `template_weight` times, their words become single tokens, as in a
  real LLaMA vocabulary (the llava_v1 system prompt: 24 tokens instead of 79). Short prompts keep
  the question's words from being diluted among template pieces in a from-scratch model."""
  from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel
  from jaxlisa.data import synthetic_text as text  # pylint: disable=import-outside-toplevel
  tok = text.train_tokenizer(list(corpus) + template_texts() * template_weight, vocab_size)
  tok.model_max_length = model_max_length
  tok.padding_side = "right"
  tok.add_tokens([AddedToken(conv_lib.DEFAULT_SEG_TOKEN, lstrip=seg_lstrip)])
  tok.add_tokens([conv_lib.DEFAULT_IM_START_TOKEN, conv_lib.DEFAULT_IM_END_TOKEN], special_tokens=True)
  seg_token_index(tok)
  if out_dir:
    from jaxlisa.data.tokenization import save_tokenizer  # pylint: disable=import-outside-toplevel
    save_tokenizer(tok, out_dir)
  return tok


def load_tokenizer(directory: str):
  from jaxlisa.data.tokenization import load_saved_tokenizer  # pylint: disable=import-outside-toplevel
  return load_saved_tokenizer(directory)
