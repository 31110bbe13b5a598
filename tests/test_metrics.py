"""Every metric against an independent reference."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from alphagan import anatomy, features, metrics
from alphagan.data.prepare import normalise
from alphagan.data.space import cube_affine


def _volumes(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool3d(torch.rand(n, 1, size, size, size, generator=g), 3, 1, 1)
    return (smooth * 2 - 1).squeeze(1)


def test_paper_mmd_equals_the_mean_difference_form():
    r, g = _volumes(8, seed=0), _volumes(8, seed=1)
    direct = float(((g.reshape(8, -1).double().mean(0) - r.reshape(8, -1).double().mean(0)) ** 2).sum())
    assert metrics.mmd_linear(r, g) == pytest.approx(direct, rel=1e-9)
    # The batch-wise figure with one batch and one repetition is that same number.
    result = metrics.mmd_batchwise(r, g, batch=8, repetitions=1)
    assert result.mean == pytest.approx(direct, rel=1e-9)
    assert result.per_voxel_mean == pytest.approx(direct / 16**3, rel=1e-9)


def test_batchwise_mmd_repetitions_and_identity():
    r = _volumes(32, seed=0)
    same = metrics.mmd_batchwise(r, r.clone(), batch=8, repetitions=20)
    shifted = metrics.mmd_batchwise(r, r + 0.2, batch=8, repetitions=20)
    assert shifted.mean == pytest.approx(0.04 * 16**3, rel=0.35)  # a constant shift of 0.2 in every voxel
    assert same.mean < shifted.mean and same.std > 0  # shuffles pair different batches
    with pytest.raises(ValueError, match="at least 8"):
        metrics.mmd_batchwise(r[:4], r[:4])


def test_gaussian_mmd_against_a_double_loop():
    x, y = (
        _volumes(5, 8, seed=2).double().numpy().reshape(5, -1),
        _volumes(6, 8, seed=3).double().numpy().reshape(6, -1),
    )
    value, sigma = metrics.mmd_gaussian(x, y)
    pooled = np.concatenate([x, y])
    dists = [np.linalg.norm(a - b) for i, a in enumerate(pooled) for j, b in enumerate(pooled) if i != j]
    assert sigma == pytest.approx(np.median(dists), rel=1e-6)

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / (5 * 6)
    assert value == pytest.approx(xx + yy - 2 * xy, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("size", [32, 40])
def test_ssim_equals_scikit_image(size):
    x, y = _volumes(1, size, seed=4)[0].numpy(), _volumes(1, size, seed=5)[0].numpy()
    y = 0.6 * x + 0.4 * y
    ours = float(metrics.ssim3d(x[None], y[None], metrics.SSIMSettings(win_size=11, sigma=1.5, data_range=2.0))[0])
    reference = structural_similarity(
        x.astype(np.float64),
        y.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=2.0,
    )
    assert ours == pytest.approx(reference, abs=1e-5)


@pytest.mark.parametrize("size", [64, 128])
def test_ms_ssim_equals_pytorch_msssim(size):
    from pytorch_msssim import ms_ssim

    n = 2 if size == 64 else 1
    x = _volumes(n, size, seed=6)
    y = (0.7 * x + 0.3 * _volumes(n, size, seed=7)).clamp(-1, 1)
    s = metrics.ms_ssim_settings(size)
    assert (s.win_size, s.scales) == ({64: 3, 128: 7}[size], 5)
    ours = metrics.ms_ssim3d(x, y, s)
    reference = ms_ssim(
        x.unsqueeze(1).double(),
        y.unsqueeze(1).double(),
        data_range=2.0,
        size_average=False,
        win_size=s.win_size,
        win_sigma=s.sigma,  # and pytorch-msssim's own default weights, the published five
    ).float()
    torch.testing.assert_close(ours, reference.view(-1), atol=1e-5, rtol=1e-5)


def test_five_scales_use_the_published_weights_and_one_negative_term_gives_zero():
    s = metrics.ms_ssim_settings(64)
    assert s.weights == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) and sum(s.weights) == pytest.approx(1.0001)
    # Two independent noise volumes: at the coarsest scale (2^3 window positions) their term can be negative,
    # and clipping it makes the whole product 0, although the four finer scales alone score well above 0.
    noise = torch.randn(2, 64, 64, 64, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    assert float(metrics.ms_ssim3d(noise[:1], noise[1:])[0]) == 0.0
    x, y, terms = noise[:1, None].double(), noise[1:, None].double(), []
    for _ in range(5):
        ssim, cs = metrics._ssim_and_cs(x, y, s)
        terms.append(float(cs))
        x, y = torch.nn.functional.avg_pool3d(x, 2), torch.nn.functional.avg_pool3d(y, 2)
    terms[-1] = float(ssim)
    assert min(terms) < 0 and sum(t > 0 for t in terms) >= 3, terms


def test_median_bandwidth_is_the_usual_median_of_pairwise_distances():
    from scipy.spatial.distance import pdist

    x, y = _volumes(3, 8, seed=22), _volumes(4, 8, seed=23)  # 7 points: 21 distances, an odd count
    x2, y2 = _volumes(2, 8, seed=24), _volumes(2, 8, seed=25)  # 4 points: 6 distances, an even count
    for a, b in ((x, y), (x2, y2)):
        pooled = np.concatenate([a.reshape(len(a), -1).numpy(), b.reshape(len(b), -1).numpy()]).astype(np.float64)
        assert metrics.median_bandwidth(a, b) == pytest.approx(np.median(pdist(pooled)), rel=1e-9)


def test_ms_ssim_properties():
    x = _volumes(3, 32, seed=8)
    torch.testing.assert_close(metrics.ms_ssim3d(x, x.clone()), torch.ones(3))  # identical volumes give 1
    s = metrics.ms_ssim_settings(32)
    assert s.scales == 4 and s.win_size == 3 and sum(s.weights) == pytest.approx(1.0)
    # The authors' product applied the coarsest weight four times: for the same terms it gives another number.
    y = (0.5 * x + 0.5 * _volumes(3, 32, seed=9)).clamp(-1, 1)
    assert float(metrics.ms_ssim3d(x, y).mean()) < 0.999
    with pytest.raises(ValueError, match="too small"):
        metrics.ms_ssim3d(x, y, metrics.SSIMSettings())


def test_diversity_of_a_collapsed_model_is_one():
    one = _volumes(1, 32, seed=10)
    collapsed = one.repeat(6, 1, 1, 1)
    mean, std = metrics.diversity(collapsed, pairs=20)
    assert mean == pytest.approx(1.0, abs=1e-5) and std < 1e-5
    varied, _ = metrics.diversity(_volumes(6, 32, seed=11), pairs=20)
    assert varied < 0.9


def test_pca_is_scikit_learns_pca_fitted_on_the_real_set():
    from sklearn.decomposition import PCA

    real, fake = _volumes(10, 8, seed=12), _volumes(7, 8, seed=13)
    real_2d, projected, variance = metrics.pca_projection(real, {"model": fake})
    reference = PCA(2, random_state=0).fit(real.reshape(10, -1).double().numpy())
    sign = np.sign(real_2d[0] / reference.transform(real.reshape(10, -1).double().numpy())[0])  # an axis's sign
    np.testing.assert_allclose(real_2d, sign * reference.transform(real.reshape(10, -1).double().numpy()), rtol=1e-8)
    np.testing.assert_allclose(
        projected["model"], sign * reference.transform(fake.reshape(7, -1).double().numpy()), rtol=1e-8, atol=1e-12
    )
    np.testing.assert_allclose(variance, reference.explained_variance_ratio_, rtol=1e-10)


def test_metrics_read_memory_mapped_sets_a_block_at_a_time(tmp_path, monkeypatch):
    """The metrics give the same numbers on read-only memory maps read in blocks of three volumes (or of a few
    voxels of every volume) as on whole sets in memory, and never widen more than a block at once."""
    real, fake = _volumes(11, 8, seed=30).numpy(), _volumes(9, 8, seed=31).numpy()
    np.save(tmp_path / "real.npy", real)
    np.save(tmp_path / "fake.npy", fake)
    mapped = np.load(tmp_path / "real.npy", mmap_mode="r"), np.load(tmp_path / "fake.npy", mmap_mode="r")

    def all_metrics(r, f):
        return {
            "paper MMD": metrics.mmd_batchwise(r, f, batch=3, repetitions=4).mean,
            "Gaussian MMD": metrics.mmd_gaussian(r, f),
            "distances": np.sort(metrics.pair_distances(r)),  # each pair once, in the order of its blocks
            "PCA": metrics.pca_projection(r, {"model": f}),
            "nearest": metrics.nearest_neighbours(f, r),
            "spread": metrics.spread(f),
            "diversity": metrics.diversity(f, pairs=10),
            "overlap": anatomy.brain_overlap(f, r),
        }

    whole = all_metrics(real, fake)
    block = 3 * 8 * 8**3  # three volumes of 8³ in float64
    monkeypatch.setattr(metrics, "BLOCK_BYTES", block)
    monkeypatch.setattr(anatomy, "CHUNK_VOXELS", 2 * 8**3)
    widened, double = [], metrics._double
    monkeypatch.setattr(metrics, "_double", lambda part: widened.append(double(part)) or widened[-1])
    blocked = all_metrics(*mapped)
    assert widened and max(t.numel() * 8 for t in widened) <= block
    for name in whole:
        np.testing.assert_allclose(
            np.concatenate([np.ravel(x) for x in _leaves(blocked[name])]),
            np.concatenate([np.ravel(x) for x in _leaves(whole[name])]),
            rtol=1e-6,
            err_msg=name,
        )


def _leaves(value) -> list:
    """The numbers in a metric's result, in order (tuples and dicts of arrays)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [np.asarray(value, dtype=np.float64)]


