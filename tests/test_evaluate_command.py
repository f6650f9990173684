"""`nnunet-diffusion evaluate` on tiny trained models: tables, per-step rows, seed spread, early exit, bad input."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_diffusion.evaluation.commands.evaluate import main
from nnunet_diffusion.utils import environment
from nnunet_diffusion.trainers.segmentation import nnUNetTrainerDiff
from nnunet_runs import model_folder, nnunet_case_dice, nnunet_mean_dice, train_if_missing

DIFFUSION, STOCK = "nnUNetTrainerDiff", "nnUNetTrainer"
SAMPLERS, SEEDS = ("ddpm", "ddim"), (0, 1)



def cli_args(dataset, models: list[Path], output: Path, reference: Path | None = None) -> list[str]:
    return ["-m", *map(str, models), "-i", str(dataset.test_images), "-r", str(reference or dataset.test_labels),
            "-o", str(output), "-device", "cpu", "--disable-tta"]


@pytest.fixture(scope="module")
def evaluation(demo_dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("evaluate")
    models = [train_if_missing(demo_dataset, DIFFUSION), train_if_missing(demo_dataset, STOCK)]
    assert main(cli_args(demo_dataset, models, output) + ["--samplers", *SAMPLERS, "--seeds", *map(str, SEEDS),
                                                          "--early-exit", "0.05"]) == 0
    return output


def test_writes_tables_and_plots_with_a_row_per_case_seed_and_step(evaluation, demo_dataset):
    expected = ["results.csv", "per_case.csv", "seed_spread.csv", "early_exit.csv", "results.json", "results.md"]
    expected += [f"{kind}_vs_step_{s}.png" for kind in ("dice", "delta_dice") for s in SAMPLERS]
    assert all((evaluation / name).stat().st_size > 0 for name in expected)
    results = json.loads((evaluation / "results.json").read_text())
    cases = sorted(p.name[:-len(".nii.gz")] for p in demo_dataset.test_labels.glob("*.nii.gz"))
    steps = nnUNetTrainerDiff.num_timesteps
    keys = {(r["model"], r["sampler"], r["seed"], r["case"], r["step"]) for r in results["per_case"]}
    assert keys == {(DIFFUSION, s, seed, c, k) for s in SAMPLERS for seed in SEEDS for c in cases
                    for k in range(1, steps + 1)} | {(STOCK, "-", "", c, 1) for c in cases}
    saved = {(DIFFUSION, s, seed): evaluation / "predictions" / DIFFUSION / s / f"seed_{seed}" for s in SAMPLERS
             for seed in SEEDS} | {(STOCK, "-", ""): evaluation / "predictions" / STOCK}
    nnunet = {run: nnunet_case_dice(demo_dataset, folder) for run, folder in saved.items()}
    for row in results["per_case"]:
        assert row["HD95"] >= 0
        assert row["Dice"] == pytest.approx((row["Dice ball"] + row["Dice box"]) / 2)
        if row["step"] == (steps if row["model"] == DIFFUSION else 1):  # the saved prediction: nnU-Net's own Dice
            expected = nnunet[row["model"], row["sampler"], row["seed"]][row["case"]]
            assert [row["Dice ball"], row["Dice box"]] == pytest.approx([expected[1], expected[2]], nan_ok=True)
    markdown = (evaluation / "results.md").read_text()
    assert all(title in markdown for title in ("## Final step", "## Dice per sampling step",
                                               "## Max ΔDice across seeds per step", "## Early exit"))


def test_seed_spread_is_the_dice_range_across_seeds(evaluation):
    results = json.loads((evaluation / "results.json").read_text())
    dice: dict[tuple, list[float]] = {}
    for row in results["per_case"]:
        if row["model"] == DIFFUSION:
            dice.setdefault((row["sampler"], row["case"], row["step"]), []).append(row["Dice"])
    spreads = {(r["sampler"], r["case"], r["step"]): r["max_delta_dice"] for r in results["seed_spread"]}
    assert spreads.keys() == dice.keys()
    for key, values in dice.items():
        assert len(values) == len(SEEDS)
        assert spreads[key] == pytest.approx(max(values) - min(values))
    assert any(v > 0 for v in spreads.values())  # the seed reaches the sampler
    for row in results["summary"]:
        if row["model"] == DIFFUSION:
            per_case = [v for (s, _, k), v in spreads.items() if s == row["sampler"] and k == row["step"]]
            assert row["max_delta_dice"] == pytest.approx(np.mean(per_case))


def test_final_step_is_what_nnunets_predictor_writes_with_the_same_seed(evaluation, demo_dataset, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder(demo_dataset, DIFFUSION)), (0,))
    with environment(nnUNet_diffusion_sampler="ddim", nnUNet_diffusion_seed="1", nnUNet_diffusion_steps=None,
                     nnUNet_diffusion_early_exit=None):
        predictor.predict_from_files_sequential(str(demo_dataset.test_images), str(tmp_path))
    ours = evaluation / "predictions" / DIFFUSION / "ddim" / "seed_1"
    other_seed = evaluation / "predictions" / DIFFUSION / "ddim" / "seed_0"
    differs_from_other_seed = []
    for file in sorted(tmp_path.glob("*.nii.gz")):
        stock = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(ours / file.name))), stock)
        differs_from_other_seed.append(
            (sitk.GetArrayFromImage(sitk.ReadImage(str(other_seed / file.name))) != stock).any())
    assert differs_from_other_seed and any(differs_from_other_seed)


def test_early_exit_reports_steps_used_and_dice_cost(evaluation):
    results = json.loads((evaluation / "results.json").read_text())
    final = {r["sampler"]: r["Dice"] for r in results["summary"]
             if r["model"] == DIFFUSION and r["step"] == r["steps"]}
    assert [r["sampler"] for r in results["early_exit"]] == list(SAMPLERS)
    for row in results["early_exit"]:
        assert 1 <= row["mean_steps_used"] <= row["steps"] == nnUNetTrainerDiff.num_timesteps
        assert row["Dice_full"] == pytest.approx(final[row["sampler"]])
        assert row["Dice_cost"] == pytest.approx(row["Dice_full"] - row["Dice_early_exit"])


def copy_model(source: Path, results_root: Path, dataset_folder: str, labels: dict | None = None) -> Path:
    target = results_root / dataset_folder / source.name
    shutil.copytree(source, target)
    if labels is not None:
        dataset_json = json.loads((target / "dataset.json").read_text())
        (target / "dataset.json").write_text(json.dumps({**dataset_json, "labels": labels}))
    return target


def test_models_of_different_datasets_are_refused(demo_dataset, tmp_path):
    stock = train_if_missing(demo_dataset, STOCK)
    other = copy_model(stock, tmp_path, "Dataset991_Other")
    with pytest.raises(SystemExit, match=r"different datasets.*Dataset991_Other"):
        main(cli_args(demo_dataset, [stock, other], tmp_path / "out"))


def test_models_with_different_labels_are_refused(demo_dataset, tmp_path):
    stock = train_if_missing(demo_dataset, STOCK)
    relabelled = copy_model(stock, tmp_path, demo_dataset.name, {"background": 0, "ball": 1, "cube": 2})
    with pytest.raises(SystemExit, match=r"different labels.*" + re.escape(str(relabelled / "dataset.json"))):
        main(cli_args(demo_dataset, [stock, relabelled], tmp_path / "out"))


def test_a_reference_folder_missing_a_case_is_named(demo_dataset, tmp_path):
    reference = tmp_path / "labels"
    shutil.copytree(demo_dataset.test_labels, reference)
    removed = sorted(reference.glob("*.nii.gz"))[-1]
    removed.unlink()
    with pytest.raises(SystemExit, match=re.escape(f"{reference} lacks {removed.name}")):
        main(cli_args(demo_dataset, [train_if_missing(demo_dataset, STOCK)], tmp_path / "out", reference))


def test_a_reference_in_another_geometry_is_refused(demo_dataset, tmp_path):
    reference = tmp_path / "labels"
    shutil.copytree(demo_dataset.test_labels, reference)
    moved = sorted(reference.glob("*.nii.gz"))[0]
    image = sitk.ReadImage(str(moved))
    image.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(image, str(moved))
    with pytest.raises(SystemExit, match=re.escape(f"and reference {moved} differ in geometry (origin")):
        main(cli_args(demo_dataset, [train_if_missing(demo_dataset, STOCK)], tmp_path / "out", reference))


def test_per_k_runs_report_dice_and_predict_time_for_each_number_of_steps(demo_dataset, tmp_path):
    models = [train_if_missing(demo_dataset, DIFFUSION), train_if_missing(demo_dataset, STOCK)]
    assert main(cli_args(demo_dataset, models, tmp_path) + ["--samplers", "ddim", "--seeds", "0", "--steps", "2",
                                                            "--per-k", "--early-exit", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["model"], r["run"]): r for r in results["per_k"]}
    assert set(rows) == {(DIFFUSION, "K = 1"), (DIFFUSION, "K = 2"), (DIFFUSION, "early exit 0.0"),
                         (STOCK, "one pass")}
    assert all(r["seconds_per_case"] > 0 for r in rows.values())
    assert rows[STOCK, "one pass"]["Dice"] == pytest.approx(nnunet_mean_dice(demo_dataset, tmp_path / "predictions" /
                                                                              STOCK))
    steps = {r["step"]: r["Dice"] for r in results["summary"] if r["model"] == DIFFUSION}
    # seeded: a 1-step run is step 1 of the 2-step run, and the 2-step run is that run's prediction
    assert rows[DIFFUSION, "K = 1"]["Dice"] == pytest.approx(steps[1])
    assert rows[DIFFUSION, "K = 2"]["Dice"] == pytest.approx(steps[2])
    assert 1 <= rows[DIFFUSION, "early exit 0.0"]["mean_steps_used"] <= 2
    # each case's early exit is one of the seeded run's steps, so its Dice lies between that case's step scores
    per_step: dict[str, list[float]] = {}
    for row in results["per_case"]:
        if row["model"] == DIFFUSION:
            per_step.setdefault(row["case"], []).append(row["Dice"])
    assert np.mean([min(d) for d in per_step.values()]) - 1e-9 <= rows[DIFFUSION, "early exit 0.0"]["Dice"] <= \
        np.mean([max(d) for d in per_step.values()]) + 1e-9
    assert (tmp_path / "dice_vs_predict_time.png").stat().st_size > 0
    assert "## Dice and predict time per number of steps" in (tmp_path / "results.md").read_text()
