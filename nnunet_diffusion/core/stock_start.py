"""Start a diffusion network from a trained stock nnU-Net network of the same plans (fine-tuning, Fu et al.'s
"recycling can be used to fine-tune any pre-existing segmentation network").

The denoiser is the stock planned UNet with extra input channels (the noisy mask, and the previous estimate for
self-conditioning), every normalisation wrapped in a FiLM layer and a time embedding. Copying the stock weights
into it, with the extra input channels' weights at zero and the FiLM projections at their zero start, makes the
denoiser's x0 logits equal the stock network's output for every x_t and t: fine-tuning starts from exactly the
stock model's predictions, and sampling from it gives them at every step.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.time_conditioning import FiLMNorm


class StockWeightsError(ValueError):
    """Stock weights that do not fit the diffusion network (other plans, classes or input channels)."""


def _film_paths(unet: nn.Module) -> set[str]:
    """Every name under which a FiLM layer sits (a norm can have two, e.g. `.norm` and `.all_modules.1`)."""
    return {name for name, module in unet.named_modules(remove_duplicate=False) if isinstance(module, FiLMNorm)}


def stock_name(key: str, film_paths: set[str]) -> str | None:
    """The stock network's name for a key of the denoiser's UNet; None for the FiLM projections (no counterpart)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in film_paths:
            if parts[i] == "to_scale_shift":
                return None
            return ".".join(parts[:i] + parts[i + 1:])  # drop the wrapper's `.norm`
    return key


def stock_image_channels(stock_weights: dict[str, torch.Tensor]) -> int:
    """Input channels of a stock network: those of the first stage's first convolution."""
    first = next((v for k, v in stock_weights.items() if k.startswith("encoder.") and k.endswith(".weight")
                  and v.ndim >= 4), None)
    if first is None:
        raise StockWeightsError("the weights hold no encoder convolution: not an nnU-Net UNet checkpoint")
    return first.shape[1]


def stock_num_outputs(stock_weights: dict[str, torch.Tensor]) -> int:
    """Segmentation outputs (classes, or regions) of a stock network: those of its full-resolution head."""
    heads = sorted((k for k in stock_weights if k.startswith("decoder.seg_layers.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[2]))
    if not heads:
        raise StockWeightsError("the weights hold no segmentation head (decoder.seg_layers): not an nnU-Net UNet "
                                "checkpoint")
    return stock_weights[heads[-1]].shape[0]


def load_stock_weights(network: DiffusionSegmentationNetwork, stock_weights: dict[str, torch.Tensor]) -> None:
    """Copy a stock network's weights (nnU-Net's `network_weights`) into the denoiser, in place: every stock
    tensor to its counterpart, the image part of the input convolution, zero for its mask channels; the FiLM
    projections and the time embedding keep their start (FiLM = identity). Raises StockWeightsError naming what
    does not fit."""
    if any(k.startswith("unet.") for k in stock_weights):
        raise StockWeightsError("the weights are a diffusion network's, not a stock nnU-Net one's: fine-tune from a "
                                "model trained with a non-diffusion trainer such as nnUNetTrainer")
    image_channels, outputs = stock_image_channels(stock_weights), stock_num_outputs(stock_weights)
    if image_channels != network.num_image_channels:
        raise StockWeightsError(f"the stock network reads {image_channels} image channel(s), this one "
                                f"{network.num_image_channels}: it was trained on another dataset")
    if outputs != network.num_mask_channels:
        raise StockWeightsError(f"the stock network segments {outputs} output(s), this one {network.num_mask_channels}"
                                f": it was trained with other labels")
    film = _film_paths(network.unet)
    own = network.unet.state_dict()
    loaded, problems = {}, []
    for key, value in own.items():
        name = stock_name(key, film)
        if name is None:
            continue
        if name not in stock_weights:
            problems.append(f"missing {name}")
            continue
        stock = stock_weights[name].to(value.dtype)
        if stock.shape == value.shape:
            loaded[key] = stock
        elif stock.ndim == value.ndim >= 3 and stock.shape[0] == value.shape[0] and stock.shape[2:] == \
                value.shape[2:] and stock.shape[1] == image_channels and value.shape[1] > image_channels:
            loaded[key] = torch.cat([stock, stock.new_zeros(value.shape[0], value.shape[1] - image_channels,
                                                            *value.shape[2:])], dim=1)  # the mask channels
        else:
            problems.append(f"{name}: shape {tuple(stock.shape)} != {tuple(value.shape)}")
    unused = sorted(set(stock_weights) - {stock_name(k, film) for k in own})
    problems += [f"unexpected {k}" for k in unused]
    if problems:
        raise StockWeightsError(f"the stock network's architecture differs from this one's (first mismatches: "
                                f"{'; '.join(problems[:5])}): it was trained with other plans or another "
                                f"configuration")
    network.unet.load_state_dict({**own, **loaded})
