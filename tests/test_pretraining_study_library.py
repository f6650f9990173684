"""The library behind experiments/pretraining_phantom.py: a probe dataset preprocessed with the plans of the
pretraining dataset (docs/pretraining.md, section 5), the study's dataset preparation, coordinate agreement with
true positions, and cached probing on a planned dataset down to nnU-Net's predictions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_diffusion.bpr.agreement import coordinate_agreement, real_ct_organs
from nnunet_diffusion.bpr.model import AXIS_NAMES
from nnunet_diffusion.datasets.coordinate_channels import GeometryCoordinates, add_coordinates_to_dataset
from nnunet_diffusion.datasets.phantom import LABELS as PHANTOM_LABELS, generate_phantom_dataset
from nnunet_diffusion.datasets.pretraining_study import (PhantomStudyDatasets, StudyDataset, StudyFolders,
                                                         prepare_hippocampus, prepare_phantom)
from nnunet_diffusion.datasets.synthetic import generate_synthetic_dataset
from nnunet_diffusion.plans import plan_and_preprocess_with_preset, preprocess_with_plans_of
from nnunet_diffusion.pretraining.cached_probing import decoder_features_of
from nnunet_diffusion.pretraining.dataset_probing import (HeadTraining, ProbeDataset, VoxelMLP,
                                                          cached_dataset_features, num_classes, predict_test_cases,
                                                          probe_cases, probe_network, train_head)
from nnunet_diffusion.pretraining.network import decoder_level_channels
from nnunet_diffusion.trainers.pretraining import nnUNetTrainerDiffPretrain
from nnunet_diffusion.trainers.probes import nnUNetTrainerProbeNonLinear
from nnunet_runs import CONFIGURATION, PLANS, Dataset, mean_dice, model_folder, run, train_in_process


def preprocessed_root() -> Path:
    return Path(os.environ["nnUNet_preprocessed"])


def study_folders(commands: list[list[str]]) -> StudyFolders:
    """The session's nnU-Net folders; every command run is recorded in `commands`."""
    def recorded(command: list[str]) -> None:
        commands.append(command)
        run(command)
    return StudyFolders(Path(os.environ["nnUNet_raw"]), preprocessed_root(), recorded)


def plans_of(folder: Path, plans: str = PLANS) -> dict:
    return json.loads((folder / f"{plans}.json").read_text())


# --- one set of plans for pretraining and probe datasets ------------------------------------------------------------

def test_the_target_is_preprocessed_with_the_plans_of_the_source(nnunet_workspace):
    raw = Path(os.environ["nnUNet_raw"])
    generate_synthetic_dataset(raw, 976, "PlansSource", 4, 0, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0), seed=0)
    generate_synthetic_dataset(raw, 977, "PlansTarget", 4, 0, shape=(20, 20, 20), spacing=(2.0, 2.0, 2.0), seed=1)
    plan_and_preprocess_with_preset(976, "cpu_tiny", preprocessed_root(), run)
    written = preprocess_with_plans_of(976, 977, "cpu_tiny", preprocessed_root(), run)
    assert written == preprocessed_root() / "Dataset977_PlansTarget" / f"{PLANS}.json"
    source, target = plans_of(preprocessed_root() / "Dataset976_PlansSource"), plans_of(written.parent)
    assert target["dataset_name"] == "Dataset977_PlansTarget"
    assert target["configurations"] == source["configurations"]  # spacing, patch size, architecture: the source's
    assert source["configurations"]["3d_fullres"]["spacing"] == [1.0, 1.0, 1.0]
    assert target["foreground_intensity_properties_per_channel"] == \
        source["foreground_intensity_properties_per_channel"]  # normalised as the source's data was
    # its own plans would keep its 2 mm spacing: the cases are resampled to the source's 1 mm instead
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = written.parent / "nnUNetPlans_3d_fullres"
    cases = infer_dataset_class(str(folder))(str(folder))
    assert len(cases.identifiers) == 4
    assert all(np.asarray(cases.load_case(key)[0]).shape[1:] == (40, 40, 40) for key in cases.identifiers)


