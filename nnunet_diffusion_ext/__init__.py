"""Shim folder for nnU-Net's `nnUNet_extTrainer` lookup.

nnU-Net imports every module here as a top-level name and drops it from `sys.modules` afterwards, so the
real trainer classes live in the installed package `nnunet_diffusion.trainers` and this folder only
re-exports them. Point `nnUNet_extTrainer` here with `eval "$(nnunet-diffusion env)"`.
"""
