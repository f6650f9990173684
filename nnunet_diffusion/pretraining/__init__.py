"""Self-supervised pretraining for nnU-Net (BPR-guided diffusion, plain diffusion, Models Genesis restoration)
and the linear / non-linear probes and fine-tuning that evaluate the pretrained features.

The nnU-Net trainers are in `nnunet_diffusion.trainers.pretraining` and `.probes`. Modules here: `network`
(pretraining and probe networks with matching state-dict keys), `heads` (probe heads), `bpr_guidance` (the
embedded frozen BPR), `restoration` (Models Genesis distortions).
"""
