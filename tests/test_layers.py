"""The import layers of docs/architecture.md: models and datasets never import trainers, evaluation or commands."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_diffusion"
LOWER_LAYERS = ("core", "bpr", "pretraining", "datasets")
UPPER = ("nnunet_diffusion.trainers", "nnunet_diffusion.evaluation", "nnunet_diffusion.cli", "nnunet_diffusion.demo",
         "nnunet_diffusion.training", "nnunet_diffusion.trainer_lookup")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_import_no_trainer_evaluation_or_command_module(layer):
    modules = sorted((PACKAGE / layer).glob("*.py"))
    assert modules
    offending = {f"{m.relative_to(PACKAGE)}: {name}" for m in modules for name in imported_modules(m)
                 if name.startswith(UPPER)}
    assert not offending
