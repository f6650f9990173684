"""Learning curves over labelled cases: the seeded nested subsets, nnU-Net training on exactly them, and
`crossval --train-cases` end to end with a pretraining checkpoint given to one trainer and its random-init
control beside it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nnunet_diffusion.cli import main as cli_main
from nnunet_diffusion.evaluation.learning_curve import paired_across_curves
from nnunet_diffusion.evaluation.splits import load_or_write_splits
from nnunet_diffusion.evaluation.study import dataset_cases
from nnunet_diffusion.training import TrainingError, TrainingRun, check_fold_folder, train
from nnunet_diffusion.training_subsets import labelled_subset
from nnunet_diffusion.utils import TrainingBudget, environment
from nnunet_runs import CONFIGURATION, PLANS, make_dataset, model_folder, train_in_process

CASES = [f"case_{i:03d}" for i in range(40)]
FINETUNE, CONTROL = "nnUNetTrainerPretrainedFinetune", "nnUNetTrainerPretrainedFinetuneRandomInit"


def test_subsets_are_nested_across_n_and_drawn_by_the_seed_alone():
    subsets = [labelled_subset(CASES, n, seed=3) for n in (5, 10, 20, 40)]
    assert [len(s) for s in subsets] == [5, 10, 20, 40]
    assert all(set(small) < set(large) for small, large in zip(subsets, subsets[1:]))
    assert labelled_subset(list(reversed(CASES)), 10, seed=3) == subsets[1]  # nnU-Net's listing order is moot
    assert labelled_subset(CASES, 10, seed=4) != subsets[1]
    assert subsets[1] != CASES[:10]  # drawn, not the first names


@pytest.mark.parametrize("count", [0, 41])
def test_a_count_outside_the_fold_is_refused_naming_the_range(count):
    with pytest.raises(ValueError, match=f"--train-cases {count}: the fold holds 40 training case.*from 1 to 40"):
        labelled_subset(CASES, count, seed=0)


@pytest.fixture(scope="module")
def curve_dataset(nnunet_workspace):
    """8 cases in nnU-Net's seeded two-fold split (written first, so that every test sees the same folds)."""
    dataset = make_dataset(985, "LearningCurve", num_train=8, num_test=1)
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / dataset.name
    load_or_write_splits(preprocessed, dataset_cases(preprocessed, ".nii.gz"), 2, None)
    return dataset


def _fold_split(dataset, fold: int) -> dict:
    splits = Path(os.environ["nnUNet_preprocessed"]) / dataset.name / "splits_final.json"
    return json.loads(splits.read_text())[fold]


def test_nnunet_trains_on_the_subset_and_validates_on_the_whole_fold(curve_dataset):
    with environment(nnUNet_n_proc_DA="0"):
        trainer = train(TrainingRun(str(curve_dataset.dataset_id), CONFIGURATION, 0, "nnUNetTrainer", PLANS,
                                    TrainingBudget(1, 1, 1), seed=7, train_cases=2))
    record = json.loads((Path(trainer.output_folder) / "training_record.json").read_text())
    split = _fold_split(curve_dataset, 0)
    assert record["train_cases"] == 2 and record["train_case_names"] == labelled_subset(split["train"], 2, 7)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()  # what nnU-Net's data loaders are built from
    assert sorted(dataset_tr.identifiers) == record["train_case_names"]
    assert sorted(dataset_val.identifiers) == sorted(split["val"])


def test_a_fold_folder_of_another_number_of_cases_is_refused(curve_dataset, tmp_path):
    run = TrainingRun(str(curve_dataset.dataset_id), CONFIGURATION, 0, "nnUNetTrainer", PLANS,
                      TrainingBudget(1, 1, 1), seed=7, results=str(tmp_path), train_cases=2)
    run.fold_folder.mkdir(parents=True)
    (run.fold_folder / "checkpoint_latest.pth").touch()  # the state check looks for the file only
    (run.fold_folder / "training_record.json").write_text(json.dumps(run.settings()))
    assert check_fold_folder(run) == "resumable"
    with pytest.raises(TrainingError, match="training on 2 of the fold's training cases, not the requested 3"):
        check_fold_folder(TrainingRun(**{**run.__dict__, "train_cases": 3}))
    with pytest.raises(TrainingError, match="not the requested all"):
        check_fold_folder(TrainingRun(**{**run.__dict__, "train_cases": None}))


