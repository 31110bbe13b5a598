"""The four networks of the 3D alpha-GAN (docs/method.md, section 1) and the baselines' variants (notebook 02).

At 64^3 the discriminator and encoder halve the volume four times (64 -> 32 -> 16 -> 8 -> 4) and a last 4^3
convolution reduces it to one value (D) or one latent vector (E); the generator mirrors this with
nearest-neighbour upsampling followed by a 3^3 convolution ("resize-convolution"), which avoids the
checkerboard of transposed convolutions. Other sizes add or remove one block per factor of two, so that the
trunk always ends at 4^3. With latent 1000 and width 64 the parameter counts equal the authors' code.

Three kinds of layer are computed in a faster form that gives the same result with the same weights (tests
compare each with the plain PyTorch layers): the 4^3 heads of D and E and the generator's first layer are
matrix products (`HeadConv3d`, `StemConvTranspose3d`), and resize-convolution never builds the upsampled
volume (`ResizeConv3d`).

Initialisation (DCGAN's, as is usual for these models): convolution and linear weights N(0, 0.02), biases 0,
BatchNorm weights N(1, 0.02) and biases 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alphagan.config import NORMS


def _levels(size: int) -> int:
    """How many factor-two steps separate `size` from the 4^3 trunk end."""
    levels = int(math.log2(size)) - 2
    if size < 16 or 2 ** (levels + 2) != size:
        raise ValueError(f"volume size must be a power of two >= 16, got {size}")
    return levels


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation, applied with `net.apply(init_weights)`."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class HeadConv3d(nn.Conv3d):
    """A k^3 convolution over a k^3 input (the heads of D and E, k = 4): one output position, so it is the matrix
    product it amounts to. Same weights and result as `nn.Conv3d(c_in, c_out, k)`; oneDNN and cuDNN run the
    general convolution on this shape about three times slower (bench/layers.py)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != self.kernel_size:
            raise ValueError(f"HeadConv3d needs a {self.kernel_size} input, got {tuple(x.shape[2:])}")
        return F.linear(x.reshape(x.shape[0], -1), self.weight.flatten(1), self.bias).view(x.shape[0], -1, 1, 1, 1)


class StemConvTranspose3d(nn.ConvTranspose3d):
    """The generator's first layer, a bias-free k^3 transposed convolution of a 1^3 code: a matrix product too
    (see `HeadConv3d`). Same weights and result as `nn.ConvTranspose3d(latent, c_out, k, bias=False)`."""

    def __init__(self, latent: int, out_channels: int, kernel: int):
        super().__init__(latent, out_channels, kernel, bias=False)

    def forward(self, z: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if z.shape[2:] != (1, 1, 1) or output_size is not None:
            raise ValueError(f"StemConvTranspose3d needs a 1^3 input, got {tuple(z.shape[2:])}")
        out = z.reshape(z.shape[0], -1) @ self.weight.flatten(1)
        return out.view(z.shape[0], self.out_channels, *self.kernel_size)


# Nearest x2 upsampling followed by a 3-tap filter, along one axis: for an even output voxel 2i the filter's taps
# fall on input voxels i-1, i, i; for an odd one, 2i+1, on i, i, i+1. Indexed [phase, input offset + 1, tap].
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]], [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


class ResizeConv3d(nn.Conv3d):
    """Nearest-neighbour x2 upsampling, then a bias-free 3^3 convolution with padding 1 ("resize-convolution"),
    computed without building the upsampled volume: each of the 8 output phases (even or odd along each axis) is
    a 3^3 convolution of the input whose taps are summed as `_PHASE_TAPS` says; the 8 run as one convolution
    with 8x the output channels and are interleaved ("sub-pixel"). Same weights and result as
    `nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv3d(c_in, c_out, 3, 1, 1, bias=False))`, which is how
    docs/method.md writes it; on a CPU the generator's last layer (one output channel) runs 8x faster this way
    (bench/layers.py). The taps are a buffer (not saved in checkpoints), so they live on the layer's device: a
    CUDA graph cannot copy them from the host while it captures."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, 1, 1, bias=False)
        self.register_buffer("taps", _PHASE_TAPS.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.taps.to(self.weight.dtype)
        phases = torch.einsum("apu,bqv,crw,oiuvw->oabcipqr", taps, taps, taps, self.weight)
        y = F.conv3d(x, phases.reshape(8 * self.out_channels, self.in_channels, 3, 3, 3), padding=1)
        b, _, d, h, w = y.shape
        y = y.view(b, self.out_channels, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, self.out_channels, 2 * d, 2 * h, 2 * w)


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm (the paper's), layer normalisation over each sample's channels and voxels (what WGAN-GP's
    authors put in a gradient-penalised critic, whose penalty is per sample), or nothing."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"normalisation must be one of {NORMS}, got {kind!r}")


def _trunk(size: int, width: int, norm: str = "batch") -> tuple[nn.Sequential, int]:
    """Strided 4^3 convolutions from (1, S^3) down to (C, 4^3); `norm` on all but the first."""
    layers: list[nn.Module] = [nn.Conv3d(1, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    channels = width
    for _ in range(_levels(size) - 1):
        layers += [
            nn.Conv3d(channels, 2 * channels, 4, 2, 1),
            _norm(norm, 2 * channels),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels *= 2
    return nn.Sequential(*layers), channels


class Discriminator(nn.Module):
    """The image critic D: a volume to one unbounded score (no sigmoid: WGAN critic, or logits for BCE).
    `norm`: the paper's BatchNorm, or layer normalisation or none (docs/method.md, "Why the paper's α-WGAN-GP
    collapses")."""

    def __init__(self, size: int = 64, width: int = 64, norm: str = "batch"):
        super().__init__()
        self.trunk, channels = _trunk(size, width, norm)
        self.head = HeadConv3d(channels, 1, 4)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).flatten(1)  # (B, 1)


