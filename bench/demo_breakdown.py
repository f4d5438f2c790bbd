"""Where the LISA demo's validation gIoU comes from: per question kind, per scene size, and how
far apart the [SEG] embeddings of different questions are.

  python bench/demo_breakdown.py workdir/lisa_tiny              # latest checkpoint of a demo run
  python bench/demo_breakdown.py workdir/lisa_tiny --refer       # also refcoco-style val queries

For every ReasonSeg val query of the synthetic shapes data: the question kind (a shape's kind,
its colour, the largest shape), whether the predicted mask overlaps the target more than any
other shape ("picked right"), and the IoU with the best-matching shape. With one shape in the
scene picking is trivial; with two or three, picking at chance (1/2, 1/3) means the [SEG]
embedding does not carry the question. The embedding spread is the mean cosine similarity of
[SEG] embeddings of queries about different targets (near 1: collapsed).
"""

import argparse
import collections
import json
import os

import numpy as np

import _path  # noqa: F401,E402  pylint: disable=unused-import  (the repo root on sys.path)


def _tuples(x):
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def _iou(a, b):
  return float((a & b).sum() / max((a | b).sum(), 1))


def breakdown(workdir: str, val_dataset: str = "ReasonSeg|val") -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from jaxlisa import config as config_lib, parallel  # pylint: disable=import-outside-toplevel
  from jaxlisa.tasks import prepared_task  # pylint: disable=import-outside-toplevel
  from jaxlisa.training.trainer import Trainer  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict(_tuples(config_lib.read_config(workdir)))
  config.data.val_dataset = val_dataset
  trainer = Trainer(config, workdir, prepared_task(config, workdir))
  state, _, step = trainer.restore_or_init()
  task = trainer.task
  with open(os.path.join(task.base_dir, "shapes_meta.json")) as f:
    meta = json.load(f)
  scenes = {name: m for name, m in meta.items() if m["split"] == "val"}
  forward = jax.jit(lambda p, b: task.forward(p, b)[0])
  rows, embeds = [], []
  with parallel.use(trainer.mesh, trainer.rules):
    for batch in task.eval_data():
      out = forward(state.params, trainer.device_batch(batch))
      pred, emb = np.asarray(out.pred_masks) > 0, np.asarray(out.seg_embeddings)
      for i in np.flatnonzero(batch["image_valid"]):
        h, w = (int(x) for x in batch["orig_hw"][i])
        for j in range(pred.shape[1]):
          if not batch["mask_valid"][i, j, 0]:
            continue
          gt = batch["gt_masks"][i, j, 0, :h, :w] > 0
          p = pred[i, j, 0, :h, :w]
          text = task.tokenizer.decode([t for t in batch["input_ids"][i, j] if t > 0])
          scene = _find_scene(scenes, gt)
          masks = [_shape_mask(s, h, w) for s in scene["shapes"]]
          target = int(np.argmax([(m & gt).sum() for m in masks]))
          ious = [_iou(p, m) for m in masks]
          rows.append(dict(kind=_question_kind(text), n=len(masks), size=scene["shapes"][target]["size"],
                           giou=_iou(p, gt), picked=int(np.argmax(ious)) == target,
                           target=f'{scene["shapes"][target]["color"]} {scene["shapes"][target]["kind"]}'))
          embeds.append(emb[i, j, 0])
  report = {"workdir": workdir, "step": int(step), "val_dataset": val_dataset, "n": len(rows),
            "giou": float(np.mean([r["giou"] for r in rows]))}
  for key in ("kind", "n", "size"):
    groups = collections.defaultdict(list)
    for r in rows:
      groups[r[key]].append(r)
    report[f"by_{key}"] = {str(k): {"n": len(v), "giou": round(float(np.mean([r["giou"] for r in v])), 3),
                                    "picked_right": round(float(np.mean([r["picked"] for r in v])), 3)}
                           for k, v in sorted(groups.items())}
  e = np.asarray(embeds)
  e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  cos = e @ e.T
  targets = np.array([r["target"] for r in rows])
  report["seg_cosine_different_targets"] = round(float(cos[targets[:, None] != targets[None]].mean()), 4)
  return report


def _question_kind(text: str) -> str:
  if "colour" in text:
    return "color"
  if "most space" in text or "biggest" in text:
    return "largest"
  return "kind" if "Which shape" in text or "What here" in text else "refer"


def _shape_mask(shape: dict, h: int, w: int) -> np.ndarray:
  from jaxlisa.data import synthetic_shapes  # pylint: disable=import-outside-toplevel
  return synthetic_shapes.Shape(**shape).mask(h, w) > 0


def _find_scene(scenes: dict, gt: np.ndarray) -> dict:
  """The val scene one of whose shapes (or whose reasoning target union) is exactly gt."""
  h, w = gt.shape
  for scene in scenes.values():
    masks = [_shape_mask(s, h, w) for s in scene["shapes"]]
    if any(np.array_equal(m, gt) for m in masks):
      return scene
    if np.array_equal(np.any([masks[t] for t in scene.get("reason_targets", [])] or [np.zeros_like(gt)], 0), gt):
      return scene
  raise ValueError("a val mask matches no synthetic val scene")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--refer", action="store_true", help="also evaluate refcoco|unc|val (explicit names)")
  args = parser.parse_args()
  reports = [breakdown(args.workdir)]
  if args.refer:
    reports.append(breakdown(args.workdir, "refcoco|unc|val"))
  for r in reports:
    print(f"\n{r['val_dataset']} at step {r['step']}: gIoU {r['giou']:.3f} over {r['n']} queries; "
          f"[SEG] cosine between different targets {r['seg_cosine_different_targets']:.3f}")
    for key in ("by_kind", "by_n", "by_size"):
      for k, v in r[key].items():
        print(f"  {key[3:]:5s} {k:8s} n={v['n']:4d}  gIoU {v['giou']:.3f}  picked right {v['picked_right']:.2f}")
  print(json.dumps(reports))


if __name__ == "__main__":
  main()
