"""Pure, nnU-Net-independent diffusion building blocks: schedules, sampler, mask codec, strategies, networks."""
