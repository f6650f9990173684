"""results.md and the plots of a comparison: the tables of its summary with the settings that produced them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_diffusion.evaluation.model_evaluation import NO_SAMPLER
from nnunet_diffusion.evaluation.study import Study
from nnunet_diffusion.evaluation.summary import MIN_FOLD_CASES_FOR_INTERVAL, groups
from nnunet_diffusion.evaluation.unit_scoring import POSTPROCESSED
from nnunet_diffusion.utils import markdown_table


def _fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(d: dict) -> str:
    return f"[{_fmt(d['interval_low'], signed=True)}, {_fmt(d['interval_high'], signed=True)}]"


def _per_fold_markdown(summary: dict) -> list[str]:
    """The fold-by-fold tables of results.md (none for a single fold): each model's mean Dice per fold, and each
    paired difference per fold with its interval where the fold holds enough cases."""
    folds = sorted({r["fold"] for r in summary["fold_means"]})
    if len(folds) < 2:
        return []
    means = {(r["model"], r["sampler"], r["fold"]): r["Dice"] for r in summary["fold_means"]}
    differences = []
    for d in summary["differences"]:
        cells = {f["fold"]: _fmt(f["mean"], signed=True) + (f" {_interval(f)}" if "interval_low" in f else "")
                 for f in d["per_fold"]}
        differences.append([f"{d['a']} − {d['b']}", d["sampler"], *(cells.get(f, "") for f in folds)])
    return ["", "## Fold by fold", "",
            "Each fold is a separate training of every model: mean Dice of the fold's held-out cases (averaged over "
            "sampling seeds and repeated trainings), then A − B on the fold's cases with a 95 % bootstrap interval "
            f"where the fold holds at least {MIN_FOLD_CASES_FOR_INTERVAL} cases.", "",
            markdown_table(["model", "sampler", *(f"fold {f}" for f in folds)],
                           [[r["model"], r["sampler"], *(_fmt(means.get((r["model"], r["sampler"], f)))
                                                         for f in folds)] for r in summary["table"]]), "",
            markdown_table(["A − B", "sampler", *(f"fold {f}" for f in folds)], differences)]


def results_markdown(study: Study, summary: dict, splits: Sequence[dict], missing: Sequence[str] = ()) -> str:
    """results.md: the tables of `summary` with the settings that produced them."""
    budget = "each trainer's own epochs and iterations" if study.budget is None else \
        f"{study.budget.epochs} epochs × {study.budget.iterations} iterations " \
        f"({study.budget.val_iterations} validation " \
        f"batches per epoch)" + "".join(f"; {t}: {e} epochs" for t, e in study.trainer_epochs)
    options = study.evaluation
    held_out = (f"every fold's model ({', '.join(map(str, study.folds))}) scored on the same test cases"
                if study.test_folder else
                f"{len(splits)}-fold split of `splits_final.json`, folds {', '.join(map(str, study.folds))}")
    lines = [f"# {'Comparison' if study.test_folder else 'Cross-validation'} on {study.dataset} "
             f"({study.configuration}, {study.plans})", "",
             held_out
             + (f", cases grouped by `{study.group_pattern}`" if study.group_pattern else "")
             + f"; {study.repeats} training run(s) per unit"
             + (f" (repeats for {', '.join(study.repeat_trainers or study.all_trainers)} on folds "
                f"{', '.join(map(str, study.repeat_folds or study.folds))})" if study.repeats > 1 else "")
             + f". Budget: {budget}. Prediction: {'with' if options.use_mirroring else 'no'} mirroring, "
             f"samplers {', '.join(options.samplers)}, seeds {', '.join(map(str, options.seeds))}, "
             + (f"{options.steps} steps." if options.steps else "each model's default steps (from its checkpoint)."),
             "",
             "## Held-out Dice", "",
             "Each case's Dice (foreground mean; per class in the named columns) is averaged over sampling seeds "
             "and repeated trainings, then over cases (± sd over cases). `run sd`: the sd of a fold's mean Dice "
             "between repeated trainings, averaged over the folds trained more than once. Diffusion models at "
             "their last step; `+` rows average the probabilities of the two models (nnU-Net's ensembling)."
             + (f" `{POSTPROCESSED.strip()}` rows: the same predictions after nnU-Net's postprocessing (the largest "
                "connected component of the foreground, then of each class, kept where it raises the fold's Dice, "
                "as `nnUNetv2_determine_postprocessing` decides), decided fold by fold." if study.postprocessing
                else ""), ""]
    class_columns = [c for c in dict.fromkeys(k for r in summary["table"] for k in r) if c.startswith("Dice ")]
    lines.append(markdown_table(["model", "sampler", "trainings", "cases", "Dice", *class_columns, "HD95", "run sd"],
                        [[r["model"], r["sampler"], r["trainings"], r["cases"],
                          f"{_fmt(r['Dice'])} ± {_fmt(r['Dice_sd'])}", *(_fmt(r.get(c)) for c in class_columns),
                          _fmt(r["HD95"], 2), _fmt(r["run_sd"])] for r in summary["table"]]))
    lines += ["", "## Paired differences", "",
              "A − B per held-out case (final predictions), mean, 95 % bootstrap interval over cases, Wilcoxon "
              "signed-rank p (two-sided), the cases where A scored higher and the folds where A's mean over the "
              "fold's cases is higher (each fold is a separate training, so this shows whether the difference "
              f"survives the spread between trainings). Verdict at the margin ±{study.margin:g} Dice: *on par* when "
              "the interval lies inside it; *A better* / *B better* when the whole interval lies beyond it and the "
              "rest of the evidence agrees; *undecided* when the interval crosses a margin or the evidence "
              "disagrees with itself (a signed-rank p ≥ 0.05, or a mean whose sign most folds contradict).", ""]
    lines.append(markdown_table(["A − B", "sampler", "cases", "mean", "95 % interval", "p", "A higher",
                                 "folds A higher", "verdict"],
                        [[f"{d['a']} − {d['b']}", d["sampler"], d["cases"], _fmt(d["mean"], signed=True),
                          _interval(d), f"{d['p_signed_rank']:.2g}", f"{d['a_better']}/{d['cases']}",
                          f"{d['folds_a_better']}/{d['folds']}",
                          d["verdict"]]
                         for d in summary["differences"]]))
    lines += _per_fold_markdown(summary)
    if summary["per_step"]:
        steps = max(r["step"] for r in summary["per_step"])
        runs = groups(summary["per_step"], "model", "sampler")
        lines += ["", "## Dice per sampling step", "",
                  markdown_table(["model", "sampler", *range(1, steps + 1)],
                         [[m, s, *(_fmt(r["Dice"]) for r in sorted(g, key=lambda r: r["step"]))]
                          for (m, s), g in runs.items()])]
    if summary["seed_spread"]:
        steps = max(r["step"] for r in summary["seed_spread"])
        runs = groups(summary["seed_spread"], "model", "sampler")
        lines += ["", "## Largest Dice difference across sampling seeds per step", "",
                  "Per case, max − min Dice over the seeds; mean over cases (largest case in brackets).", "",
                  markdown_table(["model", "sampler", "seeds", *range(1, steps + 1)],
                         [[m, s, g[0]["seeds"], *(f"{r['max_delta_dice']:.4f} ({r['max_delta_dice_largest']:.3f})"
                                                  for r in sorted(g, key=lambda r: r["step"]))]
                          for (m, s), g in runs.items()])]
    epochs = max(len(c["pseudo_dice"]) for c in summary["curves"])
    shown = sorted({0, epochs - 1, *range(0, epochs, max(1, epochs // 10))})
    lines += ["", "## Training", "", "Validation pseudo-Dice (nnU-Net's online estimate) per epoch, mean over "
              "trainings (`pseudo_dice.png`):", "",
              markdown_table(["trainer", *(e + 1 for e in shown)],
                     [[c["trainer"], *(_fmt(c["pseudo_dice"][e]) if e < len(c["pseudo_dice"]) else "" for e in shown)]
                      for c in summary["curves"]])]
    per_t = [c for c in summary["curves"] if "loss_per_timestep" in c]
    if per_t:
        steps = max(len(c["loss_per_timestep"]) for c in per_t)
        lines += ["", "Training x0 cross-entropy per timestep t in the last epoch (t = 0 least noise):", "",
                  markdown_table(["trainer", *(f"t={t}" for t in range(steps))],
                         [[c["trainer"], *(_fmt(v) for v in c["loss_per_timestep"])] for c in per_t])]
    lines += ["", "Wall clock (median per training run): the training process as `nnUNetv2_train` runs it "
              "(without its final validation), one epoch, and the prediction of one held-out case per sampler "
              "run (every step exported and scored):", "",
              markdown_table(["trainer", "trainings", "training (s)", "epoch (s)", "predict per case (s)"],
                     [[t["trainer"], t["trainings"], _fmt(t["training_seconds"], 0), _fmt(t["epoch_seconds"], 1),
                       _fmt(t["predict_seconds_per_case"], 1)] for t in summary["timing"]])]
    if missing:
        lines += ["", "## Missing", "", "Not yet trained or scored (these tables leave them out):", "",
                  *(f"- {m}" for m in missing)]
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, output: Path) -> list[Path]:
    """pseudo_dice.png (per epoch), dice_vs_step_<sampler>.png (non-diffusion models drawn flat, as reference),
    loss_per_timestep.png."""
    from nnunet_diffusion.evaluation.report import plot_metric_vs_step
    written = [plot_metric_vs_step({c["trainer"]: c["pseudo_dice"] for c in summary["curves"]}, "pseudo-Dice",
                                   output / "pseudo_dice.png", xlabel="epoch")]
    for (sampler,), rows in groups(summary["per_step"], "sampler").items():
        curves = {m: [r["Dice"] for r in sorted(g, key=lambda r: r["step"])]
                  for (m,), g in groups(rows, "model").items()}
        steps = max(len(c) for c in curves.values())
        curves.update({f"{r['model']} (no diffusion)": [r["Dice"]] * steps for r in summary["table"]
                       if r["sampler"] == NO_SAMPLER and not r["model"].endswith(POSTPROCESSED)})
        written.append(plot_metric_vs_step(curves, f"held-out Dice ({sampler})",
                                           output / f"dice_vs_step_{sampler}.png"))
    per_t = {c["trainer"]: c["loss_per_timestep"] for c in summary["curves"] if "loss_per_timestep" in c}
    if per_t:
        written.append(plot_metric_vs_step(per_t, "training x0 cross-entropy", output / "loss_per_timestep.png",
                                           xlabel="timestep t + 1"))
    return written
