"""The fine-tuning learning rate: a linear warm-up, then nnU-Net's poly schedule over the remaining epochs.

This is the schedule of nnU-Net's own fine-tuning trainers (`PretrainedTrainer` for nnssl checkpoints,
`nnUNetTrainer_warmup`), which switch between two schedulers (`Lin_incr_LRScheduler`, `PolyLRScheduler_offset`)
and rebuild the optimiser at the switch, so resuming needs their own `load_checkpoint`. Here one scheduler gives
the rate as a function of the epoch alone; nnU-Net steps it with the epoch at every epoch start, so a run resumed
with `--c` (whose checkpoint holds the epoch) continues on the same schedule with nnU-Net's `load_checkpoint`.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler


def warmup_epochs(num_epochs: int, fraction: float) -> int:
    """The warm-up length: `fraction` of the epochs, at least one."""
    return max(1, round(fraction * num_epochs))


class WarmupPolyLRScheduler(_LRScheduler):
    """lr(e) = initial_lr · (e + 1) / W for the first W epochs, so that the first update is already small and the
    last warm-up epoch reaches initial_lr; then initial_lr · (1 − (e − W) / (N − W))^0.9, nnU-Net's poly schedule
    over the remaining N − W epochs. Stepped like nnU-Net's `PolyLRScheduler`: `step(current_epoch)`."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 exponent: float = 0.9):
        if not 1 <= warmup_steps <= max_steps:
            raise ValueError(f"the warm-up must last between 1 and {max_steps} epochs (the whole training), got "
                             f"{warmup_steps}")
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return self.initial_lr * (1 - progress) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        """Set the rate of epoch `current_step`; without it (the base class's first call), of the next epoch."""
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr_at(current_step)
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]
