"""Training data: a cache (or a freshly synthesised cohort) as a torch Dataset, with the paper's augmentation.

Augmentation, as in the paper: a left-right flip and an intensity randomisation. Volumes are in RAS order, so
the anatomical left-right axis is the first array axis. The authors multiply the whole [-1, 1] volume by
U(0.7, 1), which also moves the background off -1; we scale the foreground only, (x + 1) * s - 1, so that the
background stays exactly -1 and the generator is not asked to learn a random background level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from alphagan.data.prepare import load_cache, normalise


def augment(
    batch: torch.Tensor, generator: torch.Generator, flip: bool = True, intensity: tuple[float, float] = (0.7, 1.0)
) -> torch.Tensor:
    """Randomly flip each (B, 1, X, Y, Z) volume along X and scale its foreground by U(intensity)."""
    b = batch.shape[0]
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        batch = torch.where(flips.view(b, 1, 1, 1, 1).to(batch.device), batch.flip(2), batch)
    lo, hi = intensity
    if (lo, hi) != (1.0, 1.0):
        scale = lo + (hi - lo) * torch.rand(b, generator=generator)
        batch = (batch + 1.0) * scale.view(b, 1, 1, 1, 1).to(batch.device) - 1.0
    return batch


class BrainVolumes(Dataset):
    """Volumes of shape (1, S, S, S) in [-1, 1] from a prepared cache, optionally augmented."""

    def __init__(
        self, volumes: np.ndarray, flip: bool = False, intensity: tuple[float, float] = (1.0, 1.0), seed: int = 0
    ):
        if volumes.ndim != 4:
            raise ValueError(f"expected volumes of shape (N, S, S, S), got {volumes.shape}")
        self.volumes = volumes
        self.flip, self.intensity = flip, tuple(intensity)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_cache(cls, cache: str | Path, **kwargs) -> BrainVolumes:
        volumes, _, _ = load_cache(cache)
        return cls(volumes, **kwargs)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        volume = torch.from_numpy(np.array(self.volumes[index], dtype=np.float32))[None]
        return augment(volume[None], self.generator, self.flip, self.intensity)[0]


def synthetic_volumes(
    n: int, size: int, seed: int = 0, kind: str = "normal", contrast: str = "t1", progress: bool = False
) -> tuple[np.ndarray, float]:
    """A synthetic cohort preprocessed in memory as `prepare` would do it: (n, size, size, size) volumes and
    the median edge of their cubes in mm."""
    from tqdm.auto import tqdm

    from alphagan.data.prepare import to_cube
    from alphagan.data.synth import make_subject

    out = np.empty((n, size, size, size), dtype=np.float32)
    edges = []
    # Synthesise at twice the target resolution, then trim, pad and resize like real data.
    for i in tqdm(range(n), desc="synthetic cohort", disable=not progress, unit="subj"):
        subject = make_subject(i, seed=seed, size=2 * size, kind=kind, contrast=contrast)
        spacing = np.abs(np.diag(subject.affine)[:3])
        cube, edge = to_cube(subject.volume, spacing, size)
        out[i] = normalise(cube)
        edges.append(edge)
    return out, float(np.median(edges))


def load_training_volumes(
    data: str, size: int, n_subjects: int, seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, float]:
    """The volumes of `data` and the edge of their cube in mm (for the NIfTI affine of generated volumes).

    `data` is a cache folder, or `synth[:kind[:contrast]]` for a cohort synthesised on the fly.
    """
    if data.startswith("synth"):
        parts = data.split(":")
        kind = parts[1] if len(parts) > 1 else "normal"
        contrast = parts[2] if len(parts) > 2 else "t1"
        return synthetic_volumes(n_subjects, size, seed=seed, kind=kind, contrast=contrast, progress=progress)
    volumes, manifest, settings = load_cache(data)
    if settings["size"] != size:
        raise ValueError(
            f"{data}: the cache holds {settings['size']}^3 volumes but the run asks for {size}^3; "
            f"prepare it again with --size {size} or pass --size {settings['size']}"
        )
    return volumes, float(np.median([float(row["cube_mm"]) for row in manifest]))
