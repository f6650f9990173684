"""The denoiser built from nnU-Net plans, its time conditioning, the CPU workarounds, the wrapper network and its
sampling loop."""
from __future__ import annotations

import json
import os

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.sampling import ENV_EARLY_EXIT, ENV_SAMPLER, ENV_SEED, ENV_STEPS, SamplerSettings
from nnunet_diffusion.core.sampling_loop import changed_label_fraction, sample, sample_steps
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.time_conditioning import FiLMNorm, TimeContext
from nnunet_diffusion.trainer_support import mismatching_keys
from nnunet_diffusion.trainers.segmentation import nnUNetTrainerDiffRecycle, nnUNetTrainerDiffSelfCond
from nnunet_runs import run


def _configuration(plans_file, configuration="3d_fullres"):
    manager = PlansManager(json.loads(open(plans_file).read()))
    return manager, manager.get_configuration(configuration)


@pytest.fixture(scope="module")
def real_plans(demo_dataset):
    """nnU-Net's default (PlainConvUNet) and ResEnc-M plans for the generated dataset."""
    folder = os.path.join(os.environ["nnUNet_preprocessed"], demo_dataset.name)
    run(["nnUNetv2_plan_experiment", "-d", str(demo_dataset.dataset_id), "-pl", "nnUNetPlannerResEncM"])
    return {"PlainConvUNet": f"{folder}/nnUNetPlans.json", "ResidualEncoderUNet": f"{folder}/nnUNetResEncUNetMPlans.json"}


def _convs(module):
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in module.modules()
            if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_denoiser_keeps_nnunets_planned_architecture_with_extra_mask_channels(real_plans, architecture):
    manager, configuration = _configuration(real_plans[architecture])
    assert configuration.network_arch_class_name.endswith(architecture)
    network = nnUNetTrainerDiffRecycle.build_network_architecture(manager, configuration, 1, 3, False)
    stock = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                   configuration.network_arch_init_kwargs_req_import, 1 + 3, 3, deep_supervision=False)
    assert _convs(network.unet) == _convs(stock)  # same stages, kernels, strides, features
    assert sum(isinstance(m, FiLMNorm) for m in network.modules()) == \
        sum(isinstance(m, torch.nn.InstanceNorm3d) for m in stock.modules())


def test_self_conditioning_adds_another_set_of_mask_channels(real_plans):
    manager, configuration = _configuration(real_plans["PlainConvUNet"])
    network = nnUNetTrainerDiffSelfCond.build_network_architecture(manager, configuration, 2, 3, False)
    assert _convs(network.unet)[0][0] == 2 + 3 + 3


def _small_network(time_conditioning=True, self_conditioning=False, channels=3, activation="softmax",
                   features=(4, 8, 16)):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(0)
    extra = channels * (2 if self_conditioning else 1)
    unet = PlainConvUNet(1 + extra, 3, features, torch.nn.Conv3d, 3, (1, 2, 2), 1, channels, 1,
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                         nonlin=torch.nn.LeakyReLU)
    return DiffusionSegmentationNetwork(unet, 1, MaskCodec(channels, activation), make_alphas_cumprod("linear", 5),
                                        self_conditioning=self_conditioning, time_conditioning=time_conditioning)


def _perturb_film(network):
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, FiLMNorm):
                m.to_scale_shift.weight.normal_(0, 0.5)


def test_time_conditioning_starts_as_identity_and_then_makes_the_output_depend_on_t():
    network = _small_network()
    image, x_t = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    t0, t3 = torch.tensor([0, 0]), torch.tensor([3, 3])
    assert torch.allclose(network(image, x_t, t0), network(image, x_t, t3))  # zero-initialised FiLM
    _perturb_film(network)
    assert not torch.allclose(network(image, x_t, t0), network(image, x_t, t3), atol=1e-4)


