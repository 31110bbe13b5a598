"""The four networks of the 3D alpha-GAN (docs/method.md, section 1) and the baselines' variants (notebook 02).

At 64^3 the discriminator and encoder halve the volume four times (64 -> 32 -> 16 -> 8 -> 4) and a last 4^3
convolution reduces it to one value (D) or one latent vector (E); the generator mirrors this with
nearest-neighbour upsampling followed by a 3^3 convolution ("resize-convolution"), which avoids the
checkerboard of transposed convolutions. Other sizes add or remove one block per factor of two, so that the
trunk always ends at 4^3. With latent 1000 and width 64 the parameter counts equal the authors' code.

Initialisation (DCGAN's, as is usual for these models): convolution and linear weights N(0, 0.02), biases 0,
BatchNorm weights N(1, 0.02) and biases 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _trunk(size: int, width: int) -> tuple[nn.Sequential, int]:
    """Strided 4^3 convolutions from (1, S^3) down to (C, 4^3); BatchNorm on all but the first."""
    layers: list[nn.Module] = [nn.Conv3d(1, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    channels = width
    for _ in range(_levels(size) - 1):
        layers += [
            nn.Conv3d(channels, 2 * channels, 4, 2, 1),
            nn.BatchNorm3d(2 * channels),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels *= 2
    return nn.Sequential(*layers), channels


class Discriminator(nn.Module):
    """The image critic D: a volume to one unbounded score (no sigmoid: WGAN critic, or logits for BCE)."""

    def __init__(self, size: int = 64, width: int = 64):
        super().__init__()
        self.trunk, channels = _trunk(size, width)
        self.head = nn.Conv3d(channels, 1, 4, 1, 0)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).flatten(1)  # (B, 1)


class Encoder(nn.Module):
    """E: a volume to a latent code of size `latent`, with no activation and no sampling (alpha-GAN)."""

    def __init__(self, size: int = 64, width: int = 64, latent: int = 1000):
        super().__init__()
        self.trunk, channels = _trunk(size, width)
        self.head = nn.Conv3d(channels, latent, 4, 1, 0)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).flatten(1)  # (B, latent)


class VariationalEncoder(nn.Module):
    """The VAE-GAN encoder: the same trunk with two heads, the mean and the log-variance of q(z|x)."""

    def __init__(self, size: int = 64, width: int = 64, latent: int = 1000):
        super().__init__()
        self.trunk, channels = _trunk(size, width)
        self.mean = nn.Conv3d(channels, latent, 4, 1, 0)
        self.logvar = nn.Conv3d(channels, latent, 4, 1, 0)
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
            nn.ConvTranspose3d(latent, channels, 4, 1, 0, bias=False),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
        ]
        for _ in range(levels - 1):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv3d(channels, channels // 2, 3, 1, 1, bias=False),
                nn.BatchNorm3d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(channels, 1, 3, 1, 1, bias=False), nn.Tanh()]
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


def build_networks(model: str, size: int, width: int, latent: int, code_hidden: int = 4096) -> dict[str, nn.Module]:
    """The networks each model trains: E, G, D and C for the alpha-GANs; G and D for WGAN-GP; E, G, D for VAE-GAN."""
    nets: dict[str, nn.Module] = {"G": Generator(size, width, latent), "D": Discriminator(size, width)}
    if model in ("alpha-wgan-gp", "alpha-gan"):
        nets["E"] = Encoder(size, width, latent)
        nets["C"] = CodeDiscriminator(latent, code_hidden)
    elif model == "vae-gan":
        nets["E"] = VariationalEncoder(size, width, latent)
    elif model != "wgan-gp":
        raise ValueError(f"unknown model {model!r}")
    return nets


def layer_shapes(net: nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, layer type, output shape, parameters) for every leaf layer of `net` on input `x`."""
    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    hooks = []
    for name, module in net.named_modules():
        if len(list(module.children())) == 0:

            def hook(mod, _inputs, output, name=name):
                rows.append((name, type(mod).__name__, tuple(output.shape), sum(p.numel() for p in mod.parameters())))

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        net.train()
    return rows


def compare_upsampling(channels: int = 4, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample one smooth random volume x2 with a transposed convolution and with resize-convolution.

    Both use random weights with the same initialisation; the transposed convolution's kernel overlaps
    unevenly (kernel 4, stride 2), which prints a checkerboard on any input, while nearest upsampling followed
    by a 3^3 convolution treats every output voxel alike (Odena et al., 2016).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(1, channels, size, size, size) + 0.1 * torch.randn(1, channels, size, size, size, generator=g)
    transposed = nn.ConvTranspose3d(channels, 1, 4, 2, 1, bias=False)
    resize = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(channels, 1, 3, 1, 1, bias=False))
    with torch.no_grad():
        transposed.weight.copy_(torch.randn(transposed.weight.shape, generator=g) * 0.02)
        resize[1].weight.copy_(torch.randn(resize[1].weight.shape, generator=g) * 0.02)
        return transposed(x)[0, 0], resize(x)[0, 0]