def test_a_probe_split_holds_the_drawn_training_cases_and_the_others_as_test_cases(nnunet_workspace, tmp_path):
    source = generate_synthetic_dataset(tmp_path, 900, "Labelled", 7, 0, shape=(32, 32, 32), seed=2)
    images, probe = StudyDataset(978, "SplitImages"), StudyDataset(979, "SplitProbe")
    commands: list[list[str]] = []
    folders = study_folders(commands)
    prepare_hippocampus(folders, images, probe, source, probe_cases=3)
    assert folders.raw(images).resolve() == source.resolve()  # the images dataset is the source itself
    probe_raw = folders.raw(probe)
    train = sorted(p.name for p in (probe_raw / "imagesTr").iterdir())
    test = sorted(p.name for p in (probe_raw / "imagesTs").iterdir())
    assert len(train) == 3 and len(test) == 4
    assert sorted(train + test) == sorted(p.name for p in (source / "imagesTr").iterdir())
    assert sorted(p.name for p in (probe_raw / "labelsTs").iterdir()) == [n.replace("_0000", "") for n in test]
    assert all((probe_raw / "imagesTr" / name).resolve() == (source / "imagesTr" / name).resolve() for name in train)
    dataset_json = json.loads((probe_raw / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 3 and dataset_json["labels"] == json.loads(
        (source / "dataset.json").read_text())["labels"]
    assert plans_of(folders.preprocessed(probe))["configurations"] == \
        plans_of(folders.preprocessed(images))["configurations"]
    assert [c[0] for c in commands] == ["nnUNetv2_plan_and_preprocess", "nnUNetv2_plan_and_preprocess",
                                        "nnUNetv2_move_plans_between_datasets", "nnUNetv2_preprocess"]
    prepare_hippocampus(folders, images, probe, source, probe_cases=3)
    assert len(commands) == 4, "a prepared study runs nothing again"


def test_a_probe_split_needs_training_and_test_cases(tmp_path):
    source = generate_synthetic_dataset(tmp_path / "source", 900, "Labelled", 3, 0, shape=(8, 8, 8), seed=2)
    folders = StudyFolders(tmp_path / "raw", tmp_path / "preprocessed", run)
    with pytest.raises(ValueError, match="has 3 training cases.*between 1 and 2"):
        prepare_hippocampus(folders, StudyDataset(980, "FewImages"), StudyDataset(981, "FewProbe"), source, 3)
    assert not folders.raw(StudyDataset(981, "FewProbe")).exists()


@pytest.mark.slow
def test_the_phantom_study_datasets_share_plans_and_carry_the_bprs_and_the_true_coordinates(nnunet_workspace):
    """About 4 minutes on 2 cores: nnU-Net's fingerprint samples 10^8 intensities per channel, and three of the
    five datasets have four channels."""
    datasets = PhantomStudyDatasets(StudyDataset(961, "StudyPretrain"), StudyDataset(962, "StudyPretrainCoord"),
                                    StudyDataset(963, "StudyProbe"), StudyDataset(964, "StudyProbeCoord"),
                                    StudyDataset(965, "StudyProbeTrue"))
    commands: list[list[str]] = []
    folders = study_folders(commands)
    trained: list[int] = []

    def train_bpr(dataset: StudyDataset) -> Path:
        """One iteration of nnU-Net's loop; a finished training is kept, as the experiment's runner keeps it."""
        study = Dataset(dataset.dataset_id, folders.raw(dataset))
        checkpoint = model_folder(study, "nnUNetTrainerBPR") / "fold_0" / "checkpoint_final.pth"
        if not checkpoint.is_file():
            trained.append(dataset.dataset_id)
            train_in_process(study, "nnUNetTrainerBPR", iterations=1)
        return checkpoint

    bpr = prepare_phantom(folders, datasets, pretrain_cases=5, probe_cases=2, test_cases=1, train_bpr=train_bpr)
    assert trained == [961] and bpr.is_file()
    configurations = {d.dataset_id: plans_of(folders.preprocessed(d))["configurations"]
                      for d in (datasets.pretrain, datasets.pretrain_coord, datasets.probe, datasets.probe_coord,
                                datasets.probe_true)}
    assert configurations[963] == configurations[961]
    assert configurations[964] == configurations[965] == configurations[962]
    probe_coord = json.loads((folders.raw(datasets.probe_coord) / "dataset.json").read_text())
    probe_true = json.loads((folders.raw(datasets.probe_true) / "dataset.json").read_text())
    assert probe_coord["coordinate_channels"]["bpr"] == str(bpr.resolve())
    assert probe_true["coordinate_channels"]["source"] == "geometry"
    agreement = coordinate_agreement(folders.raw(datasets.probe_coord), folders.raw(datasets.probe_true))
    assert sorted(agreement["per_case"]) == ["studyprobe_000", "studyprobe_001", "studyprobe_002"]
    assert all(np.isfinite(v) for v in agreement["pooled_r2"].values())
    ran = len(commands)
    assert prepare_phantom(folders, datasets, 5, 2, 1, train_bpr) == bpr
    assert len(commands) == ran and trained == [961], "a prepared study runs nothing again"


# --- coordinates against true positions -----------------------------------------------------------------------------

class ShiftedGeometry(GeometryCoordinates):
    """The true coordinates shifted by a different offset in every case: what a BPR with case offsets writes."""
    name = "shifted geometry"

    def __init__(self):
        self.cases = 0

    def __call__(self, image_files):
        self.cases += 1
        return super().__call__(image_files) + 0.5 * self.cases


@pytest.fixture(scope="module")
def phantom_with_coordinates(tmp_path_factory) -> dict[str, Path]:
    raw = tmp_path_factory.mktemp("raw")
    phantom = generate_phantom_dataset(raw, 966, "Agreement", num_train=2, num_test=1, seed=5)
    return {"phantom": phantom,
            "true": add_coordinates_to_dataset(phantom, raw, 967, "AgreementTrue", GeometryCoordinates()),
            "shifted": add_coordinates_to_dataset(phantom, raw, 968, "AgreementShifted", ShiftedGeometry())}


def test_true_coordinates_agree_with_themselves_and_case_offsets_lower_the_pooled_r2(phantom_with_coordinates,
                                                                                   tmp_path):
    validation = tmp_path / "bpr_validation.json"
    validation.write_text(json.dumps({"mean_per_axis": {"axial": 0.9, "coronal": 0.8, "sagittal": 0.7}}))
    exact = coordinate_agreement(phantom_with_coordinates["true"], phantom_with_coordinates["true"], validation)
    assert sorted(exact["per_case"]) == ["agreement_000", "agreement_001", "agreement_002"]
    for rows in exact["per_case"].values():
        assert list(rows) == list(AXIS_NAMES)
        for row in rows.values():
            assert row["slope"] == pytest.approx(1.0, abs=1e-6) and row["intercept"] == pytest.approx(0.0, abs=1e-5)
    assert all(r2 == pytest.approx(1.0) for r2 in exact["pooled_r2"].values())
    assert exact["spearman"] == {"axial": 0.9, "coronal": 0.8, "sagittal": 0.7}
    shifted = coordinate_agreement(phantom_with_coordinates["shifted"], phantom_with_coordinates["true"])
    intercepts = [rows["axial"]["intercept"] for rows in shifted["per_case"].values()]
    assert intercepts == pytest.approx([0.5, 1.0, 1.5], abs=1e-4)
    assert all(row["slope"] == pytest.approx(1.0, abs=1e-5) for rows in shifted["per_case"].values()
               for row in rows.values())
    assert all(r2 < 0.99 for r2 in shifted["pooled_r2"].values()) and "spearman" not in shifted


def test_organ_centroids_read_the_coordinates_at_each_organs_position(phantom_with_coordinates):
    phantom = phantom_with_coordinates["phantom"]
    image, labels = phantom / "imagesTr" / "agreement_000_0000.nii.gz", phantom / "labelsTr" / "agreement_000.nii.gz"
    organs = {value: name for name, value in PHANTOM_LABELS.items() if value}
    result = real_ct_organs(image, labels, GeometryCoordinates(), organs)
    present = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(labels))))) - {0}
    assert [row["organ"] for row in result["organs"]] == [organs[v] for v in organs if v in present]
    spacing_z = sitk.ReadImage(str(image)).GetSpacing()[2]
    for row in result["organs"]:  # the geometry at the centroid's slice: its true z within half a slice
        assert abs(100 * row["bpr_axial"] - row["true_z_mm"]) <= spacing_z / 2 + 1e-3
    assert result["spearman_over_organs"] > 0.95


