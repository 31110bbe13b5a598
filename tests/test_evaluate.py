"""`python -m alphagan evaluate`: a table in the paper's form, figures, and an honest statement of the real side."""

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from alphagan import metrics
from alphagan.cli import main
from alphagan.config import make_config
from alphagan.data.cache import read_manifest
from alphagan.data.dataset import synthetic_volumes
from alphagan.data.prepare import prepare
from alphagan.data.synth import make_cohort
from alphagan.evaluate import BLUR_SIGMA, HELD_OUT_SEED_OFFSET, conclusions, decoy_scores, decoys
from alphagan.features import ResNet3D
from alphagan.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for model in ("alpha-wgan-gp", "vae-gan"):
        train(make_config("smoke", model, iters=2, device="cpu"), "synth", root / model, progress=False)
    return root


def test_evaluate_writes_table_json_and_figures(runs, tmp_path):
    torch.manual_seed(0)
    torch.save(ResNet3D(10).state_dict(), tmp_path / "resnet_10.pth")
    args = [
        "evaluate",
        "--real",
        "synth",
        "--checkpoint",
        str(runs / "alpha-wgan-gp" / "checkpoints"),
        "--checkpoint",
        str(runs / "vae-gan" / "checkpoints"),
        "--out",
        str(tmp_path / "eval"),
        "--n",
        "16",
        "--pairs",
        "40",
        "--n-anatomy",
        "4",
        "--features",
        str(tmp_path / "resnet_10.pth"),
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"alpha-wgan-gp z16", "vae-gan"}
    assert "never seen in training" in results["real"]["data"] and "eval mode" in results["sampling"]
    row = results["models"]["vae-gan"]
    for key in (
        "mmd",
        "mmd_std",
        "mmd_per_voxel",
        "mmd_gaussian",
        "ms_ssim",
        "frechet",
        "anatomy",
        "anatomy_wasserstein_ml",
        "memorisation",
    ):
        assert key in row, key
    assert 0 < row["ms_ssim"] <= 1 and row["mmd"] > 0
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| vae-gan |" in table and "| real (held out) |" in table and "ours z1000 | 0.072 | 0.829" in table
    said = table.split("What these numbers say:")[1].split("The paper's Table 1")[0]  # the summary keeps them
    assert said.split() == [w for line in conclusions(results) for w in f"- {line}".split()]
    for figure in ("pca.png", "volumes.png", "nearest.png"):
        assert (tmp_path / "eval" / figure).stat().st_size > 5000
    assert not list((tmp_path / "eval").rglob("*.npy"))  # the generated sets, on disk while it ran, are gone


