"""Checkpoints that a user names, read without running code from them.

`torch.load(..., weights_only=False)` executes whatever a file's pickle says, so a checkpoint from a colleague or a
download could run any command. Everything the plugin reads goes through `load_checkpoint`: torch's weights-only
unpickler (tensors, containers, numbers, strings, `torch.device`) plus the numpy scalars nnU-Net's own entries hold
(its logged losses and Dice values and `_best_ema` are numpy floats), which carry nothing but a dtype and raw bytes.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# numpy scalars pickle as `scalar(dtype, bytes)`; numpy 2 writes `numpy._core`, numpy 1 wrote `numpy.core`
NUMPY_SCALAR_TYPES = [np._core.multiarray.scalar, (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                      np.dtype, np.dtypes.BoolDType,
                      np.dtypes.Float16DType, np.dtypes.Float32DType, np.dtypes.Float64DType,
                      np.dtypes.Int8DType, np.dtypes.Int16DType, np.dtypes.Int32DType, np.dtypes.Int64DType,
                      np.dtypes.UInt8DType, np.dtypes.UInt16DType, np.dtypes.UInt32DType, np.dtypes.UInt64DType]


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle would call something other than torch's and numpy's data constructors."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` with `weights_only=True` and the numpy scalar types allowed for this call only; a file that
    asks for anything else is refused before any of its code runs."""
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_TYPES):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path} holds executable pickle content ({_refusal_reason(str(error))}), and nnunet-diffusion does not "
            f"run code from a checkpoint. If you trust where the file comes from, re-save it there so that it holds "
            f"only tensors and plain values (nnU-Net's own checkpoints do); otherwise delete it") from None


def _refusal_reason(message: str) -> str:
    """What torch's refusal says the pickle asked for, without torch's advice to load with weights_only=False
    (the very thing to avoid here)."""
    asked = re.search(r"GLOBAL (\S+)", message) or re.search(r"but got (<class '[^']+'>)", message)
    return f"it asks for {asked.group(1)}" if asked else "a pickle instruction beyond tensors and plain values"
