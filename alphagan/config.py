"""Named settings ("profiles") shared by the notebooks, the command line and the tests.

One place defines what `smoke`, `cpu` and `paper` mean, so that a notebook's `parameters` cell only has to
name a profile and, optionally, override a few fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODELS = ("alpha-wgan-gp", "alpha-gan", "wgan-gp", "vae-gan")


@dataclass(frozen=True)
class Config:
    """Every knob of a training run. The defaults are the paper's settings (SPEC.md)."""

    model: str = "alpha-wgan-gp"
    size: int = 64  # edge of the cubic volume, a power of two >= 16
    width: int = 64  # channels of the first conv block (w in SPEC.md)
    latent: int = 1000
    code_hidden: int = 4096  # width of the code discriminator's hidden layers
    batch: int = 4
    iters: int = 100_000
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)  # Adam defaults, as the authors' code used
    lambda_gp: float = 10.0  # lambda_1
    lambda_rec: float = 10.0  # lambda_2
    beta_kl: float = 1.0  # VAE-GAN only: weight of the KL term
    g_steps: int = 2  # E+G updates per iteration ("the generator twice")
    d_steps: int = 1  # critic updates per iteration (5 for wgan-gp)
    n_subjects: int = 991  # size of the synthetic cohort when no cache is given
    flip: bool = True
    intensity: tuple[float, float] = (0.7, 1.0)  # foreground scale range of the augmentation
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA, fp32 elsewhere)
    channels_last: bool = False
    compile: bool = False  # torch.compile E and G (not the critics: their penalty needs double backward)
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    n_fixed: int = 4  # fixed-noise samples shown every `sample_every` iterations

    def replace(self, **overrides: Any) -> Config:
        """A copy with some fields changed; unknown names raise a clear error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
        if "betas" in overrides or "intensity" in overrides:
            overrides = {k: tuple(v) if k in ("betas", "intensity") else v for k, v in overrides.items()}
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so that checkpoints load with `weights_only=True`."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["intensity"] = list(self.intensity)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls().replace(**d)

    def validate(self) -> Config:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.size < 16 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 16, got {self.size}")
        for name in ("width", "latent", "batch", "g_steps", "d_steps", "code_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        return self


# Model-specific defaults that differ from the alpha-WGAN-GP ones.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "alpha-wgan-gp": {},
    "alpha-gan": {},
    "wgan-gp": {"g_steps": 1, "d_steps": 5},
    "vae-gan": {"g_steps": 1},
}

PROFILES: dict[str, dict[str, Any]] = {
    # CI: seconds per notebook. Tiny volumes and nets; the numbers mean nothing, the code paths run.
    "smoke": dict(
        size=16,
        width=4,
        latent=16,
        code_hidden=32,
        batch=2,
        iters=4,
        n_subjects=12,
        log_every=1,
        sample_every=2,
        ckpt_every=2,
        n_fixed=2,
    ),
    # A laptop or a CI-sized machine: brain-shaped samples within minutes (SPEC.md "Pitfalls measured").
    "cpu": dict(
        size=32,
        width=16,
        latent=1000,
        code_hidden=1024,
        batch=4,
        iters=300,
        n_subjects=128,
        log_every=10,
        sample_every=50,
        ckpt_every=100,
    ),
    # The paper: 64^3, width 64, latent 1000, batch 4.
    "paper": dict(
        size=64,
        width=64,
        latent=1000,
        code_hidden=4096,
        batch=4,
        iters=100_000,
        n_subjects=991,
        log_every=50,
        sample_every=1000,
        ckpt_every=2000,
    ),
}


def make_config(profile: str = "cpu", model: str = "alpha-wgan-gp", **overrides: Any) -> Config:
    """The settings of `profile` for `model`, with `overrides` applied last."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    settings = {**PROFILES[profile], **MODEL_DEFAULTS[model], "model": model}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return Config().replace(**settings).validate()


def default_profile() -> str:
    """`paper` when a CUDA GPU is present, `cpu` otherwise."""
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def device_banner(profile: str, cfg: Config, minutes: float | None = None) -> str:
    """One line saying where this runs, with which settings and for how long, for the top of a notebook."""
    import os

    import torch

    where = f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    line = (
        f"{where}: profile {profile}, {cfg.model}, {cfg.size}³ volumes, width {cfg.width}, latent {cfg.latent}, "
        f"batch {cfg.batch}, {cfg.iters} iterations"
    )
    if minutes is None:
        return line
    return line + ("; under a minute" if minutes < 1 else f"; about {minutes:.0f} minutes")
