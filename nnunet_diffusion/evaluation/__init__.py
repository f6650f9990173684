"""Evaluation building blocks: Dice/HD95, seed variance, voxel uncertainty and result writers (no trainer code)."""
