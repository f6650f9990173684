"""The tables of a comparison from its scored units: Dice per model and sampler, per sampling step, the seed
spread, fold means, paired differences with the tool's verdict, training curves and wall clock."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnunet_diffusion.evaluation.statistics import common_scored_cases, paired_difference, verdict
from nnunet_diffusion.evaluation.study import Study
from nnunet_diffusion.evaluation.unit_scoring import POSTPROCESSED
from nnunet_diffusion.evaluation.model_evaluation import NO_SAMPLER
from nnunet_diffusion.utils import nanmean

# a fold's paired difference gets a bootstrap interval from this many cases on: fewer give too few distinct
# resamples for the interval to say anything
MIN_FOLD_CASES_FOR_INTERVAL = 5


def groups(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def case_scores(rows: Sequence[dict], column: str = "Dice") -> dict[str, float]:
    """One score per case: the mean over sampling seeds within a training, then over the trainings that scored
    the case (repeated trainings; with a test folder, every fold's model)."""
    per_training = {k: nanmean([r[column] for r in g]) for k, g in groups(rows, "case", "repeat", "fold").items()}
    return {case: nanmean([v for (c, _, _), v in per_training.items() if c == case])
            for case in dict.fromkeys(c for c, _, _ in per_training)}


def _final_rows(units: Sequence[dict], derived: Sequence[dict]) -> list[dict]:
    """Each prediction's last step, tagged with its repeat and fold, and the derived rows (ensembles and
    postprocessed predictions, one step each, already tagged)."""
    rows = [{**r, "repeat": u["repeat"], "fold": u["fold"]} for u in units for r in u["per_case"]
            if r["step"] == r["steps"]]
    return rows + list(derived)


def _model_table(final: Sequence[dict]) -> list[dict]:
    class_columns = [c for c in dict.fromkeys(k for r in final for k in r) if c.startswith("Dice ")]
    table = []
    ordered = sorted(groups(final, "model", "sampler").items(), key=lambda g: g[0][0].endswith(POSTPROCESSED))
    for (model, sampler), rows in ordered:  # postprocessed rows after all others
        scores = case_scores(rows)
        training_means = {k: nanmean([r["Dice"] for r in g]) for k, g in groups(rows, "fold", "repeat").items()}
        run_sds = [float(np.std(v, ddof=1)) for fold in dict.fromkeys(f for f, _ in training_means)
                   if len(v := [m for (f, _), m in training_means.items() if f == fold]) > 1]
        values = np.array([v for v in scores.values() if not np.isnan(v)])
        table.append({"model": model, "sampler": sampler, "trainings": len(training_means), "cases": len(scores),
                      "Dice": float(values.mean()), "Dice_sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                      **{c: nanmean(list(case_scores(rows, c).values())) for c in class_columns},
                      "HD95": nanmean(list(case_scores(rows, "HD95").values())),
                      "run_sd": float(np.mean(run_sds)) if run_sds else None})
    return table


def _steps_and_spread(units: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    per_step, seed_spread = [], []
    rows_all = [{**r, "repeat": u["repeat"], "fold": u["fold"]} for u in units if u["diffusion"] for r in u["per_case"]]
    for (model, sampler, step), rows in groups(rows_all, "model", "sampler", "step").items():
        per_step.append({"model": model, "sampler": sampler, "step": step,
                         "Dice": nanmean(list(case_scores(rows).values()))})
        spreads = [max(d) - min(d) for g in groups(rows, "case", "repeat", "fold").values()
                   if len(d := [r["Dice"] for r in g if not np.isnan(r["Dice"])]) > 1]
        if spreads:
            seed_spread.append({"model": model, "sampler": sampler, "step": step, "seeds": len(
                {r["seed"] for r in rows}), "max_delta_dice": float(np.mean(spreads)),
                "max_delta_dice_largest": float(np.max(spreads))})
    return per_step, seed_spread


def summarise(study: Study, units: Sequence[dict], derived: Sequence[dict]) -> dict:
    """Tables of the units scored so far (`derived`: the rows of ensembles and postprocessed predictions)."""
    final = _final_rows(units, derived)
    per_step, seed_spread = _steps_and_spread(units)
    by_model = groups(final, "model", "sampler")
    scores = {key: case_scores(rows) for key, rows in by_model.items()}
    fold_scores = {key: {fold: case_scores(fold_rows) for (fold,), fold_rows in groups(rows, "fold").items()}
                   for key, rows in by_model.items()}
    fold_means = [{"model": model, "sampler": sampler, "fold": fold, "cases": len(values),
                   "Dice": nanmean(list(values.values()))}
                  for (model, sampler), per_fold in fold_scores.items() for fold, values in per_fold.items()]
    return {"table": _model_table(final), "fold_means": fold_means, "per_step": per_step, "seed_spread": seed_spread,
            "differences": _differences(study, scores, fold_scores), "curves": _curves(units),
            "timing": _timing(units)}


def comparison_pairs(study: Study) -> list[tuple[str, str]]:
    """A − B pairs the paper's claims need: each trainer against the baseline, later diffusion trainers against
    earlier ones in the given order (e.g. Recycle − Diff when Diff comes first), each ensemble against both of
    its members, and the pairs `--compare` asks for; with postprocessing, the same pairs again after it."""
    diffusion = [t for t in study.trainers if t in study.diffusion_trainers]
    others = [t for t in study.trainers if t not in study.diffusion_trainers and t != study.baseline]
    pairs = [(t, study.baseline) for t in [*others, *diffusion]]
    pairs += [(later, earlier) for i, earlier in enumerate(diffusion) for later in diffusion[i + 1:]]
    for t in diffusion:
        pairs += [(f"{t} + {study.baseline}", study.baseline), (f"{t} + {study.baseline}", t)]
    pairs += [(a, b) for a, b in study.compare if (a, b) not in pairs and (b, a) not in pairs]
    return pairs + [(a + POSTPROCESSED, b + POSTPROCESSED) for a, b in pairs if study.postprocessing]


def fold_differences(per_fold_a: dict[int, dict[str, float]], per_fold_b: dict[int, dict[str, float]]
                     ) -> list[dict]:
    """A − B on each fold's common cases: whether a difference holds from one training to the next, which the
    interval over all cases cannot tell when trainings differ more than cases. A fold gets an interval and a
    signed-rank p only when it holds MIN_FOLD_CASES_FOR_INTERVAL cases; otherwise its mean alone."""
    out = []
    for fold in sorted(set(per_fold_a) & set(per_fold_b)):
        a, b = per_fold_a[fold], per_fold_b[fold]
        cases = common_scored_cases(a, b)
        if not cases:
            continue
        row = {k: v for k, v in paired_difference("A", "B", a, b).as_row().items() if k not in ("a", "b")} \
            if len(cases) >= MIN_FOLD_CASES_FOR_INTERVAL else \
            {"cases": len(cases), "mean": float(np.mean([a[c] - b[c] for c in cases]))}
        out.append({"fold": fold, **row})
    return out


def _differences(study: Study, scores: dict[tuple[str, str], dict[str, float]],
                 fold_scores: dict[tuple[str, str], dict[int, dict[str, float]]]) -> list[dict]:
    """Paired per-case differences of the final predictions, per sampler (a model without one pairs with each),
    with the same difference fold by fold, the folds on which A is ahead, and the verdict at the study's margin."""
    out, pairs_done = [], set()
    for a, b in comparison_pairs(study):
        for sampler in study.evaluation.samplers:
            key_a = (a, sampler) if (a, sampler) in scores else (a, NO_SAMPLER)
            key_b = (b, sampler) if (b, sampler) in scores else (b, NO_SAMPLER)
            if key_a not in scores or key_b not in scores or (key_a, key_b) in pairs_done:
                continue
            pairs_done.add((key_a, key_b))
            one_pass = key_a[1] == key_b[1] == NO_SAMPLER
            per_fold = fold_differences(fold_scores[key_a], fold_scores[key_b])
            difference = paired_difference(a, b, scores[key_a], scores[key_b])
            folds_a_better = sum(int(d["mean"] > 0) for d in per_fold)
            out.append({**difference.as_row(), "sampler": NO_SAMPLER if one_pass else sampler,
                        "folds_a_better": folds_a_better, "folds": len(per_fold), "per_fold": per_fold,
                        "margin": study.margin,
                        "verdict": verdict(difference, study.margin, folds_a_better, len(per_fold))})
    return out


def _curves(units: Sequence[dict]) -> list[dict]:
    """Per trainer, means over its trainings: validation pseudo-Dice and training loss per epoch, and the last
    epoch's training loss per diffusion timestep."""
    curves = []
    for (trainer,), group in groups(units, "trainer").items():
        epochs = min(len(u["pseudo_dice"]) for u in group)
        entry = {"trainer": trainer, "trainings": len(group),
                 "pseudo_dice": np.mean([u["pseudo_dice"][:epochs] for u in group], 0).tolist(),
                 "train_loss": np.mean([u["train_loss"][:epochs] for u in group], 0).tolist()}
        per_t = [u["loss_per_timestep"] for u in group if "loss_per_timestep" in u]
        if per_t:
            entry["loss_per_timestep"] = [nanmean([float("nan") if v[t] is None else v[t] for v in per_t])
                                          for t in range(len(per_t[0]))]
        curves.append(entry)
    return curves


def _timing(units: Sequence[dict]) -> list[dict]:
    """Wall clock as a user sees it: the training process (start-up, augmentation workers, all epochs), an
    epoch, and the prediction of one held-out case per sampler run (all steps exported and scored)."""
    rows = []
    for (trainer,), group in groups(units, "trainer").items():
        wall = [u["training"]["wall_seconds"] for u in group if u["training"].get("wall_seconds") is not None]
        predict = [u["predict_seconds_per_case"] for u in group if u["predict_seconds_per_case"] is not None]
        rows.append({"trainer": trainer, "trainings": len(group),
                     "training_seconds": float(np.median(wall)) if wall else None,
                     "epoch_seconds": float(np.median([e for u in group for e in u["epoch_seconds"]])),
                     "predict_seconds_per_case": float(np.median(predict)) if predict else None})
    return rows