@pytest.mark.parametrize("channels,features,hooked", [(2, 4, False), (3, 4, True), (3, 32, False)])
def test_input_convolution_takes_channels_last_on_cpu_without_changing_results(channels, features, hooked):
    """1 + 3 input channels into at most 16 features get the layout hooks (faster on CPU), fewer channels or
    nnU-Net's 32 features do not; either way the outputs and gradients are those of the plain convolution, and
    the network continues in nnU-Net's layout."""
    network = _small_network(channels=channels, features=(features, 8, 16))
    first = network.unet.encoder.stages[0][0].convs[0].conv
    assert bool(first._forward_pre_hooks) == hooked and bool(first._forward_hooks) == hooked
    image, x_t, t = torch.randn(2, 1, 8, 8, 8), torch.randn(2, channels, 8, 8, 8), torch.tensor([1, 3])
    activations = []
    network.unet.encoder.stages[0][0].convs[0].norm.register_forward_hook(lambda m, a, o: activations.append(a[0]))
    network(image, x_t, t).square().sum().backward()
    gradient = first.weight.grad.clone()
    first._forward_pre_hooks.clear()
    first._forward_hooks.clear()
    network.zero_grad()
    network(image, x_t, t).square().sum().backward()
    assert activations[0].is_contiguous()
    assert torch.allclose(activations[0], activations[1], atol=1e-5)
    assert torch.allclose(gradient, first.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_a_single_sample_runs_as_a_batch_of_two_on_cpu_without_changing_its_logits(monkeypatch, deep_supervision):
    """No-grad CPU forwards of one sample (one sliding-window tile) go through the UNet as two copies, which
    takes PyTorch's oneDNN path; the returned logits are those of the sample alone, and training forwards and
    real batches are left as they are."""
    network = _small_network().eval()
    _perturb_film(network)
    network.set_deep_supervision_enabled(deep_supervision)
    batches = []
    network.unet.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    image, x_t, t = torch.randn(1, 1, 8, 8, 8), torch.randn(1, 3, 8, 8, 8), torch.tensor([3])
    with torch.no_grad():
        padded = network(image, x_t, t)
        monkeypatch.setattr("nnunet_diffusion.core.diffusion_network.pads_single_sample", lambda x: False)
        alone = network(image, x_t, t)
    assert batches == [2, 1]
    for a, b in zip(*((padded, alone) if deep_supervision else ([padded], [alone]))):
        assert a.shape[0] == 1 and torch.allclose(a, b, atol=1e-5)
    monkeypatch.undo()
    network(image, x_t, t)  # gradients on: as it is
    with torch.no_grad():
        network(torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3, 8, 8, 8), torch.tensor([0, 1]))
    assert batches[2:] == [1, 2]


def test_unconditioned_network_ignores_the_timestep():
    network = _small_network(time_conditioning=False)
    image, x_t = torch.randn(1, 1, 8, 8, 8), torch.randn(1, 3, 8, 8, 8)
    assert torch.equal(network(image, x_t, torch.tensor([0])), network(image, x_t, torch.tensor([4])))
    assert not any(isinstance(m, FiLMNorm) for m in network.modules())


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_eval_forward_samples_finite_logits_of_the_predictors_shape(activation, self_conditioning):
    network = _small_network(self_conditioning=self_conditioning, activation=activation).eval()
    _perturb_film(network)
    with torch.inference_mode():
        logits = network(torch.randn(2, 1, 8, 12, 8))
    assert logits.shape == (2, 3, 8, 12, 8)
    assert torch.isfinite(logits).all()


def test_sampling_steps_and_seed_come_from_the_environment(monkeypatch):
    network = _small_network().eval()
    _perturb_film(network)
    image = torch.randn(1, 1, 8, 8, 8)
    monkeypatch.setenv(ENV_SEED, "11")
    monkeypatch.setenv(ENV_SAMPLER, "ddpm")
    with torch.inference_mode():
        first, second = network(image), network(image)
        monkeypatch.setenv(ENV_SEED, "12")
        third = network(image)
    assert torch.equal(first, second) and not torch.equal(first, third)
    steps = list(network.sample_steps(image, SamplerSettings("ddim", 3, seed=1)))
    assert len(steps) == 3


def test_settings_passed_in_code_replace_the_environment_and_are_checked_against_T(monkeypatch):
    network = _small_network().eval()
    _perturb_film(network)
    image = torch.randn(1, 1, 8, 8, 8)
    monkeypatch.setenv(ENV_SAMPLER, "no-such-sampler")  # would fail the plain forward
    with pytest.raises(ValueError, match="unknown sampler"):
        network(image)
    settings = SamplerSettings("ddpm", 2, seed=5)
    with torch.inference_mode():
        with network.sampling_with(settings):
            passed = network(image)
        expected = list(network.sample_steps(image, settings))[-1]
    assert torch.equal(passed, expected) and network.sampler_settings is None
    with pytest.raises(ValueError, match="exceeds the 5 timesteps"):
        with network.sampling_with(SamplerSettings("ddim", 6)):
            pass


