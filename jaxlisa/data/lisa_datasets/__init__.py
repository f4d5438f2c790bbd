"""LISA's training and validation data, one module per family, read from the native on-disk
layouts (see each module). Every family yields per-image samples (common.py docstring)."""

from jaxlisa.data.lisa_datasets.common import (BadSample, LisaSource, make_sample,
                                               render_conversations, reset_skip_counts, seg_counts,
                                               skip_counts)
from jaxlisa.data.lisa_datasets.hybrid import HybridDataset, build_hybrid
from jaxlisa.data.lisa_datasets.reason_seg import ReasonSegDataset, get_mask_from_json
from jaxlisa.data.lisa_datasets.refer_seg import Refer, ReferSegDataset
from jaxlisa.data.lisa_datasets.sem_seg import SemSegDataset
from jaxlisa.data.lisa_datasets.val import ValDataset
from jaxlisa.data.lisa_datasets.vqa import VQADataset

__all__ = ["BadSample", "LisaSource", "make_sample", "render_conversations", "reset_skip_counts",
           "seg_counts", "skip_counts", "HybridDataset", "build_hybrid", "ReasonSegDataset",
           "get_mask_from_json", "Refer", "ReferSegDataset", "SemSegDataset", "ValDataset",
           "VQADataset"]
