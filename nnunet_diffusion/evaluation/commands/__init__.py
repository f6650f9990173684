"""The evaluation commands of `nnunet-diffusion`: argument parsing and one error frame each, over the library."""
