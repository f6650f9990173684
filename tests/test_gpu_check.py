"""`bash bench/gpu_check.sh --cpu-smoke`: the GPU check's whole code path on the CPU (linking and planning the
shared MSD Hippocampus data, or a generated dataset where it is missing; six trainers built by nnU-Net, compiled
vs eager, short trainings, nnU-Net's predictor), so that the one run on a GPU machine does not fail on something a CPU could have shown."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"
RATIO = re.compile(r"^Diff (\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\], Recycle (\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\] "
                   r"× stock$")


@pytest.fixture(scope="module")
def smoke_output(tmp_path_factory) -> str:
    """The smoke run on the shared Hippocampus data, or, where a machine lacks it (a CI clone), on a generated
    dataset in nnU-Net's raw layout: the same code path either way."""
    data = DATA
    if not (DATA / "dataset.json").is_file():
        from nnunet_diffusion.datasets.synthetic import generate_synthetic_dataset
        data = generate_synthetic_dataset(tmp_path_factory.mktemp("raw"), 4, "Hippocampus", num_train=8, num_test=0,
                                          shape=(32, 32, 32))
    # the script runs `python`: this interpreter's, whether or not its environment is activated
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--data", str(data)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def table(smoke_output: str) -> dict[str, list[str]]:
    """The printed Markdown table: check name → [stock, Diff, Recycle, result]."""
    lines = [line for line in smoke_output.splitlines() if line.startswith("| ")]
    assert lines[0] == "| check | stock | Diff | Recycle | result |"
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:])}


def test_the_table_has_every_check(table):
    assert list(table) == [
        "train step, eager (ms)", "train step, compiled (ms)", "train step, compiled / eager",
        "peak memory, eager (MiB)", "peak memory, compiled (MiB)",
        "compiled vs eager: forward at t = 0 and T−1", "compiled vs eager: gradients of nnU-Net's loss",
        "compiled vs eager: seeded sampling, 5 DDIM steps", "predict per case, default steps (ms)"]


@pytest.mark.parametrize("row", ["train step, eager (ms)", "train step, compiled (ms)",
                                 "predict per case, default steps (ms)"])
def test_times_are_positive_and_ratios_lie_in_their_intervals(table, row):
    *cells, result = table[row]
    assert all(float(cell.split()[0]) > 0 for cell in cells)
    match = RATIO.match(result)
    assert match, result
    for ratio, low, high in (map(float, match.groups()[:3]), map(float, match.groups()[3:])):
        assert 0 < low <= ratio <= high


def test_memory_and_compiled_over_eager_are_positive(table):
    for row in ("peak memory, eager (MiB)", "peak memory, compiled (MiB)", "train step, compiled / eager"):
        assert all(float(cell) > 0 for cell in table[row][:3])
    for row in ("peak memory, eager (MiB)", "peak memory, compiled (MiB)"):
        ratios = re.fullmatch(r"Diff (\d+\.\d+), Recycle (\d+\.\d+) × stock", table[row][3])
        assert ratios and all(float(r) > 0 for r in ratios.groups()), table[row][3]


def test_compiled_equals_eager_and_the_timestep_matters(table):
    compile_rows = [name for name in table if name.startswith("compiled vs eager")]
    assert all(table[name][3].startswith("pass") for name in compile_rows), {n: table[n] for n in compile_rows}
    forward = table["compiled vs eager: forward at t = 0 and T−1"][2]
    effect = re.search(r"t = 0 vs T−1 differ by (\d+\.\d+)", forward)
    assert effect and float(effect.group(1)) >= 0.01


def test_prediction_runs_each_models_default_steps(table):
    """The default sampling travels in the checkpoint: all T = 5 steps for Diff, 1 for the fine-tuned recycling."""
    stock, diff, recycle, _ = table["predict per case, default steps (ms)"]
    assert (stock.split(" ", 1)[1], diff.split(" ", 1)[1], recycle.split(" ", 1)[1]) == \
        ("(1 pass)", "(5 steps)", "(1 step)")


def test_the_header_names_device_versions_and_elapsed_time(smoke_output):
    assert "## GPU check (--cpu-smoke: CPU, small)" in smoke_output
    assert re.search(r"^- device: cpu \(", smoke_output, re.MULTILINE)
    assert re.search(r"^- nnunetv2 \d+\.\d+", smoke_output, re.MULTILINE)
    assert "dataset: Dataset004_Hippocampus, plans nnUNetPlansCPU, configuration 3d_cpu" in smoke_output
    assert re.search(r"^- elapsed: \d+ s after imports$", smoke_output, re.MULTILINE)
