"""MiniGPT4-Qwen through main.py (configs/minigpt4qwen_tiny.py:runlocal, synthetic instructions): trains,
validates and checkpoints; resumed in process where it stopped, the loss falls and the token accuracy
rises over the 30 steps; the batches carry exactly num_query_tokens placeholders per image and supervise only the assistant
turns (ChatML preprocess); the trained ChatML tokenizer has Qwen's special-token layout; the freeze
switches decide the trainable set (the real-size config trains llm_proj only)."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import check_resumed_run
from jaxlisa import config as cfg_lib
from jaxlisa.data import synthetic_captions as sc
from jaxlisa.models import minigpt4qwen as m4q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "configs", "minigpt4qwen_tiny.py") + ":runlocal"


def test_trains_validates_checkpoints_resumes_and_loss_falls(resumed_run):
  """main.py on runlocal, stopped after 15 of its 30 steps; then the same job resumed in process."""
  wd, cli, result = resumed_run
  _, train = check_resumed_run(wd, cli, result)
  losses = [r["train/loss"] for r in train]
  assert "eval/accuracy" in cli
  assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
  acc = [r["train/accuracy"] for r in train]
  assert np.mean(acc[-5:]) > np.mean(acc[:3]) + 0.1, acc


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  from jaxlisa.tasks.minigpt4qwen import Task  # pylint: disable=import-outside-toplevel
  task = Task(cfg_lib.load_config(SPEC), str(tmp_path_factory.mktemp("m4q_task")))
  task.prepare()
  return task


def test_batches_placeholders_and_targets(task):
  c, tok = task.model_config, task.tokenizer
  batch = next(task.train_data())
  ids, labels = batch["input_ids"], batch["labels"]
  assert batch["pixels"].shape == (8, 64, 64, 3) and ids.shape == labels.shape == (8, c.max_txt_len)
  assert ((ids == c.image_token_id).sum(1) == c.num_query_tokens).all()
  assert (labels[ids == c.image_token_id] == -100).all()
  im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
  for i in range(4):  # row i of the source is annotation i
    item, ann = task.train_source[i], task.train_ann[i]
    ids, lab, n = item["input_ids"], item["labels"], int(item["attention_mask"].sum())
    assert (ids[n:] == tok.pad_token_id).all() and (lab[n:] == -100).all()
    delim = np.isin(ids, [im_start, im_end])
    delim[1:] |= ids[:-1] == im_end  # the "\n" after <|im_end|>
    delim[n:] = False
    np.testing.assert_array_equal(lab[delim], ids[delim])  # every turn's delimiters are supervised
    content = ids[(lab != -100) & ~delim]
    assert tok.decode(content) == "".join(ann["output"])  # and the assistant answers, nothing else
  assert c.llm.pad_token_id == tok.pad_token_id == 0 and c.image_token_id == 3


def test_chatml_tokenizer_layout():
  tok = sc.train_chatml_tokenizer(["How many shapes are there?", "There are two shapes."], vocab_size=300)
  assert [tok.convert_tokens_to_ids(t) for t in sc.CHATML_SPECIALS] == [0, 1, 2, 3]
  assert tok.pad_token_id == 0 and len(tok("\n").input_ids) == 1
  assert tok("<|im_start|>user").input_ids[0] == 1 and tok("<|extra_0|><|extra_0|>").input_ids == [3, 3]
  text = "There are two shapes.\nok"
  assert tok.decode(tok(text).input_ids) == text


def test_freeze_switches_decide_the_trainable_set():
  """The real-size config's defaults (MiniGPT4Qwen: frozen ViT, Q-Former, queries and LLM) train
  llm_proj only; config.trainable regexes replace the switches."""
  from configs import minigpt4qwen as real  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks.minigpt4qwen import Task  # pylint: disable=import-outside-toplevel
  rc = real.get_config()
  assert tuple(rc.trainable) == () and rc.model.freeze_vit and rc.model.freeze_llm and not rc.model.freeze_proj
  tiny = cfg_lib.load_config(SPEC)
  for k in ("freeze_vit", "freeze_qformer", "freeze_queries", "freeze_proj", "freeze_llm"):
    tiny.model[k] = rc.model[k]
  t = Task.__new__(Task)
  t.config = tiny
  t.model_config = m4q.MiniGPT4QwenConfig.from_dict({
      **tiny.model.to_dict(), "image_token_id": 3,
      "qformer": {**tiny.model.qformer.to_dict(), "vocab_size": 1, "encoder_hidden_size": 64},
      "llm": {**tiny.model.llm.to_dict(), "vocab_size": 64}})
  model = m4q.MiniGPT4Qwen(t.model_config)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *t.model_config.dummy_inputs())["params"])
  mask = traverse_util.flatten_dict(t.trainable_mask(params))
  assert {k[0] for k, v in mask.items() if v} == {"llm_proj"}
  tiny.trainable = (r"llm_model/.*",)
  mask = traverse_util.flatten_dict(t.trainable_mask(params))
  assert {k[0] for k, v in mask.items() if v} == {"llm_model"}


def test_init_qformer_from_a_stage1_pth(task, tmp_path):
  """config.init.qformer: a BLIP-2 stage-1 .pth (LAVIS names) gives the ViT, ln_vision, Q-Former and
  queries; the stage-1 text parts (word embeddings, text FFN, LM head, projections) are left out."""
  import torch  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import families  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.keymap import export_state  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import blip2 as B  # pylint: disable=import-outside-toplevel
  c = task.model_config
  s1 = B.Blip2Config(vision=c.vision, qformer=c.qformer.replace(use_text=True, lm_head=True, vocab_size=50,
                                                                 max_position_embeddings=32), embed_dim=16)
  model = B.Blip2Qformer(s1)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *s1.dummy_inputs())["params"]
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda s: np.asarray(0.1 * rs.randn(*s.shape), np.float32), nn.meta.unbox(shapes))
  state = export_state(params, families.get_family("blip2_lavis").export_rules(s1, ()))
  path = str(tmp_path / "blip2_pretrained.pth")
  torch.save({"model": {k: torch.tensor(np.asarray(v)) for k, v in state.items()}}, path)
  old = task.config.init.qformer
  task.config.init.qformer = path
  try:
    got = traverse_util.flatten_dict(task.pretrained())
  finally:
    task.config.init.qformer = old
  want = traverse_util.flatten_dict({k: params[k] for k in ("visual_encoder", "Qformer", "query_tokens")})
  text_parts = [k for k in want if "word_embeddings" in k or "position_embeddings" in k or k[1:2] == ("cls",)
                or (len(k) > 4 and k[-4].startswith("layer_") and k[-3] in ("intermediate", "output"))]
  assert text_parts and not set(text_parts) & set(got)
  assert sorted(got) == sorted(set(want) - set(text_parts))
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg="/".join(k))
