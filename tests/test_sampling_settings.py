import pytest

from nnunet_diffusion.core.sampling import ENV_EARLY_EXIT, ENV_SAMPLER, ENV_SEED, ENV_STEPS, SamplerSettings


def test_defaults_are_ddim_over_all_training_timesteps(monkeypatch):
    for name in (ENV_SAMPLER, ENV_STEPS, ENV_SEED, ENV_EARLY_EXIT):
        monkeypatch.delenv(name, raising=False)
    assert SamplerSettings.from_environment(5) == SamplerSettings("ddim", 5, None, None)


def test_a_models_default_fills_what_the_environment_leaves_unset(monkeypatch):
    for name in (ENV_SAMPLER, ENV_SEED, ENV_EARLY_EXIT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV_STEPS, "")  # set but empty counts as unset
    default = SamplerSettings("ddpm", 1, None, 0.02)
    assert SamplerSettings.from_environment(5, default) == default
    monkeypatch.setenv(ENV_STEPS, "5")
    monkeypatch.setenv(ENV_SAMPLER, "ddim")
    assert SamplerSettings.from_environment(5, default) == SamplerSettings("ddim", 5, None, 0.02)
    monkeypatch.setenv(ENV_EARLY_EXIT, "off")
    assert SamplerSettings.from_environment(5, default) == SamplerSettings("ddim", 5, None, None)


def test_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_SAMPLER, "DDPM")
    monkeypatch.setenv(ENV_STEPS, "3")
    monkeypatch.setenv(ENV_SEED, "42")
    monkeypatch.setenv(ENV_EARLY_EXIT, "0.01")
    assert SamplerSettings.from_environment(5) == SamplerSettings("ddpm", 3, 42, 0.01)


@pytest.mark.parametrize("variable,value,message", [
    (ENV_SAMPLER, "euler", "unknown sampler 'euler'; set nnUNet_diffusion_sampler to one of ddim, ddpm"),
    (ENV_STEPS, "6", "nnUNet_diffusion_steps=6 exceeds the 5 timesteps this model was trained with"),
    (ENV_STEPS, "0", "nnUNet_diffusion_steps must be at least 1"),
    (ENV_STEPS, "five", "nnUNet_diffusion_steps='five' is not a valid int"),
    (ENV_SEED, "1.5", "nnUNet_diffusion_seed='1.5' is not a valid int"),
    (ENV_EARLY_EXIT, "2", "nnUNet_diffusion_early_exit must be a number in \\[0, 1\\]"),
])
def test_invalid_settings_raise_clear_errors(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        SamplerSettings.from_environment(5)
