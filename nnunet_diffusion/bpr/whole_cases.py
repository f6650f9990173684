"""Batches of whole preprocessed cases for BPR training: the BPR reads whole slices (the full field of view), so it
is fed whole cases of nnU-Net's dataset instead of nnU-Net's patches."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch


class CaseDataset(Protocol):
    """What is read of nnU-Net's dataset classes (`nnUNetBaseDataset`)."""
    identifiers: list[str]

    def load_case(self, identifier: str) -> tuple: ...


class WholeCases:
    """Endless batches of whole preprocessed cases (first image channel), as (D0, D1, D2) tensors of their own
    shapes, each intensity-augmented with `augmentation` when given (a batchgeneratorsv2 transform, called as
    nnU-Net calls it: `augmentation(image=...)["image"]`). Cases are drawn with numpy's global RNG, as nnU-Net's
    loader draws its patches, so that seeding numpy makes a run repeatable."""

    def __init__(self, dataset: CaseDataset, batch_size: int, augmentation: Callable[..., dict] | None):
        self.dataset, self.batch_size, self.augmentation = dataset, batch_size, augmentation
        self.keys = list(dataset.identifiers)

    def __iter__(self) -> WholeCases:
        return self

    def __next__(self) -> dict:
        volumes = []
        for key in np.random.choice(self.keys, self.batch_size):
            image = torch.from_numpy(np.asarray(self.dataset.load_case(key)[0][:1], dtype=np.float32))
            if self.augmentation is not None:
                image = self.augmentation(image=image)["image"]
            volumes.append(image[0])
        return {"data": volumes}
