"""Reproducibility: a training killed after an epoch and resumed with nnU-Net's `--c` continues exactly where it
stopped; seeded predictions repeat, unseeded ones vary, but far less than training changes them.

Where the randomness of a training comes from (nnUNet_n_proc_DA=0, CPU): torch's global RNG (timesteps and noise
of the strategies, the sampler noise of validation, torch-based augmentations), numpy's global RNG (nnU-Net's case
and patch sampling, numpy-based augmentations) and Python's `random`. nnU-Net's checkpoint holds none of their
states, so a resumed run matches an uninterrupted one only if all three are re-seeded from the epoch number at the
start of every epoch, as `_seed_every_epoch` does (docs/troubleshooting.md).
"""
from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffusion.core.sampling import ENV_SAMPLER, ENV_SEED, ENV_STEPS
from nnunet_diffusion.pretraining.network import BACKBONES
from nnunet_diffusion.trainers.finetune import FINETUNE_FROM_VARIABLE, FINETUNE_TRAINERS
from nnunet_diffusion.trainers.probes import OLD_NAME_TRAINERS, PROBE_TRAINERS, RandomInit
from nnunet_diffusion.trainers.segmentation import STRATEGY_TRAINERS
from nnunet_runs import CONFIGURATION, PLANS, Dataset, model_folder, train_in_process

FINETUNE_NAMES = {cls.__name__ for cls in FINETUNE_TRAINERS}
RESUME_FOLD = 2  # folds this module trains in, apart from those other modules use
MODEL_FOLD = 3
CPU = torch.device("cpu")
LOGGED = ("train_losses", "val_losses", "mean_fg_dice", "dice_per_class_or_region", "lrs")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seed_every_epoch(trainer: nnUNetTrainer, seed: int = 1234) -> None:
    """Make each epoch a function of (saved state, epoch number) alone by seeding every RNG it draws from."""
    start_epoch = trainer.on_train_epoch_start

    def seeded_start() -> None:
        random.seed(seed + trainer.current_epoch)
        np.random.seed(seed + trainer.current_epoch)
        torch.manual_seed(seed + trainer.current_epoch)
        start_epoch()
    trainer.on_train_epoch_start = seeded_start


def _two_epoch_trainer(dataset: Dataset, name: str) -> nnUNetTrainer:
    """As nnUNetv2_train builds it, with 1 iteration per epoch and a checkpoint_latest after every epoch."""
    trainer = get_trainer_from_args(str(dataset.dataset_id), CONFIGURATION, RESUME_FOLD, name, PLANS, device=CPU)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 1, 1
    trainer.save_every = 1
    trainer.logger.plot_progress_png = lambda folder: None  # ~2 s of PNG encoding per epoch, no part in resuming
    _seed_every_epoch(trainer)
    return trainer


