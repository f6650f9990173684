"""Dice + focal loss, the loss of the recycling paper (Dice + 20·focal, γ = 2), honouring nnU-Net's label setups."""
from __future__ import annotations

import torch
from torch import nn


class DiceFocalLoss(nn.Module):
    """`dice(logits, target)` from nnU-Net plus `focal_weight` × focal loss on the same logits.

    Softmax labels: target (B, 1, *S) label ids, voxels equal to `ignore_label` are excluded.
    Sigmoid regions: target (B, R[+1], *S); with `has_ignore_channel` the last channel marks ignored voxels.
    """

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
        if self.activation == "softmax":
            labels = target[:, 0].long()
            mask = None
            if self.ignore_label is not None:
                mask = (labels != self.ignore_label)
                labels = torch.where(mask, labels, torch.zeros_like(labels))
                mask = mask[:, None].float()
            dice = self.dice(logits, labels[:, None], loss_mask=mask)
            log_p = torch.log_softmax(logits.float(), 1).gather(1, labels[:, None])
        else:
            mask = None
            regions = target
            if self.has_ignore_channel:
                mask = 1 - target[:, -1:].float()
                regions = target[:, :-1]
            dice = self.dice(logits, regions, loss_mask=mask)
            z = logits.float()
            y = regions.float()
            log_p = y * nn.functional.logsigmoid(z) + (1 - y) * nn.functional.logsigmoid(-z)
        focal = -((1 - log_p.exp()) ** self.gamma) * log_p
        if mask is not None:
            focal = (focal * mask).sum() / mask.expand_as(focal).sum().clamp_min(1)
        else:
            focal = focal.mean()
        return dice + self.focal_weight * focal
