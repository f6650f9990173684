"""Where nnU-Net must look for the plugin's trainers, the shell line that tells it, and the frame of the plugin's
in-process commands."""
from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"


def shim_folder() -> Path:
    """The installed folder of one-line shims that re-export `nnunet_diffusion.trainers`."""
    import nnunet_diffusion_ext
    return Path(next(iter(nnunet_diffusion_ext.__path__))).resolve()


def ext_trainer_value(current: str | None = None) -> str:
    """`nnUNet_extTrainer` with the plugin's shim folder first, keeping any folders already listed."""
    current = os.environ.get(EXT_TRAINER_VARIABLE, "") if current is None else current
    ours = str(shim_folder())
    others = [p for p in current.split(os.pathsep) if p and Path(p).resolve() != Path(ours)]
    return os.pathsep.join([ours, *others])


def with_plugin_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) in which nnU-Net finds the plugin's trainers."""
    env = dict(os.environ if env is None else env)
    env[EXT_TRAINER_VARIABLE] = ext_trainer_value(env.get(EXT_TRAINER_VARIABLE, ""))
    return env


@contextmanager
def plugin_command(name: str, *errors: type[Exception]) -> Iterator[None]:
    """The frame of a command that runs nnU-Net in this process: nnU-Net's trainer lookup finds the plugin's
    trainers, and the expected failures (`errors`, default ValueError) end the command with one line that names
    it, without a traceback."""
    os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()
    try:
        yield
    except (errors or (ValueError,)) as error:
        raise SystemExit(f"nnunet-diffusion {name}: {error}") from None


def export_line() -> str:
    return f"export {EXT_TRAINER_VARIABLE}={shlex.quote(ext_trainer_value())}"


def main(argv: list[str]) -> int:
    """`nnunet-diffusion env`."""
    argparse.ArgumentParser(prog="nnunet-diffusion env", description="print the shell line that lets nnU-Net find "
                            'the plugin\'s trainers. Use it as: eval "$(nnunet-diffusion env)"').parse_args(argv)
    print(export_line())
    return 0