def _same_tensors(a: dict, b: dict) -> bool:
    """Equal state dicts; entries that are not tensors (a module's extra state, e.g. a BPR's config) by ==."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def _same_optimizer_state(a: dict, b: dict) -> bool:
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and \
        all(_same_tensors(a["state"][k], b["state"][k]) for k in a["state"])


def _log(trainer: nnUNetTrainer) -> dict[str, list]:
    return {key: trainer.logger.local_logger.my_fantastic_logging[key] for key in LOGGED}


# Every trainer class of the plugin that has its own code path. Left out: the `_1epoch`/`_5epochs` and `_T<N>`
# copies, which differ from a trainer listed here only in a class attribute (epochs, diffusion timesteps).
RESUMED_TRAINERS = [
    *(cls.__name__ for cls in STRATEGY_TRAINERS), "nnUNetTrainerDiffRecycleNoTime", "nnUNetTrainerDiffRecycleFocal",
    "nnUNetTrainerDiffRecycleDS", "nnUNetTrainerDiffRecycleAllT", "nnUNetTrainerDiffRecycleImportance",
    "nnUNetTrainerBPR", "nnUNetTrainerDiffPretrain", "nnUNetTrainerDiffPretrainCoord", "nnUNetTrainerRestorePretrain",
    "nnUNetTrainerRestorePretrainCoord", *(cls.__name__ for cls in PROBE_TRAINERS + OLD_NAME_TRAINERS),
    "nnUNetTrainerDiffRecycleFinetune", "nnUNetTrainerStockContinue"]
PRETRAINED_STARTS = {cls.__name__: cls.backbone for cls in PROBE_TRAINERS + OLD_NAME_TRAINERS
                     if not issubclass(cls, RandomInit)}


def _dataset_of(trainer_name: str, request: pytest.FixtureRequest) -> Dataset:
    """Coordinate trainers read the demo dataset with coordinate channels, the others the demo dataset."""
    return request.getfixturevalue("coordinate_dataset" if "Coord" in trainer_name else "demo_dataset")


@pytest.fixture(scope="module")
def stock_checkpoint(demo_dataset) -> Path:
    """A one-iteration nnUNetTrainer model, the start of the fine-tuning trainers."""
    return Path(train_in_process(demo_dataset, "nnUNetTrainer", iterations=1, fold=MODEL_FOLD).output_folder) / \
        "checkpoint_final.pth"


@pytest.fixture(scope="module")
def pretraining_checkpoints(request) -> dict[str, Path]:
    """A one-iteration checkpoint of each pretraining trainer, for the probes' `-pretrained_weights`."""
    return {spec.pretraining_trainer: Path(train_in_process(_dataset_of(spec.pretraining_trainer, request),
                                                            spec.pretraining_trainer, iterations=1,
                                                            fold=MODEL_FOLD).output_folder)
            / "checkpoint_final.pth" for spec in BACKBONES}


def _pretrained_weights(trainer_name: str, request: pytest.FixtureRequest) -> str | None:
    """What `nnUNetv2_train -pretrained_weights` gets for this trainer: a probe or fine-tuning (not its random-init
    control) needs its backbone's checkpoint."""
    backbone = PRETRAINED_STARTS.get(trainer_name)
    if backbone is None:
        return None
    return str(request.getfixturevalue("pretraining_checkpoints")[backbone.pretraining_trainer])


@pytest.mark.parametrize("trainer_name", RESUMED_TRAINERS)
def test_a_run_killed_after_an_epoch_resumes_exactly_where_it_stopped(trainer_name, request, monkeypatch, tmp_path):
    dataset = _dataset_of(trainer_name, request)  # planned before nnUNet_n_proc_DA=0, which planning refuses
    pretrained_weights = _pretrained_weights(trainer_name, request)
    if trainer_name in FINETUNE_NAMES:  # a resumed fine-tuning continues from its checkpoint, not the stock model
        monkeypatch.setenv(FINETUNE_FROM_VARIABLE, str(request.getfixturevalue("stock_checkpoint")))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # augmentation in this process, from the RNGs seeded above
    monkeypatch.setenv(ENV_STEPS, "1")  # a cheaper validation; its noise still comes from torch's RNG
    fold_folder = model_folder(dataset, trainer_name) / f"fold_{RESUME_FOLD}"
    shutil.rmtree(fold_folder, ignore_errors=True)
    uninterrupted = _two_epoch_trainer(dataset, trainer_name)
    maybe_load_checkpoint(uninterrupted, continue_training=False, validation_only=False,
                          pretrained_weights_file=pretrained_weights)  # nnUNetv2_train ... [-pretrained_weights]
    after_first_epoch: dict = {}
    end_epoch = uninterrupted.on_epoch_end

    def end_epoch_and_keep_what_a_kill_would_leave() -> None:
        end_epoch()
        if uninterrupted.current_epoch == 1:
            shutil.copytree(fold_folder, tmp_path / "killed")
            after_first_epoch["weights"] = copy.deepcopy(uninterrupted.network.state_dict())
            after_first_epoch["optimizer"] = copy.deepcopy(uninterrupted.optimizer.state_dict())
            after_first_epoch["log"] = copy.deepcopy(_log(uninterrupted))
    uninterrupted.on_epoch_end = end_epoch_and_keep_what_a_kill_would_leave
    uninterrupted.run_training()

    shutil.rmtree(fold_folder)
    shutil.copytree(tmp_path / "killed", fold_folder)
    resumed = _two_epoch_trainer(dataset, trainer_name)  # a fresh process builds it the same way
    # nnUNetv2_train ... --c (nnU-Net refuses --c together with -pretrained_weights: the checkpoint holds them)
    maybe_load_checkpoint(resumed, continue_training=True, validation_only=False)
    assert resumed.current_epoch == 1
    assert _same_tensors(resumed.network.state_dict(), after_first_epoch["weights"])
    assert _same_optimizer_state(resumed.optimizer.state_dict(), after_first_epoch["optimizer"])
    assert _log(resumed) == after_first_epoch["log"]

    resumed.run_training()
    assert _log(resumed) == _log(uninterrupted)  # the second epoch's loss, Dice and learning rate, bit for bit
    assert _same_tensors(resumed.network.state_dict(), uninterrupted.network.state_dict())


