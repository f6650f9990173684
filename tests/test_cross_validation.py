"""The statistics and folds behind `nnunet-diffusion crossval`: bootstrap intervals, the signed-rank test, paired
differences, grouped nnU-Net splits, and the summary of unit records."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_diffusion.evaluation.options import EvaluationOptions
from nnunet_diffusion.evaluation.results_page import results_markdown
from nnunet_diffusion.evaluation.study import Study, Unit
from nnunet_diffusion.evaluation.summary import case_scores, comparison_pairs, fold_differences, summarise
from nnunet_diffusion.evaluation.unit_scoring import (POSTPROCESSING_RECORD, UNIT_RECORD, _read_nnunet_validation,
                                                      archived_unit, ensemble_file, ensemble_key, postprocessing_key,
                                                      unit_options)
from nnunet_diffusion.evaluation.splits import check_splits, group_of, grouped_splits, load_or_write_splits
from nnunet_diffusion.evaluation.statistics import bootstrap_interval, paired_difference, signed_rank_p

ACDC_LIKE = [f"patient{p:03d}_frame0{f}" for p in range(1, 11) for f in (1, 2)]


def test_the_bootstrap_interval_holds_the_mean_narrows_with_more_cases_and_is_reproducible():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.01, 0.05, 4), rng.normal(0.01, 0.05, 200)
    for values in (few, many):
        low, high = bootstrap_interval(values)
        assert low < values.mean() < high
    assert np.subtract(*bootstrap_interval(many)[::-1]) < np.subtract(*bootstrap_interval(few)[::-1]) / 3
    assert bootstrap_interval(few) == bootstrap_interval(few)
    assert bootstrap_interval(np.full(5, 0.2)) == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval(np.array([]))


def test_the_signed_rank_test_is_exact_for_small_samples_and_one_when_nothing_differs():
    # 10 positive differences: the exact two-sided p is 2 / 2^10
    assert signed_rank_p(np.arange(1, 11) / 100) == pytest.approx(2 / 2 ** 10)
    assert signed_rank_p(np.zeros(7)) == 1.0
    assert signed_rank_p(np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05])) == pytest.approx(1.0)


def test_a_paired_difference_uses_common_scored_cases_and_says_whether_it_is_beyond_noise():
    a = {"c1": 0.9, "c2": 0.8, "c3": 0.7, "c4": float("nan"), "only_a": 0.1}
    b = {"c1": 0.8, "c2": 0.7, "c3": 0.6, "c4": 0.5}
    difference = paired_difference("A", "B", a, b)
    assert difference.cases == 3 and difference.mean == pytest.approx(0.1) and difference.a_better == 3
    assert difference.separated and difference.as_row()["separated"]
    noisy = paired_difference("A", "B", {"x": 0.9, "y": 0.5}, {"x": 0.8, "y": 0.6})
    assert noisy.mean == pytest.approx(0.0) and not noisy.separated
    with pytest.raises(ValueError, match="share no scored case"):
        paired_difference("A", "B", {"x": 1.0}, {"y": 1.0})


def test_without_a_pattern_the_split_is_nnunets_own():
    cases = [f"case_{i:03d}" for i in range(12)]
    assert grouped_splits(cases[::-1], 5) == [{k: sorted(v) for k, v in s.items()}
                                              for s in generate_crossval_split(cases, seed=12345, n_splits=5)]


def test_grouped_folds_hold_out_both_frames_of_a_patient_together():
    splits = grouped_splits(ACDC_LIKE, 5, r"patient\d+")
    assert len(splits) == 5
    assert sorted(c for s in splits for c in s["val"]) == sorted(ACDC_LIKE)  # every case held out once
    for split in splits:
        held_out = {group_of(c, r"patient\d+") for c in split["val"]}
        assert len(split["val"]) == 2 * len(held_out)
        assert not held_out & {group_of(c, r"patient\d+") for c in split["train"]}
    check_splits(splits, ACDC_LIKE, r"patient\d+", Path("splits_final.json"))


def test_splits_that_break_a_group_or_repeat_a_case_are_refused_with_the_file_named():
    broken = grouped_splits(ACDC_LIKE, 5)  # ungrouped: frames of a patient land in different folds
    with pytest.raises(ValueError, match=r"splits_final.json: .*trains on groups it holds out.*Remove it"):
        check_splits(broken, ACDC_LIKE, r"patient\d+", Path("splits_final.json"))
    twice = [{"train": ACDC_LIKE[2:], "val": ACDC_LIKE[:2]}, {"train": ACDC_LIKE[1:], "val": ACDC_LIKE[:1]}]
    with pytest.raises(ValueError, match="more than one fold: patient001_frame01"):
        check_splits(twice, ACDC_LIKE, None, Path("x.json"))
    with pytest.raises(ValueError, match="does not match the grouping pattern"):
        group_of("case_001", r"patient\d+")
    with pytest.raises(ValueError, match="5 folds need between 2 and 3 groups"):
        grouped_splits(ACDC_LIKE[:6], 5, r"patient\d+")


def test_the_split_is_written_once_where_nnunet_reads_it_and_then_reused(tmp_path):
    written = load_or_write_splits(tmp_path, ACDC_LIKE, 4, r"patient\d+")
    assert json.loads((tmp_path / "splits_final.json").read_text()) == written and len(written) == 4
    assert load_or_write_splits(tmp_path, ACDC_LIKE, 2, None) == written  # an existing split wins
    assert not list(tmp_path.glob("*.partial"))


def _cv(tmp_path, **changes) -> Study:
    settings = dict(dataset="Dataset001_X", configuration="3d_cpu", plans="P", trainers=("D", "R"),
                    baseline="S", folds=(0, 1), output=tmp_path, results_root=tmp_path / "results",
                    evaluation=EvaluationOptions(samplers=("ddim",), seeds=(0, 1), device="cpu"),
                    diffusion_trainers=frozenset({"D", "R"}))
    return Study(**{**settings, **changes})


def test_units_go_fold_by_fold_baseline_first_and_repeat_only_where_asked(tmp_path):
    cv = _cv(tmp_path, repeats=2, repeat_trainers=("S", "R"), repeat_folds=(1,))
    assert cv.units() == [Unit("S", 0, 0), Unit("D", 0, 0), Unit("R", 0, 0), Unit("S", 0, 1), Unit("D", 0, 1),
                          Unit("R", 0, 1), Unit("S", 1, 1), Unit("R", 1, 1)]
    assert cv.baseline_of(Unit("R", 1, 1)) == Unit("S", 1, 1)
    assert _cv(tmp_path, repeats=2, repeat_trainers=("R",)).baseline_of(Unit("R", 1, 0)) == Unit("S", 0, 0)
    assert cv.fold_folder(Unit("R", 1, 1)) == tmp_path / "results" / "crossval_repeat_1" / "Dataset001_X" / \
        "R__P__3d_cpu" / "fold_1"
    assert len({u.seed for u in cv.units()}) == len({(u.repeat, u.fold) for u in cv.units()})
    with pytest.raises(ValueError, match="diffusion trainer"):
        _cv(tmp_path, baseline="D")
    with pytest.raises(ValueError, match="--repeat-folds"):
        _cv(tmp_path, repeats=2, repeat_folds=(3,))
    assert comparison_pairs(cv) == [("D", "S"), ("R", "S"), ("R", "D"), ("D + S", "S"), ("D + S", "D"),
                                    ("R + S", "S"), ("R + S", "R")]
    assert comparison_pairs(_cv(tmp_path, trainers=("R",), postprocessing=True)) == [
        ("R", "S"), ("R + S", "S"), ("R + S", "R"), ("R (postprocessed)", "S (postprocessed)"),
        ("R + S (postprocessed)", "S (postprocessed)"), ("R + S (postprocessed)", "R (postprocessed)")]
    compared = _cv(tmp_path, trainers=("D", "C", "R"), compare=(("R", "C"), ("R + S", "D + S"), ("R", "S")))
    assert comparison_pairs(compared)[-2:] == [("R", "C"), ("R + S", "D + S")]  # ("R", "S") is there already
    with pytest.raises(ValueError, match="--compare names C \\+ S, X"):
        _cv(tmp_path, trainers=("D", "C", "R"), compare=(("X", "C + S"),))


def test_trainer_epochs_change_only_the_epochs_of_the_named_trainers(tmp_path):
    from nnunet_diffusion.utils import TrainingBudget
    budget = TrainingBudget(20, 250, 20)
    cv = _cv(tmp_path, budget=budget, trainer_epochs=(("R", 5),))
    assert cv.budget_of("R") == TrainingBudget(5, 250, 20) and cv.budget_of("D") == cv.budget_of("S") == budget
    with pytest.raises(ValueError, match="--trainer-epochs names X"):
        _cv(tmp_path, budget=budget, trainer_epochs=(("X", 5),))
    with pytest.raises(ValueError, match="give --epochs too"):
        _cv(tmp_path, trainer_epochs=(("R", 5),))


def _row(model, case, dice, sampler="-", seed="", step=1, steps=1):
    return {"model": model, "trainer": model, "sampler": sampler, "seed": seed, "step": step, "steps": steps,
            "case": case, "Dice": dice, "HD95": 1.0, "Dice a": dice}


def _unit(trainer, repeat, fold, rows, diffusion):
    return {"trainer": trainer, "repeat": repeat, "fold": fold, "diffusion": diffusion, "per_case": rows,
            "pseudo_dice": [0.1, 0.2], "train_loss": [1.0, 0.5], "epoch_seconds": [2.0, 2.0],
            "training": {"wall_seconds": 5.0}, "predict_seconds_per_case": 1.0}


def test_scores_average_seeds_within_a_training_then_repeated_trainings(tmp_path):
    rows = [{**_row("R", "c1", d, "ddim", s, 2, 2), "repeat": r, "fold": 0} for r, s, d in
            [(0, 0, 0.6), (0, 1, 0.8), (1, 0, 0.9), (1, 1, 0.9)]]
    assert case_scores(rows) == {"c1": pytest.approx(0.8)}  # (0.7 + 0.9) / 2
    stock = [_unit("S", 0, 0, [_row("S", "c1", 0.7), _row("S", "c2", 0.5)], False),
             _unit("S", 1, 0, [_row("S", "c1", 0.9), _row("S", "c2", 0.7)], False)]
    recycle = [_unit("R", 0, 0, [_row("R", c, d - 0.1 * (k == 1), "ddim", s, k, 2) for c, d in (("c1", 0.8),
               ("c2", 0.6)) for s in (0, 1) for k in (1, 2)], True)]
    cv = _cv(tmp_path, trainers=("R",), diffusion_trainers=frozenset({"R"}))
    summary = summarise(cv, stock + recycle, [])
    table = {r["model"]: r for r in summary["table"]}
    assert table["S"]["Dice"] == pytest.approx(0.7) and table["S"]["run_sd"] == pytest.approx(np.std([0.6, 0.8],
                                                                                                        ddof=1))
    assert table["R"]["Dice"] == pytest.approx(0.7) and table["R"]["trainings"] == 1
    assert [r["Dice"] for r in summary["per_step"]] == pytest.approx([0.6, 0.7])
    assert summary["seed_spread"][0]["max_delta_dice"] == pytest.approx(0.0)
    (difference,) = summary["differences"]
    assert difference["a"] == "R" and difference["mean"] == pytest.approx(0.0) and difference["cases"] == 2


def test_each_fold_gets_its_own_means_and_differences_with_an_interval_only_where_it_has_enough_cases(tmp_path):
    # R wins the six cases of fold 0 by 0.02 and loses fold 1 (−0.40 on one case, +0.05 on the other): ahead on 1
    # of 2 folds; fold 0 has enough cases for an interval, fold 1 has its mean alone
    stock = [_unit("S", 0, 0, [_row("S", f"a{i}", 0.80) for i in range(6)], False),
             _unit("S", 0, 1, [_row("S", "b0", 0.90), _row("S", "b1", 0.90)], False)]
    recycle = [_unit("R", 0, 0, [_row("R", f"a{i}", 0.82, "ddim", 0) for i in range(6)], True),
               _unit("R", 0, 1, [_row("R", "b0", 0.50, "ddim", 0), _row("R", "b1", 0.95, "ddim", 0)], True)]
    cv = _cv(tmp_path, trainers=("R",), diffusion_trainers=frozenset({"R"}))
    summary = summarise(cv, stock + recycle, [])
    (difference,) = summary["differences"]
    assert (difference["a_better"], difference["cases"]) == (7, 8)
    assert (difference["folds_a_better"], difference["folds"]) == (1, 2)
    fold0, fold1 = difference["per_fold"]
    assert (fold0["fold"], fold0["cases"], fold0["a_better"]) == (0, 6, 6)
    assert fold0["mean"] == pytest.approx(0.02) and fold0["interval_low"] == pytest.approx(0.02) and fold0["separated"]
    assert fold1 == {"fold": 1, "cases": 2, "mean": pytest.approx(-0.175)}
    means = {(r["model"], r["fold"]): (r["cases"], r["Dice"]) for r in summary["fold_means"]}
    assert means == {("S", 0): (6, pytest.approx(0.80)), ("S", 1): (2, pytest.approx(0.90)),
                     ("R", 0): (6, pytest.approx(0.82)), ("R", 1): (2, pytest.approx(0.725))}
    markdown = results_markdown(cv, summary, [{"train": [], "val": []}] * 2)
    assert "| R | ddim | 0.820 | 0.725 |" in markdown
    assert "| R − S | ddim | +0.020 [+0.020, +0.020] | -0.175 |" in markdown
    assert fold_differences({0: {"a": 0.7}, 1: {"b": float("nan")}}, {0: {"a": 0.6}, 1: {"b": 0.9}}) == [
        {"fold": 0, "cases": 1, "mean": pytest.approx(0.1)}]  # a case without a score pairs with nothing


def test_nnunets_fold_validation_is_read_only_when_it_matches_the_requested_prediction(tmp_path):
    cv = _cv(tmp_path, evaluation=EvaluationOptions(samplers=("ddim",), seeds=(0,), device="cpu",
                                                    use_mirroring=True))
    validation = cv.fold_folder(Unit("S", 0, 0)) / "validation"
    validation.mkdir(parents=True)
    summary = {"metric_per_case": [{"reference_file": f"/gt/{c}.nii.gz", "metrics": {"1": {"Dice": d}}}
                                   for c, d in (("c1", 0.5), ("c2", 0.7))]}
    (validation / "summary.json").write_text(json.dumps(summary))
    rows = _read_nnunet_validation(cv, Unit("S", 0, 0), ["c1", "c2"], {"1": "a"}, ".nii.gz", False)
    assert [(r["case"], r["Dice"], r["Dice a"]) for r in rows] == [("c1", 0.5, 0.5), ("c2", 0.7, 0.7)]
    assert _read_nnunet_validation(cv, Unit("S", 0, 0), ["c1", "c2"], {}, ".nii.gz", True) is None  # no .npz
    assert _read_nnunet_validation(cv, Unit("S", 0, 0), ["c1"], {}, ".nii.gz", False) is None  # other cases
    no_tta = _cv(tmp_path, evaluation=EvaluationOptions(samplers=("ddim",), seeds=(0,), device="cpu",
                                                        use_mirroring=False))
    assert _read_nnunet_validation(no_tta, Unit("S", 0, 0), ["c1", "c2"], {}, ".nii.gz", False) is None


def test_a_kept_fold_brings_its_postprocessing_only_when_the_whole_fold_has_it(tmp_path):
    cv = _cv(tmp_path, trainers=("R",), folds=(0,), postprocessing=True)
    cases = ["c1", "c2"]
    records = {}
    for unit in cv.units():  # the kept scores of fold 0, as a finished run leaves them
        diffusion = unit.trainer in cv.diffusion_trainers
        records[unit] = {"key": {"options": json.loads(json.dumps(asdict(unit_options(cv, unit)))),
                                 "training": {"budget": None}, "cases": cases},
                         "trainer": unit.trainer, "repeat": unit.repeat, "fold": unit.fold, "diffusion": diffusion,
                         "training": {"budget": None}, "per_case": [_row(unit.trainer, c, 0.5) for c in cases]}
        (cv.unit_output(unit) / UNIT_RECORD).parent.mkdir(parents=True)
        (cv.unit_output(unit) / UNIT_RECORD).write_text(json.dumps(records[unit]))
    stock, recycle = records[Unit("S", 0, 0)], records[Unit("R", 0, 0)]
    ensemble_file(cv, recycle).parent.mkdir()
    ensemble_file(cv, recycle).write_text(json.dumps({"key": ensemble_key(recycle, stock),
                                                       "per_case": [_row("R + S", "c1", 0.6)]}))
    for record, model in ((stock, "S"), (recycle, "R")):
        (cv.unit_output(Unit(model, 0, 0)) / POSTPROCESSING_RECORD).write_text(json.dumps(
            {"key": postprocessing_key(record, stock), "per_case": [_row(f"{model} (postprocessed)", "c1", 0.7)]}))
    record, rows = archived_unit(cv, Unit("R", 0, 0), cases)
    assert record == recycle and [r["model"] for r in rows] == ["R + S", "R (postprocessed)"]
    assert archived_unit(cv, Unit("R", 0, 0), ["c1"]) is None  # other held-out cases
    assert archived_unit(_cv(tmp_path, trainers=("R",), folds=(0,)), Unit("R", 0, 0), cases)[1] == [
        _row("R + S", "c1", 0.6)]  # without postprocessing, the ensemble alone
    (cv.unit_output(Unit("S", 0, 0)) / POSTPROCESSING_RECORD).unlink()
    record, rows = archived_unit(cv, Unit("R", 0, 0), cases)  # scored before postprocessing: stands without it
    assert record == recycle and rows == [_row("R + S", "c1", 0.6)]
    ensemble_file(cv, recycle).unlink()
    assert archived_unit(cv, Unit("R", 0, 0), cases) is None  # without its ensemble the fold is trained again


def _difference(low, high, mean=None, p=0.001):
    from nnunet_diffusion.evaluation.statistics import PairedDifference
    return PairedDifference("A", "B", 40, (low + high) / 2 if mean is None else mean, low, high, p, 30)


@pytest.mark.parametrize("low, high, p, folds_a_better, expected", [
    (0.006, 0.009, 1e-18, 5, "A better"),  # the whole interval beyond +margin
    (-0.084, -0.048, 1e-6, 0, "B better"),
    (-0.003, 0.001, 0.35, 2, "on par"),  # inside ±margin
    (0.001, 0.003, 0.2, 3, "on par"),  # equivalence needs no significant difference
    (0.001, 0.006, 0.002, 4, "undecided"),  # beyond 0 but crosses +margin
    (0.009, 0.046, 0.86, 1, "undecided"),  # interval and signed-rank test disagree (ACDC's AllT − Recycle)
    (0.009, 0.046, 0.001, 1, "undecided"),  # ahead on 1 of 5 folds only
    (-0.02, 0.03, 0.5, 3, "undecided"),  # crosses both margins
])
def test_verdicts_read_the_interval_against_the_margin_and_refuse_disagreeing_evidence(low, high, p, folds_a_better,
                                                                                       expected):
    from nnunet_diffusion.evaluation.statistics import verdict
    assert verdict(_difference(low, high, p=p), 0.005, folds_a_better, 5) == expected


def test_the_margin_is_the_users_and_reaches_the_report(tmp_path):
    stock = [_unit("S", 0, 0, [_row("S", f"a{i}", 0.80) for i in range(8)], False)]
    recycle = [_unit("R", 0, 0, [_row("R", f"a{i}", 0.803 + 0.001 * (i % 2), "ddim", 0) for i in range(8)], True)]
    for margin, expected in ((0.005, "on par"), (0.001, "A better")):
        study = _cv(tmp_path, trainers=("R",), diffusion_trainers=frozenset({"R"}), margin=margin)
        summary = summarise(study, stock + recycle, [])
        assert summary["differences"][0]["verdict"] == expected
        assert f"±{margin:g} Dice" in results_markdown(study, summary, [{"train": [], "val": []}])
    with pytest.raises(ValueError, match="--margin"):
        _cv(tmp_path, margin=-0.1)
