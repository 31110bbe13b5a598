"""The common space of the course's cubic volumes: RAS orientation, isotropic voxels, MNI-centred.

Taught in notebook 01.

A 64^3 training volume has no scanner geometry of its own any more (it was trimmed, padded and resized). To
save generated volumes as NIfTI files that open on the MNI template in nilearn or any viewer, we give every
cube the same affine: RAS axes, a field of view of `fov_mm` and its centre on the centre of the MNI brain.
"""

from __future__ import annotations

import numpy as np

# Centre of the ICBM152 2009a brain mask's bounding box, in MNI millimetres.
MNI_BRAIN_CENTRE = np.array([0.0, -17.0, 5.0])
# What `sample` and `train` write into the `descrip` field of a NIfTI header they save: a model's output, which
# `prepare` refuses as training data unless asked (`--allow-generated`).
GENERATED_MARK = "alphagan generated"
# Edge of the cube that holds the whole MNI brain (its longest axis is 181 mm) with a small margin.
DEFAULT_FOV_MM = 192.0


def cube_affine(size: int, fov_mm: float = DEFAULT_FOV_MM, centre=MNI_BRAIN_CENTRE) -> np.ndarray:
    """The 4x4 voxel-to-world affine of a `size`^3 RAS cube of edge `fov_mm` centred on `centre`."""
    voxel = fov_mm / size
    affine = np.diag([voxel, voxel, voxel, 1.0])
    # World coordinate of voxel centre i is origin + i * voxel; the middle of the cube sits at `centre`.
    affine[:3, 3] = np.asarray(centre, dtype=float) - voxel * (size - 1) / 2.0
    return affine


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of `affine`, in millilitres (1 mL = 1000 mm³)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
