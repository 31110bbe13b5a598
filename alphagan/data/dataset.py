"""Training data: where volumes come from (`Source`), the synthetic cohort made once into a cache, and batches
drawn on the device that trains on them, with the paper's augmentation (taught in notebook 01).

Augmentation, as in the paper: a left-right flip and an intensity randomisation. Volumes are in RAS order, so
the anatomical left-right axis is the first array axis. The authors multiply the whole [-1, 1] volume by
U(0.7, 1), which also moves the background off -1; we scale the foreground only, (x + 1) * s - 1, so that the
background stays exactly -1 and the generator is not asked to learn a random background level.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from alphagan.config import CONTRASTS, KINDS
from alphagan.data.cache import load_cache, synthetic_cache

# A cohort that takes at most this share of the GPU's memory lives on the GPU (991 subjects at 64^3: 1 GB).
RESIDENT_GPU_FRACTION = 0.25


def augment(
    batch: torch.Tensor, generator: torch.Generator, flip: bool = True, intensity: tuple[float, float] = (0.7, 1.0)
) -> torch.Tensor:
    """Randomly flip each (B, 1, X, Y, Z) volume along X and scale its foreground by U(intensity).

    The draws come from `generator` on its own device, so a GPU batch is augmented without a host round trip."""
    b = batch.shape[0]
    if flip:
        flips = torch.rand(b, generator=generator, device=generator.device) < 0.5
        batch = torch.where(flips.view(b, 1, 1, 1, 1).to(batch.device), batch.flip(2), batch)
    lo, hi = intensity
    if (lo, hi) != (1.0, 1.0):
        scale = lo + (hi - lo) * torch.rand(b, generator=generator, device=generator.device)
        batch = (batch + 1.0) * scale.view(b, 1, 1, 1, 1).to(batch.device) - 1.0
    return batch


# ------------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class Source:
    """Where volumes come from: a prepared cache folder, or the synthetic cohort `synth[:kind[:contrast]]`.

    An existing folder always wins, so a cache named `synth_old` is read as a cache."""

    cache: Path | None = None
    kind: str = "normal"
    contrast: str = "t1"

    @classmethod
    def parse(cls, text: str | Path) -> Source:
        text = str(text)
        if Path(text).is_dir():
            return cls(cache=Path(text).resolve())
        head, *rest = text.split(":")
        if head != "synth":
            return cls(cache=Path(text).resolve())  # missing: load_cache says so, naming the folder
        if len(rest) > 2 or (rest and rest[0] not in KINDS) or (len(rest) == 2 and rest[1] not in CONTRASTS):
            raise ValueError(
                f"{text!r}: a synthetic source is synth[:kind[:contrast]], kind in {KINDS}, contrast in {CONTRASTS}"
            )
        return cls(None, *rest)

    @property
    def synthetic(self) -> bool:
        return self.cache is None

    def __str__(self) -> str:
        return str(self.cache) if self.cache else f"synth:{self.kind}:{self.contrast}"


def data_digest(data: str, settings: bool = True) -> str | None:
    """The SHA-256 of a cache's settings.json and manifest.tsv (which holds each input's checksum): two caches of the
    same name but other subjects, or prepared other ways (--stretch), differ here; one moved elsewhere does not.
    `settings=False`: of the manifest alone, as runs recorded it before December 2026. None for the synthetic
    cohort, which its settings define."""
    source = Source.parse(data)
    if source.synthetic or not (source.cache / "manifest.tsv").exists():
        return None
    digest = hashlib.sha256()
    for name in ("settings.json", "manifest.tsv") if settings else ("manifest.tsv",):
        digest.update((source.cache / name).read_bytes() if (source.cache / name).exists() else b"")
    return digest.hexdigest()


def same_data(recorded: str | None, data: str) -> bool:
    """Whether a run's recorded `data_digest` is that of the cache `data` (by either definition)."""
    return recorded is not None and recorded in (data_digest(data), data_digest(data, settings=False))


# ------------------------------------------------------------------------------------------------ the synthetic cohort
def _median_fov(manifest: list[dict]) -> float:
    """The field of view (cube edge, mm) given to the volumes of a cache: the median of its rows'."""
    return float(np.median([float(row["fov_mm"]) for row in manifest]))


def synthetic_volumes(
    n: int, size: int, seed: int = 0, kind: str = "normal", contrast: str = "t1", progress: bool = False
) -> tuple[np.ndarray, float]:
    """A synthetic cohort as `prepare` would make it: (n, size, size, size) memory-mapped volumes from the
    cohort cache, and their median field of view (the cube's edge) in mm."""
    folder = synthetic_cache(n, size, seed, kind, contrast, progress=progress)
    try:
        volumes, manifest, _ = load_cache(folder)
    except ValueError as exc:  # made by us, so made again: damaged by a full disk, a kill or an edit
        warnings.warn(f"{str(exc).split('; ')[0]}; making it again", stacklevel=2)  # not its fix: ours
        shutil.rmtree(folder)
        volumes, manifest, _ = load_cache(synthetic_cache(n, size, seed, kind, contrast, progress=progress))
    return volumes, _median_fov(manifest)