def test_crossval_learning_curve_with_a_pretrained_trainer_and_its_control(curve_dataset, tmp_path, capsys):
    pretraining = train_in_process(curve_dataset, "nnUNetTrainerDiffPretrain", iterations=1)
    checkpoint = str(Path(pretraining.output_folder).parent / "fold_{fold}" / "checkpoint_final.pth")
    output = tmp_path / "curve"
    arguments = ["crossval", "-d", str(curve_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", FINETUNE,
                 CONTROL, "-f", "0", "--num-folds", "2", "--epochs", "1", "--iterations", "2", "--val-iterations",
                 "1", "--samplers", "ddim", "--disable-tta", "--train-cases", "3", "1",
                 "--pretrained-weights", f"{FINETUNE}={checkpoint}", "--compare", f"{FINETUNE}:{CONTROL}",
                 "-o", str(output)]
    assert cli_main(arguments) == 0
    curve = json.loads((output / "learning_curve.json").read_text())
    assert curve["train_cases"] == [1, 3]
    split = _fold_split(curve_dataset, 0)
    subsets = {(s["train_cases"], s["trainer"]): s["cases"] for s in curve["subsets"]}
    assert sorted(subsets) == [(n, t) for n in (1, 3) for t in sorted(["nnUNetTrainer", FINETUNE, CONTROL])]
    for n in (1, 3):  # every trainer on the same cases of the fold's training split
        assert subsets[n, FINETUNE] == subsets[n, CONTROL] == subsets[n, "nnUNetTrainer"]
        assert len(subsets[n, FINETUNE]) == n and set(subsets[n, FINETUNE]) <= set(split["train"])
    assert set(subsets[1, FINETUNE]) < set(subsets[3, FINETUNE])
    records = {(n, t): json.loads((output / "results" / f"train_cases_{n}" / curve_dataset.name /
                                   f"{t}__{PLANS}__{CONFIGURATION}" / "fold_0" / "training_record.json").read_text())
               for n in (1, 3) for t in (FINETUNE, CONTROL)}
    assert all(records[n, FINETUNE]["pretrained_weights"] == checkpoint.replace("{fold}", "0") for n in (1, 3))
    assert all(records[n, CONTROL]["pretrained_weights"] is None for n in (1, 3))
    for n in (1, 3):  # each N a whole study on the fold's held-out cases
        result = json.loads((output / f"train_cases_{n}" / "results.json").read_text())
        assert {r["model"]: r["cases"] for r in result["table"]} == {
            t: len(split["val"]) for t in ("nnUNetTrainer", FINETUNE, CONTROL)}
    pairs = [(d["train_cases"], d["a"], d["b"]) for d in curve["differences"]]
    assert pairs == [(n, *pair) for n in (1, 3) for pair in
                     ((FINETUNE, "nnUNetTrainer"), (CONTROL, "nnUNetTrainer"), (FINETUNE, CONTROL))]
    # the pairing of two learning curves (for models of two datasets) gives what one comparison gives
    across = paired_across_curves(output, FINETUNE, output, CONTROL, 0.005)
    within = [d for d in curve["differences"] if (d["a"], d["b"]) == (FINETUNE, CONTROL)]
    assert [(a["train_cases"], a["cases"], a["mean"], a["interval_low"], a["p_signed_rank"], a["verdict"])
            for a in across] == [(d["train_cases"], d["cases"], d["mean"], d["interval_low"], d["p_signed_rank"],
                                  d["verdict"]) for d in within]
    markdown = (output / "learning_curve.md").read_text()
    assert "| model | sampler | N = 1 | N = 3 |" in markdown
    assert f"| 1 | {FINETUNE} − nnUNetTrainer |" in markdown and "verdict" in markdown
    assert (output / "learning_curve.png").stat().st_size > 0
    capsys.readouterr()

    assert cli_main(arguments) == 0  # resumed: nothing trained or predicted again
    rerun = capsys.readouterr().out
    assert "train " not in rerun and "predict " not in rerun and "learning_curve.md" in rerun


def test_more_cases_than_a_fold_trains_on_are_refused_before_anything_trains(curve_dataset, tmp_path):
    pool = len(_fold_split(curve_dataset, 1)["train"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["crossval", "-d", str(curve_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", FINETUNE,
                  "-f", "1", "--num-folds", "2", "--epochs", "1", "--train-cases", "1", str(pool + 1), "-o", str(tmp_path / "out")])
    assert f"--train-cases {pool + 1}: fold 1 holds {pool} training case(s); give numbers from 1 to {pool}" in \
        str(exit_info.value.code)
    assert not (tmp_path / "out" / "results").exists()


def test_a_missing_pretraining_checkpoint_is_refused_before_anything_trains(curve_dataset, tmp_path):
    missing = tmp_path / "pretraining" / "fold_{fold}" / "checkpoint_final.pth"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["crossval", "-d", str(curve_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", FINETUNE,
                  "-f", "1", "--num-folds", "2", "--epochs", "1", "--train-cases", "2",
                  "--pretrained-weights", f"{FINETUNE}={missing}", "-o", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert not (tmp_path / "out" / "results").exists()
