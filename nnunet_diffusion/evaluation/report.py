"""Writers for result tables and curves: CSV/JSON for machines, Markdown for the README, PNG for the eye."""
from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunet_diffusion import utils


# One colour per trainer in every figure of every report, so that a trainer is recognised across pages; other
# models (short schedules, ensembles, ablations) get a colour from their name, moved on to the next free one
# where two names of one figure would share it.
TRAINER_COLOURS = {"nnUNetTrainer": "tab:gray", "nnUNetTrainerDiff": "tab:blue",
                   "nnUNetTrainerDiffRecycle": "tab:orange", "nnUNetTrainerDiffRecycleAllT": "tab:green",
                   "nnUNetTrainerDiffRecycleFinetune": "tab:red", "nnUNetTrainerStockContinue": "tab:brown",
                   "nnUNetTrainerDiffSelfCond": "tab:purple"}
OTHER_COLOURS = ("tab:pink", "tab:olive", "tab:cyan", "navy", "gold", "teal", "crimson", "darkkhaki", "indigo",
                 "lightcoral", "darkgreen", "chocolate")


def model_of(label: str) -> str:
    """The model a plot label names (what precedes " (sampler)" or ": run")."""
    return label.split(" (")[0].split(": ")[0]


def figure_colours(labels: Sequence[str]) -> dict[str, str]:
    """The colour of every label of one figure: the trainer's own, else its name's, never one a figure uses twice
    for two models (unless there are more models than colours)."""
    models = list(dict.fromkeys(model_of(label) for label in labels))
    colours = {m: TRAINER_COLOURS[m] for m in models if m in TRAINER_COLOURS}
    for model in sorted(m for m in models if m not in colours):
        start = zlib.crc32(model.encode()) % len(OTHER_COLOURS)
        free = [OTHER_COLOURS[(start + i) % len(OTHER_COLOURS)] for i in range(len(OTHER_COLOURS))
                if OTHER_COLOURS[(start + i) % len(OTHER_COLOURS)] not in colours.values()]
        colours[model] = free[0] if free else OTHER_COLOURS[start]
    return {label: colours[model_of(label)] for label in labels}


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per mapping; columns are the union of the keys in first-seen order, missing cells left empty."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = _prepare(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """JSON with numpy scalars/arrays converted; NaN is kept as NaN, as in nnU-Net's summary.json."""
    path = _prepare(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_to_builtin)
        f.write("\n")
    return path


def records_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """`utils.markdown_table` of records (mappings): the named columns, floats with 4 decimals, missing cells
    empty."""
    if not columns:
        raise ValueError("records_table needs at least one column")
    return utils.markdown_table([_cell(c) for c in columns],
                                [[_cell(row.get(c, "")) for c in columns] for row in rows]) + "\n"


def plot_metric_vs_step(curves: Mapping[str, Sequence[float]], ylabel: str, out_png: str | Path,
                        xlabel: str = "sampling step", x_values: Sequence[int] | None = None) -> Path:
    """One line per trainer against sampling step 1..K (e.g. Dice vs step, max ΔDice across seeds vs step), or
    against another 1-based count named by `xlabel` (epochs, timesteps), or against `x_values` (e.g. labelled
    training cases; NaN where a trainer has no value).

    Uses the Agg canvas directly, so no display is needed and no global matplotlib backend is changed. The legend
    sits beside the axes and the canvas grows to fit it (a tight bounding box; tight_layout gave up, with a warning,
    on long labels), so trainer names never hide the curves.
    """
    if not curves:
        raise ValueError("no curves to plot; pass {trainer name: [value per step]}")
    empty = [name for name, values in curves.items() if len(values) == 0]
    if empty:
        raise ValueError(f"curves without values: {', '.join(empty)}")
    figure = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = figure_colours(list(curves))
    for name, values in curves.items():
        steps = np.arange(1, len(values) + 1) if x_values is None else np.asarray(x_values[:len(values)])
        axes.plot(steps, np.asarray(values, dtype=float), marker="o", label=name, color=colours[name])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")  # beside the axes: names are long
    out_png = _prepare(out_png)
    figure.savefig(out_png, format="png", bbox_inches="tight")
    return out_png


def plot_dice_vs_time(rows: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Dice against predict seconds per case, one line per model and sampler through its K = 1 … T runs, early
    exit and one-pass (stock) runs as labelled points."""
    if not rows:
        raise ValueError("no per-K rows to plot")
    figure = Figure(figsize=(5.5, 3.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = figure_colours([r["model"] for r in rows])
    for model, sampler in dict.fromkeys((r["model"], r["sampler"]) for r in rows):
        group = [r for r in rows if r["model"] == model and r["sampler"] == sampler]
        line = [r for r in group if str(r["run"]).startswith("K = ")]
        label = model if sampler == "-" else f"{model} ({sampler})"
        if line:
            axes.plot([r["seconds_per_case"] for r in line], [r["Dice"] for r in line], marker="o", label=label,
                      color=colours[model])
        for r in group:
            if r not in line:
                axes.scatter([r["seconds_per_case"]], [r["Dice"]], marker="*" if sampler != "-" else "s",
                             label=f"{label}: {r['run']}", color=colours[model])
    axes.set_xlabel("predict seconds per case")
    axes.set_ylabel("mean Dice")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    out_png = _prepare(out_png)
    figure.savefig(out_png, format="png", bbox_inches="tight")
    return out_png


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cell(value: Any) -> str:
    text = f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)
    return text.replace("|", "\\|")


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")
