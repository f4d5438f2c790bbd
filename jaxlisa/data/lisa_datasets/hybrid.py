"""The training mixture (LISA utils/dataset.py HybridDataset): each sample picks a family with
probability proportional to `sample_rates` (9:3:3:1 for sem_seg, refer_seg, vqa, reason_seg),
then a random sample of that family. A sample is a function of (seed, index) alone; unreadable
samples are retried inside the picked family, so skips do not shift the rates.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from jaxlisa.data.lisa_datasets.common import MAX_ATTEMPTS, LisaSource, Sample
from jaxlisa.data.lisa_datasets.reason_seg import ReasonSegDataset
from jaxlisa.data.lisa_datasets.refer_seg import DEFAULT_REFER_SEG_DATA, ReferSegDataset
from jaxlisa.data.lisa_datasets.sem_seg import DEFAULT_SEM_SEG_DATA, SemSegDataset
from jaxlisa.data.lisa_datasets.vqa import VQADataset

DEFAULT_DATASET = "sem_seg||refer_seg||vqa||reason_seg"
DEFAULT_SAMPLE_RATES = (9, 3, 3, 1)


class HybridDataset(LisaSource):
  """Mixture of families; `len` is samples_per_epoch; item `index` = sample(index, rng(seed, index))."""

  name = "hybrid"

  def __init__(self, families: Sequence[LisaSource], sample_rates: Sequence[float] = DEFAULT_SAMPLE_RATES,
               samples_per_epoch: int = 500 * 8 * 2 * 10, seed: int = 0):
    if len(families) != len(sample_rates):
      raise ValueError(f"{len(families)} families for {len(sample_rates)} sample rates")
    rates = np.asarray(sample_rates, np.float64)
    if (rates < 0).any() or rates.sum() <= 0:
      raise ValueError(f"bad sample rates {sample_rates}")
    self.families, self.probs = list(families), rates / rates.sum()
    self.samples_per_epoch, self.seed = samples_per_epoch, seed

  def __len__(self):
    return self.samples_per_epoch

  def family_index(self, rng: np.random.Generator) -> int:
    return int(rng.choice(len(self.families), p=self.probs))

  def sample(self, key: int, rng: np.random.Generator,
             transform: Callable[[Sample], Any] | None = None, *, random_draw: bool = True,
             max_attempts: int = MAX_ATTEMPTS) -> Any:
    del random_draw  # the families are always drawn from at random, as LISA
    fam = self.families[self.family_index(rng)]
    return fam.sample(key, rng, transform, random_draw=True, max_attempts=max_attempts)

  def read(self, index: int, rng: np.random.Generator | None = None) -> Sample:
    """Sample `index` of the mixture (rng defaults to one seeded by (seed, index))."""
    rng = np.random.default_rng([self.seed, index]) if rng is None else rng
    return self.sample(index, rng)

  __getitem__ = read


def build_hybrid(base_dir: str, dataset: str = DEFAULT_DATASET,
                 sample_rates: Sequence[float] = DEFAULT_SAMPLE_RATES, *,
                 samples_per_epoch: int = 500 * 8 * 2 * 10, seed: int = 0,
                 num_classes_per_sample: int = 3, sem_seg_data: str = DEFAULT_SEM_SEG_DATA,
                 refer_seg_data: str = DEFAULT_REFER_SEG_DATA, vqa_data: str = "llava_instruct_150k",
                 reason_seg_data: str = "ReasonSeg|train", explanatory: float = 0.1,
                 class_lists=None) -> HybridDataset:
  """LISA's HybridDataset arguments (train_ds.py flags) -> a HybridDataset over base_dir."""
  builders = {
      "sem_seg": lambda: SemSegDataset(base_dir, sem_seg_data, num_classes_per_sample, class_lists),
      "refer_seg": lambda: ReferSegDataset(base_dir, refer_seg_data, num_classes_per_sample),
      "vqa": lambda: VQADataset(base_dir, vqa_data),
      "reason_seg": lambda: ReasonSegDataset(base_dir, reason_seg_data, num_classes_per_sample,
                                             explanatory),
  }
  names = dataset.split("||")
  unknown = [n for n in names if n not in builders]
  if unknown:
    raise ValueError(f"unknown datasets {unknown}; known: {sorted(builders)}")
  return HybridDataset([builders[n]() for n in names], sample_rates, samples_per_epoch, seed)
