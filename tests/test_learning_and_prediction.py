"""The recycling trainer learns through the stock CLI, and nnU-Net's whole prediction path works on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_runs import mean_dice, predict, run, train_in_process

TRAINER = "nnUNetTrainerDiffRecycle_1epoch"
# Mean foreground Dice on the held-out cases that training must reach and an untrained network misses. Training is
# not seeded (nnU-Net's is not), so the threshold leaves room for its spread: 250 iterations gave 0.85-0.92 in 20
# runs on a 2-core machine, and 0.48 once in CI. An untrained network scores about 0.06 and cannot much exceed 0.1
# (a mask of all one class scores 2p/(1+p) for an organ of volume fraction p <= 0.05).
LEARNED_DICE = 0.3


def test_recycling_learns_the_task_that_an_untrained_network_fails(demo_dataset, cli_trained_recycle,
                                                                   untrained_recycle_fold, tmp_path):
    predict(demo_dataset, TRAINER, tmp_path / "trained", env={"nnUNet_diffusion_seed": "0"})
    predict(demo_dataset, TRAINER, tmp_path / "untrained", fold=str(untrained_recycle_fold), env={"nnUNet_diffusion_seed": "0"})
    trained, untrained = mean_dice(demo_dataset, tmp_path / "trained"), mean_dice(demo_dataset, tmp_path / "untrained")
    print(f"held-out mean Dice: trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained > LEARNED_DICE > untrained


def test_the_trainers_own_final_validation_ran_unchanged(cli_trained_recycle):
    summary = json.loads((cli_trained_recycle / "fold_0" / "validation" / "summary.json").read_text())
    assert summary["foreground_mean"]["Dice"] > LEARNED_DICE  # nnU-Net's own score of its validation cases (0.96)
    assert (cli_trained_recycle / "fold_0" / "progress.png").is_file()


def test_sliding_window_over_a_larger_image_with_mirroring_and_probabilities(demo_dataset, cli_trained_recycle,
                                                                             tmp_path):
    """A 44x40x36 image needs 2x2x2 tiles of 32³; test-time mirroring is on (nnU-Net's default); 2 sampling
    steps keep the 8 tiles x 8 mirrors affordable on a CPU."""
    (tmp_path / "in").mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(36, 40, 44)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "in" / "big_0000.nii.gz"))
    predict(demo_dataset, TRAINER, tmp_path / "out", inputs=tmp_path / "in", extra=["--save_probabilities"],
            env={"nnUNet_diffusion_steps": "2"})
    assert sitk.ReadImage(str(tmp_path / "out" / "big.nii.gz")).GetSize() == (44, 40, 36)
    probabilities = np.load(tmp_path / "out" / "big.npz")["probabilities"]
    assert probabilities.shape == (3, 36, 40, 44)
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(0), 1, atol=1e-3)


def test_seeded_predictions_are_identical_and_unseeded_ones_vary(demo_dataset, cli_trained_recycle, tmp_path):
    outputs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", None)):
        env = {"nnUNet_diffusion_sampler": "ddpm", **({"nnUNet_diffusion_seed": seed} if seed else {})}
        predict(demo_dataset, TRAINER, tmp_path / name, extra=["--disable_tta", "--save_probabilities"], env=env)
        outputs[name] = np.load(tmp_path / name / "diffusiondemo_ts_000.npz")["probabilities"]
    assert np.array_equal(outputs["a"], outputs["b"])
    assert not np.array_equal(outputs["a"], outputs["c"])


@pytest.mark.parametrize("env,message", [
    ({"nnUNet_diffusion_steps": "6"}, "nnUNet_diffusion_steps=6 exceeds the 5 timesteps"),
    ({"nnUNet_diffusion_sampler": "euler"}, "unknown sampler 'euler'"),
])
def test_invalid_sampler_settings_stop_prediction_with_a_clear_message(demo_dataset, cli_trained_recycle, tmp_path,
                                                                       env, message):
    result = predict(demo_dataset, TRAINER, tmp_path / "out", extra=["--disable_tta"], env=env, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr  # one line, raised when the predictor builds the network
    assert result.stderr.strip().splitlines()[-1].startswith("nnunet-diffusion: ")
    assert not list((tmp_path / "out").glob("*.nii.gz"))  # stopped before any case was predicted


def test_fewer_ddpm_steps_and_ensembling_with_the_stock_trainer(demo_dataset, cli_trained_recycle, tmp_path):
    train_in_process(demo_dataset, "nnUNetTrainer", iterations=2)
    predict(demo_dataset, "nnUNetTrainer", tmp_path / "stock", extra=["--disable_tta", "--save_probabilities"])
    predict(demo_dataset, TRAINER, tmp_path / "diff", extra=["--disable_tta", "--save_probabilities"],
            env={"nnUNet_diffusion_sampler": "ddpm", "nnUNet_diffusion_steps": "3"})
    run(["nnUNetv2_ensemble", "-i", str(tmp_path / "stock"), str(tmp_path / "diff"), "-o", str(tmp_path / "ens"),
         "-np", "1", "--save_npz"])
    # the stock model had 2 iterations (measured Dice 0.02), so the ensemble scores as the trained diffusion model
    # does (0.90 both); a broken diffusion model or a broken average would miss the floor
    assert mean_dice(demo_dataset, tmp_path / "ens") > LEARNED_DICE
    ensembled = np.load(tmp_path / "ens" / "diffusiondemo_ts_000.npz")["probabilities"]
    average = (np.load(tmp_path / "stock" / "diffusiondemo_ts_000.npz")["probabilities"] +
               np.load(tmp_path / "diff" / "diffusiondemo_ts_000.npz")["probabilities"]) / 2
    assert np.allclose(ensembled, average, atol=1e-3)
