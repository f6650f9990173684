"""Plans presets (JSON) that `nnunet-diffusion plans` turns into inheriting nnU-Net configurations."""
