"""The synthetic cohort: determinism, anatomy in the right place, contrasts, and factors that vary as described."""

import csv
import warnings

import nibabel as nib
import numpy as np
import pytest
from nilearn import datasets, image

from alphagan.cli import main
from alphagan.data.synth import FACTOR_COLUMNS, make_subject


def _mni_maps_on(volume_affine, shape):
    """The MNI mask, GM and WM maps resampled by nilearn (an independent resampler) onto a subject's grid."""
    target = nib.Nifti1Image(np.zeros(shape, np.float32), volume_affine)
    out = {}
    for name, loader in (
        ("mask", datasets.load_mni152_brain_mask),
        ("gm", datasets.load_mni152_gm_template),
        ("wm", datasets.load_mni152_wm_template),
    ):
        with warnings.catch_warnings():  # the mask is binary; linear interpolation of it is what we want here
            warnings.simplefilter("ignore", UserWarning)
            img = image.resample_to_img(
                loader(resolution=1), target, interpolation="linear", force_resample=True, copy_header=True
            )
        out[name] = img.get_fdata()
    return out


def test_same_seed_same_subject_whatever_the_cohort():
    a = make_subject(5, seed=1, size=32)
    b = make_subject(5, seed=1, size=32)
    c = make_subject(5, seed=2, size=32)
    np.testing.assert_array_equal(a.volume, b.volume)
    assert a.factors == b.factors or str(a.factors) == str(b.factors)
    assert not np.array_equal(a.volume, c.volume)


def test_overlays_the_mni_template_and_background_is_zero():
    subject = make_subject(0, seed=0, size=64)
    maps = _mni_maps_on(subject.affine, subject.volume.shape)
    brain = subject.volume > 0
    mni = maps["mask"] > 0.5
    dice = 2 * (brain & mni).sum() / (brain.sum() + mni.sum())
    assert dice > 0.7, dice  # subjects are smaller than the MNI brain (head size ~0.9 of it, atrophy)

    def centroid_mm(mask):
        ijk = np.argwhere(mask).mean(0)
        return subject.affine[:3, :3] @ ijk + subject.affine[:3, 3]

    # A flipped or shifted affine would move the brain's centre by centimetres (the brain is not symmetric
    # front to back or top to bottom).
    assert np.linalg.norm(centroid_mm(brain) - centroid_mm(mni)) < 6.0
    assert subject.volume.dtype == np.float32
    assert np.all(subject.volume[~mni & ~brain] == 0.0)
    assert (subject.volume == 0).mean() > 0.3  # a FreeSurfer-like brainmask: much exact-zero background


@pytest.mark.parametrize("contrast, order", [("t1", ("csf", "gm", "wm")), ("t2", ("wm", "gm", "csf"))])
def test_tissue_contrast_order(contrast, order):
    subject = make_subject(1, seed=0, size=64, contrast=contrast)
    maps = _mni_maps_on(subject.affine, subject.volume.shape)
    csf = np.clip(maps["mask"] - maps["gm"] - maps["wm"], 0, 1)
    regions = {"csf": csf > 0.8, "gm": maps["gm"] > 0.8, "wm": maps["wm"] > 0.9}
    means = {k: subject.volume[v & (subject.volume > 0)].mean() for k, v in regions.items()}
    assert means[order[0]] < means[order[1]] < means[order[2]], means


def test_tumour_is_bright_in_flair_and_recorded():
    subject = make_subject(2, seed=0, size=64, kind="tumor", contrast="flair")
    f = subject.factors
    assert f["lesion_kind"] == "tumor" and f["lesion_ml"] > 0.5 and f["oedema_ml"] > 0.5
    ijk = np.round(
        np.linalg.inv(subject.affine) @ np.array([f["lesion_x_mm"], f["lesion_y_mm"], f["lesion_z_mm"], 1.0])
    )
    i, j, k = ijk[:3].astype(int)
    assert subject.volume[i, j, k] > 0  # the centre is inside the brain
    normal = make_subject(2, seed=0, size=64, kind="normal", contrast="flair")
    brain = normal.volume > 0
    around = subject.volume[max(i - 4, 0) : i + 5, max(j - 4, 0) : j + 5, max(k - 4, 0) : k + 5]
    assert around.max() > np.percentile(normal.volume[brain], 99)


def test_stroke_removes_tissue():
    subject = make_subject(4, seed=0, size=64, kind="stroke", contrast="t1")
    assert subject.factors["lesion_kind"].startswith("stroke-") and subject.factors["lesion_ml"] > 0.2


def test_ageing_drives_atrophy():
    rows = [make_subject(i, seed=7, size=32).factors for i in range(24)]
    age = np.array([r["age"] for r in rows])
    ventricles = np.array([r["ventricle_ml"] for r in rows])
    grey_fraction = np.array([r["gm_ml"] / r["brain_ml"] for r in rows])
    assert np.corrcoef(age, ventricles)[0, 1] > 0.5
    assert np.corrcoef(age, grey_fraction)[0, 1] < -0.5
    assert 900 < np.median([r["brain_ml"] for r in rows]) < 1800


def test_synth_command_writes_volumes_and_table(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--n", "3", "--size", "32", "--kind", "stroke", "--seed", "1"]) == 0
    files = sorted(tmp_path.glob("*.nii.gz"))
    assert len(files) == 3
    img = nib.load(files[0])
    assert img.shape == (32, 32, 32) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    with open(tmp_path / "participants.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["subject"] for r in rows] == [p.name[: -len(".nii.gz")] for p in files]
    assert set(rows[0]) == set(FACTOR_COLUMNS)
    assert all(r["lesion_kind"].startswith("stroke") for r in rows)


def test_cohort_script_makes_the_four_training_caches(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from alphagan.data.cache import load_cache

    script = Path(__file__).resolve().parent.parent / "data_scripts" / "synth_cohorts.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this python
    run = subprocess.run(["bash", str(script), str(tmp_path), "2", "16"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("normal-t1", "tumor-flair", "tumor-t2", "stroke-t1"):
        volumes, manifest, settings = load_cache(tmp_path / f"cache-{name}-16")
        assert volumes.shape == (2, 16, 16, 16) and settings["size"] == 16


def test_the_blur_is_a_gaussian_with_replicated_edges_cut_at_three_sigma():
    import math

    import torch
    from scipy import ndimage

    from alphagan.data.synth import _blur

    volume = torch.rand(9, 10, 11)
    for sigma in (0.6, 0.8):
        radius = max(1, math.ceil(3 * sigma))
        t = np.arange(-radius, radius + 1)
        k1 = np.exp(-(t**2) / (2 * sigma**2))
        k1 /= k1.sum()
        kernel = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]  # separable: the outer product
        expected = ndimage.convolve(volume.numpy().astype(np.float64), kernel, mode="nearest")
        np.testing.assert_allclose(_blur(volume, sigma).numpy(), expected, atol=1e-6)


def test_the_rotation_turns_about_x_then_y_then_z():
    from alphagan.data.synth import _rotation

    np.testing.assert_allclose(_rotation(np.array([90.0, 0, 0])) @ [0, 1, 0], [0, 0, 1], atol=1e-12)  # y to z
    np.testing.assert_allclose(_rotation(np.array([0, 0, 90.0])) @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # x to y
    both = _rotation(np.array([90.0, 0, 90.0]))  # x first (y to z), then z (x to y)
    np.testing.assert_allclose(both @ [0, 1, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(both @ [0, 0, 1], [1, 0, 0], atol=1e-12)