# --- cached probing on a planned dataset ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_probe(demo_dataset) -> ProbeDataset:
    return ProbeDataset(demo_dataset.raw, preprocessed_root() / demo_dataset.name, PLANS, CONFIGURATION)


@pytest.fixture(scope="module")
def pretraining_checkpoint(demo_probe, tmp_path_factory) -> Path:
    """A diffusion pretraining network as nnU-Net's trainer builds it, saved in nnU-Net's checkpoint format."""
    from nnunet_diffusion.pretraining.dataset_probing import probe_plans
    plans_manager, configuration, _ = probe_plans(demo_probe)
    torch.manual_seed(0)
    network = nnUNetTrainerDiffPretrain.build_network_architecture(plans_manager, configuration, 1, 1, False)
    path = tmp_path_factory.mktemp("pretraining") / "checkpoint_final.pth"
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainerDiffPretrain"}, path)
    return path


def test_the_probe_network_holds_the_pretrained_backbone_and_a_head_drawn_from_its_seed(demo_probe,
                                                                                         pretraining_checkpoint):
    pretrained = torch.load(pretraining_checkpoint, weights_only=False)["network_weights"]
    first, again, other = (probe_network(nnUNetTrainerProbeNonLinear, demo_probe, pretraining_checkpoint, seed)
                           for seed in (0, 0, 1))
    backbone = {k: v for k, v in first.state_dict().items() if not k.startswith("head.")}
    assert backbone and all(torch.equal(v, pretrained[k]) for k, v in backbone.items())
    head = [k for k in first.state_dict() if k.startswith("head.")]
    assert all(torch.equal(first.state_dict()[k], again.state_dict()[k]) for k in head)
    assert not all(torch.equal(first.state_dict()[k], other.state_dict()[k]) for k in head)
    assert not first.training