def load_training_volumes(
    data: str | Source, size: int, n_subjects: int, seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, float]:
    """The memory-mapped volumes of `data` and their field of view in mm, the cube's edge (for the NIfTI affine
    of generated volumes). `data` is a cache folder, or `synth[:kind[:contrast]]` for the cached synthetic cohort."""
    source = data if isinstance(data, Source) else Source.parse(data)
    if source.synthetic:
        return synthetic_volumes(n_subjects, size, seed, source.kind, source.contrast, progress=progress)
    volumes, manifest, settings = load_cache(source.cache)
    if settings["size"] != size:
        raise ValueError(
            f"{source.cache}: the cache holds {settings['size']}^3 volumes but the run asks for {size}^3; "
            f"prepare a cache at that size (`python -m alphagan prepare ... --size {size}`)"
        )
    return volumes, _median_fov(manifest)


# ------------------------------------------------------------------------------------------------ batches
class Batches:
    """The training volumes, and random augmented batches of them on the device that trains.

    On a GPU, a cohort that fits in `RESIDENT_GPU_FRACTION` of its memory is copied there once, chunk by chunk,
    and batches are indexed and augmented there: no host work and no host-device sync per batch. A larger
    cohort stays memory-mapped on disk; each batch is gathered into one of a ring of pinned buffers and copied
    asynchronously, so the host prepares batch k+1 while the GPU computes step k. On the CPU, batches are read
    from the memory map. Every draw comes from `generator` (on the training device), except the rows of a
    memory-mapped cohort on a GPU, which a CPU generator of its own picks (`index_generator`).
    """

    def __init__(
        self,
        volumes: np.ndarray,
        device: torch.device,
        generator: torch.Generator,
        flip: bool = True,
        intensity: tuple[float, float] = (0.7, 1.0),
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        if volumes.ndim != 4:
            raise ValueError(f"expected volumes of shape (N, S, S, S), got {volumes.shape}")
        self.volumes, self.device, self.generator = volumes, device, generator
        self.flip, self.intensity, self.memory_format = flip, tuple(intensity), memory_format
        self.index_generator = generator
        self.resident: torch.Tensor | None = None
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            if volumes.nbytes <= RESIDENT_GPU_FRACTION * total:
                self.resident = torch.empty(volumes.shape, dtype=torch.float32, device=device)
                for i in range(0, len(volumes), 64):
                    self.resident[i : i + 64].copy_(torch.from_numpy(np.ascontiguousarray(volumes[i : i + 64])))
            else:
                self.index_generator = torch.Generator().manual_seed(int(generator.initial_seed()))
                self._pinned: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
                self._next = 0

    def __len__(self) -> int:
        return len(self.volumes)

    def first(self, n: int) -> torch.Tensor:
        """The first `n` volumes as (n, 1, S, S, S), unaugmented (the fixed volumes of progress pictures)."""
        return torch.from_numpy(np.array(self.volumes[:n], dtype=np.float32)).unsqueeze(1)

    def batch(self, size: int) -> torch.Tensor:
        """`size` random volumes, augmented, as (size, 1, S, S, S) on the training device."""
        if self.resident is not None:
            index = torch.randint(len(self), (size,), generator=self.generator, device=self.device)
            x = self.resident[index]
        else:
            index = torch.randint(len(self), (size,), generator=self.index_generator)
            x = self._gather(index.numpy(), size)
        x = augment(x.unsqueeze(1), self.generator, self.flip, self.intensity)
        return x.contiguous(memory_format=self.memory_format)

    def _gather(self, index: np.ndarray, size: int) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(np.asarray(self.volumes[index], dtype=np.float32)).to(self.device)
        if len(self._pinned) < 3:  # a ring of three: one being filled, up to two in flight
            self._pinned.append((torch.empty((size, *self.volumes.shape[1:]), pin_memory=True), None))
        slot = self._next % len(self._pinned)
        buffer, done = self._pinned[slot]
        if done is not None:
            done.synchronize()  # the copy that last read this buffer has finished
        np.take(self.volumes, index, axis=0, out=buffer.numpy())
        x = buffer.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pinned[slot] = (buffer, event)
        self._next += 1
        return x

    def state(self) -> dict[str, torch.Tensor]:
        """The generators' states, for exact resume."""
        return {"generator": self.generator.get_state(), "index": self.index_generator.get_state()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.index_generator.set_state(state["index"])


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
