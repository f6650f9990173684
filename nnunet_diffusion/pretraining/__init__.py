"""Self-supervised pretraining for nnU-Net (coordinate-guided diffusion, plain diffusion, Models Genesis
restoration) and the linear / non-linear probes and fine-tuning that evaluate the pretrained features.

The nnU-Net trainers are in `nnunet_diffusion.trainers.pretraining` and `.probes`. Modules here: `network`
(pretraining, probe and fine-tuning networks with matching state-dict keys), `coordinate_modulation` (the
dataset's coordinate channels as a modulation after every normalisation), `heads` (probe heads), `restoration`
(Models Genesis distortions), `lr_schedule` (the fine-tuning's warm-up + poly learning rate), `cached_probing`
(heads trained on cached frozen features), `dataset_probing` (cached probing on a planned nnU-Net dataset).
"""
