"""The denoiser's UNet is nnU-Net's own planned architecture (PlainConvUNet, ResidualEncoderUNet, ...: same stages,
kernels, strides and features), built by nnU-Net's builder with extra input channels for the noisy mask."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # nnU-Net's plans handling pulls in its preprocessing stack; the builder is imported when used
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager


def build_unet_from_plans(plans_manager: PlansManager | None, configuration_manager: ConfigurationManager,
                          num_input_channels: int, num_output_channels: int, deep_supervision: bool) -> nn.Module:
    """nnU-Net's planned architecture with `num_input_channels` inputs (nnU-Net's own builder, reused). The
    configuration alone describes the network; the plans manager is taken for the trainers' signature."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=deep_supervision)