# --- prediction -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_iteration_models(demo_dataset) -> dict[str, Path]:
    """Model folders of a self-conditioning and a recycling trainer; determinism needs no learning."""
    folders = {}
    for name in ("nnUNetTrainerDiffSelfCond", "nnUNetTrainerDiffRecycle"):
        train_in_process(demo_dataset, name, iterations=1, fold=MODEL_FOLD)
        folders[name] = model_folder(demo_dataset, name)
    return folders


def _predictor(folder: Path, fold: int) -> nnUNetPredictor:
    """nnUNetv2_predict's predictor, without test-time mirroring; it reads the sampler settings at every call."""
    predictor = nnUNetPredictor(use_mirroring=False, device=CPU, perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (fold,), "checkpoint_final.pth")
    return predictor


def _probabilities(predictor: nnUNetPredictor, image: Path) -> np.ndarray:
    ((_, probabilities),) = predictor.predict_from_files_sequential([[str(image)]], None, save_probabilities=True)
    return probabilities


@pytest.mark.parametrize("trainer_name,sampler", [("nnUNetTrainerDiffSelfCond", "ddim"),
                                                  ("nnUNetTrainerDiffSelfCond", "ddpm"),
                                                  ("nnUNetTrainerDiffRecycle", "ddim")])
def test_seeded_predictions_repeat_and_unseeded_ones_do_not(demo_dataset, one_iteration_models, trainer_name,
                                                            sampler, monkeypatch):
    image = sorted(demo_dataset.test_images.glob("*.nii.gz"))[0]
    monkeypatch.setenv(ENV_SAMPLER, sampler)
    monkeypatch.setenv(ENV_SEED, "7")
    predictor = _predictor(one_iteration_models[trainer_name], MODEL_FOLD)
    first, second = (_probabilities(predictor, image) for _ in range(2))
    monkeypatch.delenv(ENV_SEED)
    unseeded = _probabilities(predictor, image)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, unseeded)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_unseeded_predictions_vary_far_less_than_training_changes_them(demo_dataset, cli_trained_recycle,
                                                                       untrained_recycle_fold, sampler, monkeypatch):
    """Sampling noise must not be what decides a voxel: the seed-to-seed change of a trained model's probabilities
    has to stay an order of magnitude below the change that training made (measured: about 1000 times below)."""
    monkeypatch.setenv(ENV_SAMPLER, sampler)
    monkeypatch.delenv(ENV_SEED, raising=False)
    image = sorted(demo_dataset.test_images.glob("*.nii.gz"))[0]
    trained = _predictor(cli_trained_recycle, 0)
    first, second = (_probabilities(trained, image) for _ in range(2))
    untrained = _probabilities(_predictor(cli_trained_recycle, untrained_recycle_fold), image)
    spread, learned = np.abs(first - second).mean(), np.abs(first - untrained).mean()
    print(f"{sampler}: mean |Δp| of two unseeded runs {spread:.5f}, trained vs untrained {learned:.5f}")
    assert 0 < spread < learned / 10
