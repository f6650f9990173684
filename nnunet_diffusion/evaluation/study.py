"""The plan of a comparison: which trainings (units: trainer × repeat × fold) it needs, with what budget and seed,
where each lives, and which held-out cases each is scored on. `crossval` holds out the folds of nnU-Net's
`splits_final.json`; `ablate` scores every fold's model on one test folder. The rest of the engine (jobs,
scoring, statistics, report) is the same for both."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from nnunet_diffusion.evaluation.options import EvaluationOptions
from nnunet_diffusion.training import TrainingRun
from nnunet_diffusion.utils import TrainingBudget, model_folder


@dataclass(frozen=True)
class Unit:
    """One training: trainer × repeat × fold."""
    trainer: str
    repeat: int
    fold: int

    @property
    def seed(self) -> int:
        """Distinct per repeat and fold, the same on every rerun."""
        return 1000 * self.repeat + self.fold

    def __str__(self) -> str:
        return f"{self.trainer} repeat {self.repeat} fold {self.fold}"


@dataclass(frozen=True)
class HeldOut:
    """The cases a fold's models are scored on: nnU-Net-named images and references (links or a test folder)."""
    images: Path
    labels: Path
    cases: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    """What to train and how to score it."""
    dataset: str  # nnU-Net's dataset name, DatasetXXX_Name
    configuration: str
    plans: str
    trainers: tuple[str, ...]
    baseline: str
    folds: tuple[int, ...]
    output: Path
    results_root: Path  # the nnUNet_results of repeat 0; repeat r lives in <results_root>/crossval_repeat_<r>
    evaluation: EvaluationOptions
    budget: TrainingBudget | None = None  # None: each trainer's own epochs and iterations
    repeats: int = 1
    repeat_trainers: tuple[str, ...] = ()  # default: every trainer
    repeat_folds: tuple[int, ...] = ()  # default: every fold
    num_folds: int = 5
    group_pattern: str | None = None
    diffusion_trainers: frozenset[str] = field(default_factory=frozenset)
    trainer_epochs: tuple[tuple[str, int], ...] = ()  # (trainer, epochs) instead of the budget's epochs
    postprocessing: bool = False  # also score every final prediction after nnU-Net's postprocessing
    margin: float = 0.005  # Dice: differences inside ±margin are "on par"
    test_folder: bool = False  # held-out cases: one test folder for every fold (ablate), not the folds (crossval)
    compare: tuple[tuple[str, str], ...] = ()  # further A − B pairs (models: trainers or "trainer + baseline")
    pretrained_weights: tuple[tuple[str, str], ...] = ()  # (trainer, checkpoint path; "{fold}" is the fold)
    train_cases: int | None = None  # each fold's models train on this many of its training cases (None: all)
    learning_curve: tuple[int, ...] = ()  # one study per number of training cases (`learning_curve.py`)

    def __post_init__(self):
        if self.baseline in self.diffusion_trainers:
            raise ValueError(f"--baseline {self.baseline} is a diffusion trainer; the ensembles need a non-diffusion "
                             f"one, e.g. nnUNetTrainer")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        if self.margin < 0:
            raise ValueError(f"--margin must not be negative, got {self.margin}")
        stray = sorted(set(self.repeat_trainers) - set(self.all_trainers))
        if stray:
            raise ValueError(f"--repeat-trainers {', '.join(stray)} are not among the compared trainers")
        stray = sorted({t for t, _ in self.trainer_epochs} - set(self.all_trainers))
        if stray:
            raise ValueError(f"--trainer-epochs names {', '.join(stray)}, which are not among the compared trainers")
        if self.trainer_epochs and self.budget is None:
            raise ValueError("--trainer-epochs changes the epochs of the --epochs budget; give --epochs too")
        ensemble = f" + {self.baseline}"
        stray = sorted({m for pair in self.compare for m in pair} - set(self.all_trainers)
                       - {t + ensemble for t in self.diffusion_trainers})
        if stray:
            raise ValueError(f"--compare names {', '.join(stray)}, which are neither compared trainers nor a diffusion "
                             f"trainer's ensemble 'TRAINER{ensemble}'")
        stray = sorted({t for t, _ in self.pretrained_weights} - set(self.all_trainers))
        if stray:
            raise ValueError(f"--pretrained-weights names {', '.join(stray)}, which are not among the compared "
                             f"trainers")
        if any(n < 1 for n in self.learning_curve) or len(set(self.learning_curve)) != len(self.learning_curve):
            raise ValueError(f"--train-cases must be distinct numbers ≥ 1, got {list(self.learning_curve)}")
        stray_folds = sorted(set(self.repeat_folds) - set(self.folds))
        if stray_folds:
            raise ValueError(f"--repeat-folds {stray_folds} are not among the folds {list(self.folds)}")

    @property
    def all_trainers(self) -> list[str]:
        """The baseline first (ensembles need it), then the compared trainers in the given order."""
        return list(dict.fromkeys([self.baseline, *self.trainers]))

    def units(self) -> list[Unit]:
        """In the order they are trained: fold by fold, every trainer of repeat 0, then fold by fold the further
        repeats; so an interrupted run leaves whole folds (each with its ensembles) behind."""
        units = [Unit(t, 0, f) for f in self.folds for t in self.all_trainers]
        for repeat in range(1, self.repeats):
            units += [Unit(t, repeat, f) for f in (self.repeat_folds or self.folds)
                      for t in (self.repeat_trainers or self.all_trainers)]
        return units

    def baseline_of(self, unit: Unit) -> Unit:
        """The baseline training a diffusion unit is ensembled with: its own repeat's, else repeat 0's."""
        own = Unit(self.baseline, unit.repeat, unit.fold)
        return own if own in self.units() else Unit(self.baseline, 0, unit.fold)

    def budget_of(self, trainer: str) -> TrainingBudget | None:
        """The budget's iterations, with the trainer's own epochs where --trainer-epochs names it."""
        epochs = dict(self.trainer_epochs).get(trainer)
        return self.budget if epochs is None else replace(self.budget, epochs=epochs)

    def results_of(self, repeat: int) -> Path:
        return self.results_root if repeat == 0 else self.results_root / f"crossval_repeat_{repeat}"

    def fold_folder(self, unit: Unit) -> Path:
        return model_folder(self.results_of(unit.repeat), self.dataset, unit.trainer, self.plans,
                            self.configuration) / f"fold_{unit.fold}"

    def unit_output(self, unit: Unit) -> Path:
        return self.output / "units" / unit.trainer / f"repeat_{unit.repeat}" / f"fold_{unit.fold}"

    def pretrained_weights_of(self, unit: Unit) -> str | None:
        """The checkpoint a unit starts from (`-pretrained_weights`), with "{fold}" filled in."""
        path = dict(self.pretrained_weights).get(unit.trainer)
        return None if path is None else path.replace("{fold}", str(unit.fold))

    def training_run(self, unit: Unit, save_every: int | None = None) -> TrainingRun:
        """The runner's view of a unit: nnU-Net's names, the unit's budget, seed, start weights and training
        cases (drawn with the unit's seed: the same cases for every trainer of a fold and repeat), its results
        root."""
        return TrainingRun(self.dataset, self.configuration, unit.fold, unit.trainer, self.plans,
                           self.budget_of(unit.trainer), unit.seed, self.evaluation.device, save_every,
                           self.pretrained_weights_of(unit), str(self.results_of(unit.repeat)),
                           train_cases=self.train_cases)


