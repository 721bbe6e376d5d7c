"""Device and precision choices shared by inference and training: CUDA + bf16 when present.

Training runs under bf16 autocast on CUDA (`autocast`). Inference converts its own copy of the
weights instead (`inference_copy`): autocast would cast every weight again at every decode step, and
its cast cache cannot be used inside a CUDA graph.
"""
from __future__ import annotations

import contextlib
import copy

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on CPU, where fp32 is both faster for small models and exact."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere. For clocks that time device work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def inference_dtype(device: torch.device, precision: str | None = None) -> torch.dtype:
    """The named precision's dtype; by default bf16 on CUDA and fp32 on CPU (exact, and faster there)."""
    check_precision(precision)
    return PRECISIONS[precision or ("bf16" if device.type == "cuda" else "fp32")]


def inference_copy(module: torch.nn.Module, dtype: torch.dtype, channels_last: bool = False) -> torch.nn.Module:
    """`module` in eval mode with its weights in `dtype` (and 4-D weights channels_last): the module
    itself when nothing changes, else a converted copy, so the caller's model is left as it was."""
    if dtype == next(module.parameters()).dtype and not channels_last:
        return module.eval()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return copy.deepcopy(module).to(dtype=dtype, memory_format=memory_format).eval()
