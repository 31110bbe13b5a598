"""Where the work runs: the device, the autocast dtype, the processes (one, or one per GPU under torchrun), how an
update is replayed on a GPU (`Graphed`), the profile that suits this machine, and its description.

Every caller asks this module: training, sampling, evaluation, the course's plan and the notebooks' banners.
Taught in notebook 03 (the device, the dtype and CUDA graphs) and opened by every notebook (`choose_profile`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from alphagan.config import Config
from alphagan.losses import Terms


def pick_device(name: str = "auto") -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU; or the device named, if this machine has it."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            device = torch.device("meta")  # refused just below, with the names that work
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {name}: not a device alphagan trains on; use auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU here (torch {torch.__version__}); use --device cpu or auto")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        if device.type == "mps" and not _mps():
            raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if _mps():
        return torch.device("mps")
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    """A device in a few words, for a banner: "GPU (NVIDIA H200)", "Apple GPU (MPS)" or "CPU (2 cores)"."""
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({os.cpu_count()} cores)"


def synchronise(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously; a CPU has nothing to wait for): what a
    timer reads around GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | None = None) -> int:
    """Bytes that can be allocated on `device` now: a GPU's free memory, or the host's available memory (None: the
    host; the CPU's, and Apple's GPU's, which shares it)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


@contextlib.contextmanager
def out_of_memory_named(device: torch.device, fix: str) -> Iterator[None]:
    """Turn running out of memory on `device` (PyTorch's many-line CUDA message, or its CPU allocator's "can't
    allocate memory") into one MemoryError that says where, how much was asked for, and `fix`."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text):
            raise
        asked = re.search(r"[Tt]ried to allocate ([\d.]+) (\w+)", text)
        if asked is None:
            detail = ""
        elif asked.group(2) == "bytes":
            detail = f" (asked for {float(asked.group(1)) / 2**30:.2f} GiB more)"
        else:
            detail = f" (asked for {asked.group(1)} {asked.group(2)} more)"
        raise MemoryError(f"out of memory on {describe(device)}{detail}; {fix}") from None


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


def fastest_kernels(device: torch.device) -> None:
    """On a GPU, let cuDNN time its kernels for the fixed shapes and pick the fastest, and let float32 products use
    TF32; on a CPU, nothing. Whatever times training (the course's plan, the benchmarks) sets the same."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def processes(name: str = "auto") -> tuple[torch.device, int, int]:
    """Device (`pick_device(name)`, with `fastest_kernels`), rank and world size: one process, or one per GPU under
    torchrun (DDP)."""
    device = pick_device(name)
    fastest_kernels(device)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


GRAPH_WARMUP = 3  # eager runs of each update before its capture (cuDNN autotuning, Adam's state)


class Graphed:
    """Runs each update eagerly, or with `graphs` `GRAPH_WARMUP` times eagerly on a side stream, then captured
    once as a CUDA graph and replayed. Replaying launches the update's hundreds of kernels in one call; the
    inputs are read from the same tensors every time, which `draw(..., static=True)` refills."""

    def __init__(self, steps: dict[str, Callable[[], Terms]], graphs: bool = False):
        self.steps, self.graphs = steps, graphs
        self.calls = dict.fromkeys(steps, 0)
        self.captured: dict[str, tuple[torch.cuda.CUDAGraph, Terms]] = {}

    def __call__(self, update) -> Terms:
        """Run `update` (a `steps.Update`): eagerly, or its graph."""
        name = update.name
        if not self.graphs:
            return self.steps[name]()
        if name not in self.captured and self.calls[name] < GRAPH_WARMUP:
            self.calls[name] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                terms = self.steps[name]()
            torch.cuda.current_stream().wait_stream(side)
            return terms
        if name not in self.captured:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                terms = self.steps[name]()
            self.captured[name] = (graph, terms)
        graph, terms = self.captured[name]
        graph.replay()
        return terms


def use_graphs(cfg: Config, device: torch.device, distributed: bool, amp_dtype: torch.dtype) -> bool:
    """CUDA graphs where they are safe: one CUDA process, no compile, no fp16 loss scaling (host-side state)."""
    single_cuda = device.type == "cuda" and not distributed
    return cfg.cuda_graphs and single_cuda and not cfg.compile and amp_dtype != torch.float16


def choose_profile(profile: str | None = None) -> tuple[str, str]:
    """The profile to run and why: `profile` if given, else `gpu` where a CUDA GPU is present, `cpu` otherwise."""
    if profile in ("gpu", "paper") and not torch.cuda.is_available():
        return profile, "as asked, without a CUDA GPU: an iteration of the paper's networks takes seconds here, not ms"
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
