"""BLIP-2 families: the Q-Former key maps (LAVIS `Qformer.*` and HF `qformer.*` names).

The Q-Former's layers are unscanned (`encoder/layer_{i}`: cross-attention layers differ), so its
rules are written out per layer index: the same table then serves conversion and export whatever
the scan setting of the towers around it.
"""

from __future__ import annotations

from jaxlisa.conversion.keymap import FLAT, LINEAR, LINEAR_IN2, Rule
from jaxlisa.models.qformer import QFormerConfig

QFORMER_SKIP = (r"(^|\.)position_ids$",)


def _ln(src: str, dst: str) -> list[Rule]:
  return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def _dense(src: str, dst: str, t=LINEAR) -> list[Rule]:
  return [Rule(f"{src}.weight", f"{dst}/kernel", t), Rule(f"{src}.bias", f"{dst}/bias", FLAT)]


def qformer_rules(c: QFormerConfig, src: str = "Qformer.", dst: str = "Qformer/", style: str = "lavis",
                  embeddings_src: str | None = None) -> list[Rule]:
  """Q-Former names under `src` -> QFormer params under `dst`.

  style "lavis": `{src}bert.embeddings.*`, `{src}bert.encoder.layer.{i}.attention.self.query`,
  `{src}cls.predictions.*` (LAVIS `BertLMHeadModel`). style "hf": `{src}layernorm`,
  `{src}encoder.layer.{i}.attention.attention.query` (HF `Blip2QFormerModel`), the word/position
  embeddings under `embeddings_src` (HF `Blip2ForImageTextRetrieval`: "embeddings.").
  """
  d = f"{dst}bert/"
  if style == "lavis":
    e, enc, selfattn = f"{src}bert.embeddings.", f"{src}bert.encoder.layer.", "self"
    ln_src = f"{e}LayerNorm"
  elif style == "hf":
    e, enc, selfattn = embeddings_src or f"{src}embeddings.", f"{src}encoder.layer.", "attention"
    ln_src = f"{src}layernorm"
  else:
    raise ValueError(f"unknown Q-Former naming style {style!r}")
  rules = _ln(ln_src, f"{d}embeddings/LayerNorm")
  if c.use_text:
    rules += [Rule(f"{e}word_embeddings.weight", f"{d}embeddings/word_embeddings/embedding"),
              Rule(f"{e}position_embeddings.weight", f"{d}embeddings/position_embeddings/embedding")]
  for i in range(c.num_hidden_layers):
    s, t = f"{enc}{i}.", f"{d}encoder/layer_{i}/"
    blocks = ["attention"] + (["crossattention"] if c.has_cross_attention(i) else [])
    for blk in blocks:
      for n in ("query", "key", "value"):
        rules += _dense(f"{s}{blk}.{selfattn}.{n}", f"{t}{blk}/self/{n}")
      rules += [Rule(f"{s}{blk}.output.dense.weight", f"{t}{blk}/output/dense/kernel", LINEAR_IN2),
                Rule(f"{s}{blk}.output.dense.bias", f"{t}{blk}/output/dense/bias")]
      rules += _ln(f"{s}{blk}.output.LayerNorm", f"{t}{blk}/output/LayerNorm")
    for suffix in ("_query", "") if c.use_text else ("_query",):
      rules += _dense(f"{s}intermediate{suffix}.dense", f"{t}intermediate{suffix}/dense")
      rules += _dense(f"{s}output{suffix}.dense", f"{t}output{suffix}/dense")
      rules += _ln(f"{s}output{suffix}.LayerNorm", f"{t}output{suffix}/LayerNorm")
  if c.lm_head:
    p, q = f"{src}cls.predictions.", f"{dst}cls/predictions/"
    rules += _dense(f"{p}transform.dense", f"{q}transform/dense")
    rules += _ln(f"{p}transform.LayerNorm", f"{q}transform/LayerNorm")
    rules += [Rule(f"{p}bias", f"{q}bias"),
              Rule(f"{p}decoder.bias", ()),  # the same tensor as `bias` (LAVIS ties them)
              Rule(f"{p}decoder.weight", () if c.tie_word_embeddings else f"{q}decoder/kernel", LINEAR)]
  return rules


def dropped_qformer_text_rules(src: str = "Qformer.", n_layers: int = 12) -> list[Rule]:
  """LAVIS stage-2 files (blip2_opt, MiniGPT-4...) may still carry the text half of the Q-Former
  (word/position embeddings, text FFN, cls) that the model sets to None: known, dropped."""
  rules = [Rule(f"{src}bert.embeddings.word_embeddings.weight", ()),
           Rule(f"{src}bert.embeddings.position_embeddings.weight", ())]
  for i in range(n_layers):
    for n in ("intermediate.dense", "output.dense", "output.LayerNorm"):
      rules += [Rule(f"{src}bert.encoder.layer.{i}.{n}.weight", ()), Rule(f"{src}bert.encoder.layer.{i}.{n}.bias", ())]
  for n in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
            "transform.LayerNorm.bias", "bias", "decoder.weight", "decoder.bias"):
    rules.append(Rule(f"{src}cls.predictions.{n}", ()))
  return rules