def test_the_default_sampling_travels_in_the_state_dict_and_old_checkpoints_keep_all_T_steps(monkeypatch):
    for name in (ENV_SAMPLER, ENV_SEED, ENV_STEPS, ENV_EARLY_EXIT):
        monkeypatch.delenv(name, raising=False)
    recommended = _small_network()
    recommended.set_default_sampling(SamplerSettings("ddpm", 1, None, 0.05))
    weights = recommended.state_dict()
    assert int(weights["default_sampling_steps"]) == 1
    network = _small_network()
    assert network.default_sampling == SamplerSettings("ddim", 5)
    network.load_state_dict(weights)
    assert network.prediction_settings() == SamplerSettings("ddpm", 1, None, 0.05)
    monkeypatch.setenv(ENV_STEPS, "3")
    assert network.prediction_settings() == SamplerSettings("ddpm", 3, None, 0.05)
    old = {k: v for k, v in weights.items() if not k.startswith("default_")}
    network.load_state_dict(old)  # strict, as nnU-Net's predictor loads
    assert network.default_sampling == SamplerSettings("ddim", 5)
    assert mismatching_keys(network.state_dict(), old) == []
    assert mismatching_keys(network.state_dict(), {**old, "stray": torch.zeros(1)}) == ["unexpected stray"]
    with pytest.raises(ValueError, match="default of 6 sampling steps exceeds the 5 timesteps"):
        network.set_default_sampling(SamplerSettings("ddim", 6))


def test_the_first_step_of_a_T_step_ddim_run_is_the_one_step_run():
    """Why the per-step tables score a model's one-step default: step 1 of the T-step run is that run."""
    network = _small_network().eval()
    _perturb_film(network)
    image = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode():
        first = next(iter(network.sample_steps(image, SamplerSettings("ddim", 5, seed=3))))
        one_step = network.sample(image, SamplerSettings("ddim", 1, seed=3))
        two_steps = list(network.sample_steps(image, SamplerSettings("ddim", 2, seed=3)))[-1]
        second = list(network.sample_steps(image, SamplerSettings("ddim", 5, seed=3)))[1]
    assert torch.equal(first, one_step)
    assert not torch.equal(second, two_steps)  # step k > 1 of a T-step run is not a k-step run


def test_the_recycling_fine_tuning_trainers_default_to_one_step_and_from_scratch_to_T():
    from nnunet_diffusion.trainers.finetune import nnUNetTrainerDiffRecycleFinetune
    from nnunet_diffusion.trainers.training_length import nnUNetTrainerDiffRecycleFinetune_5epochs
    assert nnUNetTrainerDiffRecycleFinetune_5epochs.default_sampling() == SamplerSettings("ddim", 1)
    assert nnUNetTrainerDiffRecycleFinetune.default_sampling() == SamplerSettings("ddim", 1)
    assert nnUNetTrainerDiffRecycle.default_sampling() == SamplerSettings("ddim", 5)


def test_the_eval_forward_is_one_network_call_that_runs_the_sampling_loop():
    """nnU-Net's predictor calls `network(tile)` once per tile and mirror; that call runs K denoising passes
    through `sampling_loop.sample`, and gives exactly what the plain function gives."""
    network = _changing_network()
    calls, unet_passes = [], []
    network.register_forward_pre_hook(lambda m, a: calls.append(1))
    network.unet.register_forward_pre_hook(lambda m, a: unet_passes.append(1))
    image, settings = torch.randn(1, 1, 8, 8, 8), SamplerSettings("ddpm", 4, seed=2)
    with torch.inference_mode(), network.sampling_with(settings):
        predicted = network(image)
    assert len(calls) == 1 and len(unet_passes) == 4
    with torch.inference_mode():
        assert torch.equal(predicted, sample(network.denoise, network.scheduler, network.codec, image, settings))


def test_the_sampling_loop_takes_any_denoiser_and_feeds_it_the_previous_estimate():
    network = _small_network()
    seen = []

    def denoise(image, x_t, t, previous_x0):
        seen.append((t.tolist(), previous_x0 is None))
        return torch.ones(image.shape[0], 3, *image.shape[2:])  # the same x0 at every step

    steps = list(sample_steps(denoise, network.scheduler, network.codec, torch.zeros(2, 1, 4, 4, 4),
                              SamplerSettings("ddim", 3, seed=0)))
    assert len(steps) == 3 and all(torch.equal(s, steps[0]) for s in steps)
    assert seen == [([4, 4], True), ([2, 2], False), ([0, 0], False)]


