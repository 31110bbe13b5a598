"""Named settings ("profiles") shared by the notebooks, the command line and the tests.

Used by every notebook: its parameters cell names a profile.

What `smoke`, `cpu`, `gpu` and `paper` mean for a training run (`PROFILES`); `alphagan.course.settings.Profile`
joins it with what they mean for the course's notebooks, so that a notebook's `parameters` cell only has to name
a profile and, optionally, override a few fields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODELS = ("alpha-wgan-gp", "alpha-gan", "wgan-gp", "vae-gan")
NORMS = ("batch", "layer", "none")  # the image critic's normalisation (models.py)
KINDS = ("normal", "tumor", "stroke")  # synthetic cohorts (data/synth.py)
CONTRASTS = ("t1", "t2", "flair")
LAYOUTS = ("auto", "flat", "brats", "adni", "atlas", "ixi", "decathlon")  # folders `prepare` reads
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# `evaluate`'s defaults, for its function and its command line: the paper's 512 volumes a side and MMD batch 8.
EVALUATE_DEFAULTS: dict[str, int] = {"n": 512, "pairs": 1000, "mmd_batch": 8, "mmd_repetitions": 100, "n_anatomy": 64}
EVALUATE_LEAST: dict[str, int] = {"n": 3, "pairs": 2, "n_anatomy": 1}  # MS-SSIM's spread needs two pairs


@dataclass(frozen=True)
class Config:
    """Every knob of a training run. The defaults are the paper's settings (docs/method.md)."""

    model: str = "alpha-wgan-gp"
    size: int = 64  # edge of the cubic volume, a power of two >= 16
    width: int = 64  # channels of the first conv block (w in docs/method.md)
    latent: int = 1000
    code_hidden: int = 4096  # width of the code discriminator's hidden layers
    batch: int = 4
    iters: int = 100_000
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)  # Adam defaults, as the authors' code used
    lambda_gp: float = 10.0  # lambda_1
    lambda_rec: float = 10.0  # lambda_2
    beta_kl: float = 1.0  # VAE-GAN only: weight of the KL term
    critic_norm: str = "batch"  # normalisation in the image critic D: batch (the paper's), layer or none
    g_steps: int = 2  # E+G updates per iteration ("the generator twice")
    d_steps: int = 1  # critic updates per iteration (5 for wgan-gp)
    n_subjects: int = 991  # size of the synthetic cohort when no cache is given
    flip: bool = True
    intensity: tuple[float, float] = (0.7, 1.0)  # foreground scale range of the augmentation
    seed: int = 0
    device: str = "auto"
    # auto: bf16 on GPUs with native bf16 (Ampere and newer), fp16 with loss scaling on older ones (T4, V100),
    # fp32 on the CPU.
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False  # torch.compile E and G (not the critics: their penalty needs double backward)
    # Replay each update as a CUDA graph after a few eager iterations (one GPU, fp32 or bf16, no compile):
    # at the paper's batch of 4 the GPU otherwise waits on Python launching several hundred small kernels.
    cuda_graphs: bool = True
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 1000
    keep_ckpts: int = 3  # the newest checkpoints kept; 0: every one
    n_fixed: int = 4  # fixed-noise samples shown every `sample_every` iterations

    def replace(self, **overrides: Any) -> Config:
        """A copy with some fields changed; unknown names raise a clear error."""
        unknown = sorted(set(overrides) - SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
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
        """This Config, if every field is one a run can train with (`check`); else ValueError naming the field."""
        for name in RULES:
            check(name, getattr(self, name))
        for name in ("betas", "intensity"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} must be two numbers, got {getattr(self, name)!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be from 0 to below 1, got {self.betas}")
        low, high = self.intensity
        if not 0 < low <= high:
            raise ValueError(f"intensity must be a range 0 < low <= high, got {self.intensity}")
        return self


SETTINGS = frozenset(f.name for f in dataclasses.fields(Config))  # the names of a run's settings


SIZES = (16, 32, 64, 128, 256)  # a training volume's edge: the networks halve it down to 4^3; 256^3 fills a GPU


_COUNT = (lambda v: v >= 1), ">= 1"
MAX_STEPS = 100
LR_RANGE = (1e-7, 1.0)
# What each setting may be, for every command: `Config.validate` and the command line's options both ask `check`.
# Settings that cannot learn are refused: no learning rate, a negative weight.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": ((lambda v: v in MODELS), f"one of {', '.join(MODELS)}"),
    "size": ((lambda v: v in SIZES), f"a power of two from 16 to 256 ({', '.join(map(str, SIZES))})"),
    **dict.fromkeys(("width", "latent", "code_hidden", "iters", "n_subjects"), _COUNT),
    # More updates than this in one iteration is a slip (the paper: 2 and 1, WGAN-GP's 5): one iteration would run
    # for minutes with its progress bar still.
    **dict.fromkeys(("g_steps", "d_steps"), ((lambda v: 1 <= v <= MAX_STEPS), f"from 1 to {MAX_STEPS}")),
    "batch": ((lambda v: v >= 2), ">= 2 (BatchNorm needs two volumes in a batch)"),
    **dict.fromkeys(("log_every", "sample_every", "ckpt_every", "n_fixed"), _COUNT),
    "keep_ckpts": ((lambda v: v >= 0), ">= 0 (0: keep every checkpoint)"),
    # Adam moves each weight by at most about `lr` a step: above 1 that swamps weights of about 0.01, and below 1e-7
    # the paper's 100 000 iterations move a weight by no more than its own size. The paper's: 2e-4.
    "lr": ((lambda v: LR_RANGE[0] <= v <= LR_RANGE[1]), f"from {LR_RANGE[0]:g} to {LR_RANGE[1]:g} (the paper: 2e-4)"),
    **dict.fromkeys(
        ("lambda_gp", "lambda_rec", "beta_kl"),
        ((lambda v: math.isfinite(v) and v >= 0), "a finite number of at least 0"),
    ),
    "critic_norm": ((lambda v: v in NORMS), f"one of {', '.join(NORMS)}"),
    "precision": ((lambda v: v in PRECISIONS), f"one of {', '.join(PRECISIONS)}"),
    "seed": ((lambda v: 0 <= v < 2**32), "a whole number from 0 to 2^32 - 1"),
}


class SettingError(ValueError):
    """A setting out of its range: `name` and what it `rule`s, "must be ..., got ..."."""

    def __init__(self, name: str, rule: str):
        super().__init__(f"{name} {rule}")
        self.name, self.rule = name, rule


def check(name: str, value: Any) -> Any:
    """`value` if setting `name` may take it, else SettingError: "<name> must be <rule>, got <value>"."""
    ok, rule = RULES[name]
    try:
        allowed = not isinstance(value, bool) and ok(value)
    except TypeError:  # a string where a number belongs, or the reverse
        allowed = False
    if not allowed:
        raise SettingError(name, f"must be {rule}, got {value!r}")
    return value


# What the alpha-WGAN-GP needs, beyond the paper's settings, to learn at the course's sizes (docs/method.md,
# section 7, measured by bench/ablation.py, two seeds to 5 000 iterations): a reconstruction weight whose gradient
# is not swamped by the critic's. With it alone the samples stayed as varied as real ones and the reconstructions
# followed their input. Layer normalisation in the critic and five critic updates per iteration, also measured,
# were not needed, and the five make an iteration 2.1-2.7x as long (bench/train_step.py --grid critic).
LEARNS: dict[str, Any] = {"lambda_rec": 1000.0}


def as_written(cfg: Config) -> Config:
    """`cfg` with the paper's own settings in place of `LEARNS` (notebook 03 trains both)."""
    return cfg.replace(**{k: getattr(Config(), k) for k in LEARNS})


# Model-specific defaults that differ from the alpha-WGAN-GP ones.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "alpha-wgan-gp": {},
    "alpha-gan": {},
    "wgan-gp": {"g_steps": 1, "d_steps": 5},
    "vae-gan": {"g_steps": 1},
}

