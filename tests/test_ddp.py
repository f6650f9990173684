"""Multi-GPU training as nnU-Net does it (`-num_gpus 2`: DistributedDataParallel, find_unused_parameters=False),
simulated on the CPU with the gloo backend: every strategy's step must synchronise gradients and use every
trainable parameter, or DDP would hang or fail at the next forward."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.nn.parallel import DistributedDataParallel

from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.trainers.segmentation import STRATEGY_TRAINERS

WORLD_SIZE = 2
STEPS = 2  # DDP reports parameters that got no gradient only at the forward after the step that left them out
NUM_CLASSES = 3
PATCH = (8, 8, 8)
TINY_PLANS = {  # three stages, so the UNet has a lower-resolution segmentation head that DS-free training never uses
    "plans_name": "tiny", "configurations": {"tiny": {"patch_size": list(PATCH), "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_steps(trainer_class: type, rank: int) -> dict:
    """The trainer's own network and strategy, wrapped like nnU-Net's initialize() does, trained for STEPS steps."""
    plans_manager = PlansManager(TINY_PLANS)
    torch.manual_seed(0)
    network = trainer_class.build_network_architecture(plans_manager, plans_manager.get_configuration("tiny"), 1,
                                                       NUM_CLASSES, enable_deep_supervision=False)
    ddp = DistributedDataParallel(network)  # nnU-Net passes no find_unused_parameters, so it is False
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    codec = MaskCodec(NUM_CLASSES)
    strategy = trainer_class.strategy_class(DiffusionScheduler(make_alphas_cumprod(trainer_class.noise_schedule,
                                                                                   trainer_class.num_timesteps)), codec)
    torch.manual_seed(1 + rank)  # each rank its own batch, timesteps and noise, as with nnU-Net's per-rank loaders
    losses, unused = [], set()
    for _ in range(STEPS):
        image = torch.randn(2, 1, *PATCH)
        target = torch.randint(0, NUM_CLASSES, (2, 1, *PATCH))
        optimizer.zero_grad(set_to_none=True)
        final = strategy.final_pass(codec.encode(target), lambda x_t, t, condition: ddp(image, x_t, t, condition))
        loss = torch.nn.functional.cross_entropy(ddp(image, final.x_t, final.t, final.self_condition), target[:, 0])
        loss.backward()
        unused |= {name for name, p in network.named_parameters() if p.requires_grad and p.grad is None}
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "unused": sorted(unused),
            "parameters": torch.nn.utils.parameters_to_vector(network.parameters()).detach()}


def _train_on_rank(rank: int, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        torch.save({cls.__name__: _ddp_steps(cls, rank) for cls in STRATEGY_TRAINERS}, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_strategy_trains_under_ddp_with_synchronised_gradients(tmp_path: Path):
    mp.spawn(_train_on_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE)
    reports = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for trainer_class in STRATEGY_TRAINERS:
        first, second = (report[trainer_class.__name__] for report in reports)
        assert first["unused"] == second["unused"] == [], trainer_class.__name__
        assert first["losses"] != second["losses"], "the ranks must see different batches for the check to mean much"
        assert torch.equal(first["parameters"], second["parameters"]), \
            f"{trainer_class.__name__}: the ranks' weights diverged, so the gradients were not all-reduced"
