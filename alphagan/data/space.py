"""The common space of the course's cubic volumes: RAS orientation, isotropic voxels, MNI-centred, intensities in
[-1, 1] with the background at -1; and how a brain volume is brought into it (`to_cube`, `normalise`), which
`prepare` does to real scans and the synthetic cache to synthetic subjects.

Taught in notebook 01.

A 64^3 training volume has no scanner geometry of its own any more (it was trimmed, padded and resized). To
save generated volumes as NIfTI files that open on the MNI template in nilearn or any viewer, we give every
cube the same affine: RAS axes, a field of view of `fov_mm` and its centre on the centre of the MNI brain.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from alphagan.folders import atomic

# Centre of the ICBM152 2009a brain mask's bounding box, in MNI millimetres.
MNI_BRAIN_CENTRE = np.array([0.0, -17.0, 5.0])
# What `sample` and `train` write into the `descrip` field of a NIfTI header they save: a model's output, which
# `prepare` refuses as training data unless asked (`--allow-generated`).
GENERATED_MARK = "alphagan generated"
# What `synth` writes there: the synthetic cohort a subject belongs to. Subject i of a (kind, seed) cohort has the
# same anatomy at every size and contrast, so a cache of it shares subjects with a run trained on that cohort.
SYNTHETIC_MARK = "alphagan synth"


def synthetic_origin(kind: str, seed: int) -> str:
    """The cohort a synthetic subject comes from, as a cache's manifest records it."""
    return f"{SYNTHETIC_MARK} {kind} seed {seed}"


def synthetic_mark(kind: str, seed: int, index: int) -> str:
    """What `synth` writes into a subject's header: its cohort (`synthetic_origin`) and its index there."""
    return f"{synthetic_origin(kind, seed)} subject {index}"


def origin_of(descrip: str) -> str:
    """The cohort a header's descrip names (`synthetic_mark`), or "" for a file `synth` did not write."""
    return descrip.split(" subject ")[0] if descrip.startswith(SYNTHETIC_MARK) else ""


# Edge of the cube that holds the whole MNI brain (its longest axis is 181 mm) with a small margin.
DEFAULT_FOV_MM = 192.0


def cube_affine(size: int, fov_mm: float = DEFAULT_FOV_MM, centre=MNI_BRAIN_CENTRE) -> np.ndarray:
    """The 4x4 voxel-to-world affine of a `size`^3 RAS cube of edge `fov_mm` centred on `centre`."""
    voxel = fov_mm / size
    affine = np.diag([voxel, voxel, voxel, 1.0])
    # World coordinate of voxel centre i is origin + i * voxel; the middle of the cube sits at `centre`.
    affine[:3, 3] = np.asarray(centre, dtype=float) - voxel * (size - 1) / 2.0
    return affine


def write_nifti(volume: np.ndarray, affine: np.ndarray, path: str | Path, description: str = "") -> Path:
    """The one NIfTI writer: `volume` (float32) with `affine` as both qform and sform (code 4, MNI152 space), in
    millimetres, `description` in the header's descrip field, written atomically (`folders.atomic`)."""
    img = nib.Nifti1Image(np.asarray(volume, np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)
    img.header.set_sform(affine, code=4)
    img.header["descrip"] = description.encode()
    path = Path(path)
    with atomic(path) as tmp:
        nib.save(img, tmp)
    return path


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of `affine`, in millilitres (1 mL = 1000 mm³)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


class InputError(ValueError):
    """A file that cannot be used, with the plain reason."""


def bounding_box(data: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box that leaves out only all-zero planes."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nonzero = np.flatnonzero(np.any(data != 0, axis=other))
        box.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1))
    return tuple(box)


def to_cube(data: np.ndarray, spacing: np.ndarray, size: int, stretch: bool = False) -> tuple[np.ndarray, float]:
    """Trim all-zero planes, then resize to `size`^3 keeping physical proportions (pad to a cube in mm).

    Returns the cube and its field of view `fov_mm` (the cube's edge in mm). With `stretch`, each axis is resized
    straight to `size`.
    """
    from skimage.transform import resize

    trimmed = data[bounding_box(data)]
    extent = np.array(trimmed.shape) * spacing
    if stretch:
        shape = (size, size, size)
    else:
        voxel = extent.max() / size
        shape = tuple(int(min(size, max(1, round(e / voxel)))) for e in extent)
    # order=1 with a Gaussian pre-filter where we shrink (anti-aliasing); a shrunken brain keeps a zero border.
    resized = resize(
        trimmed, shape, order=1, mode="constant", cval=0.0, anti_aliasing=True, preserve_range=True
    ).astype(np.float32)
    if stretch:
        return resized, float(extent.max())
    cube = np.zeros((size, size, size), dtype=np.float32)
    start = [(size - n) // 2 for n in shape]
    cube[tuple(slice(s, s + n) for s, n in zip(start, shape))] = resized
    return cube, float(extent.max())


def normalise(cube: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Map 0 (background) to -1 and the `percentile` of the brain's voxels to +1, clipping above."""
    foreground = cube[cube > 0]
    if foreground.size == 0:
        raise InputError("no voxel above zero: intensities must be non-negative with a zero background")
    top = float(np.percentile(foreground, percentile))
    return (np.clip(cube / top, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
