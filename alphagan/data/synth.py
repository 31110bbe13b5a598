"""A synthetic cohort of skull-stripped brain MRI volumes, made offline from the templates in nilearn's wheel.

Taught in notebook 01.

Real cohorts (ADNI, BraTS, ATLAS) need an account, so the course brings its own. Each subject is the ICBM152
2009a anatomy (grey- and white-matter probability maps, CSF = brain mask - GM - WM) put through

1. a random affine (head size, small rotation and shift) and a random smooth nonlinear deformation;
2. ageing: a smaller brain, ventricles expanded by a local radial warp, grey matter at the outer surface
   turned into CSF (thinner cortex);
3. for the diseased kinds, a tumour (necrotic core, enhancing rim, oedema spreading in white matter) or a
   stroke (a cavity with tissue loss and a gliotic rim, cortical or subcortical);
4. an MR contrast: tissue intensities drawn per subject, mixed by partial volume, a smooth multiplicative
   bias field, a slight blur and Rician noise, and a background of exactly zero (like a FreeSurfer brainmask).

Every random draw comes from a generator seeded by (seed, subject index), so subject i is the same whatever
the cohort size, order or number of workers. The ground-truth factors are returned with each volume.
"""

from __future__ import annotations

import csv
import functools
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from alphagan.config import CONTRASTS, KINDS
from alphagan.data.space import DEFAULT_FOV_MM, cube_affine, synthetic_mark, voxel_ml, write_nifti
from alphagan.folders import atomic, check_space, claim, staged
from alphagan.progress import tqdm

NATIVE = 0  # size value meaning "the template's own 1 mm grid (197 x 233 x 189)"

# Mean intensity of each tissue class per contrast, before the per-subject jitter. T1w: CSF < GM < WM;
# T2w: WM < GM < CSF; FLAIR: CSF suppressed, oedema and gliosis bright.
TISSUE_MEANS = {
    "t1": dict(csf=0.20, gm=0.55, wm=0.80, core=0.18, rim=0.50, oedema=0.62, cavity=0.25, gliosis=0.60),
    "t2": dict(csf=0.95, gm=0.55, wm=0.40, core=0.90, rim=0.70, oedema=0.80, cavity=0.90, gliosis=0.75),
    "flair": dict(csf=0.08, gm=0.55, wm=0.45, core=0.35, rim=0.80, oedema=0.90, cavity=0.12, gliosis=0.85),
}
FACTOR_COLUMNS = (
    "subject",
    "kind",
    "contrast",
    "age",
    "head_scale",
    "brain_ml",
    "gm_ml",
    "wm_ml",
    "csf_ml",
    "ventricle_ml",
    "lesion_kind",
    "lesion_ml",
    "oedema_ml",
    "lesion_x_mm",
    "lesion_y_mm",
    "lesion_z_mm",
)
VENTRICLE_CENTRE_MNI = np.array([0.0, -12.0, 15.0])


@dataclass
class Subject:
    """One synthetic volume (float32, RAS, background 0), its voxel-to-world affine and its factors."""

    volume: np.ndarray
    affine: np.ndarray
    factors: dict


@dataclass
class _Template:
    """Tissue maps (mask, GM, WM, ventricles, outer proximity) as one tensor, and world-to-grid mapping."""

    maps: torch.Tensor  # (1, 5, X, Y, Z)
    world_to_index: np.ndarray  # 4x4


