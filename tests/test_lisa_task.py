"""LISA end to end through main.py (tiny config, synthetic data): train + validate + resume,
segment mode (answers, masks, no-[SEG] message, bad inputs), and segment() vs the teacher-forced
forward pass."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxlisa.inference import segment as seg_lib
from jaxlisa.models import lisa as lisa_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "lisa_tiny.py") + ":runlocal"


def _main(workdir, *args, timeout=900):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", CONFIG, "--workdir",
                         str(workdir), *args], capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("lisa_run")
  out = _main(wd, "--config.model.point_prompt_loss_weight=1.0")  # the non-official SAM prompt loss too
  assert out.returncode == 0, out.stderr[-3000:]
  return wd, out.stdout


def test_train_validates_and_checkpoints(trained):
  wd, stdout = trained
  assert "done: step 4/4" in stdout and "eval/giou" in stdout and "eval/ciou" in stdout
  assert os.path.isdir(wd / "checkpoints") and os.path.isfile(wd / "metrics.jsonl")
  assert os.path.isfile(wd / "tokenizer" / "tokenizer.json")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / "tensorboard"))
  assert '"train/point_prompt_loss"' in (wd / "metrics.jsonl").read_text()


def test_segment_mode_and_bad_inputs(trained, tmp_path):
  wd, _ = trained
  config_before = open(wd / "config.json").read()
  img = sorted((wd / "data" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
  out = _main(wd, "--config.mode=segment", f"--config.image={img}",
              "--config.prompt=Please segment the circle in this image.", "--config.max_new_tokens=4")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "answer:" in out.stdout
  assert ("no [SEG] in the answer" in out.stdout) or ("mask 0:" in out.stdout)
  assert open(wd / "config.json").read() == config_before  # the run's config is not overwritten
  bad = tmp_path / "corrupt.jpg"
  bad.write_bytes(b"\xff\xd8\xff garbage")
  out = _main(wd, "--config.mode=segment", f"--config.image={bad}", "--config.prompt=segment the circle")
  assert out.returncode == 2 and "corrupt.jpg" in out.stderr
  out = _main(wd, "--config.mode=segment", f"--config.image={img}", "--config.prompt=" + "circle " * 400)
  assert out.returncode == 2 and "exceeds the model context" in out.stderr


def test_resume_continues_from_latest(trained):
  wd, _ = trained
  out = _main(wd, "--config.model.point_prompt_loss_weight=1.0")
  assert out.returncode == 0 and "nothing to do" in out.stdout


@pytest.fixture(scope="module")
def forced_seg_model(tmp_path_factory):
  """A tiny LISA whose LM always answers [SEG]: token embeddings and image features carry a large
  positive first coordinate, layers add little, and lm_head reads that coordinate into [SEG]."""
  from configs import lisa_tiny  # pylint: disable=import-outside-toplevel
  from jaxlisa.data import synthetic_shapes  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks.lisa import model_config_from  # pylint: disable=import-outside-toplevel
  d = tmp_path_factory.mktemp("forced")
  synthetic_shapes.write_dataset(str(d), num_train=4, num_val=2, image_size=64)
  tok = synthetic_shapes.train_tokenizer(synthetic_shapes.read_corpus(str(d)), vocab_size=600)
  cfg = model_config_from(lisa_tiny.get_config(), tok)
  model = lisa_lib.Lisa(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *cfg.dummy_inputs())["params"])
  params = jax.tree.map(np.array, params)
  lm = params["llava"]["language_model"]
  lm["embed_tokens"]["embedding"][:, 0] = 50.0
  params["llava"]["multi_modal_projector"]["linear_1"]["bias"][0] = 50.0
  for name in ("o_proj", "down_proj"):
    sub = lm["layers"]["self_attn" if name == "o_proj" else "mlp"][name]
    sub["kernel"] *= 0.05
  lm["lm_head"]["kernel"][:] = 0.0
  lm["lm_head"]["kernel"][0, cfg.seg_token_idx] = 10.0
  img = np.asarray(Image.open(sorted((d / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]).convert("RGB"))
  return model, params, tok, img


def test_segment_masks_equal_teacher_forced_forward(forced_seg_model):
  model, params, tok, img = forced_seg_model
  img2 = np.ascontiguousarray(img[:48, :40])  # a second, non-square image of another size
  res = seg_lib.segment(model, params, tok, [img, img2], ["Please segment the circle.", "Where is it?"],
                        max_new_tokens=3, max_length=256)
  c = model.config
  for r, im, q in zip(res, [img, img2], ["Please segment the circle.", "Where is it?"]):
    assert r.has_seg and r.masks.shape == (3,) + im.shape[:2] and r.text.count("[SEG]") == 3
    # teacher-forced: prompt + the three generated [SEG] tokens through Lisa.__call__
    from jaxlisa.data import tokenization as tok_lib  # pylint: disable=import-outside-toplevel
    from jaxlisa.data.preprocess import clip_preprocess, sam_preprocess  # pylint: disable=import-outside-toplevel
    ids = tok_lib.tokenizer_image_token(seg_lib.build_prompt(q), tok) + [c.seg_token_idx] * 3
    ids = tok_lib.expand_image_tokens(ids, None, c.num_image_tokens, c.llava.image_token_index).input_ids
    sam_px, resize = sam_preprocess(im, c.sam.img_size)
    forced = lisa_lib.Lisa(c.replace(max_seg_per_conversation=3))
    fwd = jax.jit(forced.apply, static_argnames=("mask_shape",))
    out = fwd({"params": params}, jnp.asarray(ids)[None, None], jnp.ones((1, 1, len(ids)), jnp.int32),
              jnp.asarray(clip_preprocess(im, c.llava.vision.image_size, c.llava.vision.image_size))[None],
              jnp.asarray(sam_px)[None], jnp.asarray([resize]), jnp.asarray([im.shape[:2]]),
              mask_shape=tuple(im.shape[:2]))
    # the first [SEG]'s state comes from the prompt's last position; later ones from decode steps
    np.testing.assert_allclose(r.mask_logits, np.asarray(out.pred_masks[0, 0]), atol=1e-4)


def test_serving_options_keep_the_masks(forced_seg_model):
  """mask_size_multiple (padded size / [SEG] count, one compile for many sizes) and
  row_max_new_tokens (per-row caps) give the exact-size masks and answers, truncated per row."""
  model, params, tok, img = forced_seg_model
  img2 = np.ascontiguousarray(img[:48, :40])
  qs = ["Please segment the circle.", "Where is it?"]
  want = seg_lib.segment(model, params, tok, [img, img2], qs, max_new_tokens=3, max_length=256)
  got = seg_lib.segment(model, params, tok, [img, img2], qs, max_new_tokens=3, max_length=256,
                        mask_size_multiple=32, row_max_new_tokens=[3, 1])
  np.testing.assert_allclose(got[0].mask_logits, want[0].mask_logits, atol=1e-4)
  assert got[0].text == want[0].text
  assert got[1].text.count("[SEG]") == 1 and got[1].masks.shape == (1,) + img2.shape[:2]
  np.testing.assert_allclose(got[1].mask_logits[0], want[1].mask_logits[0], atol=1e-4)


def test_answer_without_seg_gives_no_mask(forced_seg_model):
  model, params, tok, img = forced_seg_model
  params = jax.tree.map(np.array, params)
  params["llava"]["language_model"]["lm_head"]["kernel"][0, :] = 0.0
  params["llava"]["language_model"]["lm_head"]["kernel"][0, 5] = 10.0  # always token 5
  (r,) = seg_lib.segment(model, params, tok, [img], ["Please segment the circle."], max_new_tokens=2,
                         max_length=256)
  assert not r.has_seg and r.masks.shape == (0,) + img.shape[:2]


def test_point_prompt_masks_equal_sam_prompted_by_points(forced_seg_model):
  """Lisa's point_masks (the demo's SAM-promptability loss) are SAM's own point-prompted masks."""
  from jaxlisa.data.preprocess import clip_preprocess, sam_preprocess  # pylint: disable=import-outside-toplevel
  from jaxlisa.models import sam as sam_lib  # pylint: disable=import-outside-toplevel
  model, params, tok, img = forced_seg_model
  c = model.config
  im = np.ascontiguousarray(img[:48, :40])
  from jaxlisa.data import tokenization as tok_lib  # pylint: disable=import-outside-toplevel
  ids = tok_lib.tokenizer_image_token(seg_lib.build_prompt("Where is it?"), tok) + [c.seg_token_idx]
  ids = tok_lib.expand_image_tokens(ids, None, c.num_image_tokens, c.llava.image_token_index).input_ids
  ids = jnp.asarray(ids)[None, None]
  sam_px, resize = sam_preprocess(im, c.sam.img_size)
  points = jnp.asarray([[[[17.5, 9.5]]]]) * resize[0] / 48  # pixel (17, 9) in SAM's input frame
  args = (jnp.asarray(clip_preprocess(im, c.llava.vision.image_size, c.llava.vision.image_size))[None],
          jnp.asarray(sam_px)[None], jnp.asarray([resize]), jnp.asarray([im.shape[:2]]))
  out = model.apply({"params": params}, ids, jnp.ones_like(ids), *args, mask_shape=(48, 40),
                    prompt_points=points)
  low, _ = model.apply({"params": params}, jnp.asarray(sam_px)[None], points[0, 0][:, None],
                       jnp.ones((1, 1), jnp.int32), multimask_output=False,
                       method=lambda m, *a, **k: m.visual_model(*a, **k))
  want = sam_lib.postprocess_masks_dynamic(low[:, 0], jnp.asarray([resize]), jnp.asarray([im.shape[:2]]),
                                           out_shape=(48, 40), padded_size=c.sam.img_size)
  assert out.point_masks.shape == out.pred_masks.shape == (1, 1, 1, 48, 40)
  np.testing.assert_allclose(np.asarray(out.point_masks[0, 0, 0]), np.asarray(want[0]), atol=1e-5)
  assert not np.allclose(np.asarray(out.point_masks), np.asarray(out.pred_masks), atol=1e-3)