def test_a_training_cache_on_the_real_side_is_refused(tmp_path, cohort_dir, capsys):
    cache = prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False).out
    train(make_config("smoke", iters=2, device="cpu", batch=2), str(cache), tmp_path / "run", progress=False)
    args = ["--out", str(tmp_path / "eval"), "--n", "6", "--pairs", "10", "--n-anatomy", "2"]
    for run in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # a run folder or its checkpoints
        assert main(["evaluate", "--real", str(cache) + "/", "--checkpoint", str(run), *args]) == 1  # also with a '/'
        assert "the training set of a model, not held out; give a cache prepared from other" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_a_real_side_sharing_files_with_the_training_set_is_refused(tmp_path, cohort_dir, capsys):
    """Scans of the user's own (no synthetic origin): a held-out cache prepared partly from the training files."""
    files = sorted(cohort_dir.glob("*.nii.gz"))
    for folder, chosen in (("a", files[:4]), ("b", files[2:])):
        (tmp_path / folder).mkdir()
        for path in chosen:
            image = nib.load(path)
            image.header["descrip"] = b""  # no mark of the synthetic cohort
            nib.save(image, tmp_path / folder / path.name)
    train_cache = prepare(str(tmp_path / "a"), tmp_path / "train", size=16, progress=False).out
    held = prepare(str(tmp_path / "b"), tmp_path / "held", size=16, progress=False).out
    assert not any(row["origin"] for row in read_manifest(held))
    train(make_config("smoke", iters=2, device="cpu", batch=2), str(train_cache), tmp_path / "run", progress=False)
    args = ["evaluate", "--real", str(held), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e")]
    assert main([*args, "--n", "4"]) == 1
    err = capsys.readouterr().err
    assert f"2 of its subjects are in {train_cache}, which the alpha-wgan-gp run trained on" in err
    assert f"({tmp_path / 'b' / files[2].name} is the same file as {tmp_path / 'a' / files[2].name})" in err
    # The same images in other files (another header text, stored as integers): not the same bytes, still refused.
    (tmp_path / "c").mkdir()
    for path in files[3:]:
        image = nib.load(path)
        image.header["descrip"] = b"held out, we hope"
        nib.save(nib.Nifti1Image(image.get_fdata(), image.affine, image.header), tmp_path / "c" / path.name)
    held = prepare(str(tmp_path / "c"), tmp_path / "held-c", size=16, progress=False).out
    assert main(["evaluate", "--real", str(held), *args[3:], "--n", "4"]) == 1
    err = capsys.readouterr().err
    assert f"1 of its subjects is in {train_cache}" in err
    assert f"({tmp_path / 'c' / files[3].name} is the same image as {tmp_path / 'a' / files[3].name} (" in err


def test_table_numbers_are_plain_and_pairs_never_exceed_the_distinct_ones(runs, tmp_path):
    from alphagan.evaluate import _mean_sd

    assert _mean_sd(12630.4, 150.2) == "12630 ± 150" and _mean_sd(7.4567, 0.026) == "7.46 ± 0.026"
    args = ["evaluate", "--real", "synth", "--checkpoint", str(runs / "alpha-wgan-gp" / "checkpoints")]
    assert main([*args, "--out", str(tmp_path), "--n", "8", "--pairs", "1000", "--n-anatomy", "2"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["pairs"] == 28  # 8 * 7 / 2
    assert "e+" not in (tmp_path / "table.md").read_text()


def test_train_takes_the_size_of_its_cache(tmp_path, cohort_dir, capsys):
    cache = prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False).out
    args = ["train", "--data", str(cache), "--out", str(tmp_path / "run"), "--profile", "cpu", "--iters", "1"]
    assert main([*args, "--width", "4", "--latent", "8", "--batch", "2", "--device", "cpu"]) == 0
    assert "holds 16³ volumes; training at that size" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["size"] == 16


def test_conclusions_follow_the_numbers():
    from alphagan.classifier import AugmentationResult

    shaped = {"brain_overlap": 0.93, "brain_shaped": True}
    results = {
        "real": {"ms_ssim": 0.85, "brain_overlap_lowest": 0.89},
        "models": {
            "a": {"mmd": 10.0, "mmd_gaussian": 0.5, "ms_ssim": 0.95, "memorisation": {"nn_ratio": 0.8}, **shaped},
            "b": {"mmd": 20.0, "mmd_gaussian": 0.1, "ms_ssim": 0.60, **shaped},
            "c": {"mmd": 30.0, "mmd_gaussian": 0.9, "ms_ssim": 0.86, "memorisation": {"nn_ratio": 1.3}, **shaped},
        },
    }
    lines = conclusions(results)
    assert lines[0] == "Closest to the real data by the Gaussian-kernel MMD²: b; by the paper's MMD: a."
    assert lines[1].startswith("a: collapsed: its volumes are more alike than real pairs (MS-SSIM 0.950 > 0.850)")
    assert "is closer to its training volumes" in lines[1]
    assert "vary more than real pairs" in lines[2]
    assert "about as diverse" in lines[3] and "no closer" in lines[3]
    # A model whose volumes are not brain-shaped is named, not judged, and left out of the comparison.
    results["models"]["a"].update(brain_overlap=0.80, brain_shaped=False)
    lines = conclusions(results)
    assert lines[0].startswith("a: not judged") and "0.800, below the lowest real volume's 0.890" in lines[0]
    ranked = "Closest to the real data by the Gaussian-kernel MMD²: b; by the paper's MMD: b"
    assert lines[1] == ranked + " (among the brain-shaped models)."
    assert not any(line.startswith("a:") for line in lines[1:])
    for row in results["models"].values():
        row["brain_shaped"] = False
    assert len(conclusions(results)) == 3 and all("not judged" in line for line in conclusions(results))
    # The paper's Fig. 3c: a smaller code against the paper's 1000, from MS-SSIM.
    sweep = {"real": results["real"], "models": {
        f"alpha-wgan-gp z{z}": {"mmd": 1.0, "mmd_gaussian": 0.1, "ms_ssim": m, **shaped}
        for z, m in ((100, 0.90), (1000, 0.85), (2048, 0.84))
    }}  # fmt: skip
    latent = [line for line in conclusions(sweep) if line.startswith("latent")]
    assert latent == [
        "latent 100: less diverse than latent 1000 (MS-SSIM 0.900 against 0.850).",
        "latent 2048: at least as diverse as latent 1000 (MS-SSIM 0.840 against 0.850).",
    ]
    gain = AugmentationResult([0.70, 0.72, 0.71], [0.80, 0.81, 0.80]).conclusion()
    assert "above chance" in gain and "not clearly" not in gain and "a gain beyond twice its spread" in gain
    noise = AugmentationResult([0.50, 0.55, 0.45], [0.55, 0.45, 0.50]).conclusion()
    assert "not clearly above chance" in noise and "no effect shown" in noise


def test_notebook_04s_decoys_score_as_the_metrics_say():
    """The average repeated is one volume: its pairs have an MS-SSIM of 1 (SSIM of identical images). The other
    real subjects score what the metrics give them directly."""
    real = synthetic_volumes(8, 32, seed=HELD_OUT_SEED_OFFSET)[0]
    a, b = real[:4], real[4:]
    sets = decoys(b)
    assert list(sets) == ["other real subjects", "blurred copies", "the average, repeated"]
    assert np.allclose(sets["blurred copies"][0], ndimage.gaussian_filter(b[0], BLUR_SIGMA))
    collapsed = decoy_scores(a, sets["the average, repeated"], pairs=6, repetitions=3, seed=0)
    assert collapsed["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    scores = decoy_scores(a, b, pairs=6, repetitions=3, seed=0)
    assert scores["kernel_mmd2"] == pytest.approx(metrics.mmd_gaussian(a, b)[0])
    assert scores["paper_mmd"] == pytest.approx(metrics.mmd_batchwise(a, b, batch=4, repetitions=3, seed=0).mean)


def test_a_cache_of_the_synthetic_cohort_a_model_trained_on_is_refused(runs, tmp_path, cohort_dir, capsys):
    """Subject i of a synthetic cohort has the same anatomy at every size: a cache made from `synth --seed 0` holds
    the subjects of a run trained on `synth` (seed 0). `synth` marks its files, `prepare` records where each volume
    came from, and `evaluate` refuses a real side that is not held out."""
    same = make_cohort(tmp_path / "seed0", 4, size=16, seed=0, progress=False)
    caches = {seed: prepare(str(src), tmp_path / f"cache{seed}", size=16, progress=False).out
              for seed, src in ((0, same), (3, cohort_dir))}  # fmt: skip
    assert {row["origin"] for row in read_manifest(caches[0])} == {"alphagan synth normal seed 0"}
    run = str(runs / "alpha-wgan-gp" / "checkpoints")
    args = ["--checkpoint", run, "--n", "4", "--pairs", "6", "--n-anatomy", "2"]
    assert main(["evaluate", "--real", str(caches[0]), "--out", str(tmp_path / "e0"), *args]) == 1
    said = capsys.readouterr().err
    assert re.search(r"synthetic cohort .* \(normal seed 0\), not held out; give --real synth", said), said
    assert main(["evaluate", "--real", str(caches[3]), "--out", str(tmp_path / "e3"), *args]) == 0
    # A cache of 6 held-out volumes is not 8 of them: asked for more, evaluate says so instead of using fewer.
    assert main(["evaluate", "--real", str(caches[3]), "--out", str(tmp_path / "e8"), *args, "--n", "8"]) == 1
    assert "--n 8: --real" in capsys.readouterr().err and not (tmp_path / "e8").exists()


def test_a_synthetic_real_side_of_another_kind_contrast_or_seed_is_refused(runs, tmp_path, capsys):
    """The synthetic real side is the kind and contrast of data a model learned, its own contrast is the one the
    tissues are segmented in, and its held-out cohort is one no model trained on."""
    run = str(runs / "alpha-wgan-gp" / "checkpoints")  # trained on synth (normal, t1), seed 0
    args = ["--checkpoint", run, "--out", str(tmp_path / "e"), "--n", "4", "--pairs", "6", "--n-anatomy", "2"]
    for real, extra, said in (
        ("synth:tumor", [], "--real synth:tumor:t1: the alpha-wgan-gp run learned synth:normal:t1; compare it with"),
        ("synth:normal:t2", [], "learned synth:normal:t1; compare it with --real synth:normal:t1"),
        ("synth", ["--contrast", "t2"], "--contrast t2: the real side synth:normal:t1 is t1; give --contrast t1"),
    ):
        assert main(["evaluate", "--real", real, *args, *extra]) == 1
        assert said in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_missing_feature_network_is_refused_before_any_work(runs, tmp_path, capsys):
    argv = ["evaluate", "--real", "synth", "--checkpoint", str(runs / "vae-gan"), "--out", str(tmp_path / "e")]
    assert main([*argv, "--features", str(tmp_path / "resnet_10.pth")]) == 1
    assert capsys.readouterr().err.endswith(
        "no such file; give MedicalNet's resnet_10.pth (Tencent/MedicalNet), or leave out --features\n"
    )
    assert not (tmp_path / "e").exists()


def test_a_real_cache_of_another_size_is_refused_before_any_work(runs, tmp_path, cohort_dir, capsys):
    cache = prepare(str(cohort_dir), tmp_path / "c32", size=32, progress=False).out
    argv = ["evaluate", "--real", str(cache), "--checkpoint", str(runs / "vae-gan"), "--out", str(tmp_path / "e")]
    assert main(argv) == 1
    said = capsys.readouterr().err
    assert "holds 32³ volumes and the models generate 16³; prepare a held-out cache at that size" in said, said
    assert not (tmp_path / "e").exists()


def test_a_model_of_a_synthetic_cache_is_compared_with_its_own_kind_and_unseen_subjects(tmp_path, capsys):
    """A cache of `synth` subjects records their cohort: a model trained on it is refused a real side of another
    kind, or a second cache of the same subjects."""
    cohort = make_cohort(tmp_path / "tumour", 4, size=16, kind="tumor", seed=5, progress=False)
    some = tmp_path / "three of them"
    some.mkdir()
    for path in sorted(cohort.glob("*.nii.gz"))[1:]:
        shutil.copy(path, some)
    caches = [
        prepare(str(src), tmp_path / name, size=16, progress=False).out for src, name in ((cohort, "a"), (some, "b"))
    ]
    train(make_config("smoke", iters=2, device="cpu", batch=2, n_subjects=4), str(caches[0]), tmp_path / "run")
    args = ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e"), "--n", "4", "--pairs", "6"]
    for real, said in (
        ("synth", "holds synthetic normal subjects, and the alpha-wgan-gp run learned tumor ones"),
        (str(caches[1]), "holds subjects of the synthetic cohort the alpha-wgan-gp run trained on (tumor seed 5)"),
    ):
        assert main(["evaluate", "--real", real, *args]) == 1
        assert said in capsys.readouterr().err
    assert main(["evaluate", "--real", "synth:tumor", *args, "--n-anatomy", "2"]) == 0
    said = "MMD over batches of 4 volumes, as few as --n gave, not the paper's 8: not comparable with its Table 1."
    assert said in capsys.readouterr().err and said in (tmp_path / "e" / "table.md").read_text().splitlines()[0]


def test_a_real_side_of_another_contrast_is_refused_and_a_caches_own_contrast_is_the_default(tmp_path, capsys):
    """A cache records no contrast, but the file names of its scans say it (sub-normal0000_t2.nii.gz): a model of
    T1 scans is not compared with T2 ones, and T2 scans are segmented as T2 without --contrast."""
    caches = {
        (contrast, seed): prepare(
            str(make_cohort(tmp_path / f"{contrast}-{seed}", 4, size=16, contrast=contrast, seed=seed, progress=False)),
            tmp_path / f"cache-{contrast}-{seed}",
            size=16,
            progress=False,
        ).out
        for contrast, seed in (("t1", 1), ("t2", 2), ("t2", 3))
    }
    cfg = make_config("smoke", iters=2, device="cpu", batch=2)
    train(cfg, str(caches["t1", 1]), tmp_path / "t1 run", progress=False)
    train(cfg, str(caches["t2", 2]), tmp_path / "t2 run", progress=False)
    args = ["--out", str(tmp_path / "e"), "--n", "4", "--pairs", "6", "--n-anatomy", "2"]
    assert main(["evaluate", "--real", str(caches["t2", 3]), "--checkpoint", str(tmp_path / "t1 run"), *args]) == 1
    said = f"holds t2 scans, and the alpha-wgan-gp run learned t1 ones ({caches['t1', 1]})"
    assert said in capsys.readouterr().err
    t2_run = ["evaluate", "--real", str(caches["t2", 3]), "--checkpoint", str(tmp_path / "t2 run"), *args]
    assert main([*t2_run, "--contrast", "t1"]) == 1
    assert "--contrast t1: the real side" in (err := capsys.readouterr().err) and "is t2 by its file names; give" in err
    assert main(t2_run) == 0
    assert "segmented as t2 images (--contrast)" in (tmp_path / "e" / "table.md").read_text()
    # A held-out cache of two contrasts (made before prepare refused them) would be segmented as one.
    manifest = caches["t2", 3] / "manifest.tsv"
    manifest.write_text(manifest.read_text().replace("sub-normal0000_t2", "sub-normal0000_t1"))
    assert main([*t2_run, "--overwrite"]) == 1
    assert "holds scans of 2 contrasts by their names (3 t2, 1 t1); prepare a held-out cache of one contrast" in (
        capsys.readouterr().err
    )


def test_a_real_side_prepared_another_way_than_the_training_data_is_refused(tmp_path, capsys):
    """Stretched to the cube (--stretch) or padded: the same brains in other shapes, which every metric would count
    as the model's error."""
    held = prepare(
        str(make_cohort(tmp_path / "held", 4, size=16, seed=7, progress=False)),
        tmp_path / "held-stretched",
        size=16,
        stretch=True,
        progress=False,
    ).out
    train(make_config("smoke", iters=2, device="cpu", batch=2), "synth", tmp_path / "run", progress=False)
    args = ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e"), "--n", "4", "--pairs", "6"]
    assert main(["evaluate", "--real", str(held), *args]) == 1
    said = "prepared with stretch True, and the data the alpha-wgan-gp run learned (synth:normal:t1) with stretch False"
    assert said in capsys.readouterr().err


def test_a_generator_of_background_alone_is_evaluated_and_not_judged(runs, tmp_path, capsys):
    """A collapsed generator (every voxel -1): its volumes have no tissue to segment, which stopped `evaluate`."""
    state = torch.load(runs / "alpha-wgan-gp" / "checkpoints" / "ckpt_00000002.pt", weights_only=False)
    state["nets"]["G"]["net.6.weight"].fill_(-10.0)  # the last convolution, after a ReLU: tanh gives -1
    torch.save(state, tmp_path / "ckpt_00000002.pt")
    args = ["evaluate", "--real", "synth", "--checkpoint", str(tmp_path / "ckpt_00000002.pt"), "--n", "8"]
    assert main([*args, "--out", str(tmp_path / "e"), "--pairs", "10", "--n-anatomy", "2"]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    row = results["models"]["alpha-wgan-gp z16"]
    assert row["brain_overlap"] == 0 and row["anatomy"]["gm_ml"] == 0 and not row["brain_shaped"]
    assert "not judged: its volumes are not brain-shaped yet" in (tmp_path / "e" / "table.md").read_text()
