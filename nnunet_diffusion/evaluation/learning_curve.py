"""A comparison as a learning curve over labelled cases (`--train-cases N …`): one study per N, in which every
fold's models train on N of the fold's training cases (a seeded subset, nested across N, the same for every
trainer; `training_subsets.py`) and are scored on the fold's unchanged held-out cases; then Dice against N per
model, with each N's paired differences and verdicts, in `learning_curve.md`, `learning_curve.json` and
`learning_curve.png` beside the studies' `train_cases_<N>/` folders."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from nnunet_diffusion.evaluation.comparison import Comparison
from nnunet_diffusion.evaluation.model_evaluation import NO_SAMPLER
from nnunet_diffusion.evaluation.options import ExecutionOptions
from nnunet_diffusion.utils import markdown_table

LEARNING_CURVE = "learning_curve"
_STUDY_FOLDER = re.compile(r"train_cases_(\d+)$")


def study_folder(output: Path, train_cases: int) -> Path:
    return output / f"train_cases_{train_cases}"


def curve_folders(output: Path) -> dict[int, Path]:
    """The study folder of every N under a learning curve's output, smallest N first."""
    found = {int(m.group(1)): folder for folder in output.glob("train_cases_*")
             if (m := _STUDY_FOLDER.search(folder.name))}
    return dict(sorted(found.items()))


def comparison_at(comparison: Comparison, train_cases: int) -> Comparison:
    """The comparison of one N: its own output and results root, so that each N's models and scores stand apart."""
    study = comparison.study
    return replace(comparison, study=replace(study, output=study_folder(study.output, train_cases),
                                             results_root=study_folder(study.results_root, train_cases),
                                             train_cases=train_cases, learning_curve=()))


def run_learning_curve(comparison: Comparison, options: ExecutionOptions) -> dict:
    """Each N's comparison as `run_comparison` runs one (smallest N first: the cheapest results come first), then
    the learning curve of whatever has been scored. Every N is checked (`prepare`) before any of them runs."""
    from nnunet_diffusion.evaluation.scheduling import run_comparison
    comparisons = {n: comparison_at(comparison, n) for n in sorted(comparison.study.learning_curve)}
    for each in comparisons.values():
        each.prepare()
    for train_cases, each in comparisons.items():
        print(f"--- {train_cases} labelled training case(s) per fold ---", flush=True)
        run_comparison(each, options)
    return {} if options.dry_run else write_learning_curve(comparison.study.output)


def _fmt(value: float | None, signed: bool = False) -> str:
    return "" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"


def learning_curve_markdown(curve: dict) -> str:
    counts = curve["train_cases"]
    dice = {(r["model"], r["sampler"], r["train_cases"]): r for r in curve["table"]}
    models = list(dict.fromkeys((r["model"], r["sampler"]) for r in curve["table"]))
    lines = [f"# Learning curve over labelled cases on {curve['dataset']}", "",
             "Every fold's models trained on N of the fold's training cases (a seeded subset per fold and repeat, "
             "nested across N, the same for every trainer; listed in learning_curve.json) with the same budget at "
             "every N, and scored on the fold's held-out cases. Held-out Dice, mean ± sd over cases:", "",
             markdown_table(["model", "sampler", *(f"N = {n}" for n in counts)],
                            [[m, s, *(f"{_fmt(r['Dice'])} ± {_fmt(r['Dice_sd'])}" if (r := dice.get((m, s, n)))
                                      else "" for n in counts)] for m, s in models]), "",
             f"Paired differences at each N (per held-out case; 95 % bootstrap interval, Wilcoxon signed-rank p, "
             f"verdict at ±{curve['margin']:g} Dice, as in each N's results.md):", "",
             markdown_table(["N", "A − B", "sampler", "cases", "mean", "95 % interval", "p", "A higher", "verdict"],
                            [[d["train_cases"], f"{d['a']} − {d['b']}", d["sampler"], d["cases"],
                              _fmt(d["mean"], True), f"[{_fmt(d['interval_low'], True)}, "
                              f"{_fmt(d['interval_high'], True)}]", f"{d['p_signed_rank']:.2g}",
                              f"{d['a_better']}/{d['cases']}", d["verdict"]] for d in curve["differences"]])]
    missing = [f"N = {n}: {m}" for n, items in curve["missing"].items() for m in items]
    if missing:
        lines += ["", "## Missing", "", *(f"- {m}" for m in missing)]
    return "\n".join(lines) + "\n"