class Encoder(nn.Module):
    """E: a volume to a latent code of size `latent`, with no activation and no sampling (alpha-GAN)."""

    def __init__(self, size: int = 64, width: int = 64, latent: int = 1000):
        super().__init__()
        self.trunk, channels = _trunk(size, width)
        self.head = HeadConv3d(channels, latent, 4)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).flatten(1)  # (B, latent)


class VariationalEncoder(nn.Module):
    """The VAE-GAN encoder: the same trunk with two heads, the mean and the log-variance of q(z|x)."""

    def __init__(self, size: int = 64, width: int = 64, latent: int = 1000):
        super().__init__()
        self.trunk, channels = _trunk(size, width)
        self.mean = HeadConv3d(channels, latent, 4)
        self.logvar = HeadConv3d(channels, latent, 4)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.mean(h).flatten(1), self.logvar(h).flatten(1)


def reparameterise(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mean + sigma * noise: a sample of q(z|x) through which gradients reach mean and logvar."""
    return mean + torch.exp(0.5 * logvar) * noise


class Generator(nn.Module):
    """G: a latent code to a volume in [-1, 1], by resize-convolution."""

    def __init__(self, size: int = 64, width: int = 64, latent: int = 1000):
        super().__init__()
        levels = _levels(size)
        channels = width * 2 ** (levels - 1)
        layers: list[nn.Module] = [
            StemConvTranspose3d(latent, channels, 4),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
        ]
        for _ in range(levels - 1):
            layers += [ResizeConv3d(channels, channels // 2), nn.BatchNorm3d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        layers += [ResizeConv3d(channels, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent = latent
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1, 1))


class CodeDiscriminator(nn.Module):
    """C: tells encoder codes from N(0, I) codes, which pushes q(z|x) towards the prior."""

    def __init__(self, latent: int = 1000, hidden: int = 4096):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, 1),
        )
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, 1)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm affine weights included, running statistics not)."""
    return sum(p.numel() for p in module.parameters())


def build_networks(
    model: str, size: int, width: int, latent: int, code_hidden: int = 4096, critic_norm: str = "batch"
) -> dict[str, nn.Module]:
    """The networks each model trains: E, G, D and C for the alpha-GANs; G and D for WGAN-GP; E, G, D for VAE-GAN."""
    nets: dict[str, nn.Module] = {"G": Generator(size, width, latent), "D": Discriminator(size, width, critic_norm)}
    if model in ("alpha-wgan-gp", "alpha-gan"):
        nets["E"] = Encoder(size, width, latent)
        nets["C"] = CodeDiscriminator(latent, code_hidden)
    elif model == "vae-gan":
        nets["E"] = VariationalEncoder(size, width, latent)
    elif model != "wgan-gp":
        raise ValueError(f"unknown model {model!r}")
    return nets
