"""BLIP-2 stage-1 training step and BLIP beam-search captioning: jaxlisa vs transformers (PyTorch), one run.

  python bench/blip.py [--iters 3 --batch 16 --q_width 384 --q_layers 6 ...]

Cases:
  stage-1 train step  ITC + ITM (one hard negative per sample drawn from the similarity softmax) + ITG
               (label smoothing 0.1), backward, AdamW (lr 1e-4 constant, betas 0.9/0.999, wd 0.05 off
               biases and norms, no clipping: LAVIS's runner), frozen ViT (LAVIS freeze_vit; ln_vision
               trains on both sides). jaxlisa: the blip2_stage1 task's loss driven by the trainer's
               jitted step (jaxlisa/training/trainer.py). PyTorch: transformers' Blip2ForImageTextRetrieval modules
               (vision_model, query_tokens, embeddings, qformer, projections, itm_head) + a BERT LM head
               tied to the word embeddings, with the LAVIS `Blip2Qformer.forward` formulas as in
               tests/test_blip2.py (torch.multinomial negatives). transformers' Q-Former has no
               past_key_values, so its ITG pass recomputes the query positions jointly with the causal
               text (UniLM mask); jaxlisa (like LAVIS) reuses the query pass's K/V.
               Same weights on both sides: the PyTorch state is saved under LAVIS names and converted
               with the blip2_lavis converter; the losses of one step with the same negatives are
               compared (first_loss_abs_diff).
  BLIP caption  beam search (num_beams 3, LAVIS's max_length 30 / min_length 10) after the prompt
               "[DEC] a picture of": jaxlisa.inference.captioning.blip_captions (one jitted while_loop, KV cache and
               cross-attention K/V computed once) vs BlipForConditionalGeneration.generate, the same
               random weights through the blip_hf converter; tokens compared.
Compile time (jaxlisa's first call) is excluded and reported under compile_s. fp32 on both sides.
"""

import os
import tempfile
import time

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers as tf  # noqa: E402

from bench.common import convert_reference, finish, parse_args, time_steps, timeit  # noqa: E402
from configs import blip2_common  # noqa: E402
from jaxlisa.conversion.convert import convert_checkpoint  # noqa: E402
from jaxlisa.inference import captioning  # noqa: E402
from jaxlisa.models import blip as blip_lib  # noqa: E402
from jaxlisa.models import blip2 as blip2_lib  # noqa: E402
from jaxlisa.tasks import blip2_stage1 as blip2_task  # noqa: E402
from jaxlisa.training import partition  # noqa: E402
from jaxlisa.training.train_state import TrainState  # noqa: E402
from jaxlisa.training.trainer import Trainer  # noqa: E402
from torch_refs import blip2 as blip2_ref  # noqa: E402

VOCAB = 30524  # bert-base-uncased + [DEC] (+1 spare, as BLIP's 30524)
DEC, SEP, CLS = 30522, 102, 101


# ----------------------------------------------------------------------------- BLIP-2 stage 1, PyTorch
class TorchStage1(torch.nn.Module):
  """LAVIS Blip2Qformer.forward on transformers' Blip2ForImageTextRetrieval modules (+ an LM head)."""

  def __init__(self, ref, temp=0.07):
    super().__init__()
    self.ref = ref
    d = ref.config.qformer_config.hidden_size
    self.transform = torch.nn.Linear(d, d)
    self.transform_ln = torch.nn.LayerNorm(d, eps=1e-12)
    self.lm_bias = torch.nn.Parameter(torch.zeros(ref.config.qformer_config.vocab_size))
    self.temp = torch.nn.Parameter(torch.tensor(temp))

  def lm_logits(self, h):
    h = self.transform_ln(F.gelu(self.transform(h)))
    return h @ self.ref.embeddings.word_embeddings.weight.T + self.lm_bias  # tied decoder

  def forward(self, x, ids, mask, neg_img=None, neg_txt=None):
    ref = self.ref
    with torch.no_grad():  # freeze_vit: the ViT runs without gradients; ln_vision (post_layernorm) trains
      vit = ref.vision_model.embeddings(x)
      vit = ref.vision_model.encoder(inputs_embeds=vit).last_hidden_state
    image_embeds = ref.vision_model.post_layernorm(vit)
    out = blip2_ref.stage1_losses(ref, image_embeds, ids, mask, self.temp, DEC, self.lm_logits, neg_img, neg_txt)
    return out["loss_itc"] + out["loss_itm"] + out["loss_lm"], (out["neg_img"], out["neg_txt"])


