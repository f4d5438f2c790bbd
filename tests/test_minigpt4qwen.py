"""MiniGPT4-Qwen: the ChatML `preprocess` vs a transcription of the original algorithm (seed post /
Coobiw/MiniGPT4Qwen) on crafted conversations; the forward pass (logits, loss) vs a manual composition
of the towers with the PyTorch-style masked placeholder assignment; freeze switches as a trainable
mask; LoRA adapters start as the identity; greedy answers through inputs_embeds."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_abs_diff
from jaxlisa.data import chatml
from jaxlisa.inference import multimodal
from jaxlisa.models import minigpt4qwen as M
from jaxlisa.models.eva import EVAViTConfig, EVAVisionTransformer
from jaxlisa.models.llm import DecoderConfig, DecoderLM
from jaxlisa.models.qformer import QFormer, QFormerConfig
from jaxlisa.tasks import minigpt4qwen as m4q_task
from jaxlisa.training import optimizer as optim_lib

SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|extra_0|>": 3, "\n": 4}


class WordTokenizer:
  """A tiny stand-in for Qwen's tokenizer: special tokens and "\\n" are single ids, every other word
  (and punctuation mark) gets the next free id; `tokenizer(text).input_ids` like HF's."""

  def __init__(self, vocab_size=64):
    self.vocab, self.size = dict(SPECIAL), vocab_size
    self.im_start_id, self.im_end_id, self.pad_token_id = 1, 2, 0
    self.rx = re.compile("|".join(re.escape(s) for s in SPECIAL) + r"|\w+|[^\w\s]")

  def __call__(self, text):
    ids = [self.vocab.setdefault(t, len(self.vocab)) for t in self.rx.findall(text)]
    assert max(ids, default=0) < self.size
    return type("Enc", (), {"input_ids": ids})()


def seed_preprocess(sources, tokenizer, max_len, image_len=32, system_message="You are a helpful assistant."):
  """The original algorithm, transcribed (lists in, lists out)."""
  ignore = -100
  roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
  im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
  nl_tokens = tokenizer("\n").input_ids
  _system = tokenizer("system").input_ids + nl_tokens
  input_ids, targets = [], []
  for source in sources:
    if roles[source[0]["from"]] != roles["user"]:
      source = source[1:]
    input_id, target = [], []
    system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
    input_id += system
    target += [im_start] + [ignore] * (len(system) - 3) + [im_end] + nl_tokens
    for sentence in source:
      role = roles[sentence["from"]]
      content = sentence["value"]
      if "<ImageHere>" in content and role == "<|im_start|>user":
        content = content.replace("<ImageHere>", "<|extra_0|>" * image_len)
      _input_id = tokenizer(role).input_ids + nl_tokens + tokenizer(content).input_ids + [im_end] + nl_tokens
      input_id += _input_id
      if role == "<|im_start|>user":
        _target = [im_start] + [ignore] * (len(_input_id) - 3) + [im_end] + nl_tokens
      else:
        _target = [im_start] + [ignore] * len(tokenizer(role).input_ids) + \
            _input_id[len(tokenizer(role).input_ids) + 1:-2] + [im_end] + nl_tokens
      target += _target
    input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
    target += [ignore] * (max_len - len(target))
    input_ids.append(input_id[:max_len])
    targets.append(target[:max_len])
  return input_ids, targets


CONVERSATIONS = [
    [{"from": "user", "value": "<ImageHere> Describe the picture."},
     {"from": "assistant", "value": "A cat sits on a mat."}],
    [{"from": "assistant", "value": "Hello!"},  # a first turn not from the user is dropped
     {"from": "user", "value": "What is this? <ImageHere>"},
     {"from": "assistant", "value": "A dog."},
     {"from": "user", "value": "And its colour?"},
     {"from": "assistant", "value": "Brown, mostly."}],
    [{"from": "user", "value": "Compare <ImageHere> with <ImageHere> please"},  # two images in one turn
     {"from": "assistant", "value": "They match."}],
    [{"from": "user", "value": "Literal <|extra_0|> stays, as in the original <ImageHere>"},
     {"from": "assistant", "value": "ok"}],
]