# The paper's networks and data at 64^3: width 64, latent 1000, batch 4, 991 subjects.
PAPER_NETWORKS = dict(
    size=64, width=64, latent=1000, code_hidden=4096, batch=4, n_subjects=991, log_every=50, sample_every=1000
)

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
    # A laptop or a CI-sized machine: blurry but brain-shaped samples after 1 000 iterations. The paper as written
    # made head-sized blobs at 300 (anatomy.brain_shape: overlap 0.84 against 0.89 for the least typical real
    # brain) and passed by 800-1000 (0.91, 0.925); with LEARNS, 0.918 and 0.930 at 1 000 (bench/ablation.json, two
    # seeds). How long that takes here: the course runner's plan.
    "cpu": dict(
        size=32,
        width=16,
        latent=1000,
        code_hidden=1024,
        batch=4,
        iters=1000,
        n_subjects=128,
        log_every=10,
        sample_every=100,
        ckpt_every=500,
        keep_ckpts=1,
    ),
    # One GPU: the paper's networks at 64^3, 2 000 iterations per model (`course --minutes` scales them to a GPU's
    # speed; 17.5 it/s on an H200, docs/results_gpu.md). 256 synthetic
    # subjects, not the paper's 991: the cohort is made in about 15 s on 16 cores instead of 55 (bench/gpu_check.py,
    # section cohort). A course run keeps one checkpoint per model (1.4 GB each at the paper's size); long runs keep
    # three, so that a damaged last checkpoint still leaves one to resume from.
    "gpu": dict(PAPER_NETWORKS, iters=2000, n_subjects=256, ckpt_every=1000, keep_ckpts=1),
    # The paper's full schedule: 100 000 iterations.
    "paper": dict(PAPER_NETWORKS, iters=100_000, ckpt_every=2000),
}


def make_config(profile: str = "cpu", model: str = "alpha-wgan-gp", **overrides: Any) -> Config:
    """The settings of `profile` for `model`, with `overrides` applied last."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    learns = LEARNS if model == "alpha-wgan-gp" and profile != "paper" else {}  # `paper`: the paper as written
    settings = {**PROFILES[profile], **MODEL_DEFAULTS[model], **learns, "model": model}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return Config().replace(**settings).validate()
