"""nnunet-diffusion: diffusion segmentation (recycling) and BPR-guided diffusion pretraining for nnU-Net v2."""
__version__ = "0.1.0"
