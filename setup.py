"""nnunet-diffusion: diffusion segmentation and diffusion pretraining as nnU-Net v2 trainers."""
from setuptools import find_packages, setup

setup(
    name="nnunet-diffusion",
    version="0.1.0",
    description="Diffusion models for 3D medical image segmentation as a plugin for stock nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The library's packages (evaluation.commands and the rest below it) and the folder nnU-Net's
    # `nnUNet_extTrainer` points at: one-line shims only (see docs/install.md).
    packages=find_packages(include=["nnunet_diffusion", "nnunet_diffusion.*", "nnunet_diffusion_ext"]),
    package_data={"nnunet_diffusion.presets": ["*.json"]},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1",
        "batchgenerators>=0.25",
        "SimpleITK>=2.2",
        "acvl-utils>=0.2",
        "dynamic-network-architectures>=0.4",
        "numpy",
        "scipy",
        "matplotlib",
        # Trainings and predictions of `crossval`/`ablate` as jobs on this machine or on Slurm.
        "submitit>=1.5",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["nnunet-diffusion=nnunet_diffusion.cli:main"]},
)
