"""Preprocessing: orientation, scaling, proportions, range, layouts, bad inputs, atomic cache, re-runs."""

import gzip
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from alphagan.data import prepare as prep
from alphagan.data.cache import Settings, load_cache
from alphagan.data.dataset import BrainVolumes, augment
from alphagan.data.prepare import find_inputs, load_ras, prepare, to_cube


def ellipsoid(shape, radii_vox, value=100.0):
    """A filled ellipsoid centred in `shape`, with a bright marker on its +x, +y, +z octant."""
    grid = np.indices(shape, dtype=float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grid, centre, radii_vox))
    data = np.where(r <= 1.0, value, 0.0).astype(np.float32)
    return data


def save(data, path, affine=None, **header):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def brain_like(shape=(70, 80, 70), seed=0):
    """An ellipsoidal 'brain' of about 140 x 160 x 140 mm at 2 mm, with texture so percentiles make sense."""
    rng = np.random.default_rng(seed)
    data = ellipsoid(shape, (33, 38, 33)) * rng.uniform(0.5, 1.0, shape).astype(np.float32)
    return data, np.diag([2.0, 2.0, 2.0, 1.0])


def test_any_orientation_comes_back_in_ras(tmp_path):
    rng = np.random.default_rng(0)
    ras = rng.random((30, 40, 50)).astype(np.float32)
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    save(ras, tmp_path / "ras.nii.gz", affine)
    # The same image stored as L-P-S (x and y reversed) and as P-I-R (axes permuted and reversed).
    flip_xy = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip_xy[:3, 3] = [29.0, 39.0, 0.0]
    save(ras[::-1, ::-1, :].copy(), tmp_path / "lps.nii.gz", affine @ flip_xy)
    pir = np.transpose(ras, (1, 2, 0))[::-1, ::-1, :].copy()  # axes (y, z, x), y and z reversed
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 0] = perm[2, 1] = 1.0
    perm[3, 3] = 1.0
    reverse = np.diag([-1.0, -1.0, 1.0, 1.0])
    reverse[:3, 3] = [39.0, 49.0, 0.0]
    save(pir, tmp_path / "pir.nii.gz", affine @ perm @ reverse)
    for name in ("lps", "pir"):
        assert nib.aff2axcodes(nib.load(tmp_path / f"{name}.nii.gz").affine) != ("R", "A", "S")
        data, spacing = load_ras(tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(data, ras)
        np.testing.assert_allclose(spacing, [2.0, 1.0, 1.5])


def test_scaling_slope_and_integer_types_are_honoured(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.5, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    data, _ = load_ras(tmp_path / "scaled.nii")
    np.testing.assert_allclose(data, raw * 2.5 + 10.0)


def test_trim_and_pad_keep_proportions():
    # 120 x 90 x 60 mm box-shaped ellipsoid at 1 mm, and the same object at 1 x 1 x 2 mm.
    iso = ellipsoid((130, 100, 70), (60, 45, 30))
    aniso = ellipsoid((130, 100, 35), (60, 45, 15))
    for data, spacing in ((iso, np.array([1.0, 1.0, 1.0])), (aniso, np.array([1.0, 1.0, 2.0]))):
        cube, edge = to_cube(data, spacing, 64)
        assert cube.shape == (64, 64, 64)
        extent = np.array([b.stop - b.start for b in prep.bounding_box(cube)])
        # 121 mm -> 64 voxels, so 91 mm -> 48 and 61 mm -> 32 voxels (+-1 for the anti-aliasing blur).
        np.testing.assert_allclose(extent, [64, 48, 32], atol=2)
        assert abs(edge - 121 * spacing[0]) < 3
        centre = np.argwhere(cube > 0).mean(0)
        np.testing.assert_allclose(centre, [31.5, 31.5, 31.5], atol=1.0)
    stretched, _ = to_cube(iso, np.ones(3), 64, stretch=True)
    assert [b.stop - b.start for b in prep.bounding_box(stretched)] == [64, 64, 64]


def test_output_range_and_background(tmp_path):
    data, affine = brain_like()
    save(data, tmp_path / "b.nii.gz", affine)
    volume, info = prep.preprocess(tmp_path / "b.nii.gz", Settings(size=32))
    assert volume.shape == (32, 32, 32) and volume.dtype == np.float32
    assert volume.min() == -1.0 and volume.max() == 1.0
    assert volume[0, 0, 0] == -1.0 and (volume == -1.0).mean() > 0.3  # background stays exactly -1
    foreground = volume[volume > -1]
    assert np.mean(foreground >= 1.0) < 0.02  # only the top ~0.5 % of brain voxels are clipped at +1
    assert info["shape"] == "70x80x70" and info["spacing"] == "2x2x2"


def _bad_inputs(folder):
    """One file for each kind of bad input, and the words its rejection must contain."""
    data, affine = brain_like()
    save(data, folder / "good_a.nii.gz", affine)
    save(data[::-1].copy()[..., None, None], folder / "good_b.nii", affine)  # a converter's trailing 1s
    expected = {}
    blob = (folder / "good_a.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    expected["truncated.nii.gz"] = "ends early or is damaged"
    (folder / "notes.nii.gz").write_bytes(gzip.compress(b"these are my notes, not an image"))
    expected["notes.nii.gz"] = "not a readable"
    (folder / "text.nii").write_text("hello")
    expected["text.nii"] = "not a readable"
    save(np.stack([data, data], -1), folder / "fmri.nii.gz", affine)
    expected["fmri.nii.gz"] = "4-D image with 2 volumes"
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine), folder / "rgb.nii.gz")
    expected["rgb.nii.gz"] = "colour (RGB) voxels"
    save(data[:, :, 35], folder / "slice.nii.gz", affine)
    expected["slice.nii.gz"] = "not a 3-D volume"
    nan = data.copy()
    nan[30, 30, 30] = np.nan
    save(nan, folder / "nan.nii.gz", affine)
    expected["nan.nii.gz"] = "1 voxels are NaN within the image (a NaN background, reaching the image's edge, is read"
    infinite = data.copy()
    infinite[0, 0, 0] = np.inf
    save(infinite, folder / "infinite.nii.gz", affine)
    expected["infinite.nii.gz"] = "1 voxels are infinite; fill them"
    save(np.zeros_like(data), folder / "zeros.nii.gz", affine)
    expected["zeros.nii.gz"] = "all-zero"
    save(np.full_like(data, 7.0), folder / "constant.nii.gz", affine)
    expected["constant.nii.gz"] = "constant volume"
    save(ellipsoid((20, 20, 20), (8, 8, 8)), folder / "tiny.nii.gz", np.eye(4))
    expected["tiny.nii.gz"] = "too small to be a brain"
    return expected


def test_every_bad_input_is_rejected_with_its_reason_and_good_files_are_kept(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    expected = _bad_inputs(src)
    result = prepare(str(src), tmp_path / "cache", size=32, layout="flat", workers=2, progress=False)
    assert result.written == 2
    reasons = {p.split("/")[-1]: r for p, r in result.rejected}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    err = capsys.readouterr().err
    assert all(f"rejected {src / name}" in err for name in expected)
    volumes, manifest, settings = load_cache(tmp_path / "cache")
    assert volumes.shape == (2, 32, 32, 32) and settings["size"] == 32
    assert [r["subject"] for r in manifest] == ["good_a", "good_b"]
    assert len(manifest[0]["sha256"]) == 64
    rejected = (tmp_path / "cache" / "rejected.tsv").read_text()
    assert "truncated.nii.gz" in rejected


def test_a_nan_background_is_read_as_zero(tmp_path):
    """FSL and SPM write masked images with NaN outside the brain: the same scan as with a zero background. NaN that
    does not reach the image's edge is a hole in the image, refused (`_bad_inputs`)."""
    data, affine = brain_like()
    save(data, tmp_path / "zero.nii.gz", affine)
    save(np.where(data > 0, data, np.nan).astype(np.float32), tmp_path / "nan.nii.gz", affine)
    zero, _ = prep.preprocess(tmp_path / "zero.nii.gz", Settings(size=32))
    nan, _ = prep.preprocess(tmp_path / "nan.nii.gz", Settings(size=32))
    np.testing.assert_array_equal(nan, zero)


def test_command_exit_status(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.nii").write_text("nope")
    run = subprocess.run(
        [sys.executable, "-m", "alphagan", "prepare", "--src", str(bad), "--out", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "none of the 1 inputs could be used" in run.stderr and "x.nii" in run.stderr
    assert not (tmp_path / "c").exists()


def test_an_interrupted_run_leaves_the_previous_cache_intact(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    data, affine = brain_like()
    save(data, src / "a.nii.gz", affine)
    prepare(str(src), tmp_path / "cache", size=32, progress=False)
    before = (tmp_path / "cache" / "volumes.npy").read_bytes()
    save(data * 0.5 + 1, src / "b.nii.gz", affine)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")  # the disk filled up while the new cache was written

    monkeypatch.setattr(prep.np.lib.format, "open_memmap", crash)
    with pytest.raises(OSError):
        prepare(str(src), tmp_path / "cache", size=32, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "cache" / "volumes.npy").read_bytes() == before
    assert len(load_cache(tmp_path / "cache")[1]) == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".cache.lock", "cache", "src"]  # no partial folder left behind, only the lock file


def test_rerun_skips_unchanged_inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        data, affine = brain_like(seed=i)
        save(data, src / f"s{i}.nii.gz", affine)
    first = prepare(str(src), tmp_path / "cache", size=32, progress=False)
    assert (first.written, first.reused) == (3, 0)
    volumes_before = np.array(load_cache(tmp_path / "cache")[0])
    again = prepare(str(src), tmp_path / "cache", size=32, progress=False)
    assert (again.written, again.reused) == (0, 3)
    np.testing.assert_array_equal(load_cache(tmp_path / "cache")[0], volumes_before)
    data, affine = brain_like(seed=9)
    save(data, src / "s1.nii.gz", affine)
    changed = prepare(str(src), tmp_path / "cache", size=32, progress=False)
    assert (changed.written, changed.reused) == (1, 2)
    other_size = prepare(str(src), tmp_path / "cache", size=16, progress=False, overwrite=True)
    assert other_size.written == 3


def test_layouts(tmp_path):
    data, affine = brain_like()
    brats = tmp_path / "brats"
    for subject in ("Brats18_A_1", "Brats18_B_2"):
        (brats / subject).mkdir(parents=True)
        for mod in ("flair", "t1", "t1ce", "t2", "seg"):
            save(data, brats / subject / f"{subject}_{mod}.nii.gz", affine)
    found = find_inputs(str(brats), "auto", "t2")
    assert [e.subject for e in found] == ["Brats18_A_1", "Brats18_B_2"]
    assert all(e.source.endswith("_t2.nii.gz") for e in found)

    ixi = tmp_path / "ixi"
    ixi.mkdir()
    for name in ("IXI012-HH-1211-T1", "IXI012-HH-1211-T2", "IXI013-HH-1212-T1"):
        save(data, ixi / f"{name}.nii.gz", affine)
    assert [e.subject for e in find_inputs(str(ixi), "auto", "t1")] == ["IXI012-HH-1211", "IXI013-HH-1212"]

    adni = tmp_path / "adni"
    (adni / "002_S_0295" / "mri").mkdir(parents=True)
    mgh = nib.MGHImage(data, affine)
    nib.save(mgh, adni / "002_S_0295" / "mri" / "brainmask.mgz")
    nib.save(mgh, adni / "002_S_0295" / "mri" / "T1.mgz")
    found = find_inputs(str(adni))
    assert [e.subject for e in found] == ["002_S_0295"]
    volume, _ = prep.preprocess(found[0].source, Settings(size=16))
    assert volume.shape == (16, 16, 16)

    atlas = tmp_path / "atlas" / "sub-r001s001" / "ses-1" / "anat"
    atlas.mkdir(parents=True)
    save(data, atlas / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", affine)
    save(data, atlas / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz", affine)
    assert [e.subject for e in find_inputs(str(tmp_path / "atlas"))] == ["sub-r001s001"]

    dec = tmp_path / "Task01_BrainTumour"
    (dec / "imagesTr").mkdir(parents=True)
    (dec / "dataset.json").write_text("{}")
    four = np.stack([data, data * 2, data * 3, data * 4], -1)
    save(four, dec / "imagesTr" / "BRATS_001.nii.gz", affine)
    found = find_inputs(str(dec), "auto", "t1gd")
    assert [(e.subject, e.channel) for e in found] == [("BRATS_001", 2)]
    loaded, _ = load_ras(found[0].source, found[0].channel)
    np.testing.assert_allclose(loaded, data * 3)


def test_augmentation_flips_left_right_and_keeps_background():
    volume = -np.ones((1, 8, 8, 8), np.float32)
    volume[0, 1, 4, 4] = 1.0  # a bright voxel on the subject's left (x index 1)
    batch = torch.from_numpy(np.repeat(volume[None], 64, axis=0))
    out = augment(batch, torch.Generator().manual_seed(0), flip=True, intensity=(0.7, 1.0))
    left, right = out[:, 0, 1, 4, 4], out[:, 0, 6, 4, 4]
    flipped = right > -1
    assert 10 < int(flipped.sum()) < 54  # about half are mirrored in x, never in y or z
    assert torch.all((left > -1) ^ flipped)
    bright = torch.where(flipped, right, left)
    assert torch.all((bright >= 0.4 - 1e-6) & (bright <= 1.0))  # (1 + 1) * U(0.7, 1) - 1
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, 0, 1, 4, 4] = mask[:, 0, 6, 4, 4] = False
    assert torch.all(out[mask] == -1.0)


def test_dataset_over_cache(tmp_path, cohort_dir):
    prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False)
    dataset = BrainVolumes.from_cache(tmp_path / "cache", flip=True, intensity=(0.7, 1.0))
    assert len(dataset) == 6
    x = dataset[0]
    assert x.shape == (1, 16, 16, 16) and x.min() >= -1 and x.max() <= 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    assert next(iter(loader)).shape == (3, 1, 16, 16, 16)
    shutil.rmtree(tmp_path / "cache")


def test_auto_layout_does_not_mistake_flat_t2_files_for_brats(tmp_path):
    data, affine = brain_like()
    for name in ("sub-tumor0000_t2", "sub-tumor0001_t2"):
        save(data, tmp_path / f"{name}.nii.gz", affine)
    assert prep.detect_layout(tmp_path) == "flat"
    assert len(find_inputs(str(tmp_path))) == 2


def test_slice_viewer_widget_and_its_static_fallback():
    import matplotlib.figure

    from alphagan.viz import plane_slice, slice_viewer

    volume = np.zeros((8, 10, 12), np.float32)
    volume[6, 2, 3] = 1.0  # right, posterior, inferior
    cut = plane_slice(volume, "axial", 3)
    assert cut.shape == (10, 8) and cut[10 - 1 - 2, 6] == 1.0  # anterior up, the subject's right on the right
    static = slice_viewer([volume, volume], interactive=False)
    assert isinstance(static, matplotlib.figure.Figure)
    box = slice_viewer([volume, volume], names=["a", "b"], interactive=True)
    controls, slider, images = box.children
    plane, colours = controls.children
    first = images.children[0].children[0].value
    slider.value = 3
    assert images.children[0].children[0].value != first and images.children[0].children[1].value == "a: axial 3"
    colours.value = "viridis"
    assert images.children[0].children[0].value != first
    plane.value = "sagittal"
    assert slider.max == 7 and images.children[1].children[1].value.startswith("b: sagittal")


def test_the_viewer_is_static_in_a_saved_run(monkeypatch):
    import matplotlib.figure

    from alphagan.progress import SAVED_RUN
    from alphagan.viz import has_widget_frontend, slice_viewer

    monkeypatch.setenv(SAVED_RUN, "1")
    assert not has_widget_frontend()
    assert isinstance(slice_viewer(np.zeros((8, 8, 8), np.float32)), matplotlib.figure.Figure)


def test_curves_are_described_from_their_numbers():
    from alphagan.viz import describe_curves

    w = [1.0, 5.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.0, 3.0, 2.0, 2.0, 2.0]
    records = [
        {"iter": 10 * (i + 1), "w_dist": v, "l1": 0.7 - 0.05 * i, "gp_d": 0.1 * i, "gp_c": 0.2} for i, v in enumerate(w)
    ]
    lines = describe_curves(records)
    assert lines[0].startswith("w_dist peaked at 9.0 (iteration 30) and ended below its peak, at 2.0 (here and below")
    assert lines[1] == "l1 fell from 0.700 to 0.150."
    assert lines[2] == "gp_d stayed between 0.000 and 1.100; it ended at 1.100."
    flat = describe_curves([{"iter": i, "w_dist": 5.0} for i in range(20)])
    assert flat[0].startswith("w_dist peaked at 5.0 (iteration 0) and ended near its peak, at 5.0")