def test_a_head_trained_on_cached_features_predicts_every_test_case(demo_probe, demo_dataset, pretraining_checkpoint,
                                                                   tmp_path, one_torch_thread):
    cases = list(probe_cases(demo_probe))
    assert len(cases) == 10 and all(labels.min() >= 0 for _, labels in cases)
    training = HeadTraining(voxels_per_tile=128, iterations=20, learning_rate=1e-2, batch_voxels=256)
    network = probe_network(nnUNetTrainerProbeNonLinear, demo_probe, pretraining_checkpoint, 0)
    features, labels = cached_dataset_features(decoder_features_of(network), demo_probe, training)
    assert features.shape[1] == sum(decoder_level_channels(network.unet)) and len(labels) >= 10 * 128
    backbone = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith("head.")}
    losses = train_head(network.head, decoder_level_channels(network.unet), (features, labels), 0, training)
    assert len(losses) == 20 and all(torch.equal(v, network.state_dict()[k]) for k, v in backbone.items())
    predict_test_cases(network, demo_probe, "nnUNetTrainerProbeNonLinear", tmp_path / "probe", "cpu")
    for image in sorted(demo_dataset.test_images.glob("*_0000.nii.gz")):
        prediction = sitk.ReadImage(str(tmp_path / "probe" / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}


def test_a_voxel_mlp_on_the_intensity_learns_what_the_intensity_separates(demo_probe, demo_dataset, tmp_path,
                                                                          one_torch_thread):
    """The synthetic ball and box differ from the background in intensity, which the noise blurs: the reference
    probe finds most of them (mean Dice 0.69 here)."""
    training = HeadTraining(voxels_per_tile=512, iterations=200, learning_rate=1e-2, batch_voxels=512)
    features = cached_dataset_features(lambda tile: tile[0, :1], demo_probe, training)
    torch.manual_seed(0)
    network = VoxelMLP(1, num_classes(demo_probe))
    losses = train_head(network.head, [1], features, 0, training)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    predict_test_cases(network.eval(), demo_probe, "reference", tmp_path / "reference", "cpu")
    assert mean_dice(demo_dataset, tmp_path / "reference") > 0.55
