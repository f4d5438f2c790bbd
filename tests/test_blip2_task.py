"""BLIP-2 stage 1 through main.py (configs/blip2_tiny.py:runlocal, synthetic captions): trains, validates
(losses + in-batch recall@1) and checkpoints; resumed in process where it stopped, the summed loss and
the ITG loss fall over the 30 steps. The caption data is deterministic, describes its scene and its
iterator resumes exactly; the tokenizer has LAVIS's BERT layout ([CLS] text [SEP], [DEC] bos) and the
same ids every time; the task's light init builds the same parameters as the full forward."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import check_resumed_run
from jaxlisa import config as cfg_lib
from jaxlisa.data import synthetic_captions as sc
from jaxlisa.data import synthetic_shapes
from jaxlisa.data.image_text import load_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "configs", "blip2_tiny.py") + ":runlocal"


def test_trains_validates_checkpoints_resumes_and_loss_falls(resumed_run):
  """main.py on runlocal, stopped after 15 of its 30 steps; then the same job resumed in process."""
  wd, cli, result = resumed_run
  rows, train = check_resumed_run(wd, cli, result)
  losses = [r["train/loss"] for r in train]
  assert "eval/i2t_r1" in cli and "eval/loss_itc" in cli
  evals = [r for r in rows if "eval/loss" in r]
  assert all(0.0 <= r["eval/i2t_r1"] <= 1.0 and 0.0 <= r["eval/t2i_r1"] <= 1.0 for r in evals)
  first, last = np.mean(losses[:3]), np.mean(losses[-5:])
  assert last < first - 0.5, losses  # ITC + ITM + ITG
  lm = [r["train/loss_lm"] for r in train]
  assert np.mean(lm[-5:]) < np.mean(lm[:3]) - 0.3, lm


def test_captions_deterministic_and_faithful(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  for d in (a, b):
    sc.write_dataset(d, num_train=6, num_val=2, image_size=32)
  for name in ("captions_train.json", "captions_val.json", "instructions_train.json", "corpus.json"):
    assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read(), name
  caps = sc.read_json(os.path.join(a, "captions_train.json"))
  assert len(caps) == 12 and len(sc.read_json(os.path.join(a, "captions_val.json"))) == 2
  for ann in caps:
    scene = synthetic_shapes.make_scene(ann["image_id"], 0, 32, 3)
    for shape in scene.shapes:  # every shape is named with its size, colour and kind
      assert shape.describe() in ann["caption"], (shape, ann["caption"])
    np.testing.assert_array_equal(load_rgb(os.path.join(a, ann["image"])), scene.image)  # lossless
  ins = sc.read_json(os.path.join(a, "instructions_train.json"))[0]
  conv = sc.conversations(ins)
  assert [t["from"] for t in conv] == ["user", "assistant"] * len(ins["output"])
  assert sc.IMAGE_TAG in conv[0]["value"] and all(sc.IMAGE_TAG not in t["value"] for t in conv[1:])


def test_bert_tokenizer_layout():
  texts = ["a big red circle on a grey background", "two shapes", "three shapes: a small blue square"]
  tok = sc.train_bert_tokenizer(texts, vocab_size=120)
  for _ in range(3):  # the same ids every time (the data and checkpoints depend on them)
    assert sc.train_bert_tokenizer(texts, vocab_size=120).get_vocab() == tok.get_vocab()
  ids = tok(["a big red circle", "two"], padding="max_length", truncation=True, max_length=8)
  assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3) and tok.bos_token_id == len(tok) - 1
  assert tok.convert_ids_to_tokens(tok.bos_token_id) == "[DEC]"
  row = ids["input_ids"][0]
  assert row[0] == 2 and 3 in row and ids["attention_mask"][1][-1] == 0
  assert tok.decode(row, skip_special_tokens=True) == "a big red circle"


def test_data_iterator_resumes_exactly(tmp_path):
  from jaxlisa.tasks.blip2_stage1 import Task  # pylint: disable=import-outside-toplevel
  c = cfg_lib.load_config(SPEC)
  task = Task(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # the pure part writes nothing
  with pytest.raises(ValueError, match="prepare"):
    task.model_config  # pylint: disable=pointless-statement  (no tokenizer before prepare())
  task.prepare()
  it = task.train_data()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  again = task.train_data()
  again.set_state(state)
  for w in want:
    g = next(again)
    assert sorted(g) == ["attention_mask", "input_ids", "pixels"]
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
  assert want[0]["pixels"].shape == (8, 64, 64, 3) and want[0]["input_ids"].shape == (8, 24)
  assert (want[0]["input_ids"][:, 0] == task.tokenizer.cls_token_id).all()
  assert task.model_config.qformer.bos_token_id == task.tokenizer.bos_token_id


def test_light_init_builds_every_parameter():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import blip2 as B  # pylint: disable=import-outside-toplevel
  from jaxlisa.zoo import MODEL_ZOO  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks.blip2_stage1 import _touch_params  # pylint: disable=import-outside-toplevel
  c = MODEL_ZOO["blip2"]["tiny"][0]()
  m = B.Blip2Qformer(c)
  full = jax.eval_shape(m.init, jax.random.PRNGKey(0), *c.dummy_inputs())["params"]
  light = jax.eval_shape(lambda r: m.init(r, c.dummy_inputs()[0], method=_touch_params), jax.random.PRNGKey(0))
  full, light = (traverse_util.flatten_dict(nn.meta.unbox(t)) for t in (full, light["params"]))
  assert sorted(full) == sorted(light) and all(full[k].shape == light[k].shape for k in full)


def _random_params(model, *inputs, method=None, seed=0):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda r: model.init(r, *inputs, method=method), jax.random.PRNGKey(0))["params"]
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda s: np.asarray(0.1 * rs.randn(*s.shape), np.float32), nn.meta.unbox(shapes))


def test_init_pretrained_from_a_lavis_pth(tmp_path):
  """config.init.pretrained: a LAVIS-named stage-1 .pth (written by the blip2_lavis export rules)
  comes back as the task's pretrained params, every tensor equal."""
  import torch  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion import families  # pylint: disable=import-outside-toplevel
  from jaxlisa.conversion.keymap import export_state  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import blip2 as B  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks.blip2_stage1 import Task, _touch_params  # pylint: disable=import-outside-toplevel
  task = Task(cfg_lib.load_config(SPEC), str(tmp_path / "wd"))
  task.prepare()
  c = task.model_config
  params = _random_params(task.model, c.dummy_inputs()[0], method=_touch_params)
  state = export_state(params, families.get_family("blip2_lavis").export_rules(c, ()))
  assert "Qformer.cls.predictions.transform.dense.weight" in state and "temp" in state
  path = str(tmp_path / "blip2_stage1.pth")
  torch.save({"model": {k: torch.tensor(np.asarray(v)) for k, v in state.items()}}, path)
  task.config.init.pretrained = path
  got, want = traverse_util.flatten_dict(task.pretrained()), traverse_util.flatten_dict(params)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg="/".join(k))


