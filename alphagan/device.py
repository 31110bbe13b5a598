"""Where the work runs: the device, the autocast dtype, the profile that suits this machine, and its description.

Every caller asks this module: training, sampling, evaluation, the course's plan and the notebooks' banners.
Taught in notebook 03 (the device and the dtype) and opened by every notebook (`choose_profile`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU; or the device named, if this machine has it."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU here (torch {torch.__version__}); use --device cpu or auto")
        if device.type == "mps" and not _mps():
            raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if _mps():
        return torch.device("mps")
    return torch.device("cpu")


def _mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. `auto`: bf16 where the GPU computes it natively (Ampere and newer), fp16 with loss
    scaling on older GPUs (a T4 reports bf16 support through slow emulation), fp32 on other devices."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def choose_profile(profile: str | None = None) -> tuple[str, str]:
    """The profile to run and why: `profile` if given, else `gpu` where a CUDA GPU is present, `cpu` otherwise."""
    if profile:
        return profile, "as asked"
    if torch.cuda.is_available():
        return "gpu", f"chosen: a CUDA GPU is present ({torch.cuda.get_device_name(0)})"
    return "cpu", "chosen: no CUDA GPU here"


def machine() -> str:
    """This machine in a few words: the CPU model and cores, the GPU if any, and the PyTorch version."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, PyTorch {torch.__version__}"