def test_sample_mask_points_land_inside_their_masks():
  from jaxlisa.training.losses import sample_mask_points  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  gt = np.zeros((2, 2, 1, 20, 24), np.int32)
  gt[0, 0, 0, 3:7, 5:9] = 1
  gt[0, 0, 0, 10, 2] = 255  # ignore label: never a prompt
  gt[0, 1, 0, 15:, :] = 1  # rows 15.. lie outside image 0's 12 x 24 region: empty in effect
  gt[1, 0, 0] = rng.random((20, 24)) < 0.1
  orig_hw, resize_hw = np.array([[12, 24], [20, 16]]), np.array([[32, 64], [64, 51]])
  for seed in range(5):
    pts, has = sample_mask_points(jax.random.PRNGKey(seed), jnp.asarray(gt), jnp.asarray(orig_hw),
                                  jnp.asarray(resize_hw))
    assert pts.shape == (2, 2, 1, 2) and has.tolist() == [[[True], [False]], [[True], [False]]]
    for i, j in ((0, 0), (1, 0)):
      x, y = np.asarray(pts[i, j, 0]) * orig_hw[i, ::-1] / resize_hw[i, ::-1] - 0.5  # back to pixels
      assert np.allclose([x, y], np.round([x, y]), atol=1e-4)
      assert gt[i, j, 0, int(round(y)), int(round(x))] == 1