def test_released_size_config_trains_the_qformer_only():
  """configs/blip2_stage1.py (EVA ViT-g + bert-base Q-Former, LAVIS freeze_vit): the trained set is the
  Q-Former side (the BLIP-2 paper: 188M parameters) plus ln_vision; the ViT's ~1B are frozen."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import blip2 as B  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks.blip2_stage1 import _touch_params  # pylint: disable=import-outside-toplevel
  from jaxlisa.training import partition  # pylint: disable=import-outside-toplevel
  c = cfg_lib.load_config(os.path.join(ROOT, "configs", "blip2_stage1.py"))
  d = c.model.to_dict()
  mc = B.Blip2Config.from_dict({**d, "qformer": {**d["qformer"], "vocab_size": 30523, "encoder_hidden_size": 1408}})
  m = B.Blip2Qformer(mc)
  shapes = nn.meta.unbox(jax.eval_shape(lambda r: m.init(r, mc.dummy_inputs()[0], method=_touch_params),
                                        jax.random.PRNGKey(0))["params"])
  trained, frozen = partition.split(shapes, partition.trainable_mask(shapes, tuple(c.trainable), tuple(c.frozen)))
  assert list(trained["visual_encoder"]) == ["ln_vision"] and "ln_vision" not in frozen["visual_encoder"]
  assert 183e6 < partition.count_params(trained) < 193e6
  assert 0.95e9 < partition.count_params(frozen) < 1.05e9
  assert c.optim.weight_decay == 0.05 and c.optim.b2 == 0.999 and c.model.qformer.num_query_tokens == 32