def test_a_volume_without_brain_has_no_tissue_rather_than_stopping_an_evaluation():
    """An early or collapsed generator's volume of background: `evaluate` measured it and stopped, in a library's
    words ("fewer than 30 brain voxels")."""
    affine = cube_affine(16, 160.0)  # 10 mm voxels: 1 mL each
    background = np.full((16, 16, 16), -1.0, dtype=np.float32)
    background[0, 0, :5] = 0.5  # five voxels above the threshold
    assert anatomy.tissue_volumes(background, affine) == pytest.approx(
        {"brain_ml": 5.0, "gm_ml": 0.0, "wm_ml": 0.0, "csf_ml": 0.0}
    )


def test_segmentation_recovers_the_synthetic_cohorts_volumes():
    """On the synthetic cohort the ground truth is known: the mixture model's volumes must be close to it."""
    from alphagan.data.synth import make_subject

    errors = {k: [] for k in ("brain_ml", "gm_ml", "wm_ml", "csf_ml")}
    for i in range(4):
        s = make_subject(i, seed=1, size=64)
        measured = anatomy.tissue_volumes(normalise(s.volume), s.affine)
        for k in errors:
            errors[k].append(abs(measured[k] - s.factors[k]) / s.factors[k])
    # Measured here: brain 0 %, GM 2 %, WM 7 %, CSF 24 % (partial volumes at the CSF borders).
    assert np.mean(errors["brain_ml"]) < 0.01
    assert np.mean(errors["gm_ml"]) < 0.05 and np.mean(errors["wm_ml"]) < 0.12 and np.mean(errors["csf_ml"]) < 0.4