def _load_mni_maps() -> tuple[np.ndarray, np.ndarray]:
    """Stack of the five 1 mm maps and their affine, from nilearn's bundled ICBM152 2009a files."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = mask_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    affine = mask_img.affine
    ventricles = _ventricle_map(csf, affine)
    # How close a voxel is to the outside of the brain: 1 at the surface, 0 deep inside. Cortical thinning
    # takes grey matter where this is high, so deep grey matter (thalamus, basal ganglia) is spared.
    outside = ndimage.gaussian_filter((mask < 0.5).astype(np.float32), sigma=4.0)
    proximity = np.clip(outside / 0.3, 0.0, 1.0) * mask
    return np.stack([mask, gm, wm, ventricles, proximity]), affine


def _ventricle_map(csf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The lateral ventricles: large connected CSF regions in a box around the centre of the brain."""
    ijk = np.indices(csf.shape, dtype=np.float32)
    world = np.tensordot(affine[:3, :3], ijk, axes=1) + affine[:3, 3, None, None, None]
    x, y, z = world
    box = (np.abs(x) < 30) & (y > -45) & (y < 25) & (z > -5) & (z < 35)
    labels, n = ndimage.label((csf > 0.4) & box)
    sizes = ndimage.sum_labels(np.ones_like(csf), labels, index=np.arange(1, n + 1))
    keep = np.isin(labels, 1 + np.flatnonzero(sizes > 1000))
    keep = ndimage.binary_dilation(keep, iterations=1)
    return (csf * keep).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _template(voxel_mm: float) -> _Template:
    """The template maps, low-pass filtered and subsampled for an output grid of `voxel_mm` voxels."""
    maps, affine = _load_mni_maps()
    step = max(1, int(voxel_mm // 2))
    if voxel_mm > 1.5:
        # Anti-aliasing: a Gaussian whose FWHM is about one output voxel.
        sigma = 0.42 * voxel_mm
        maps = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
    maps = np.ascontiguousarray(maps[:, ::step, ::step, ::step])
    sub_affine = affine.copy()
    sub_affine[:3, :3] = affine[:3, :3] * step
    return _Template(torch.from_numpy(maps)[None], np.linalg.inv(sub_affine))


def output_grid(size: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the output: a `size`^3 MNI-centred cube, or the template's 1 mm grid (size 0)."""
    if size == NATIVE:
        from nilearn import datasets

        img = datasets.load_mni152_brain_mask(resolution=1)
        return tuple(img.shape), img.affine
    if size < 8:
        raise ValueError(f"size must be 0 (native 1 mm grid) or at least 8, got {size}")
    return (size, size, size), cube_affine(size, DEFAULT_FOV_MM)


def _smooth_field(
    rng: np.random.Generator, channels: int, shape: tuple[int, int, int], coarse: int, scale: float
) -> torch.Tensor:
    """A smooth random field: Gaussian noise on a `coarse`^3 lattice, trilinearly upsampled to `shape`."""
    noise = torch.from_numpy(rng.standard_normal((1, channels, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(noise * scale, size=shape, mode="trilinear", align_corners=True)[0]


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (fixed axes), by angles in degrees."""
    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


def _soft_ball(
    world: torch.Tensor, centre: np.ndarray, radius: float, wobble: torch.Tensor, edge_mm: float = 1.5
) -> torch.Tensor:
    """Membership in an irregular ball: 1 inside, 0 outside, a sigmoid edge about `edge_mm` wide."""
    dist = torch.linalg.vector_norm(world - torch.as_tensor(centre, dtype=world.dtype)[:, None, None, None], dim=0)
    return torch.sigmoid((radius * (1.0 + wobble) - dist) / edge_mm)


def _pick(
    rng: np.random.Generator, candidates: torch.Tensor, world: torch.Tensor, fallback: torch.Tensor
) -> np.ndarray:
    """World position of a random voxel among `candidates` (or among `fallback` when there are none)."""
    idx = torch.nonzero(candidates if bool(candidates.any()) else fallback)
    i, j, k = idx[rng.integers(len(idx))].tolist()
    return world[:, i, j, k].numpy().astype(float)


@dataclass
class _Lesion:
    """What a tumour or a stroke makes: its kind, centre (mm), its tissue classes, what is left of the normal tissue,
    and the maps whose volumes are reported."""

    kind: str = "none"
    centre: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    keep: torch.Tensor | float = 1.0  # the fraction of each voxel's normal tissue the lesion leaves
    lesion: torch.Tensor | None = None
    oedema: torch.Tensor | None = None


def make_subject(index: int, seed: int = 0, size: int = 64, kind: str = "normal", contrast: str = "t1") -> Subject:
    """Synthesise subject `index` of the cohort `seed` on a `size`^3 grid (0: the 1 mm template grid)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    shape, affine = output_grid(size)
    ml_per_voxel = voxel_ml(affine)

    # Population factors.
    age = float(rng.uniform(20, 90))
    ageing = (age - 20.0) / 70.0  # 0 at 20 years, 1 at 90
    head_scale = float(np.clip(rng.normal(0.9, 0.04), 0.8, 1.0))
    scale = head_scale * (1.0 - 0.07 * ageing) * (1.0 + rng.normal(0.0, 0.015, 3))  # per-axis jitter
    rotation = _rotation(rng.normal(0.0, 4.0, 3))
    shift = rng.normal(0.0, 3.0, 3)
    ventricle_growth = float(np.clip(0.6 * ageing + rng.normal(0.0, 0.03), 0.0, 0.7))
    thinning = float(np.clip(0.35 * ageing + rng.normal(0.0, 0.03), 0.0, 0.5))

    world = _world(shape, affine)
    mask, gm, wm, ventricles, proximity = _warped_template(rng, world, affine, scale, rotation, shift, ventricle_growth)
    brain = (mask > 0.5).float()
    gm, wm = gm.clamp(0, 1), wm.clamp(0, 1)
    gm = gm - gm * thinning * proximity  # cortical thinning, deep grey matter spared
    fractions = {"csf": (1.0 - gm - wm).clamp(0, 1), "gm": gm, "wm": wm}
    lesion = _Lesion()
    if kind != "normal":
        wobble = _smooth_field(rng, 1, shape, coarse=4, scale=0.15)[0]
        lesion = (_tumour if kind == "tumor" else _stroke)(rng, world, brain, gm, wm, wobble)
        fractions = {k: v * lesion.keep for k, v in fractions.items()} | lesion.maps
    image = _mr_image(rng, fractions, brain, contrast, size)

    def ml(volume: torch.Tensor | None) -> float:
        return 0.0 if volume is None else float((volume * brain).sum()) * ml_per_voxel

    factors = {
        "kind": kind,
        "contrast": contrast,
        "age": round(age, 2),
        "head_scale": round(head_scale, 4),
        "brain_ml": float(brain.sum()) * ml_per_voxel,
        "gm_ml": ml(fractions["gm"]),
        "wm_ml": ml(fractions["wm"]),
        "csf_ml": ml(fractions["csf"]),
        "ventricle_ml": ml(ventricles.clamp(0, 1)),
        "lesion_kind": lesion.kind,
        "lesion_ml": ml(lesion.lesion),
        "oedema_ml": ml(lesion.oedema),
        "lesion_x_mm": float(lesion.centre[0]),
        "lesion_y_mm": float(lesion.centre[1]),
        "lesion_z_mm": float(lesion.centre[2]),
    }
    return Subject(image.numpy().astype(np.float32), affine, factors)


def _world(shape: tuple[int, int, int], affine: np.ndarray) -> torch.Tensor:
    """World coordinates (mm) of every voxel centre, (3, X, Y, Z)."""
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    aff = torch.from_numpy(affine.astype(np.float32))
    return torch.einsum("ab,bxyz->axyz", aff[:3, :3], ijk) + aff[:3, 3, None, None, None]


def _warped_template(
    rng: np.random.Generator,
    world: torch.Tensor,
    affine: np.ndarray,
    scale: np.ndarray,
    rotation: np.ndarray,
    shift: np.ndarray,
    ventricle_growth: float,
) -> torch.Tensor:
    """The template's five maps (mask, GM, WM, ventricles, proximity) sampled at the output voxels: output point q
    -> template point p by a nonlinear warp, the inverse affine about the brain centre, and a local contraction
    around the ventricles (sampling the template compressed there enlarges them in the output)."""
    template = _template(float(abs(affine[0, 0])))
    centre = torch.tensor([0.0, -17.0, 5.0])[:, None, None, None]
    q = world + _smooth_field(rng, 3, tuple(world.shape[1:]), coarse=5, scale=2.5)
    inv = torch.from_numpy((np.linalg.inv(rotation) / scale[:, None]).astype(np.float32))
    p = (
        torch.einsum("ab,bxyz->axyz", inv, q - centre - torch.from_numpy(shift.astype(np.float32))[:, None, None, None])
        + centre
    )
    cv = torch.from_numpy(VENTRICLE_CENTRE_MNI.astype(np.float32))[:, None, None, None]
    r2 = ((p - cv) ** 2).sum(0, keepdim=True)
    p = cv + (p - cv) * (1.0 - ventricle_growth * torch.exp(-r2 / (2 * 30.0**2)))

    # Template grid coordinates, normalised to [-1, 1] for grid_sample (whose last axis is x = W = our k).
    w2i = torch.from_numpy(template.world_to_index.astype(np.float32))
    idx = torch.einsum("ab,bxyz->axyz", w2i[:3, :3], p) + w2i[:3, 3, None, None, None]
    dims = torch.tensor(template.maps.shape[2:], dtype=torch.float32)[:, None, None, None]
    grid = (2.0 * idx / (dims - 1.0) - 1.0).flip(0).permute(1, 2, 3, 0)[None]
    return F.grid_sample(template.maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def _tumour(
    rng: np.random.Generator, world: torch.Tensor, brain: torch.Tensor, gm: torch.Tensor, wm: torch.Tensor,
    wobble: torch.Tensor,
) -> _Lesion:  # fmt: skip
    """A tumour in the white matter of one hemisphere: a necrotic core, an enhancing rim, oedema around them."""
    candidates = (wm > 0.7) & (brain > 0) & (world[0].abs() > 10)
    centre = _pick(rng, candidates, world, brain > 0)
    radius = float(rng.uniform(8, 20))
    whole = _soft_ball(world, centre, radius, wobble) * brain
    core = _soft_ball(world, centre, radius * float(rng.uniform(0.4, 0.7)), wobble) * brain
    reach = radius + float(rng.uniform(6, 20))
    oedema = (_soft_ball(world, centre, reach, wobble, edge_mm=4.0) * brain - whole).clamp(0, 1)
    oedema = oedema * (wm + 0.3 * gm).clamp(0, 1)
    maps = {"core": core, "rim": (whole - core).clamp(0, 1), "oedema": oedema}
    return _Lesion("tumor", centre, maps, (1.0 - whole - oedema).clamp(0, 1), lesion=whole, oedema=oedema)


def _stroke(
    rng: np.random.Generator, world: torch.Tensor, brain: torch.Tensor, gm: torch.Tensor, wm: torch.Tensor,
    wobble: torch.Tensor,
) -> _Lesion:  # fmt: skip
    """A stroke in one hemisphere, cortical (60 %) or subcortical: a cavity with gliosis around it."""
    side = float(rng.choice([-1.0, 1.0]))
    cortical = bool(rng.random() < 0.6)
    if cortical:
        candidates = (gm > 0.5) & (brain > 0) & (side * world[0] > 35)
        radius = float(rng.uniform(10, 25))
    else:
        candidates = (wm > 0.6) & (brain > 0) & (side * world[0] > 12) & (side * world[0] < 32)
        radius = float(rng.uniform(4, 10))
    centre = _pick(rng, candidates, world, brain > 0)
    cavity = _soft_ball(world, centre, radius, wobble) * brain * 0.95
    gliosis = (_soft_ball(world, centre, radius + 3.0, wobble) * brain * 0.95 - cavity).clamp(0, 1) * 0.6
    kind = "stroke-cortical" if cortical else "stroke-subcortical"
    keep = (1.0 - cavity - gliosis).clamp(0, 1)
    return _Lesion(kind, centre, {"cavity": cavity, "gliosis": gliosis}, keep, lesion=cavity)


def _mr_image(
    rng: np.random.Generator, fractions: dict[str, torch.Tensor], brain: torch.Tensor, contrast: str, size: int
) -> torch.Tensor:
    """MR contrast: per-subject tissue means, partial-volume mixing, bias field, blur, Rician noise."""
    shape = tuple(brain.shape)
    means = {k: v * (1.0 + rng.normal(0.0, 0.05)) for k, v in TISSUE_MEANS[contrast].items()}
    image = sum(means[k] * v for k, v in fractions.items())
    image = image * torch.exp(_smooth_field(rng, 1, shape, coarse=3, scale=0.10)[0])
    image = _blur(image, sigma_vox=0.6 if size != NATIVE else 0.8)
    sigma_noise = float(rng.uniform(0.01, 0.03)) * means["wm" if contrast == "t1" else "gm"]
    n1, n2 = (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * sigma_noise for _ in range(2))
    return torch.sqrt((image + n1) ** 2 + n2**2) * brain


def _blur(volume: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Gaussian blur of a 3-D tensor, edge values replicated, the kernel cut at 3 sigma (at least one voxel)."""
    radius = max(1, math.ceil(3 * sigma_vox))
    blurred = ndimage.gaussian_filter(volume.numpy(), sigma_vox, mode="nearest", radius=radius)
    return torch.from_numpy(blurred)


def subject_id(index: int, kind: str, contrast: str) -> str:
    return f"sub-{kind}{index:04d}_{contrast}"


def _check_disk(first: Path, n: int, out: Path) -> None:
    """Refuse, before it fills the disk of `out`, a cohort of `n` files each about as large as the `first`."""
    size = first.stat().st_size
    what = f"{n} subjects (the first took {size / 2**20:.2f} MiB)"
    check_space(out, int(size * 1.1 * (n - 1)), what, "give a smaller --n or another --out")


def write_table(rows: list[dict], path: Path) -> None:
    """Write a tab-separated table (floats to four decimals), atomically."""
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def make_cohort(
    out: str | Path,
    n: int,
    size: int = 64,
    kind: str = "normal",
    contrast: str = "t1",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `n` subjects as NIfTI files and `participants.tsv` of their factors into `out`, a folder that is new,
    empty or an earlier cohort of this function's (`alphagan.folders.claim`: other settings need `overwrite`)."""
    if n < 1:
        raise ValueError(f"a cohort needs at least one subject, got n={n}")
    names = [subject_id(index, kind, contrast) for index in range(n)]
    settings = dict(n=n, size=size, kind=kind, contrast=contrast, seed=seed)
    writes = [f"{name}.nii.gz" for name in names] + ["participants.tsv"]
    rows = []
    # Synthesis runs in this process (torch uses all cores for it); gzip compression, which releases the
    # GIL, overlaps with it in writer threads. At most two files wait for it, and a write that failed (a full
    # disk) stops the cohort at once. The files appear together at the end: a stopped cohort never looks finished.
    with (
        claim(out, "synth", settings, writes, overwrite=overwrite) as owned,
        staged(owned.folder, writes) as staging,
        ThreadPoolExecutor(2) as writer,
    ):
        pending: list[Future] = []
        for index in tqdm(range(n), desc=f"synth {kind} {contrast}", disable=not progress, unit="subj"):
            subject = make_subject(index, seed=seed, size=size, kind=kind, contrast=contrast)
            path = staging / f"{names[index]}.nii.gz"
            mark = synthetic_mark(kind, seed, index)
            pending.append(writer.submit(write_nifti, subject.volume, subject.affine, path, mark))
            rows.append({"subject": names[index], **subject.factors})
            if index == 0:  # the first file's size tells whether the whole cohort fits
                pending.pop().result()
                _check_disk(path, n, owned.folder)
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.pop(0).result()
        for job in pending:
            job.result()
        write_table([{c: row[c] for c in FACTOR_COLUMNS} for row in rows], staging / "participants.tsv")
    return Path(out)
