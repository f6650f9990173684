"""Cross-validation folds in nnU-Net's `splits_final.json`: nnU-Net's own seeded split, over groups of cases when
cases are not independent (ACDC's two frames of one patient must be held out together)."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from nnunetv2.utilities.crossval_split import generate_crossval_split

SPLITS_FILE = "splits_final.json"
NNUNET_SPLIT_SEED = 12345  # what nnU-Net's trainer uses when it writes splits_final.json itself


def group_of(case: str, pattern: str | None) -> str:
    """The group a case belongs to: the first match of `pattern` in its name (the case itself without one)."""
    if pattern is None:
        return case
    match = re.search(pattern, case)
    if match is None:
        raise ValueError(f"case {case} does not match the grouping pattern {pattern!r}; give a pattern that "
                         f"every case name contains, e.g. 'patient\\d+' for patient042_frame01")
    return match.group(0)


def grouped_splits(cases: Sequence[str], num_folds: int, pattern: str | None = None) -> list[dict[str, list[str]]]:
    """nnU-Net's seeded k-fold split (`generate_crossval_split`) drawn over groups, so that all cases of a group
    land in the same fold; without a pattern it is exactly the split nnU-Net writes for the cases."""
    groups: dict[str, list[str]] = {}
    for case in sorted(cases):
        groups.setdefault(group_of(case, pattern), []).append(case)
    if num_folds < 2 or num_folds > len(groups):
        raise ValueError(f"{num_folds} folds need between 2 and {len(groups)} groups of cases; found {len(groups)} "
                         f"group(s) in {len(cases)} case(s)")
    group_splits = generate_crossval_split(sorted(groups), seed=NNUNET_SPLIT_SEED, n_splits=num_folds)
    return [{part: sorted(c for g in split[part] for c in groups[g]) for part in ("train", "val")}
            for split in group_splits]


def check_splits(splits: Sequence[dict], cases: Sequence[str], pattern: str | None, source: Path) -> None:
    """Every case held out exactly once, and (with a pattern) no group split between folds."""
    held_out = [c for split in splits for c in split["val"]]
    problems = []
    unknown = sorted(set(held_out) - set(cases))
    if unknown:
        problems.append(f"it holds out cases the dataset lacks: {', '.join(unknown[:5])}")
    twice = sorted({c for c in held_out if held_out.count(c) > 1})
    if twice:
        problems.append(f"it holds out cases in more than one fold: {', '.join(twice[:5])}")
    for fold, split in enumerate(splits):
        overlap = sorted(set(split["train"]) & set(split["val"]))
        if overlap:
            problems.append(f"fold {fold} trains on cases it holds out: {', '.join(overlap[:5])}")
        if pattern is not None:
            train_groups = {group_of(c, pattern) for c in split["train"]}
            shared = sorted({group_of(c, pattern) for c in split["val"]} & train_groups)
            if shared:
                problems.append(f"fold {fold} trains on groups it holds out ({', '.join(shared[:5])})")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ". Remove it to let nnunet-diffusion crossval "
                         "write one, or fix it")


def load_or_write_splits(preprocessed_dataset_folder: Path, cases: Sequence[str], num_folds: int,
                         pattern: str | None) -> list[dict[str, list[str]]]:
    """The dataset's `splits_final.json` if there is one (nnU-Net trains on it), checked; otherwise written with
    `grouped_splits`, where nnU-Net's trainer will find it."""
    path = Path(preprocessed_dataset_folder) / SPLITS_FILE
    if path.is_file():
        splits = json.loads(path.read_text())
    else:
        splits = grouped_splits(cases, num_folds, pattern)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(splits, indent=1))
        partial.replace(path)
    check_splits(splits, cases, pattern, path)
    return splits
