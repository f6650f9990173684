"""Checkpoints the plugin reads are loaded without running their pickle: one carrying an executable pickle is refused
with a clear error before any of its code runs, and every kind of real checkpoint the suite writes still loads."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from nnunetv2.run.run_training import get_trainer_from_args

from nnunet_diffusion.bpr.model import load_bpr, load_bpr_from_nnunet_checkpoint
from nnunet_diffusion.checkpoints import UnsafeCheckpointError, load_checkpoint
from nnunet_diffusion.datasets.coordinate_channels import BPRCoordinates
from nnunet_diffusion.trainers.finetune import FINETUNE_FROM_VARIABLE, StockStart
from nnunet_runs import CONFIGURATION, PLANS, Dataset, train_in_process

FOLD = "all"  # apart from the folds other modules train in
REAL_TRAINERS = {"stock": "nnUNetTrainer", "diffusion": "nnUNetTrainerDiffRecycleImportance",
                 "pretraining": "nnUNetTrainerDiffPretrain"}


class RunsACommand:
    """What a malicious checkpoint carries: unpickling it runs a shell command (here: creating a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def executable_checkpoint(tmp_path) -> tuple[Path, Path]:
    """An nnU-Net-shaped checkpoint whose `init_args` run a command when unpickled, and the marker it would create."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer", "init_args": RunsACommand(marker)}, path)
    return path, marker


def assert_refused(read: Callable[[Path], object], path: Path, marker: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as refused:
        read(path)
    message = str(refused.value)
    print(message)
    assert message.startswith(f"{path} holds executable pickle content (it asks for posix.system)")
    assert "re-save it" in message
    assert not marker.exists()


def test_the_executable_checkpoint_really_runs_its_command_when_loaded_unsafely(executable_checkpoint):
    path, marker = executable_checkpoint
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("read", [load_checkpoint, load_bpr, load_bpr_from_nnunet_checkpoint, BPRCoordinates],
                         ids=["load_checkpoint", "load_bpr", "load_bpr_from_nnunet_checkpoint", "add-coordinates"])
def test_an_executable_checkpoint_is_refused_before_any_of_its_code_runs(executable_checkpoint, read):
    assert_refused(read, *executable_checkpoint)


@pytest.fixture(scope="module")
def real_checkpoints(demo_dataset: Dataset, bpr_checkpoint: Path) -> dict[str, Path]:
    """One checkpoint of every kind the suite trains, each after one iteration and one validation step of nnU-Net's
    loop (so its log holds numpy scalars); the diffusion trainer's also holds the plugin's timestep-sampler state."""
    trained = {kind: Path(train_in_process(demo_dataset, name, iterations=1, fold=FOLD).output_folder) /
               "checkpoint_final.pth" for kind, name in REAL_TRAINERS.items()}
    return {**trained, "bpr": bpr_checkpoint}


def assert_same(loaded, reference) -> None:
    """Equal structure, types and values (tensors exactly, NaN equal to NaN)."""
    if torch.is_tensor(reference):
        assert torch.equal(loaded, reference)
    elif isinstance(reference, dict):
        assert loaded.keys() == reference.keys()
        for key in reference:
            assert_same(loaded[key], reference[key])
    elif isinstance(reference, (list, tuple)):
        assert type(loaded) is type(reference) and len(loaded) == len(reference)
        for a, b in zip(loaded, reference):
            assert_same(a, b)
    else:
        assert type(loaded) is type(reference)
        assert loaded == reference or (loaded != loaded and reference != reference)


@pytest.mark.parametrize("kind", [*REAL_TRAINERS, "bpr"])
def test_every_real_checkpoint_loads_exactly_as_the_unsafe_loader_reads_it(real_checkpoints, kind):
    path = real_checkpoints[kind]
    loaded = load_checkpoint(path)
    assert_same(loaded, torch.load(path, map_location="cpu", weights_only=False))
    if kind == "diffusion":
        assert "timestep_sampler" in loaded  # the plugin's own entry (`plugin_checkpoint_state`)


def finetune_trainer(dataset: Dataset) -> StockStart:
    trainer = get_trainer_from_args(str(dataset.dataset_id), CONFIGURATION, FOLD, "nnUNetTrainerDiffRecycleFinetune",
                                     PLANS, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_the_plugins_readers_take_the_real_checkpoints(demo_dataset, real_checkpoints, monkeypatch):
    assert load_bpr_from_nnunet_checkpoint(real_checkpoints["bpr"]).config is not None
    assert BPRCoordinates(real_checkpoints["bpr"]).configuration_manager.patch_size
    monkeypatch.setenv(FINETUNE_FROM_VARIABLE, str(real_checkpoints["stock"]))
    assert finetune_trainer(demo_dataset).start_from_stock() == real_checkpoints["stock"]
    diffusion = get_trainer_from_args(str(demo_dataset.dataset_id), CONFIGURATION, FOLD, REAL_TRAINERS["diffusion"],
                                      PLANS, device=torch.device("cpu"))
    diffusion.load_checkpoint(str(real_checkpoints["diffusion"]))  # --c
    assert diffusion.current_epoch == 1


def test_a_resume_or_fine_tuning_from_an_executable_checkpoint_is_refused(demo_dataset, executable_checkpoint,
                                                                         monkeypatch):
    path, marker = executable_checkpoint
    monkeypatch.setenv(FINETUNE_FROM_VARIABLE, str(path))
    finetune = finetune_trainer(demo_dataset)
    assert_refused(lambda _: finetune.start_from_stock(), path, marker)
    assert_refused(lambda named: finetune.load_checkpoint(str(named)), path, marker)  # --c and --val