@pytest.mark.parametrize("max_len", [96, 40])  # 40 cuts the longer conversations
def test_preprocess_matches_original(max_len):
  tok_a, tok_b = WordTokenizer(), WordTokenizer()
  got = chatml.preprocess(CONVERSATIONS, tok_a, max_len, image_len=4)
  want_ids, want_targets = seed_preprocess(CONVERSATIONS, tok_b, max_len, image_len=4)
  np.testing.assert_array_equal(got["input_ids"], np.array(want_ids))
  np.testing.assert_array_equal(got["labels"], np.array(want_targets))
  np.testing.assert_array_equal(got["attention_mask"], np.array(want_ids) != 0)
  if max_len == 96:  # what is supervised: the assistant content and the turn delimiters only
    ids, lab = got["input_ids"][0], got["labels"][0]
    kept = ids[lab != -100]
    assert (kept[kept > 4] == tok_a("A cat sits on a mat.").input_ids).all()
    assert (got["input_ids"][2] == 3).sum() == 8 and (got["labels"][2][got["input_ids"][2] == 3] == -100).all()
    assert (got["input_ids"][3] == 3).sum() == 5  # the literal placeholder is not stripped (original bug kept)
    with pytest.raises(ValueError, match="placeholders"):
      chatml.check_placeholders(got["input_ids"], num_images=4, image_len=4, image_token_id=3)
    chatml.check_placeholders(got["input_ids"][:2], num_images=2, image_len=4, image_token_id=3)


def test_chat_prompt_is_chatml():
  text = chatml.chat_prompt("What is it? <ImageHere>", history=[("hi", "hello")], system="sys")
  assert text == ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                  "hello<|im_end|>\n<|im_start|>user\nWhat is it? <ImageHere><|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- model
NQ, IMG = 4, 28
CFG = M.MiniGPT4QwenConfig(
    vision=EVAViTConfig(image_size=IMG, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        mlp_dim=48),
    qformer=QFormerConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, encoder_hidden_size=32, num_query_tokens=NQ, use_text=False,
                          lm_head=False, hidden_dropout_prob=0.0),
    llm=DecoderConfig(family="qwen", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, attention_bias=True, eos_token_id=0, pad_token_id=0, bos_token_id=None),
    image_token_id=3)


@pytest.fixture(scope="module")
def model():
  module = M.MiniGPT4Qwen(CFG)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *CFG.dummy_inputs()))["params"]
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rs.randn(*s.shape).astype(np.float32)), shapes)
  return module, params


def _batch():
  tok = WordTokenizer()
  data = chatml.preprocess(CONVERSATIONS[:2], tok, 40, image_len=NQ)
  x = np.random.RandomState(1).randn(2, IMG, IMG, 3).astype(np.float32)
  return x, data


def test_forward_equals_manual_composition(model):
  module, params = model
  x, data = _batch()
  ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]
  out = jax.jit(lambda p, *a: module.apply({"params": p}, *a))(params, x, ids, mask, labels)
  # manual: ViT + ln_vision, Q-Former over the query tokens, llm_proj, masked assignment, LLM, shifted CE
  img = EVAVisionTransformer(CFG.vision).apply({"params": params["visual_encoder"]}, x).image_embeds
  q = np.broadcast_to(np.asarray(params["query_tokens"]), (2, NQ, 32))
  qout = QFormer(CFG.qformer).apply({"params": params["Qformer"]}, query_embeds=q, encoder_hidden_states=img)
  inputs_llm = np.asarray(qout.last_hidden_state) @ np.asarray(params["llm_proj"]["kernel"]) + \
      np.asarray(params["llm_proj"]["bias"])
  emb = np.array(params["llm_model"]["embed_tokens"]["embedding"])[ids]
  where = np.nonzero(ids == CFG.image_token_id)
  emb[where[0], where[1]] = inputs_llm.reshape(-1, emb.shape[-1])
  logits = DecoderLM(CFG.llm).apply({"params": params["llm_model"]}, inputs_embeds=jnp.asarray(emb),
                                    attention_mask=jnp.asarray(mask)).logits
  assert max_abs_diff(out.logits, logits, np.broadcast_to(mask[..., None], out.logits.shape)) <= 1e-5
  lp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1)
  tgt = labels[:, 1:]
  valid = tgt != -100
  nll = -np.take_along_axis(np.asarray(lp), np.where(valid, tgt, 0)[..., None], -1)[..., 0]
  assert abs(float(out.loss) - nll[valid].mean()) <= 1e-5
  assert valid.sum() > 10


