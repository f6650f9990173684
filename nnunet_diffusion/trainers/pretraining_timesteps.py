"""The timestep ablation of coordinate-guided diffusion pretraining (docs/pretraining.md), kept apart from the
family as the short schedules are: each class sets only T, the number of DDPM steps over which the linear β runs
(1e-4 … 0.02), and so the largest noise level the pretext task sees; the base classes in `pretraining.py` use
T = 10.
"""
from nnunet_diffusion.trainers.pretraining import nnUNetTrainerDiffPretrainCoord, nnUNetTrainerDiffPretrainCoordX0
from nnunet_diffusion.trainers.registry import trainers_defined_in


class nnUNetTrainerDiffPretrainCoord_T1(nnUNetTrainerDiffPretrainCoord):
    """nnUNetTrainerDiffPretrainCoord with T = 1 (ᾱ at the last step 0.9999), for the timestep ablation."""
    num_timesteps = 1


class nnUNetTrainerDiffPretrainCoord_T3(nnUNetTrainerDiffPretrainCoord):
    """nnUNetTrainerDiffPretrainCoord with T = 3 (ᾱ at the last step 0.97), for the timestep ablation."""
    num_timesteps = 3


class nnUNetTrainerDiffPretrainCoord_T30(nnUNetTrainerDiffPretrainCoord):
    """nnUNetTrainerDiffPretrainCoord with T = 30 (ᾱ at the last step 0.74), for the timestep ablation."""
    num_timesteps = 30


class nnUNetTrainerDiffPretrainCoord_T100(nnUNetTrainerDiffPretrainCoord):
    """nnUNetTrainerDiffPretrainCoord with T = 100 (ᾱ at the last step 0.36), for the timestep ablation."""
    num_timesteps = 100


class nnUNetTrainerDiffPretrainCoord_T1000(nnUNetTrainerDiffPretrainCoord):
    """nnUNetTrainerDiffPretrainCoord with T = 1000 (ᾱ at the last step 4e-5, pure noise): timestep ablation."""
    num_timesteps = 1000


class nnUNetTrainerDiffPretrainCoordX0_T1(nnUNetTrainerDiffPretrainCoordX0):
    """nnUNetTrainerDiffPretrainCoordX0 with T = 1 (ᾱ at the last step 0.9999), for the timestep ablation."""
    num_timesteps = 1


class nnUNetTrainerDiffPretrainCoordX0_T3(nnUNetTrainerDiffPretrainCoordX0):
    """nnUNetTrainerDiffPretrainCoordX0 with T = 3 (ᾱ at the last step 0.97), for the timestep ablation."""
    num_timesteps = 3


class nnUNetTrainerDiffPretrainCoordX0_T30(nnUNetTrainerDiffPretrainCoordX0):
    """nnUNetTrainerDiffPretrainCoordX0 with T = 30 (ᾱ at the last step 0.74), for the timestep ablation."""
    num_timesteps = 30


class nnUNetTrainerDiffPretrainCoordX0_T100(nnUNetTrainerDiffPretrainCoordX0):
    """nnUNetTrainerDiffPretrainCoordX0 with T = 100 (ᾱ at the last step 0.36), for the timestep ablation."""
    num_timesteps = 100


class nnUNetTrainerDiffPretrainCoordX0_T1000(nnUNetTrainerDiffPretrainCoordX0):
    """nnUNetTrainerDiffPretrainCoordX0 with T = 1000 (ᾱ at the last step 4e-5, pure noise): timestep ablation."""
    num_timesteps = 1000


TIMESTEP_VARIANTS = trainers_defined_in(globals())
