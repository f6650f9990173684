"""Coordinates modulating every normalisation layer reach the features as absolute positions, where the same
coordinates given only as input channels are removed by the per-tile InstanceNorm up to border artefacts; the
modulation adds no dependence on the tile a voxel is seen in."""
from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_diffusion.core.time_conditioning import FiLMNorm, TimeContext, add_time_conditioning, conditioned_on
from nnunet_diffusion.pretraining.coordinate_modulation import (CoordinateContext, CoordinateNorm,
                                                                add_coordinate_modulation,
                                                                conditioned_on_coordinates)

SHIFT = 1.0  # 100 mm: the case lies 10 cm higher
INIT_STD = 0.1


def _unet(seed: int = 0) -> PlainConvUNet:
    torch.manual_seed(seed)
    return PlainConvUNet(1 + 3, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), 2, 4, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU)


def _coordinates(shape, offset=(2.0, 0.3, -0.1)) -> torch.Tensor:
    """Linear coordinate ramps (units of 100 mm, 4 mm voxels) with a per-case offset."""
    axes = [torch.arange(n, dtype=torch.float32) * 0.04 + o for n, o in zip(shape, offset)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _forward(unet, image, coordinates, context=None):
    with torch.no_grad():
        if context is None:
            return unet(torch.cat([image, coordinates], 1))
        with conditioned_on_coordinates(context, coordinates):
            return unet(torch.cat([image, coordinates], 1))


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _conditioned(seed: int = 0):
    unet, context = _unet(seed), CoordinateContext()
    wrapped = add_coordinate_modulation(unet, context, INIT_STD)
    assert wrapped == sum(isinstance(m, torch.nn.InstanceNorm3d) for m in _unet().modules())
    return unet, context


def test_a_constant_coordinate_shift_changes_the_modulated_features():
    """As input channels a constant shift is removed by InstanceNorm except where zero padding at the tile border
    breaks it (a border artefact, not a position); the modulation acts after the statistics."""
    image = torch.randn(1, 1, 32, 48, 48)
    coordinates = _coordinates(image.shape[2:])
    plain = _unet()
    input_only = _relative(_forward(plain, image, coordinates + SHIFT), _forward(plain, image, coordinates))
    unet, context = _conditioned()
    modulated = _relative(_forward(unet, image, coordinates + SHIFT, context), _forward(unet, image, coordinates,
                                                                                        context))
    print(f"\nrelative feature change for a 100 mm shift: input channels {input_only:.1e}, modulation {modulated:.3f}")
    assert modulated > 0.2


def test_the_modulation_adds_no_dependence_on_the_tile():
    """The same voxels seen in two overlapping tiles: how much their features differ (InstanceNorm's per-tile
    statistics make them differ in any nnU-Net network) is the same with and without the modulation."""
    image = torch.randn(1, 1, 16, 40, 40)
    coordinates = _coordinates(image.shape[2:])
    first, second = (slice(None), slice(None), slice(None), slice(0, 32), slice(0, 32)), \
        (slice(None), slice(None), slice(None), slice(8, 40), slice(8, 40))
    shared_in_first, shared_in_second = (..., slice(12, 20), slice(12, 20)), (..., slice(4, 12), slice(4, 12))

    def tile_dependence(unet, context):
        a = _forward(unet, image[first], coordinates[first], context)[shared_in_first]
        b = _forward(unet, image[second], coordinates[second], context)[shared_in_second]
        return _relative(a, b)
    plain = tile_dependence(_unet(), None)
    modulated = tile_dependence(*_conditioned())
    print(f"\nsame voxels, two tiles: relative feature difference {plain:.3f} plain, {modulated:.3f} modulated")
    assert modulated < 1.25 * plain


def test_time_film_and_coordinate_modulation_stack():
    unet, time_context = _unet(), TimeContext()
    add_time_conditioning(unet, 16, time_context)
    context = CoordinateContext()
    add_coordinate_modulation(unet, context, INIT_STD)
    norms = [m for m in unet.modules() if isinstance(m, CoordinateNorm)]
    assert norms and all(isinstance(m.norm, FiLMNorm) for m in norms)
    image = torch.randn(2, 1, 8, 16, 16)
    with conditioned_on(time_context, torch.randn(2, 16)):
        out = _forward(unet, image, _coordinates(image.shape[2:]).expand(2, -1, -1, -1, -1), context)
    assert out.shape == (2, 4, 8, 16, 16) and torch.isfinite(out).all()