def test_wasserstein_of_shifted_samples():
    assert metrics.wasserstein_1d([1, 2, 3], [11, 12, 13]) == pytest.approx(10.0)


def test_memorisation_finds_copies():
    training = _volumes(12, 8, seed=14)
    heldout = _volumes(6, 8, seed=15)
    copies = training[[3, 7, 7, 1]] + 0.001
    result = metrics.memorisation(copies, training, heldout)
    assert list(result.generated_index) == [3, 7, 7, 1]
    assert result.ratio < 0.05 and result.closer_than_heldout == 1.0
    fresh = metrics.memorisation(_volumes(6, 8, seed=16), training, heldout)
    assert 0.5 < fresh.ratio < 2.0


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = np.diag([1.0, 2.0, 3.0, 4.0]), np.diag([4.0, 1.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(a)) - np.sqrt(np.diag(b))) ** 2)
    assert features.frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-9)
    assert features.frechet_distance(mu1, a, mu1, a) == pytest.approx(0.0, abs=1e-9)


def test_feature_network_loads_by_path_and_gives_a_distance(tmp_path):
    torch.manual_seed(0)
    net = features.ResNet3D(10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "resnet_10.pth")
    loaded = features.load_feature_network(str(tmp_path / "resnet_10.pth"))
    real, fake = _volumes(6, 32, seed=17), _volumes(6, 32, seed=18)
    feats = features.features(loaded, real)
    assert feats.shape == (6, 512)
    same = features.frechet_feature_distance(loaded, real, real)
    scale = np.trace(np.cov(feats, rowvar=False))
    assert abs(same) < 1e-3 * scale
    assert features.frechet_feature_distance(loaded, real, fake * 0.2) > same
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a 3D ResNet-10"):
        features.load_feature_network(str(tmp_path / "other.pth"))