def link_fold_cases(output: Path, raw_dataset: Path, reference_folder: Path, fold: int, cases: Sequence[str],
                    file_ending: str) -> HeldOut:
    """Folders of links to one fold's held-out images and references, in nnU-Net's naming, for the predictor."""
    root = output / "folds" / f"fold_{fold}"
    images, labels = root / "images", root / "labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        channels = sorted((raw_dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}"))
        if not channels:
            raise ValueError(f"{raw_dataset / 'imagesTr'} holds no image of held-out case {case}")
        for source in [*channels, reference_folder / f"{case}{file_ending}"]:
            target = (labels if source.parent == reference_folder else images) / source.name
            try:
                target.symlink_to(source.resolve())
            except FileExistsError:  # an earlier run, or a job of the same fold, linked it
                pass
    return HeldOut(images, labels, tuple(cases))


def dataset_cases(preprocessed_dataset: Path, file_ending: str) -> list[str]:
    """The dataset's training cases: nnU-Net's copies of their references in `gt_segmentations`."""
    references = preprocessed_dataset / "gt_segmentations"
    cases = sorted(p.name[:-len(file_ending)] for p in references.glob(f"*{file_ending}"))
    if not cases:
        raise ValueError(f"{references} holds no '*{file_ending}' reference; run nnUNetv2_plan_and_preprocess first")
    return cases
