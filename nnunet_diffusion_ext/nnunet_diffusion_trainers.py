"""Re-exports the plugin's trainers for nnU-Net's external-trainer lookup (see this folder's __init__)."""
from nnunet_diffusion.trainers import *  # noqa: F401,F403
