"""Stock model → recycling fine-tuning → stock `nnUNetv2_predict`: the fine-tuning trainer finds the fold's
nnUNetTrainer model by nnU-Net's folder convention (or `nnUNet_diffusion_finetune_from`), starts from exactly its
predictions, refuses a model of other plans, and its checkpoint predicts with the stock command."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.stock_start import StockWeightsError
from nnunet_diffusion.trainers.finetune import (FINETUNE_FROM_VARIABLE, FINETUNE_TRAINERS,
                                               nnUNetTrainerStockContinue)
from nnunet_runs import CONFIGURATION, PLANS, mean_dice, model_folder, predict, train_in_process

FOLD = 1
TRAINER = "nnUNetTrainerDiffRecycleFinetune_1epoch"
AGREES_WITH_STOCK = 0.9  # mean foreground Dice between the fine-tuned and the stock predictions


@pytest.fixture(scope="module")
def stock_fold(demo_dataset):
    train_in_process(demo_dataset, "nnUNetTrainer", iterations=5, fold=FOLD)
    return model_folder(demo_dataset, "nnUNetTrainer") / f"fold_{FOLD}" / "checkpoint_final.pth"


def _trainer(dataset, name: str = TRAINER, fold: int = FOLD):
    trainer = get_trainer_from_args(str(dataset.dataset_id), CONFIGURATION, fold, name, PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def _stock_network(trainer, checkpoint_path):
    stock = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, True)
    stock.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=False)["network_weights"])
    return stock.eval()


@pytest.mark.parametrize("name", [c.__name__ for c in FINETUNE_TRAINERS
                                  if "epoch" not in c.__name__ and c is not nnUNetTrainerStockContinue])
def test_fine_tuning_starts_from_exactly_the_stock_models_predictions(demo_dataset, stock_fold, name):
    trainer = _trainer(demo_dataset, name)
    assert trainer.start_from_stock() == stock_fold
    stock = _stock_network(trainer, stock_fold)
    image = torch.randn(2, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    network = trainer.network.eval()
    network.set_deep_supervision_enabled(False)
    with torch.no_grad():
        expected = stock(image)[0]
        sampled = network.sample(image, SamplerSettings(sampler="ddpm", steps=2, seed=1))
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)
    assert trainer.initial_lr == trainer.finetune_initial_lr == (1e-2 if "FullLR" in name else 1e-3)


def test_the_stock_continuation_starts_from_the_stock_weights_at_the_fine_tuning_schedule(demo_dataset, stock_fold):
    trainer = _trainer(demo_dataset, "nnUNetTrainerStockContinue_5epochs")
    assert trainer.start_from_stock() == stock_fold
    image = torch.randn(2, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        expected = _stock_network(trainer, stock_fold)(image)
        continued = trainer.network.eval()(image)
    for e, c in zip(expected, continued):
        torch.testing.assert_close(c, e)
    fine_tuning = _trainer(demo_dataset, "nnUNetTrainerDiffRecycleFinetune_5epochs")
    assert (trainer.initial_lr, trainer.num_epochs) == (fine_tuning.initial_lr, fine_tuning.num_epochs) == (1e-3, 5)


def test_a_stock_model_of_other_plans_or_a_missing_one_is_refused(demo_dataset, stock_fold, tmp_path, monkeypatch):
    checkpoint = torch.load(stock_fold, map_location="cpu", weights_only=False)
    checkpoint["init_args"]["configuration"] = "2d"
    other = tmp_path / "checkpoint_2d.pth"
    torch.save(checkpoint, other)
    monkeypatch.setenv(FINETUNE_FROM_VARIABLE, str(other))
    with pytest.raises(StockWeightsError, match=f"-c 2d, this training uses -p {PLANS} -c {CONFIGURATION}"):
        _trainer(demo_dataset).start_from_stock()
    monkeypatch.setenv(FINETUNE_FROM_VARIABLE, str(tmp_path / "nothing.pth"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        _trainer(demo_dataset).source_checkpoint()
    monkeypatch.delenv(FINETUNE_FROM_VARIABLE)
    with pytest.raises(FileNotFoundError, match="train it first"):
        _trainer(demo_dataset, fold=4).source_checkpoint()


def test_stock_model_then_fine_tuning_then_stock_nnunetv2_predict(demo_dataset, stock_fold, tmp_path):
    trainer = train_in_process(demo_dataset, TRAINER, fold=FOLD)
    logs = [p for p in os.listdir(trainer.output_folder) if p.startswith("training_log")]
    assert any(f"starting from the stock model {stock_fold}" in open(os.path.join(trainer.output_folder, p)).read()
               for p in logs)
    checkpoint = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert int(checkpoint["network_weights"]["default_sampling_steps"]) == 1  # the model's default, in its file
    checkpoint["network_weights"] = {k: v for k, v in checkpoint["network_weights"].items()
                                     if not k.startswith("default_")}
    torch.save(checkpoint, tmp_path / "written_before_defaults.pth")
    resumed = _trainer(demo_dataset)
    resumed.load_checkpoint(str(tmp_path / "written_before_defaults.pth"))  # what --c does
    assert resumed.network.default_sampling.steps == 1  # the trainer's default, not the old checkpoints' T
    predict(demo_dataset, TRAINER, tmp_path / "pred", fold=str(FOLD), extra=["--disable_tta"],
            env={"nnUNet_diffusion_seed": "3"})
    predict(demo_dataset, TRAINER, tmp_path / "one_step", fold=str(FOLD), extra=["--disable_tta"],
            env={"nnUNet_diffusion_seed": "3", "nnUNet_diffusion_steps": "1"})
    for image in sorted(demo_dataset.test_images.glob("*.nii.gz")):
        prediction = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace("_0000", "")))
        one_step = sitk.ReadImage(str(tmp_path / "one_step" / image.name.replace("_0000", "")))
        assert np.array_equal(sitk.GetArrayFromImage(prediction), sitk.GetArrayFromImage(one_step))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}
    # After two iterations at lr 1e-3 from exactly the stock model's predictions, the fine-tuned model still predicts
    # what the stock model does (measured: Dice 0.99 between the two); the same diffusion trainer trained as briefly
    # from random weights does not (0.28), and neither model is trained enough to score against the labels (~0.08).
    predict(demo_dataset, "nnUNetTrainer", tmp_path / "stock", fold=str(FOLD), extra=["--disable_tta"])
    assert mean_dice(demo_dataset, tmp_path / "pred", reference=tmp_path / "stock") > AGREES_WITH_STOCK


def test_the_stock_continuation_trains_from_the_stock_model_and_predicts_with_stock_nnunetv2_predict(
        demo_dataset, stock_fold, tmp_path):
    train_in_process(demo_dataset, "nnUNetTrainerStockContinue", fold=FOLD)
    predict(demo_dataset, "nnUNetTrainerStockContinue", tmp_path / "continued", fold=str(FOLD),
            extra=["--disable_tta"])
    predict(demo_dataset, "nnUNetTrainer", tmp_path / "stock", fold=str(FOLD), extra=["--disable_tta"])
    # two iterations at lr 1e-3 on from the stock weights: still the stock model's predictions
    assert mean_dice(demo_dataset, tmp_path / "continued", reference=tmp_path / "stock") > AGREES_WITH_STOCK
