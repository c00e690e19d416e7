"""Mixed precision (runtime §3.5): which autocast a run uses, and which devices allow it.

Autocast covers forward passes only; losses are computed in fp32 by the callers.
"""

from contextlib import nullcontext

import torch

from esper.compute.errors import SetupError


def check_precision(amp: str, device: torch.device) -> None:
    """Fail before the first epoch: fp16 needs CUDA's gradient scaler, bf16 a device that has it."""
    if amp == "fp16" and device.type != "cuda":
        raise SetupError(f"train.amp = 'fp16' needs a CUDA device, this run uses {device} (use --amp bf16 or off)")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SetupError(f"train.amp = 'bf16' is not supported by {torch.cuda.get_device_name(device)} "
                         "(use --amp fp16 or off)")


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """One scaler per env, fp16 only: bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
