"""A diffusion network started from a stock nnU-Net network's weights predicts exactly what the stock network
predicts (2D and 3D, PlainConvUNet and ResEnc, with and without deep supervision in the source, plain diffusion and
self-conditioning), and weights that do not fit are refused with what differs."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.stock_start import StockWeightsError, load_stock_weights

OPS = {2: (torch.nn.Conv2d, torch.nn.InstanceNorm2d), 3: (torch.nn.Conv3d, torch.nn.InstanceNorm3d)}


def _unet(architecture: str, dim: int, input_channels: int, classes: int, deep_supervision: bool,
          features=(4, 8, 16)):
    conv, norm = OPS[dim]
    common = dict(conv_bias=True, norm_op=norm, norm_op_kwargs={"affine": True, "eps": 1e-5},
                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    strides = (1,) + (2,) * (len(features) - 1)
    if architecture == "PlainConvUNet":
        return PlainConvUNet(input_channels, len(features), features, conv, 3, strides, 2, classes, 1, **common)
    return ResidualEncoderUNet(input_channels, len(features), features, conv, 3, strides, strides, classes, 1,
                               **common)


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Weights as after training: norm scales and biases away from their 1/0 start, heads not at init."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.3)
    return module


def _pair(architecture="PlainConvUNet", dim=3, source_deep_supervision=True, self_conditioning=False,
          image_channels=2, classes=3, x0_deep_supervision=False):
    torch.manual_seed(0)
    stock = _randomised(_unet(architecture, dim, image_channels, classes, source_deep_supervision)).eval()
    mask_channels = classes * (2 if self_conditioning else 1)
    unet = _unet(architecture, dim, image_channels + mask_channels, classes, x0_deep_supervision)
    diffusion = DiffusionSegmentationNetwork(unet, image_channels, MaskCodec(classes),
                                             make_alphas_cumprod("linear", 5), self_conditioning=self_conditioning)
    return stock, diffusion


def _full_resolution(output):
    return output[0] if isinstance(output, (list, tuple)) else output


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("source_deep_supervision", [True, False])
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_first_x0_logits_equal_the_stock_networks_output(architecture, dim, source_deep_supervision,
                                                         self_conditioning):
    stock, diffusion = _pair(architecture, dim, source_deep_supervision, self_conditioning)
    load_stock_weights(diffusion, stock.state_dict())
    image = torch.randn(2, 2, *(16,) * dim)
    with torch.no_grad():
        expected = _full_resolution(stock(image))
        for t in (0, 4):
            x_t = torch.randn(2, 3, *(16,) * dim)
            condition = torch.randn_like(x_t) if self_conditioning else None
            got = diffusion.denoise(image, x_t, torch.full((2,), t), condition)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        diffusion.eval()
        sampled = diffusion.sample(image, SamplerSettings(sampler="ddim", steps=3, seed=0))
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)


def test_the_started_network_trains_its_new_parts():
    """Mask channels, FiLM projections and (from the second step) the time embedding get gradients, so
    fine-tuning can learn to use the noisy mask and t."""
    stock, diffusion = _pair(dim=2)
    load_stock_weights(diffusion, stock.state_dict())
    image, x_t = torch.randn(2, 2, 16, 16), torch.randn(2, 3, 16, 16)
    diffusion.denoise(image, x_t, torch.tensor([1, 3])).square().mean().backward()
    first = diffusion.unet.encoder.stages[0][0].convs[0].conv.weight
    assert first.grad[:, 2:].abs().sum() > 0
    film = [m for m in diffusion.modules() if type(m).__name__ == "FiLMNorm"]
    assert all(m.to_scale_shift.weight.grad.abs().sum() > 0 for m in film[:3])


@pytest.mark.parametrize("change, message", [
    (dict(image_channels=1), "reads 1 image channel"),
    (dict(classes=2), "segments 2 output"),
])
def test_weights_of_another_dataset_or_labels_are_refused(change, message):
    stock, _ = _pair(**change)
    _, diffusion = _pair()
    with pytest.raises(StockWeightsError, match=message):
        load_stock_weights(diffusion, stock.state_dict())


def test_weights_of_another_architecture_or_of_a_diffusion_network_are_refused():
    torch.manual_seed(0)
    _, diffusion = _pair(dim=2)
    deeper = _unet("PlainConvUNet", 2, 2, 3, True, features=(4, 8, 16, 32))
    with pytest.raises(StockWeightsError, match="architecture differs.*other plans or another configuration"):
        load_stock_weights(diffusion, deeper.state_dict())
    wider = _unet("PlainConvUNet", 2, 2, 3, True, features=(8, 8, 16))
    with pytest.raises(StockWeightsError, match="shape"):
        load_stock_weights(diffusion, wider.state_dict())
    with pytest.raises(StockWeightsError, match="diffusion network's"):
        load_stock_weights(diffusion, diffusion.state_dict())
