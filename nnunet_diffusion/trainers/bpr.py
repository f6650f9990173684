"""nnUNetTrainerBPR: trains the 3-axis BPR inside nnU-Net on its preprocessed data, split and augmentations.

Run it like any trainer: `nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerBPR` (with nnUNet_extTrainer
pointing at a folder that re-exports this module). Labels are ignored. What differs from segmentation training:

- the BPR reads whole slices (the full field of view, resampled to its slice size), so the trainer feeds whole
  preprocessed cases (nnU-Net's dataset class, `load_case`; `bpr/whole_cases.py`) instead of nnU-Net's patches;
- no rotation, scaling or mirroring: they would scramble the anatomical order the BPR learns (nnU-Net's
  intensity augmentation is kept, applied to each whole case);
- the network is the BPR (intensity_normalization="none": nnU-Net has normalised the data already), Adam with
  nnU-Net's poly learning-rate schedule, no deep supervision, no torch.compile (the slice shapes change with the
  axis, so compiled graphs would be rebuilt all the time);
- each epoch logs only nnU-Net's logger keys: train_losses and val_losses are BPR losses, mean_fg_dice is the
  mean validation Spearman (ordering quality, so checkpoint_best tracks it) and dice_per_class_or_region the
  per-axis Spearman (axial, coronal, sagittal) on whole validation cases;
- the final validation scores whole validation cases (ordering_spearman) and writes bpr_validation.json into
  the fold folder instead of segmenting.

The patch size of the configuration is recorded in the BPR's config but plays no part in what it reads.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.bpr.body_coordinates import ordering_spearman
from nnunet_diffusion.bpr.model import AXIS_NAMES, DEFAULT_FEATURES_PER_STAGE, BPRConfig, BPRModel, resized_slices
from nnunet_diffusion.bpr.training import BPRLossWeights, bpr_loss, sample_equidistant_slices
from nnunet_diffusion.bpr.whole_cases import WholeCases
from nnunet_diffusion.trainer_support import unwrap
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_diffusion.trainers.coordinate_inputs import is_intensity_transform
from nnunet_diffusion.trainers.registry import trainers_defined_in
from nnunet_diffusion.utils import nanmean


def _nan_to_none(value: float) -> float | None:
    """JSON has no NaN: an undefined correlation is written as null."""
    return None if np.isnan(value) else float(value)


class nnUNetTrainerBPR(PluginTrainer):
    """Self-supervised 3-axis Body Part Regressor trained on whole slices of nnU-Net's preprocessed cases (see the
    module docstring).

    Settings are class attributes (nnU-Net rebuilds trainers from their __init__ signature, so no new
    __init__ parameters): subclass to change them, as nnUNetTrainerBPR_smoke does.
    """
    bpr_num_epochs: int = 100
    bpr_iterations_per_epoch: int = 250
    bpr_val_iterations_per_epoch: int = 20
    bpr_initial_lr: float = 1e-3
    bpr_num_slices: int = 4
    bpr_stacks_per_case: int = 4
    bpr_slice_size: tuple[int, int] = (64, 64)
    # The pretraining networks embed a BPR of the default architecture, so keep it unless you know otherwise.
    bpr_features_per_stage: tuple[int, ...] = DEFAULT_FEATURES_PER_STAGE
    bpr_loss_weights: BPRLossWeights = BPRLossWeights()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.bpr_initial_lr
        self.weight_decay = 0.0
        self.num_epochs = self.bpr_num_epochs
        self.num_iterations_per_epoch = self.bpr_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.bpr_val_iterations_per_epoch
        self.training_step_count = 0

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The BPR for this configuration's data; it reads the first image channel only."""
        patch_size = tuple(configuration_manager.patch_size)
        if len(patch_size) != 3:
            raise ValueError(f"nnUNetTrainerBPR needs a 3D configuration (e.g. 3d_fullres); this one has patch size "
                             f"{patch_size}")
        return BPRModel(BPRConfig(patch_size=patch_size, slice_size=cls.bpr_slice_size, intensity_normalization="none",
                                  features_per_stage=cls.bpr_features_per_stage,
                                  spacing=tuple(configuration_manager.spacing),
                                  plans_identifier=plans_manager.plans_name,
                                  data_identifier=configuration_manager.data_identifier))

    def initialize(self) -> None:
        """Also records the configuration name in the BPR's config (build_network_architecture cannot know it)."""
        super().initialize()
        model = self.bpr_model()
        model.config = dataclasses.replace(model.config, configuration=self.configuration_name)

    def bpr_model(self) -> BPRModel:
        """The BPR itself, without DDP or compile wrapper."""
        return unwrap(self.network)

    def _do_i_compile(self) -> bool:
        """Never: slice shapes change with the axis, so a compiled BPR would be recompiled over and over."""
        return False

    def _build_loss(self):
        return partial(bpr_loss, mm_per_unit=self.bpr_model().config.mm_per_unit, weights=self.bpr_loss_weights)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The BPR has no decoder and no deep supervision."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """No rotation and no mirroring (no mirroring at inference either)."""
        patch_size = tuple(self.configuration_manager.patch_size)
        self.inference_allowed_mirroring_axes = None
        self.print_to_log_file("BPR training: no rotation, scaling or mirroring (they would scramble the "
                               "anatomical order)")
        return (0.0, 0.0), False, patch_size, None

    @classmethod
    def get_training_transforms(cls, *args, **kwargs) -> BasicTransform:
        """nnU-Net's intensity augmentations only, with nnU-Net's parameters, taken from its own training transforms
        (the spatial ones would scramble the anatomical order); applied to whole cases, see WholeCases."""
        transforms = super().get_training_transforms(*args, **kwargs)
        return ComposeTransforms([t for t in transforms.transforms if is_intensity_transform(t)])

    @staticmethod
    def get_validation_transforms(
            deep_supervision_scales: Union[list, tuple, None],
            is_cascaded: bool = False,
            foreground_labels: Union[tuple[int, ...], list[int]] = None,
            regions: list[Union[list[int], tuple[int, ...], int]] = None,
            ignore_label: int = None,
    ) -> BasicTransform:
        """Nothing."""
        return ComposeTransforms([])

    def get_dataloaders(self) -> tuple[WholeCases, WholeCases]:
        """Whole preprocessed cases of nnU-Net's split, the training ones with the intensity augmentation."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        augmentation = self.get_training_transforms(self.configuration_manager.patch_size, (0.0, 0.0), None, None,
                                                    False)
        return WholeCases(dataset_tr, self.batch_size, augmentation), WholeCases(dataset_val, self.batch_size, None)

    def _sample_stacks(self, batch: dict, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """bpr_stacks_per_case stacks of equidistant whole slices per case, resampled to the BPR's slice size:
        (slices, step_mm)."""
        stacks, steps_mm = [], []
        # Drawn from numpy's global RNG, like nnU-Net's own patch sampling, so that seeding numpy makes a run
        # repeatable and a resumed run can match an uninterrupted one.
        rng = np.random.default_rng(np.random.randint(2 ** 31))
        spacing = float(self.configuration_manager.spacing[axis])
        size = self.bpr_model().config.slice_size
        for volume in batch["data"]:
            reference_std = float(volume.std())
            for _ in range(self.bpr_stacks_per_case):
                slices, gap = sample_equidistant_slices(volume, axis, self.bpr_num_slices, rng,
                                                        reference_std=reference_std)
                stacks.append(resized_slices(slices, size))
                steps_mm.append(gap * spacing)
        return torch.cat(stacks).to(self.device, non_blocking=True), torch.tensor(steps_mm, device=self.device)

    def _stack_scores(self, stacks: torch.Tensor, axis: int) -> torch.Tensor:
        with self.precision():
            scores = self.network(stacks, axis)
        return scores.float().reshape(-1, self.bpr_num_slices)

    def on_train_epoch_start(self) -> None:
        """The axis cycle follows the global step, which a run resumed with --c restores through the epoch."""
        self.training_step_count = self.current_epoch * self.num_iterations_per_epoch
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        """One axis per step (cycling), so every slice in the forward pass has the same shape."""
        axis = self.training_step_count % 3
        self.training_step_count += 1
        stacks, steps_mm = self._sample_stacks(batch, axis)
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.loss(self._stack_scores(stacks, axis), steps_mm)
        self.backward_and_step(loss)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """BPR loss over all three axes, and per-axis Spearman of every patch's slices."""
        losses = []
        for axis in range(3):
            stacks, steps_mm = self._sample_stacks(batch, axis)
            losses.append(float(self.loss(self._stack_scores(stacks, axis), steps_mm)[0]))
        model, spacing = self.bpr_model(), self.configuration_manager.spacing
        spearman = np.array([[ordering_spearman(model, volume, spacing)[name] for name in AXIS_NAMES]
                             for volume in batch["data"]])
        return {"loss": np.mean(losses), "spearman": spearman}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        outputs = collate_outputs(val_outputs)
        spearman = self.gather_from_ranks(outputs["spearman"].reshape(-1, 3))
        loss = float(np.mean(self.gather_from_ranks(outputs["loss"])))
        # An axis without any defined correlation (constant scores) counts as no ordering at all.
        per_axis = np.nan_to_num([nanmean(list(column)) for column in spearman.T], nan=0.0)
        self.log_validation(float(per_axis.mean()), per_axis.tolist(), loss)
        self.print_to_log_file("validation Spearman (axial, coronal, sagittal):", np.round(per_axis, 4).tolist())

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Per-axis Spearman of every validation case, written to bpr_validation.json (no segmentation)."""
        if self.local_rank != 0:
            return
        model = self.bpr_model().eval()
        _, val_keys = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, val_keys,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        per_case = {}
        for key in val_keys:
            data, _, _, _ = dataset.load_case(key)
            per_case[key] = ordering_spearman(model, np.asarray(data[0]), self.configuration_manager.spacing)
        mean_per_axis = {name: nanmean([case[name] for case in per_case.values()]) for name in AXIS_NAMES}
        summary = {
            "metric": "Spearman correlation between BPR slice scores and slice position per array axis "
                      "(nnunet_diffusion.bpr.training.ordering_spearman); null = undefined",
            "mean": _nan_to_none(nanmean(list(mean_per_axis.values()))),
            "mean_per_axis": {name: _nan_to_none(value) for name, value in mean_per_axis.items()},
            "per_case": {key: {name: _nan_to_none(value) for name, value in case.items()}
                         for key, case in per_case.items()},
            "bpr_config": model.config.to_dict(),
        }
        save_json(summary, join(self.output_folder, "bpr_validation.json"), sort_keys=False)
        self.print_to_log_file("BPR validation (Spearman per axis):", summary["mean_per_axis"])


class nnUNetTrainerBPR_smoke(nnUNetTrainerBPR):
    """2 short epochs with a small BPR: checks the nnU-Net integration end to end, not a useful BPR."""
    bpr_num_epochs = 2
    bpr_iterations_per_epoch = 6
    bpr_val_iterations_per_epoch = 2


__all__ = [cls.__name__ for cls in trainers_defined_in(globals())]