def lavis_state(model: TorchStage1) -> dict:
  """The PyTorch weights under LAVIS Blip2Qformer names (what blip2_pretrained.pth holds)."""
  out = blip2_ref.lavis_names(model.ref.state_dict())
  p = "Qformer.cls.predictions."
  out[p + "transform.dense.weight"] = model.transform.weight.detach().clone()
  out[p + "transform.dense.bias"] = model.transform.bias.detach().clone()
  out[p + "transform.LayerNorm.weight"] = model.transform_ln.weight.detach().clone()
  out[p + "transform.LayerNorm.bias"] = model.transform_ln.bias.detach().clone()
  out[p + "bias"] = model.lm_bias.detach().clone()
  out[p + "decoder.bias"] = out[p + "bias"]
  out[p + "decoder.weight"] = out["Qformer.bert.embeddings.word_embeddings.weight"]
  out["temp"] = model.temp.detach().clone()
  return out


def build_stage1(a):
  torch.manual_seed(0)
  vision = dict(hidden_size=a.v_width, intermediate_size=4 * a.v_width, num_hidden_layers=a.v_layers,
                num_attention_heads=a.v_width // 64, image_size=a.image_size, patch_size=14, layer_norm_eps=1e-6)
  qformer = dict(vocab_size=VOCAB, hidden_size=a.q_width, num_hidden_layers=a.q_layers,
                 num_attention_heads=a.q_width // 64, intermediate_size=4 * a.q_width, max_position_embeddings=512,
                 cross_attention_frequency=2, encoder_hidden_size=a.v_width, use_qformer_text_input=True,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  cfg = tf.Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=a.queries,
                       image_text_hidden_size=256)
  ref = tf.Blip2ForImageTextRetrieval(cfg)
  ref.config._attn_implementation = "eager"  # pylint: disable=protected-access
  ref.qformer.config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = TorchStage1(ref)
  torch.nn.init.normal_(model.transform.weight, std=0.02)
  return model, cfg


def stage1_config(conv_config, a):
  """The blip2_stage1 task at the converted architecture, LAVIS optimizer, no clipping."""
  c = blip2_common.stage1_config(conv_config.vision.to_dict(), conv_config.qformer.to_dict(),
                                 embed_dim=conv_config.embed_dim, max_txt_len=a.text_len)
  c.model.qformer.update(hidden_dropout_prob=0.0)
  c.batch_size = a.batch
  c.total_steps = 1000
  c.optim.update(grad_clip=0.0, schedule="constant", warmup_steps=0)  # = torch AdamW at a fixed lr
  c.data.synthetic.update(num_train=a.batch, num_val=0, image_size=a.image_size)
  c.data.val_ann = ""
  return c


def bench_stage1(a, extra):
  model, _ = build_stage1(a)
  rs = np.random.RandomState(0)
  x = rs.randn(a.batch, a.image_size, a.image_size, 3).astype(np.float32)
  ids = rs.randint(1000, 30000, (a.batch, a.text_len))
  ids[:, 0] = CLS
  lens = rs.randint(a.text_len // 2, a.text_len + 1, a.batch)
  mask = (np.arange(a.text_len)[None] < lens[:, None]).astype(np.int64)
  ids[np.arange(a.batch), lens - 1] = SEP
  ids[mask == 0] = 0
  xt, it, mt = torch.tensor(x.transpose(0, 3, 1, 2).copy()), torch.tensor(ids), torch.tensor(mask)

  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "blip2_pretrained.pth")
    torch.save({"model": lavis_state(model)}, path)
    probe = convert_checkpoint(path)  # LAVIS files carry no config: head counts and eps from the reference
    c0 = probe.config
    over = {"vision": c0.vision.replace(num_attention_heads=a.v_width // 64, ln_vision_eps=1e-6),
            "qformer": c0.qformer.replace(num_attention_heads=a.q_width // 64, bos_token_id=DEC, sep_token_id=SEP,
                                          hidden_dropout_prob=0.0)}
    conv = convert_checkpoint(path, config_overrides=over)
    config = stage1_config(conv.config, a)
    wd = os.path.join(d, "work")
    task = blip2_task.Task(config, wd)
    task.prepare()  # writes a few synthetic captions, trains its tokenizer (unused here)
    task.model_config = conv.config  # the converted architecture (its vocab, [DEC] and [SEP] ids)
    task.model = blip2_lib.Blip2Qformer(conv.config)
    t0 = time.perf_counter()
    trainer = Trainer(config, wd, task=task)
    trained, frozen = partition.split(jax.tree.map(jnp.asarray, conv.params), trainer.mask)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trained, frozen=frozen,
                       opt_state=trainer.tx.init(trained), rng=jax.random.PRNGKey(1))
    state = jax.device_put(state, trainer.state_sharding)
    batch = trainer.device_batch({"pixels": x, "input_ids": ids.astype(np.int32),
                                  "attention_mask": mask.astype(np.int32)})
    compiled = trainer._compile(state, batch)  # pylint: disable=protected-access
    extra["compile_s"]["stage1_train_step"] = round(time.perf_counter() - t0, 1)
    extra["stage1"] = {"params": f"{trainer.num_params:,} ({trainer.num_trainable:,} trained)",
                       **{k: v for k, v in trainer.describe().items() if k in ("model", "optimizer", "memory")}}

    # the same step's losses with the same negatives (PyTorch's draw), before any update
    fwd = jax.jit(lambda p, ni, nt: task.model.apply({"params": p}, batch["pixels"], batch["input_ids"],
                                                     batch["attention_mask"], neg_image_idx=ni, neg_text_idx=nt))
    with torch.no_grad():
      loss_t0, (ni, nt) = model(xt, it, mt)
    out = fwd(state.params, jnp.asarray(ni.numpy()), jnp.asarray(nt.numpy()))
    loss_diff = abs(float(out.loss) - float(loss_t0))
    print(f"stage-1 loss, same weights and negatives: jax {float(out.loss):.6f} torch {float(loss_t0):.6f}")

    tj, losses_j = time_steps(compiled, state, batch, a.iters)
    del state, compiled

  # PyTorch: the same trainable set (everything but the ViT blocks / embeddings)
  trained_t = []
  for name, p in model.named_parameters():
    on = not (name.startswith("ref.vision_model.") and "post_layernorm" not in name)
    p.requires_grad_(on)
    if on:
      trained_t.append(p)
  decay = [p for p in trained_t if p.ndim > 1]
  no_decay = [p for p in trained_t if p.ndim <= 1]
  o = config.optim
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  model.train()
  losses_t = []

  def step_t():
    opt.zero_grad(set_to_none=True)
    loss, _ = model(xt, it, mt)
    loss.backward()
    opt.step()
    losses_t.append(float(loss.detach()))

  tt = timeit(step_t, warmup=1, iters=a.iters)
  n_t = sum(p.numel() for p in trained_t)
  print(f"stage-1 train losses jax {losses_j}\n                      torch {losses_t}")
  return {"case": f"BLIP-2 stage-1 train step, batch {a.batch} x {a.text_len} tokens", "unit": "s", "jaxlisa": tj,
          "torch": tt, "first_loss_abs_diff": loss_diff, "trained_params_jax": trainer.num_trainable,
          "trained_params_torch": n_t}


# ----------------------------------------------------------------------------- BLIP captioning
def bench_caption(a, extra):
  torch.manual_seed(0)
  vision = dict(hidden_size=a.v_width, intermediate_size=4 * a.v_width, num_hidden_layers=a.v_layers,
                num_attention_heads=a.v_width // 64, image_size=a.image_size, patch_size=16)
  text = dict(vocab_size=VOCAB, hidden_size=a.q_width, encoder_hidden_size=a.v_width, intermediate_size=4 * a.q_width,
              num_hidden_layers=a.q_layers, num_attention_heads=a.q_width // 64, max_position_embeddings=512,
              bos_token_id=DEC, sep_token_id=SEP, pad_token_id=0, eos_token_id=SEP)
  ref = tf.BlipForConditionalGeneration(tf.BlipConfig(vision_config=vision, text_config=text)).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # larger than the default init, so the search has real choices to make
    for name, t in ref.state_dict().items():
      if t.is_floating_point() and name.startswith("text_decoder.") and t.ndim == 2:
        t.add_(0.05 * torch.randn(t.shape, generator=g))
  conv = convert_reference(ref)
  module = blip_lib.BlipForConditionalGeneration(conv.config)
  params = jax.device_put(conv.params)
  rs = np.random.RandomState(1)
  px = rs.randn(a.caption_batch, a.image_size, a.image_size, 3).astype(np.float32)
  prompt = np.array([[DEC, 1037, 3861, 1997]] * a.caption_batch)  # "[DEC] a picture of" (bert-base-uncased ids)
  kw = dict(num_beams=3, max_length=30, min_length=10)
  run_j = lambda: jax.block_until_ready(captioning.blip_captions(module, params, jnp.asarray(px), jnp.asarray(prompt),
                                                                 **kw))
  t0 = time.perf_counter()
  seqs, lengths = run_j()
  extra["compile_s"]["blip_generate"] = round(time.perf_counter() - t0, 1)
  tj = timeit(run_j, warmup=0, iters=a.iters)
  xt = torch.tensor(px.transpose(0, 3, 1, 2).copy())
  ids_t = torch.tensor(np.concatenate([prompt, np.full((a.caption_batch, 1), SEP)], 1))  # the processor's [SEP]
  with torch.inference_mode():
    run_t = lambda: ref.generate(pixel_values=xt, input_ids=ids_t, **kw)
    tt = timeit(run_t, warmup=1, iters=a.iters)
    want = run_t().numpy()
  seqs, lengths = np.asarray(seqs), np.asarray(lengths)
  same = np.array_equal(seqs[:, :prompt.shape[1] + lengths.max()], want)
  print("caption tokens identical:", same, "lengths", lengths.tolist())
  return {"case": f"BLIP beam search (3 beams, max_length 30), batch {a.caption_batch}", "unit": "s", "jaxlisa": tj,
          "torch": tt, "tokens_identical": bool(same), "generated_lengths": lengths.tolist()}


def main():
  a = parse_args(image_size=224, v_width=384, v_layers=6, q_width=384, q_layers=6, queries=32, batch=16, text_len=32,
                 caption_batch=4, iters=3)
  torch.set_num_threads(min(os.cpu_count() or 1, 2))
  t0 = time.perf_counter()
  extra = {"config": vars(a), "compile_s": {}}
  rows = [bench_stage1(a, extra), bench_caption(a, extra)]
  finish("blip", rows, extra, t0, [
      "PyTorch ITG recomputes the 32 query positions with the causal text (transformers' Q-Former has no "
      "past_key_values); jaxlisa reuses the query pass's K/V as LAVIS does",
      "PyTorch attention: eager (the Q-Former needs its UniLM mask as an additive 4D mask)"])


if __name__ == "__main__":
  main()
