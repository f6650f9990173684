"""Training on N of a fold's labelled cases, as a learning curve over labelled cases needs: a seeded permutation
of the fold's training cases cut at N. One seed gives nested subsets (the 5 inside the 10, the 10 inside the 20),
and every trainer trained with the same N and seed gets the same cases, so that their scores pair. The fold's
validation cases are left as they are."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def labelled_subset(cases: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` of `cases`, the first of their permutation by `seed` (over the sorted names, so the order in which
    nnU-Net lists them does not matter)."""
    pool = sorted(cases)
    if not 1 <= count <= len(pool):
        raise ValueError(f"--train-cases {count}: the fold holds {len(pool)} training case(s); give a number from 1 "
                         f"to {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))
    return sorted(pool[i] for i in order[:count])


def restrict_training_cases(trainer, count: int, seed: int) -> list[str]:
    """Make nnU-Net's trainer train on `count` of its fold's training cases (`labelled_subset`); returns them.
    nnU-Net takes every case it trains and validates on from `do_split`, so the trainer's own is wrapped."""
    train_keys, val_keys = trainer.do_split()
    subset = labelled_subset(train_keys, count, seed)
    trainer.do_split = lambda: (list(subset), list(val_keys))
    return subset
