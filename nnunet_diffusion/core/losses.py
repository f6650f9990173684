"""Dice + focal loss, the loss of the recycling paper (Dice + 20·focal, γ = 2), and the per-sample cross-entropy of
the per-timestep loss log, honouring nnU-Net's label setups."""
from __future__ import annotations

import torch
from torch import nn


def true_label_log_probability(logits: torch.Tensor, target: torch.Tensor, activation: str,
                               ignore_label: int | None = None, has_ignore_channel: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per voxel log p(true label) (per region channel for sigmoid), the targets in the dice loss's format, and
    the mask of voxels that count (None: all).

    Softmax labels: target (B, 1, *S) label ids, voxels equal to `ignore_label` are excluded.
    Sigmoid regions: target (B, R[+1], *S); with `has_ignore_channel` the last channel marks ignored voxels.
    """
    if activation == "softmax":
        labels = target[:, 0].long()
        mask = None
        if ignore_label is not None:
            mask = (labels != ignore_label)
            labels = torch.where(mask, labels, torch.zeros_like(labels))
            mask = mask[:, None].float()
        return torch.log_softmax(logits.float(), 1).gather(1, labels[:, None]), labels[:, None], mask
    mask = None
    regions = target
    if has_ignore_channel:
        mask = 1 - target[:, -1:].float()
        regions = target[:, :-1]
    z, y = logits.float(), regions.float()
    return y * nn.functional.logsigmoid(z) + (1 - y) * nn.functional.logsigmoid(-z), regions, mask


def per_sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor, activation: str,
                             ignore_label: int | None = None, has_ignore_channel: bool = False) -> torch.Tensor:
    """Mean cross-entropy (BCE for regions) of every sample on its own, over the voxels that count: (B,)."""
    log_p, _, mask = true_label_log_probability(logits, target, activation, ignore_label, has_ignore_channel)
    if mask is None:
        return -log_p.flatten(1).mean(1)
    mask = mask.expand_as(log_p)
    return -(log_p * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


class DiceFocalLoss(nn.Module):
    """`dice(logits, target)` from nnU-Net plus `focal_weight` × focal loss on the same logits (label setups as
    in `true_label_log_probability`)."""

    def __init__(self, dice: nn.Module, activation: str, focal_weight: float = 20.0, gamma: float = 2.0,
                 ignore_label: int | None = None, has_ignore_channel: bool = False):
        super().__init__()
        self.dice = dice
        self.activation = activation
        self.focal_weight = focal_weight
        self.gamma = gamma
        self.ignore_label = ignore_label
        self.has_ignore_channel = has_ignore_channel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p, dice_target, mask = true_label_log_probability(logits, target, self.activation, self.ignore_label,
                                                              self.has_ignore_channel)
        dice = self.dice(logits, dice_target, loss_mask=mask)
        focal = -((1 - log_p.exp()) ** self.gamma) * log_p
        if mask is not None:
            focal = (focal * mask).sum() / mask.expand_as(focal).sum().clamp_min(1)
        else:
            focal = focal.mean()
        return dice + self.focal_weight * focal