def _mask(shapes, c):
  """What trains under c's freeze switches (the task's patterns through the trainer's mask)."""
  return optim_lib.trainable_mask(shapes, m4q_task.trainable_patterns(c))


def test_freeze_switches():
  module, _ = M.MiniGPT4Qwen(CFG), None
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *CFG.dummy_inputs()))["params"]
  on = lambda c: sorted({"/".join(k[:1]) for k, v in _flat(_mask(shapes, c)).items() if v})
  assert on(CFG) == ["llm_proj"]
  assert on(CFG.replace(freeze_proj=True)) == []
  assert on(CFG.replace(freeze_vit=False, freeze_qformer=False, freeze_queries=False)) == [
      "Qformer", "llm_proj", "query_tokens", "visual_encoder"]
  mask = _flat(_mask(shapes, CFG.replace(unfreeze_pos_embed=True)))
  assert mask[("visual_encoder", "pos_embed")] and not mask[("visual_encoder", "cls_token")]
  lora = CFG.with_lora(rank=2)
  lshapes = nn.meta.unbox(jax.eval_shape(M.MiniGPT4Qwen(lora).init, jax.random.PRNGKey(0),
                                         *lora.dummy_inputs()))["params"]
  trained = [k for k, v in _flat(_mask(lshapes, lora)).items() if v]
  assert {k[-1] for k in trained if k[0] == "llm_model"} == {"lora_a", "lora_b"}
  assert {k[-2] for k in trained if k[0] == "llm_model"} == {"q_proj", "v_proj"}


def _flat(tree):
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return traverse_util.flatten_dict(tree)


def test_fresh_lora_is_identity_and_greedy_answers(model):
  module, params = model
  x, data = _batch()
  lora = CFG.with_lora(rank=2)
  lmod = M.MiniGPT4Qwen(lora)
  lshapes = nn.meta.unbox(jax.eval_shape(lmod.init, jax.random.PRNGKey(0), *lora.dummy_inputs()))["params"]
  lparams = _flat(jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), lshapes))
  base = _flat(params)
  lparams = {k: (base[k] if k in base else (v if k[-1] == "lora_a" else jnp.zeros_like(v))) for k, v in lparams.items()}
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  lparams = traverse_util.unflatten_dict(lparams)
  ids, mask = data["input_ids"][:, :24], data["attention_mask"][:, :24]  # the prompt part of both rows
  a = jax.jit(lambda p: module.apply({"params": p}, x, ids, mask).logits)(params)
  b = jax.jit(lambda p: lmod.apply({"params": p}, x, ids, mask).logits)(lparams)
  assert max_abs_diff(a, b) <= 1e-6
  out = multimodal.minigpt4qwen_generate(module, params, x, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=3,
                                         stop_ids=(2, 1))
  assert out.tokens.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], np.argmax(np.asarray(a)[:, -1], -1))


def test_state_dict_round_trip_through_the_converter(model, tmp_path):
  """Export under the PyTorch model's names (llm_model.transformer.* for Qwen), save a .pth, convert it
  back: the family is detected, the config inferred from shapes, every tensor lands where it was."""
  import torch  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import families  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.checkpoint_io import open_checkpoint  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.keymap import export_state  # pylint: disable=import-outside-toplevel
  _, params = model
  fam = families.get_family("minigpt4qwen")
  state = export_state(params, fam.export_rules(CFG, ()))
  assert "llm_model.transformer.h.0.attn.c_attn.weight" in state and "llm_proj.weight" in state
  path = str(tmp_path / "minigpt4qwen_full.pth")
  torch.save({"model": {k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}}, path)
  src = open_checkpoint(path)
  assert families.detect_family(None, src.keys()).name == "minigpt4qwen"
  c = fam.config_from_hf(None, src)
  over = {"vision": c.vision.replace(num_attention_heads=4, ln_vision_eps=CFG.vision.ln_vision_eps),
          "qformer": c.qformer.replace(num_attention_heads=4, vocab_size=40),
          "llm": c.llm.replace(num_attention_heads=4, max_position_embeddings=CFG.llm.max_position_embeddings,
                               eos_token_id=0, pad_token_id=0), "image_token_id": 3}
  conv = convert_checkpoint(path, config_overrides=over)
  assert conv.config == CFG
  want, got = _flat(params), _flat(conv.params)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg="/".join(k))
