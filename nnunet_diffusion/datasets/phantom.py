"""A generated CT-like torso phantom in nnU-Net's raw layout, for BPR pretraining and organ-probe experiments.

Why a phantom: no real abdominal CT with organ masks can be shipped or downloaded here, yet the BPR needs
anatomy that changes along every axis and a segmentation probe needs organs that an intensity threshold cannot
find. Each case is a random z-range crop (field of view) of one longer virtual torso (pelvis → upper chest),
shifted in-plane, with per-case body size, organ size/shape/rotation/position and organ intensities. Most organs
differ from each other and from soft tissue by only 10–45 HU under 15–25 HU noise (only the contrast-filled aorta
stands out), so a probe needs context (position relative to spine, lungs and body outline), not just intensity.
Anatomy that real CTs share is modelled too, because the BPR learns from it: lungs, heart, spine with discs,
ribs, pelvis, bladder, bowel gas, the scanner table, and the left-right asymmetries (liver, heart, stomach).

Geometry: arrays are (z, y, x) as SimpleITK returns them, with identity direction, so index x grows towards the
patient's left, y towards posterior and z towards superior (LPS). 64×64 voxels in-plane at 4 mm, 48–80 slices
at 4–5 mm along z. The origin is the first voxel's true position in the virtual torso (mm), so the geometry of
every case tells where it lies: the ground truth for the coordinates a Body Part Regressor predicts.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunet_diffusion.datasets.staging import (add_raw_root_argument, check_dataset_name, raw_root_argument,
                                               staged_dataset)

LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "stomach": 5,
    "aorta": 6,
    "pancreas": 7,
    "gallbladder": 8,
    "adrenal_left": 9,
    "adrenal_right": 10,
}

ORGAN_SIZE_GROUPS: dict[str, str] = {
    "liver": "big", "spleen": "big", "kidney_left": "big", "kidney_right": "big", "stomach": "big",
    "aorta": "medium", "pancreas": "medium", "gallbladder": "medium",
    "adrenal_left": "small", "adrenal_right": "small",
}

IN_PLANE_SIZE = 64
IN_PLANE_SPACING_MM = 4.0
Z_SLICES_RANGE = (48, 80)
Z_SPACINGS_MM = (4.0, 4.5, 5.0)
VIRTUAL_TORSO_LENGTH_MM = 480.0
# Every field of view contains this z-range, so every case shows kidneys, liver, spleen and stomach.
ALWAYS_IN_VIEW_MM = (230.0, 290.0)

AIR_HU, FAT_HU, SOFT_TISSUE_HU, MUSCLE_HU = -1000.0, -100.0, 35.0, 50.0
LUNG_HU, HEART_HU, BLADDER_HU, GAS_HU, CSF_HU = -850.0, 45.0, 8.0, -800.0, 15.0
BONE_HU, CORTICAL_BONE_HU, DISC_HU, TABLE_HU = 300.0, 650.0, 90.0, 150.0


@dataclass(frozen=True)
class _Ellipsoid:
    """One organ part in virtual-torso millimetres (x, y, z); angle_deg rotates it about z."""
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle_deg: float


@dataclass(frozen=True)
class _Organ:
    parts: tuple[_Ellipsoid, ...]
    hu: float


# Painted in this order (later wins): big to small, so small organs stay visible where templates touch.
_ORGANS: dict[str, _Organ] = {
    "liver": _Organ((_Ellipsoid((-45, -5, 300), (55, 62, 60), 15), _Ellipsoid((5, -35, 312), (35, 24, 34), 0)), 65),
    "spleen": _Organ((_Ellipsoid((70, 28, 300), (22, 36, 45), -30),), 52),
    "stomach": _Organ((_Ellipsoid((35, -30, 300), (34, 27, 40), 20),), 22),
    "kidney_left": _Organ((_Ellipsoid((55, 40, 228), (20, 25, 50), -20),), 80),
    "kidney_right": _Organ((_Ellipsoid((-55, 40, 218), (20, 25, 50), 20),), 80),
    "pancreas": _Organ((_Ellipsoid((15, 2, 252), (50, 10, 12), -15),), 40),
    # The aorta is a long vertical tube: a very elongated ellipsoid reaching from pelvis to upper chest.
    "aorta": _Organ((_Ellipsoid((8, 0, 270), (11, 11, 260), 0),), 130),
    "gallbladder": _Organ((_Ellipsoid((-42, -40, 265), (14, 14, 25), 0),), 10),
    "adrenal_left": _Organ((_Ellipsoid((40, 36, 283), (8, 6, 12), 30),), 28),
    "adrenal_right": _Organ((_Ellipsoid((-38, 36, 276), (8, 6, 12), -30),), 28),
}


def _body_half_axes(z_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-right and anterior-posterior half-axes of the body outline: wide pelvis, narrower waist, wide chest."""
    control_z = [0, 100, 200, 300, 400, 480]
    half_width = np.interp(z_mm, control_z, [112, 115, 100, 108, 116, 118])
    half_depth = np.interp(z_mm, control_z, [82, 86, 78, 84, 88, 86])
    return half_width, half_depth