def write_learning_curve(output: Path) -> dict:
    """learning_curve.{json,md,png} from the results.json of every `train_cases_<N>/` under `output` so far."""
    from nnunet_diffusion.evaluation.report import plot_metric_vs_step, write_json
    results = {n: json.loads((folder / "results.json").read_text()) for n, folder in curve_folders(output).items()
               if (folder / "results.json").is_file()}
    if not results:
        return {}
    counts = sorted(results)
    first = results[counts[0]]
    curve = {"dataset": first["dataset"], "configuration": first["configuration"], "margin": first["margin"],
             "train_cases": counts,
             "table": [{"train_cases": n, **{k: r[k] for k in ("model", "sampler", "trainings", "cases", "Dice",
                                                                 "Dice_sd")}}
                       for n in counts for r in results[n]["table"]],
             "differences": [{"train_cases": n, **{k: v for k, v in d.items() if k != "per_fold"}}
                             for n in counts for d in results[n]["differences"]],
             "subsets": [{"train_cases": n, "trainer": u["trainer"], "repeat": u["repeat"], "fold": u["fold"],
                          "cases": u["training"].get("train_case_names")} for n in counts for u in results[n]["units"]],
             "missing": {n: results[n]["missing"] for n in counts if results[n]["missing"]}}
    write_json(curve, output / f"{LEARNING_CURVE}.json")
    (output / f"{LEARNING_CURVE}.md").write_text(learning_curve_markdown(curve), encoding="utf-8")
    by_model = {}
    for row in curve["table"]:
        label = row["model"] if row["sampler"] == NO_SAMPLER else f"{row['model']} ({row['sampler']})"
        by_model.setdefault(label, {})[row["train_cases"]] = row["Dice"]
    plot_metric_vs_step({m: [v.get(n, float("nan")) for n in counts] for m, v in by_model.items()},
                        "held-out Dice", output / f"{LEARNING_CURVE}.png", xlabel="labelled training cases (N)",
                        x_values=counts)
    return curve


def final_case_scores(per_case_csv: Path, model: str) -> dict[str, float]:
    """A model's Dice per held-out case from a comparison's per_case.csv: its final prediction (the last sampling
    step), averaged over seeds, repeats and folds as the comparison's tables average it."""
    import csv

    from nnunet_diffusion.evaluation.summary import case_scores
    with per_case_csv.open(newline="", encoding="utf-8") as f:
        rows = [{**r, "Dice": float(r["Dice"] or "nan")} for r in csv.DictReader(f)
                if r["model"] == model and r["step"] == r["steps"]]
    if not rows:
        raise ValueError(f"{per_case_csv} holds no score of {model}")
    return case_scores(rows)


def paired_across_curves(curve_a: Path, model_a: str, curve_b: Path, model_b: str, margin: float) -> list[dict]:
    """A − B at each N that both learning curves hold, on their common held-out cases, with the verdict at
    `margin`: for models that cannot share one comparison, e.g. with and without coordinate channels, which nnU-Net
    keeps as two datasets of the same cases."""
    from nnunet_diffusion.evaluation.statistics import paired_difference, verdict
    rows = []
    folders_b = curve_folders(curve_b)
    for n, folder_a in curve_folders(curve_a).items():
        files = (folder_a / "per_case.csv", folders_b.get(n, curve_b / "-") / "per_case.csv")
        if not all(file.is_file() for file in files):
            continue
        difference = paired_difference(model_a, model_b, final_case_scores(files[0], model_a),
                                       final_case_scores(files[1], model_b))
        rows.append({"train_cases": n, **difference.as_row(), "margin": margin, "verdict": verdict(difference, margin)})
    return rows
