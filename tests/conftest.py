"""Session fixtures: an isolated nnU-Net workspace in which the plugin's trainers are discoverable."""
from __future__ import annotations

import os

import pytest

from nnunet_diffusion.environment import with_plugin_environment

NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that needs the nnU-Net workspace (directly or through a fixture) runs real nnU-Net: `e2e`."""
    for item in items:
        if "nnunet_workspace" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def nnunet_workspace(tmp_path_factory):
    """Point nnU-Net's folders at a temporary workspace for the whole session and make our trainers findable."""
    root = tmp_path_factory.mktemp("nnunet")
    saved = {k: os.environ.get(k) for k in NNUNET_VARIABLES}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        os.environ[name] = str(root / name)
    os.environ["nnUNet_def_n_proc"] = "2"
    os.environ["nnUNet_extTrainer"] = with_plugin_environment()["nnUNet_extTrainer"]
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def demo_dataset(nnunet_workspace):
    """The generated ball-and-box dataset, planned and preprocessed, with the cpu_tiny configuration."""
    from nnunet_runs import make_dataset
    return make_dataset(990, "DiffusionDemo", num_train=10, num_test=2)


@pytest.fixture(scope="session")
def cli_trained_recycle(demo_dataset):
    """nnUNetTrainerDiffRecycle_1epoch trained with the real `nnUNetv2_train` command (250 iterations on the
    cpu_tiny configuration), including nnU-Net's own final validation of fold 0."""
    from nnunet_runs import CONFIGURATION, PLANS, model_folder, run
    trainer = "nnUNetTrainerDiffRecycle_1epoch"
    run(["nnUNetv2_train", str(demo_dataset.dataset_id), CONFIGURATION, "0", "-p", PLANS, "-tr", trainer,
         "-device", "cpu"])
    return model_folder(demo_dataset, trainer)


@pytest.fixture(scope="session")
def untrained_recycle_fold(demo_dataset, cli_trained_recycle) -> int:
    """A fold of the CLI-trained recycling model folder (whose fold 0 is trained) holding the network as
    initialised, never updated: the control that shows what training changed."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunet_runs import CONFIGURATION, PLANS
    fold = 2
    trainer = get_trainer_from_args(str(demo_dataset.dataset_id), CONFIGURATION, fold,
                                    cli_trained_recycle.name.split("__")[0], PLANS, device=torch.device("cpu"))
    trainer.initialize()
    trainer.save_checkpoint(f"{trainer.output_folder}/checkpoint_final.pth")
    return fold


@pytest.fixture(scope="session")
def preprocessed_plans(demo_dataset):
    """PlansManager and ConfigurationManager of the demo dataset's CPU configuration."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_runs import CONFIGURATION, PLANS
    plans_manager = PlansManager(os.path.join(os.environ["nnUNet_preprocessed"], demo_dataset.name, f"{PLANS}.json"))
    return plans_manager, plans_manager.get_configuration(CONFIGURATION)


@pytest.fixture(scope="session")
def coordinate_dataset(demo_dataset):
    """The demo dataset with its image geometry as three coordinate channels (`add-coordinates --geometry`),
    planned and preprocessed with the cpu_tiny configuration: what the coordinate-guided trainers read."""
    import os
    from pathlib import Path
    from nnunet_diffusion.datasets.coordinate_channels import GeometryCoordinates, add_coordinates_to_dataset
    from nnunet_runs import Dataset, plan_and_preprocess
    raw = add_coordinates_to_dataset(demo_dataset.raw, Path(os.environ["nnUNet_raw"]), 994, "DiffusionDemoCoord",
                                     GeometryCoordinates())
    plan_and_preprocess(994)
    return Dataset(994, raw)


@pytest.fixture(scope="session")
def bpr_checkpoint(demo_dataset):
    """A BPR for the demo dataset's plans: nnUNetTrainerBPR trained for one iteration by nnU-Net's loop."""
    from pathlib import Path
    from nnunet_runs import train_in_process
    trainer = train_in_process(demo_dataset, "nnUNetTrainerBPR", iterations=1)
    return Path(trainer.output_folder) / "checkpoint_final.pth"


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny networks: a second intra-op thread gains nothing there, and on a busy 2-core machine
    every operation then waits for a descheduled thread (measured: such a module 5-8 times slower)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
