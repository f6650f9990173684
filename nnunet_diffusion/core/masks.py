"""Mask space of the segmentation diffusion: x0 = 2·onehot − 1 (softmax labels) or 2·regions − 1 (sigmoid regions)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATIONS = ("softmax", "sigmoid")


def full_resolution(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits of a network output: with deep supervision nnU-Net's UNets return a list,
    highest resolution first."""
    return output[0] if isinstance(output, (list, tuple)) else output


def noisy_mask_to_input(x_t: torch.Tensor) -> torch.Tensor:
    """What the network sees of a noisy mask: clipped to [−1, 1] and mapped to [0, 1] (as in ImgX-DiffSeg)."""
    return (x_t.clamp(-1, 1) + 1) / 2


@dataclass(frozen=True)
class MaskCodec:
    """Converts nnU-Net targets to mask space and network logits back to x̂0."""
    num_channels: int
    activation: str = "softmax"
    ignore_label: int | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown mask activation {self.activation!r}; use one of {ACTIVATIONS}")

    def encode(self, target: torch.Tensor) -> torch.Tensor:
        """nnU-Net target → x0 in {−1, 1}.

        Softmax labels: target is (B, 1, *S) label ids; ignored voxels count as background here (the loss masks
        them out). Sigmoid regions: target is (B, R[+1], *S) binary, the optional last channel being nnU-Net's
        ignore mask, which is dropped.
        """
        if self.activation == "sigmoid":
            return target[:, :self.num_channels].float() * 2 - 1
        labels = target[:, 0].long()
        if self.ignore_label is not None:
            labels = torch.where(labels == self.ignore_label, torch.zeros_like(labels), labels)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_channels):
            raise ValueError(f"target holds label {int(labels.max())} but the network has {self.num_channels} "
                             f"output channels; check dataset.json 'labels'")
        # scatter into a contiguous (B, C, *S) tensor: one_hot(...).movedim(-1, 1) would be channels-last, and
        # that layout would spread through the noise, the network input and its first convolution (slower on CPU).
        x0 = torch.full((labels.shape[0], self.num_channels, *labels.shape[1:]), -1.0, device=labels.device)
        return x0.scatter_(1, labels.unsqueeze(1), 1.0)

    def probabilities(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        logits = full_resolution(logits).float()
        return torch.softmax(logits, 1) if self.activation == "softmax" else torch.sigmoid(logits)

    def hard_labels(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The label map of logits: argmax over classes, or logit > 0 per region."""
        logits = full_resolution(logits)
        return logits.argmax(1) if self.activation == "softmax" else logits > 0

    def decode(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Network logits (full resolution) → soft x̂0 in [−1, 1] (probabilities, not argmax: recycling feeds soft
        masks)."""
        return self.probabilities(logits) * 2 - 1
