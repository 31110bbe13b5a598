"""Milliseconds per forward + backward of each layer the networks compute in a faster form, against the plain
PyTorch layers it replaces, at the shapes of one profile, side by side in one run.

    python bench/layers.py                  # the cpu profile's shapes (32^3, width 16, latent 1000, batch 4)
    python bench/layers.py --profile gpu    # the paper's (64^3, width 64); on a GPU, in its training precision

Both forms hold the same weights and give the same result (tests/test_models.py); only the speed differs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from alphagan.config import make_config
from alphagan.models import HeadConv3d, ResizeConv3d, StemConvTranspose3d, _levels


def seconds(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward and backward pass (input and weight gradients)."""
    x = x.detach().requires_grad_()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(repeats + 2):  # the first two warm up (oneDNN / cuDNN choose their kernels)
        sync()
        start = time.perf_counter()
        layer(x).float().square().mean().backward()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cases(size: int, width: int, latent: int, batch: int) -> list[tuple[str, nn.Module, nn.Module, tuple]]:
    """(name, fast layer, plain equivalent, input shape) for every replaced layer of G, D and E at these sizes."""
    top = width * 2 ** (_levels(size) - 1)  # channels at 4^3
    rows = [
        ("E head", HeadConv3d(top, latent, 4), nn.Conv3d(top, latent, 4), (batch, top, 4, 4, 4)),
        ("D head", HeadConv3d(top, 1, 4), nn.Conv3d(top, 1, 4), (batch, top, 4, 4, 4)),
        ("G stem", StemConvTranspose3d(latent, top, 4), nn.ConvTranspose3d(latent, top, 4, bias=False),
         (batch, latent, 1, 1, 1)),
    ]  # fmt: skip
    channels, edge = top, 4
    while edge < size:
        out = max(channels // 2, 1) if edge * 2 < size else 1
        conv = nn.Conv3d(channels, out, 3, 1, 1, bias=False)
        plain = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv)
        rows.append((f"G resize-conv {edge}³→{2 * edge}³, {channels}→{out}", ResizeConv3d(channels, out), plain,
                     (batch, channels, edge, edge, edge)))  # fmt: skip
        channels, edge = out, edge * 2
    return rows


def table(profile: str, repeats: int = 10) -> str:
    """Every replaced layer at `profile`'s sizes, plain against this package's form, as a Markdown table."""
    cfg = make_config(profile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported(False) else torch.float32
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"{where}; {cfg.size}³, width {cfg.width}, latent {cfg.latent}, batch {cfg.batch}; {dtype}; fwd + bwd",
        "",
        "| layer | plain (ms) | this package (ms) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, fast, plain, shape in cases(cfg.size, cfg.width, cfg.latent, cfg.batch):
        x = torch.randn(shape, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            t_plain = seconds(plain.to(device), x, repeats)
            t_fast = seconds(fast.to(device), x, repeats)
        lines.append(f"| {name} | {1e3 * t_plain:.2f} | {1e3 * t_fast:.2f} | {t_plain / t_fast:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help="whose sizes: smoke, cpu, gpu or paper (default cpu)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(table(args.profile, args.repeats))


if __name__ == "__main__":
    main()
