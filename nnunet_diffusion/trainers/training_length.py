"""Short schedules of the segmentation and fine-tuning trainers, in nnU-Net's naming (like its
`nnUNetTrainer_5epochs`), for quick runs and the fine-tuning budget study (docs/trainers.md). Kept apart from the
families, as nnU-Net keeps `variants/training_length/`, and written out one class each so that `grep` finds every
`-tr` name. Each sets only `training_epochs` (nnU-Net's 250 iterations per epoch stay), which
`nnUNetTrainerDiff.__init__` applies.
"""
from nnunet_diffusion.trainers.finetune import (nnUNetTrainerDiffRecycleFinetune, nnUNetTrainerDiffRecycleFinetuneFullLR,
                                               nnUNetTrainerStockContinue)
from nnunet_diffusion.trainers.registry import trainers_defined_in
from nnunet_diffusion.trainers.segmentation import (nnUNetTrainerDiff, nnUNetTrainerDiffSelfCond,
                                                    nnUNetTrainerDiffSelfCondNext, nnUNetTrainerDiffRecycleNext,
                                                    nnUNetTrainerDiffRecycle, nnUNetTrainerDiffRecycleNoTime,
                                                    nnUNetTrainerDiffRecycleFocal, nnUNetTrainerDiffDS,
                                                    nnUNetTrainerDiffRecycleDS, nnUNetTrainerDiffRecycleAllT,
                                                    nnUNetTrainerDiffImportance, nnUNetTrainerDiffRecycleImportance)


class nnUNetTrainerDiff_1epoch(nnUNetTrainerDiff):
    """nnUNetTrainerDiff for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiff_5epochs(nnUNetTrainerDiff):
    """nnUNetTrainerDiff for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffSelfCond_1epoch(nnUNetTrainerDiffSelfCond):
    """nnUNetTrainerDiffSelfCond for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffSelfCond_5epochs(nnUNetTrainerDiffSelfCond):
    """nnUNetTrainerDiffSelfCond for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffSelfCondNext_1epoch(nnUNetTrainerDiffSelfCondNext):
    """nnUNetTrainerDiffSelfCondNext for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffSelfCondNext_5epochs(nnUNetTrainerDiffSelfCondNext):
    """nnUNetTrainerDiffSelfCondNext for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleNext_1epoch(nnUNetTrainerDiffRecycleNext):
    """nnUNetTrainerDiffRecycleNext for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleNext_5epochs(nnUNetTrainerDiffRecycleNext):
    """nnUNetTrainerDiffRecycleNext for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycle_1epoch(nnUNetTrainerDiffRecycle):
    """nnUNetTrainerDiffRecycle for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycle_5epochs(nnUNetTrainerDiffRecycle):
    """nnUNetTrainerDiffRecycle for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleNoTime_1epoch(nnUNetTrainerDiffRecycleNoTime):
    """nnUNetTrainerDiffRecycleNoTime for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleNoTime_5epochs(nnUNetTrainerDiffRecycleNoTime):
    """nnUNetTrainerDiffRecycleNoTime for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleFocal_1epoch(nnUNetTrainerDiffRecycleFocal):
    """nnUNetTrainerDiffRecycleFocal for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleFocal_5epochs(nnUNetTrainerDiffRecycleFocal):
    """nnUNetTrainerDiffRecycleFocal for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffDS_1epoch(nnUNetTrainerDiffDS):
    """nnUNetTrainerDiffDS for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffDS_5epochs(nnUNetTrainerDiffDS):
    """nnUNetTrainerDiffDS for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleDS_1epoch(nnUNetTrainerDiffRecycleDS):
    """nnUNetTrainerDiffRecycleDS for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleDS_5epochs(nnUNetTrainerDiffRecycleDS):
    """nnUNetTrainerDiffRecycleDS for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleAllT_1epoch(nnUNetTrainerDiffRecycleAllT):
    """nnUNetTrainerDiffRecycleAllT for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleAllT_5epochs(nnUNetTrainerDiffRecycleAllT):
    """nnUNetTrainerDiffRecycleAllT for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffImportance_1epoch(nnUNetTrainerDiffImportance):
    """nnUNetTrainerDiffImportance for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffImportance_5epochs(nnUNetTrainerDiffImportance):
    """nnUNetTrainerDiffImportance for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleImportance_1epoch(nnUNetTrainerDiffRecycleImportance):
    """nnUNetTrainerDiffRecycleImportance for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleImportance_5epochs(nnUNetTrainerDiffRecycleImportance):
    """nnUNetTrainerDiffRecycleImportance for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleFinetune_1epoch(nnUNetTrainerDiffRecycleFinetune):
    """nnUNetTrainerDiffRecycleFinetune for 1 epoch of 250 iterations."""
    training_epochs = 1


class nnUNetTrainerDiffRecycleFinetune_2epochs(nnUNetTrainerDiffRecycleFinetune):
    """nnUNetTrainerDiffRecycleFinetune for 2 epochs of 250 iterations."""
    training_epochs = 2


class nnUNetTrainerDiffRecycleFinetune_5epochs(nnUNetTrainerDiffRecycleFinetune):
    """nnUNetTrainerDiffRecycleFinetune for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerDiffRecycleFinetune_10epochs(nnUNetTrainerDiffRecycleFinetune):
    """nnUNetTrainerDiffRecycleFinetune for 10 epochs of 250 iterations."""
    training_epochs = 10


class nnUNetTrainerDiffRecycleFinetuneFullLR_5epochs(nnUNetTrainerDiffRecycleFinetuneFullLR):
    """nnUNetTrainerDiffRecycleFinetuneFullLR for 5 epochs of 250 iterations."""
    training_epochs = 5


class nnUNetTrainerStockContinue_5epochs(nnUNetTrainerStockContinue):
    """nnUNetTrainerStockContinue for 5 epochs of 250 iterations."""
    training_epochs = 5


SHORT_SCHEDULE_TRAINERS = trainers_defined_in(globals())