def _converged_network():
    """A denoiser whose estimate ignores the noisy mask and t: every step gives the same labels."""
    network = _small_network(time_conditioning=False).eval()
    first = next(m for m in network.unet.modules() if isinstance(m, torch.nn.Conv3d))
    with torch.no_grad():
        first.weight[:, 1:] = 0
    return network


def _changing_network():
    network = _small_network().eval()
    _perturb_film(network)
    return network


@pytest.mark.parametrize("make_network,tolerance,expected_steps", [
    (_converged_network, 0.0, 2), (_converged_network, None, 5),
    (_changing_network, 0.0, 5), (_changing_network, 1.0, 2), (_changing_network, None, 5)])
def test_early_exit_stops_once_the_labels_stop_changing(make_network, tolerance, expected_steps):
    network = make_network()
    image = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode():
        steps = list(network.sample_steps(image, SamplerSettings("ddim", 5, 0, tolerance)))
        full = list(network.sample_steps(image, SamplerSettings("ddim", 5, 0)))
    assert len(steps) == expected_steps
    if make_network is _converged_network:
        assert torch.equal(steps[-1].argmax(1), full[-1].argmax(1))  # stopping early changed no label
    else:
        changes = [changed_label_fraction(a.argmax(1), b.argmax(1)) for a, b in zip(full[1:], full)]
        assert min(changes) > 0  # why it never stops at tolerance 0


def test_changed_label_fraction_counts_voxels_and_region_channels():
    assert changed_label_fraction(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 0])) == 0.5
    codec = MaskCodec(2, "sigmoid")
    logits = torch.tensor([[[1.0, -1.0], [2.0, 3.0]]])
    assert codec.hard_labels(logits).tolist() == [[[True, False], [True, True]]]
    assert changed_label_fraction(codec.hard_labels(logits), codec.hard_labels(-logits)) == 1.0


def test_training_mode_forward_requires_the_noisy_mask():
    with pytest.raises(RuntimeError, match="needs \\(image, x_t, t\\)"):
        _small_network().train()(torch.randn(1, 1, 8, 8, 8))


def test_mask_activation_travels_in_the_state_dict():
    trained = _small_network(activation="softmax")
    trained.set_mask_activation("sigmoid")
    fresh = _small_network(activation="softmax")
    fresh.load_state_dict(trained.state_dict())
    assert fresh.codec.activation == "sigmoid"


@pytest.mark.parametrize("norm", [torch.nn.InstanceNorm3d(4, affine=True), torch.nn.InstanceNorm3d(4),
                                  torch.nn.BatchNorm3d(4)])
def test_film_gives_norm_times_one_plus_scale_plus_shift(norm):
    """The fused instance-norm path and the generic path compute the same FiLM."""
    torch.manual_seed(0)
    context = TimeContext()
    film = FiLMNorm(norm, 4, 6, context)
    torch.nn.init.normal_(film.to_scale_shift.weight)
    if getattr(norm, "affine", False):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x, context.embedding = torch.randn(3, 4, 5, 6, 7), torch.randn(3, 6)
    scale, shift = film.to_scale_shift(context.embedding).chunk(2, dim=1)
    expected = norm(x) * (1 + scale[..., None, None, None]) + shift[..., None, None, None]
    assert torch.allclose(film(x), expected, atol=1e-5)


def test_with_deep_supervision_training_passes_return_every_resolution_and_sampling_the_full_one():
    network = _small_network()
    network.set_deep_supervision_enabled(True)
    image, x_t = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    outputs = network(image, x_t, torch.tensor([0, 4]))
    assert isinstance(outputs, list) and [tuple(o.shape[2:]) for o in outputs] == [(8, 8, 8), (4, 4, 4)]
    assert all(p.requires_grad for p in network.unet.decoder.seg_layers.parameters())
    network.eval()
    with torch.no_grad():
        sampled = network.sample(image, SamplerSettings("ddim", 5, seed=0))
        validation = network(image)  # what nnU-Net's validation_step gets with deep supervision on: a list
    assert isinstance(validation, list) and len(validation) == 1
    assert sampled.shape == validation[0].shape == (2, 3, 8, 8, 8)
    network.set_deep_supervision_enabled(False)  # what the predictor builds
    with torch.no_grad():
        assert torch.equal(network.sample(image, SamplerSettings("ddim", 5, seed=0)), sampled)