def test_tissue_volumes_on_the_evaluation_path_agree_with_the_truth_as_documented():
    """What `evaluate` segments: 64^3 cache volumes in the cube's space, not the synthesis grid."""
    from alphagan.data.cache import _synth_one
    from alphagan.data.synth import make_subject

    keys = ("brain_ml", "gm_ml", "wm_ml", "csf_ml")
    measured, truth = {k: [] for k in keys}, {k: [] for k in keys}
    for i in range(8):
        _, volume, fov_mm = _synth_one((i, 0, 64, "normal", "t1"))
        got = anatomy.tissue_volumes(volume, cube_affine(64, fov_mm))
        factors = make_subject(i, seed=0, size=128).factors  # the subject the cache synthesised at 128^3
        for k in keys:
            measured[k].append(got[k])
            truth[k].append(factors[k])
    # Measured on 16 subjects (anatomy.tissue_volumes): brain +4 %, GM +12 %, WM -6 %, CSF +3 %; r 1.00 to 0.76.
    bias = {"brain_ml": (0.0, 0.08), "gm_ml": (0.04, 0.20), "wm_ml": (-0.15, 0.02), "csf_ml": (-0.10, 0.15)}
    for k, (lo, hi) in bias.items():
        m, t = np.array(measured[k]), np.array(truth[k])
        assert lo < np.mean((m - t) / t) < hi, k
        assert np.corrcoef(m, t)[0, 1] > (0.95 if k == "brain_ml" else 0.5), k


@pytest.mark.parametrize(
    "kind, contrast, min_r, max_distance",
    [("tumor", "flair", 0.8, 10), ("tumor", "t2", 0.75, 12), ("stroke", "t1", 0.45, 20)],
)
def test_lesion_measurement_against_the_cohorts_ground_truth(kind, contrast, min_r, max_distance):
    from alphagan.data.synth import make_subject

    true, measured, distance = [], [], []
    for i in range(12):
        s = make_subject(i, seed=0, size=64, kind=kind, contrast=contrast)
        stats = anatomy.lesion_stats(normalise(s.volume), s.affine, kind, contrast)
        f = s.factors
        true.append(f["lesion_ml"] + f["oedema_ml"])
        measured.append(stats["lesion_ml"])
        distance.append(np.linalg.norm([stats[f"lesion_{a}_mm"] - f[f"lesion_{a}_mm"] for a in "xyz"]))
    assert np.corrcoef(true, measured)[0, 1] > min_r
    assert np.nanmedian(distance) < max_distance


def test_brain_shape_tells_brains_from_blobs():
    from alphagan.data.dataset import synthetic_volumes

    real = synthetic_volumes(24, 32, seed=5)[0]
    other = synthetic_volumes(8, 32, seed=6)[0]
    # Dice computed another way, for one volume: |A and B| * 2 / (|A| + |B|) over explicit voxel lists.
    typical = {tuple(i) for i in np.argwhere((real > -0.9).mean(0) >= 0.5)}
    brain = {tuple(i) for i in np.argwhere(other[0] > -0.9)}
    expected = 2 * len(typical & brain) / (len(typical) + len(brain))
    assert anatomy.brain_overlap(other[:1], real)[0] == pytest.approx(expected)
    assert anatomy.brain_shape(other, real).shaped  # new real subjects are brain-shaped
    # A head-sized blob: a ball a quarter larger than the typical brain, at the same centre.
    grid = np.indices((32,) * 3).astype(float)
    centre = np.argwhere((real > -0.9).mean(0) >= 0.5).mean(0)
    radius = 1.25 * (((real > -0.9).mean(0) >= 0.5).sum() * 3 / (4 * np.pi)) ** (1 / 3)
    ball = np.where(((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2, 0.5, -1.0)
    blob = anatomy.brain_shape(np.repeat(ball[None], 4, axis=0), real)
    assert not blob.shaped and "not brain-shaped yet" in str(blob)


def test_lesion_comparison_of_a_cohort_against_itself_and_its_gate():
    from alphagan.data.synth import make_subject

    subjects = [make_subject(i, seed=0, size=32, kind="tumor", contrast="flair") for i in range(4)]
    volumes = np.stack([normalise(s.volume) for s in subjects])
    affine = subjects[0].affine
    found = anatomy.compare_lesions(volumes, volumes, affine, "tumor", "flair")
    row = found.summary()
    sizes = [anatomy.lesion_stats(v, affine, "tumor", "flair")["lesion_ml"] for v in volumes]
    assert row["real mean lesion (mL)"] == row["generated mean lesion (mL)"] == pytest.approx(np.mean(sizes))
    assert row["Wasserstein (mL)"] == 0.0 and row["generated brain-shaped"]
    assert found.centres("real").shape == (sum(s > 0 for s in sizes), 2)
    assert found.conclusion("tumor:flair").startswith("tumor:flair: a lesion found in")
    blobs = anatomy.BrainShape(generated_median=0.5, real_lowest=0.9, real_median=0.95)
    early = anatomy.compare_lesions(volumes, volumes, affine, "tumor", "flair", shape=blobs)
    assert early.conclusion("tumor:flair") == anatomy.not_judged("tumor:flair", 0.5, 0.9)
    assert "not judged" in early.conclusion("tumor:flair")
