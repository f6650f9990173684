"""Fine-tuning trainers: a diffusion segmentation trainer that starts from a trained stock nnU-Net model
(`nnUNetTrainer` by default) of the same dataset, plans, configuration and fold, instead of from random weights;
and its control, `nnUNetTrainerStockContinue`, the stock model trained on at the same rate and schedule without
diffusion, which tells what recycling adds apart from what more training adds.

nnU-Net's `-pretrained_weights` cannot do this: its loader copies only tensors of equal name and shape and never
the segmentation heads (`.seg_layers.`), and it hands the file to nobody else. These trainers therefore find the
source model themselves, as nnU-Net's cascade finds the previous stage: `<nnUNet_results>/<dataset>/
<source_trainer>__<plans>__<configuration>/fold_<fold>/checkpoint_final.pth`, or the checkpoint that
`nnUNet_diffusion_finetune_from` names. The weights go in through `core.stock_start.load_stock_weights`, so the
first x0 logits equal the stock model's output (see that module). The short schedules of the budget study
(`_2epochs` … `_10epochs`) are in `training_length.py`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffusion.checkpoints import load_checkpoint
from nnunet_diffusion.core.stock_start import StockWeightsError, load_stock_weights
from nnunet_diffusion.trainer_support import mismatching_keys, unwrap
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_diffusion.trainers.registry import trainers_defined_in
from nnunet_diffusion.trainers.segmentation import (nnUNetTrainerDiff, nnUNetTrainerDiffRecycle,
                                                    nnUNetTrainerDiffSelfCond)

FINETUNE_FROM_VARIABLE = "nnUNet_diffusion_finetune_from"


class StockStart:
    """Mixin for a trainer: start the first epoch from the stock model's weights, at a lower learning rate over a
    shorter schedule (a resumed training, `--c`, continues from its own checkpoint instead)."""
    source_trainer = "nnUNetTrainer"
    source_checkpoint_name = "checkpoint_final.pth"
    finetune_initial_lr = 1e-3
    training_epochs = 250

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.finetune_initial_lr

    def source_checkpoint(self) -> Path:
        """The stock checkpoint to start from: `nnUNet_diffusion_finetune_from`, else the source trainer's model
        of this fold."""
        named = os.environ.get(FINETUNE_FROM_VARIABLE)
        if named:
            path = Path(named)
            if not path.is_file():
                raise FileNotFoundError(f"{FINETUNE_FROM_VARIABLE}={named} is not a file; name a stock model's "
                                        f"checkpoint_final.pth, or unset it to start from this fold's "
                                        f"{self.source_trainer} model")
            return path
        folder = Path(self.output_folder_base).parent / \
            f"{self.source_trainer}__{self.plans_manager.plans_name}__{self.configuration_name}" / \
            f"fold_{self.fold}"
        path = folder / self.source_checkpoint_name
        if not path.is_file():
            raise FileNotFoundError(
                f"{type(self).__name__} fine-tunes the {self.source_trainer} model of the same fold, and {path} does "
                f"not exist: train it first (nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name}"
                f" {self.fold} -p {self.plans_manager.plans_name}), or set {FINETUNE_FROM_VARIABLE} to the "
                f"checkpoint of a stock model trained with the same plans and configuration")
        return path

    def start_from_stock(self) -> Path:
        """Load the source checkpoint's weights into this trainer's network; refuse one of other plans,
        configuration, labels or input channels."""
        path = self.source_checkpoint()
        checkpoint = load_checkpoint(path, map_location="cpu")
        init_args = checkpoint.get("init_args", {})
        trained = (init_args.get("plans", {}).get("plans_name"), init_args.get("configuration"))
        wanted = (self.plans_manager.plans_name, self.configuration_name)
        if None not in trained and trained != wanted:
            raise StockWeightsError(f"{path} was trained with -p {trained[0]} -c {trained[1]}, this training uses "
                                    f"-p {wanted[0]} -c {wanted[1]}: fine-tune with the plans and configuration "
                                    f"of the stock model")
        try:
            self.load_source_weights(checkpoint["network_weights"])
        except StockWeightsError as error:
            raise StockWeightsError(f"{path} ({checkpoint.get('trainer_name', 'unknown trainer')}) does not fit "
                                    f"{type(self).__name__}: {error}") from None
        self.print_to_log_file(f"starting from the stock model {path}")
        return path

    def load_source_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """The stock weights into a diffusion network: its x0 logits start as the stock model's output."""
        load_stock_weights(unwrap(self.network), weights)

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:
            self.start_from_stock()


class nnUNetTrainerDiffFinetune(StockStart, nnUNetTrainerDiff):
    """Plain diffusion fine-tuned from this fold's nnUNetTrainer model."""


class nnUNetTrainerDiffRecycleFinetune(StockStart, nnUNetTrainerDiffRecycle):
    """Recycling (Fu et al.) fine-tuned from this fold's nnUNetTrainer model. Predicts with one DDIM step by default:
    its Dice after one step equals its Dice after five (docs/results/recycling_finetune.md), at a fifth of the
    time; `nnUNet_diffusion_steps=5` gives the paper's sampling."""
    default_sampling_steps = 1


class nnUNetTrainerDiffSelfCondFinetune(StockStart, nnUNetTrainerDiffSelfCond):
    """Self-conditioning fine-tuned from this fold's nnUNetTrainer model."""


class nnUNetTrainerDiffRecycleFinetuneFullLR(nnUNetTrainerDiffRecycleFinetune):
    """Recycling fine-tuned at nnU-Net's from-scratch initial learning rate, 1e-2 (the schedule's other lever)."""
    finetune_initial_lr = 1e-2


class nnUNetTrainerStockContinue(StockStart, PluginTrainer):
    """This fold's nnUNetTrainer model trained on without diffusion, at the fine-tuning rate and schedule: the
    control of every `…Finetune` trainer."""

    def load_source_weights(self, weights: dict[str, torch.Tensor]) -> None:
        problems = mismatching_keys(unwrap(self.network).state_dict(), weights)
        if problems:
            raise StockWeightsError(f"the networks differ ({'; '.join(problems)})")
        unwrap(self.network).load_state_dict(weights)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """nnU-Net's own switch: the network is nnU-Net's."""
        nnUNetTrainer.set_deep_supervision_enabled(self, enabled)


FINETUNE_TRAINERS = trainers_defined_in(globals())