def _forced_masks(model, params, tok, im, ids, k):
  """Lisa.__call__ (the official forward) on one full sequence -> pred_masks [k, H, W]."""
  from jaxlisa.data import tokenization as tok_lib  # pylint: disable=import-outside-toplevel
  from jaxlisa.data.preprocess import clip_preprocess, sam_preprocess  # pylint: disable=import-outside-toplevel
  c = model.config
  ids = tok_lib.expand_image_tokens(ids, None, c.num_image_tokens, c.llava.image_token_index).input_ids
  sam_px, resize = sam_preprocess(im, c.sam.img_size)
  out = lisa_lib.Lisa(c.replace(max_seg_per_conversation=k)).apply(
      {"params": params}, jnp.asarray(ids)[None, None], jnp.ones((1, 1, len(ids)), jnp.int32),
      jnp.asarray(clip_preprocess(im, c.llava.vision.image_size, c.llava.vision.image_size))[None],
      jnp.asarray(sam_px)[None], jnp.asarray([resize]), jnp.asarray([im.shape[:2]]), mask_shape=tuple(im.shape[:2]))
  assert bool(np.asarray(out.seg_valid).all())
  return np.asarray(out.pred_masks[0, 0])


def test_prompt_seg_masks_and_prefilled_answers_equal_the_official_forward(forced_seg_model):
  """prompt_seg_masks=True: a [SEG] standing in the prompt gets a mask too (the official evaluate(),
  LISA issue #145), ahead of the generated ones; answers=: teacher-forced masks of a pre-filled
  assistant turn. Both equal Lisa.__call__ on the same full sequence."""
  from jaxlisa.data import tokenization as tok_lib  # pylint: disable=import-outside-toplevel
  model, params, tok, img = forced_seg_model
  c = model.config
  im = np.ascontiguousarray(img[:48, :40])
  q = "Is [SEG] the circle?"
  prompt_ids = tok_lib.tokenizer_image_token(seg_lib.build_prompt(q), tok)
  assert prompt_ids.count(c.seg_token_idx) == 1
  (plain,) = seg_lib.segment(model, params, tok, [im], [q], max_new_tokens=2, max_length=256)
  (full,) = seg_lib.segment(model, params, tok, [im], [q], max_new_tokens=2, max_length=256, prompt_seg_masks=True)
  assert plain.masks.shape[0] == 2 and full.masks.shape[0] == 3 and full.text == plain.text
  want = _forced_masks(model, params, tok, im, prompt_ids + [c.seg_token_idx] * 2, 3)
  np.testing.assert_allclose(full.mask_logits, want, atol=1e-4)
  np.testing.assert_allclose(plain.mask_logits, want[1:], atol=1e-4)
  # a pre-filled answer: nothing generated, every [SEG] of the answer (and, with the option, of the prompt)
  answer = "It is [SEG] and [SEG]."
  forced_ids = tok_lib.tokenizer_image_token(seg_lib.build_prompt(q, answer=answer), tok)
  want = _forced_masks(model, params, tok, im, forced_ids, 3)
  (tf_all,) = seg_lib.segment(model, params, tok, [im], [q], answers=[answer], max_length=256, prompt_seg_masks=True)
  (tf_ans,) = seg_lib.segment(model, params, tok, [im], [q], answers=[answer], max_length=256)
  assert tf_all.text == answer and tf_all.masks.shape[0] == 3 and tf_ans.masks.shape[0] == 2
  np.testing.assert_allclose(tf_all.mask_logits, want, atol=1e-4)
  np.testing.assert_allclose(tf_ans.mask_logits, want[1:], atol=1e-4)