def _ellipsoid_mask(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre, radii, angle_deg: float) -> np.ndarray:
    """Voxels inside an ellipsoid rotated in-plane by angle_deg (all coordinates in mm)."""
    angle = np.deg2rad(angle_deg)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0


def _periodic_band(z: np.ndarray, period: float, phase: float, thickness: float) -> np.ndarray:
    """Slabs of the given thickness repeating along z (vertebral discs, ribs)."""
    return np.mod(z - phase, period) < thickness


def _skeleton(rng: np.random.Generator, x, y, z, inner_radius: np.ndarray, spine_y: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Bone mask and bone HU: vertebrae with discs and posterior arch, ribs, iliac wings and femoral heads."""
    hu = np.zeros(z.shape, np.float32)
    vertebral_distance = np.hypot(x, y - spine_y)
    vertebra_radius = rng.uniform(13, 17)
    vertebral_body = vertebral_distance <= vertebra_radius
    disc = vertebral_body & _periodic_band(z, rng.uniform(26, 30), rng.uniform(0, 30), 6.0)
    hu[vertebral_body] = BONE_HU
    hu[vertebral_body & (vertebral_distance > vertebra_radius - 3)] = CORTICAL_BONE_HU
    hu[disc] = DISC_HU
    arch = ((x / 14) ** 2 + ((y - spine_y - vertebra_radius - 8) / 10) ** 2 <= 1.0) & ~vertebral_body
    canal = np.hypot(x, y - spine_y - vertebra_radius - 5) <= 6
    hu[arch] = CORTICAL_BONE_HU
    hu[canal] = CSF_HU

    # Ribs are arcs on the lateral and posterior wall, absent around the anterior midline (sternum gap).
    rib_ring = (inner_radius > 0.86) & (inner_radius < 0.95) & ((np.abs(x) > 50) | (y > -20))
    ribs = rib_ring & (z > rng.uniform(190, 215)) & _periodic_band(z, rng.uniform(24, 28), rng.uniform(0, 28), 9.0)
    hu[ribs] = CORTICAL_BONE_HU - 100

    iliac_top = rng.uniform(135, 155)
    for side in (-1, 1):
        iliac = _ellipsoid_mask(x, y, z, (side * 68, 18, iliac_top - 55), (12, 40, 55), side * 35)
        femoral_head = _ellipsoid_mask(x, y, z, (side * 82, -5, 20), (22, 22, 22), 0)
        hu[iliac | femoral_head] = BONE_HU + 150
    return hu != 0, hu


def _phantom_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float],
                                                   tuple[float, float, float]]:
    """One case: image in HU (int16, (z, y, x)), labels (uint8, (z, y, x)), SimpleITK spacing and origin (x, y, z).

    The origin is the first voxel's position in virtual-torso millimetres, so the image geometry holds every
    voxel's true anatomical position (as a scanner's table position would): the reference a Body Part Regressor's
    coordinates are measured against."""
    num_slices = int(rng.integers(Z_SLICES_RANGE[0], Z_SLICES_RANGE[1] + 1))
    z_spacing = float(rng.choice(Z_SPACINGS_MM))
    extent = num_slices * z_spacing
    z_start = rng.uniform(max(0.0, ALWAYS_IN_VIEW_MM[1] - extent),
                          min(ALWAYS_IN_VIEW_MM[0], VIRTUAL_TORSO_LENGTH_MM - extent))
    shift_x, shift_y = rng.uniform(-12, 12, 2)
    z_mm = z_start + np.arange(num_slices) * z_spacing
    in_plane = (np.arange(IN_PLANE_SIZE) - (IN_PLANE_SIZE - 1) / 2) * IN_PLANE_SPACING_MM
    z, y, x = np.meshgrid(z_mm, in_plane - shift_y, in_plane - shift_x, indexing="ij")

    body_scale = rng.uniform(0.9, 1.08, 2)
    half_width, half_depth = _body_half_axes(z)
    half_width, half_depth = half_width * body_scale[0], half_depth * body_scale[1]
    fat_thickness = rng.uniform(8, 18)
    body = (x / half_width) ** 2 + (y / half_depth) ** 2 <= 1.0
    inner_radius = np.hypot(x / (half_width - fat_thickness), y / (half_depth - fat_thickness))
    inner = inner_radius <= 1.0

    image = np.full(z.shape, AIR_HU, np.float32)
    # The patient lies on the scanner table: a plate just behind the back, curving up at the sides.
    table_y = half_depth.max() + rng.uniform(2, 8) - 0.0015 * x ** 2
    image[(y >= table_y) & (y <= table_y + 8) & (np.abs(x) <= 110)] = TABLE_HU
    image[body] = FAT_HU
    image[inner] = SOFT_TISSUE_HU + rng.normal(0, 4)
    spine_y = (half_depth - fat_thickness) * 0.5
    paraspinal = ((np.abs(x) - 32) / 22) ** 2 + ((y - spine_y - 12) / 18) ** 2 <= 1.0
    image[paraspinal & inner] = MUSCLE_HU

    # Left-right asymmetry as in real anatomy: the right lung base sits higher (liver dome), the heart lies
    # left of the midline and narrows the left lung, and gas collects in the stomach and descending colon.
    lung_base = rng.uniform(290, 320)
    for centre_x, lung_half_width, base in ((-52, 44, lung_base + 15), (56, 36, lung_base)):
        lung_size = np.clip((z - base) / 80.0, 0.0, 1.0) ** 0.7
        lung = ((x - centre_x) ** 2 / (lung_half_width * lung_size + 1e-6) ** 2
                + (y - 5) ** 2 / (62 * lung_size + 1e-6) ** 2 <= 1.0) & (lung_size > 0)
        image[lung & inner] = LUNG_HU
    heart = _ellipsoid_mask(x, y, z, (25, -25, lung_base + 75 + rng.normal(0, 5)), (45, 38, 50), -20)
    image[heart & inner] = HEART_HU
    bladder = _ellipsoid_mask(x, y, z, (0, -35, 45 + rng.normal(0, 5)), np.array([35, 28, 35]) * rng.uniform(0.7, 1.2),
                              0)
    image[bladder & inner] = BLADDER_HU
    colon_x = 72 * body_scale[0] + 5 * np.sin(z / 30 + rng.uniform(0, 2 * np.pi))
    colon_gas = (np.hypot(x - colon_x, y - 15) <= rng.uniform(7, 11)) & (z > rng.uniform(110, 140)) & (z < 280)
    image[colon_gas & inner] = GAS_HU

    bone, bone_hu = _skeleton(rng, x, y, z, inner_radius, spine_y)
    image[bone & inner] = bone_hu[bone & inner]

    labels = np.zeros(z.shape, np.uint8)
    soft_tissue = inner & ~bone
    for name, organ in _ORGANS.items():
        radius_scale = rng.uniform(0.85, 1.15, 3)
        offset = rng.normal(0, [5, 5, 8])
        rotation = rng.uniform(-12, 12)
        mask = np.zeros(z.shape, bool)
        for part in organ.parts:
            centre = (part.centre[0] * body_scale[0] + offset[0], part.centre[1] * body_scale[1] + offset[1],
                      part.centre[2] + offset[2])
            mask |= _ellipsoid_mask(x, y, z, centre, np.multiply(part.radii, radius_scale), part.angle_deg + rotation)
        mask &= soft_tissue
        image[mask] = organ.hu + rng.normal(0, 5)
        labels[mask] = LABELS[name]
        if name == "stomach":
            # A gas cap in the anterior part of the stomach: labelled stomach, but at air-like HU.
            anterior_limit = np.min(np.where(mask, y, np.inf)) + rng.uniform(8, 14)
            image[mask & (y < anterior_limit)] = GAS_HU

    image = gaussian_filter(image, sigma=(0.4, 0.6, 0.6))
    noise = gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), sigma=0.5)
    image += noise / noise.std() * rng.uniform(15, 25)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    origin = (float(in_plane[0] - shift_x), float(in_plane[0] - shift_y), float(z_start))
    return image, labels, (IN_PLANE_SPACING_MM, IN_PLANE_SPACING_MM, z_spacing), origin


def _write(array: np.ndarray, path: Path, spacing: tuple[float, float, float],
           origin: tuple[float, float, float]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), useCompression=True)


def generate_phantom_dataset(raw_root: str | Path, dataset_id: int = 601, name: str = "Phantom", num_train: int = 16,
                             num_test: int = 4, seed: int = 0, overwrite: bool = False) -> Path:
    """Write Dataset{id}_{name} (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json) and return its folder.

    Deterministic for a seed: case i uses the i-th child of SeedSequence(seed). Everything is written into a
    hidden temporary folder next to the target and renamed at the end, so an interrupted run leaves no
    half-written dataset that nnU-Net would pick up.
    """
    check_dataset_name(name)
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    raw_root = Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    target = raw_root / f"Dataset{dataset_id:03d}_{name}"
    with staged_dataset(target, dataset_id, overwrite) as staging:
        case_seeds = np.random.SeedSequence(seed).spawn(num_train + num_test)
        for index, case_seed in enumerate(case_seeds):
            split = "Tr" if index < num_train else "Ts"
            for folder in (f"images{split}", f"labels{split}"):
                (staging / folder).mkdir(exist_ok=True)
            image, labels, spacing, origin = _phantom_case(np.random.default_rng(case_seed))
            case = f"{name.lower()}_{index:03d}"
            _write(image, staging / f"images{split}" / f"{case}_0000.nii.gz", spacing, origin)
            _write(labels, staging / f"labels{split}" / f"{case}.nii.gz", spacing, origin)
        dataset_json = {
            "name": name,
            "description": "Generated CT-like torso phantom (nnunet_diffusion.datasets.phantom)",
            "channel_names": {"0": "CT"},
            "labels": LABELS,
            "numTraining": num_train,
            "file_ending": ".nii.gz",
            "organ_size_groups": ORGAN_SIZE_GROUPS,
            "phantom_seed": seed,
        }
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return target


def main(argv: list[str] | None = None) -> int:
    """`nnunet-diffusion phantom`: write the phantom dataset into nnUNet_raw (or --raw-root)."""
    parser = argparse.ArgumentParser(prog="nnunet-diffusion phantom", description=__doc__.split("\n\n")[0])
    add_raw_root_argument(parser)
    parser.add_argument("--dataset-id", type=int, default=601)
    parser.add_argument("--name", default="Phantom")
    parser.add_argument("--num-train", type=int, default=16)
    parser.add_argument("--num-test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing dataset folder of the same name")
    args = parser.parse_args(argv)
    raw_root = raw_root_argument(parser, args)
    try:
        folder = generate_phantom_dataset(raw_root, args.dataset_id, args.name, args.num_train, args.num_test,
                                          args.seed, overwrite=args.force)
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(folder)
    return 0
