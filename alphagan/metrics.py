"""The evidence about a generative model: the paper's metrics with correct definitions, and what it lacked.

- MMD as the paper computed it (batch-wise, linear kernel), and an unbiased Gaussian-kernel MMD^2.
- 3D SSIM and MS-SSIM (Gaussian windows, the correct product over scales, a stated data range), and the
  diversity score of the paper's Table 1: mean MS-SSIM over random pairs of volumes.
- PCA of real and generated volumes on one projection fitted on the real set (the paper's Fig. 3).
- Anatomy: brain, GM, WM, CSF and ventricle volumes from a three-class mixture model inside the brain.
- Memorisation: each generated volume's nearest training volume, against held-out real volumes' nearest.
- A Fréchet distance on features of a user-provided 3D network (MedicalNet-style ResNet weights, by path).

Volumes are arrays or tensors of shape (N, S, S, S) or (N, 1, S, S, S) in [-1, 1] unless said otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in the paper's code


def _flat(volumes) -> Tensor:
    t = volumes if isinstance(volumes, Tensor) else torch.tensor(np.asarray(volumes))  # a copy: caches are read-only
    return t.reshape(t.shape[0], -1).double()


def _as5d(volumes) -> Tensor:
    t = volumes if isinstance(volumes, Tensor) else torch.tensor(np.asarray(volumes))
    t = t.float()
    return t.unsqueeze(1) if t.dim() == 4 else t


# ------------------------------------------------------------------------------------------------ MMD
def mmd_linear(real, fake) -> float:
    """One batch of the paper's MMD: (sum g g^T + sum r r^T - 2 sum g r^T) / B^2 on flattened volumes."""
    r, g = _flat(real), _flat(fake)
    b = r.shape[0]
    if g.shape[0] != b:
        raise ValueError(f"the paper's MMD pairs batches of equal size, got {b} real and {g.shape[0]} generated")
    return float(((g @ g.T).sum() + (r @ r.T).sum() - 2 * (g @ r.T).sum()) / b**2)


@dataclass
class MMDResult:
    mean: float
    std: float
    per_voxel_mean: float
    per_voxel_std: float
    batch: int
    repetitions: int


def mmd_batchwise(real, fake, batch: int = 8, repetitions: int = 100, seed: int = 0) -> MMDResult:
    """The paper's figure: shuffle, split into batches of B real and B generated volumes, average the batch MMD,
    then the mean and spread over `repetitions` shuffles. Also per voxel (divided by the voxels per volume)."""
    r, g = _flat(real), _flat(fake)
    n = min(len(r), len(g)) // batch * batch
    if n == 0:
        raise ValueError(f"need at least {batch} real and {batch} generated volumes, got {len(r)} and {len(g)}")
    rng = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(repetitions):
        ri = torch.randperm(len(r), generator=rng)[:n].view(-1, batch)
        gi = torch.randperm(len(g), generator=rng)[:n].view(-1, batch)
        # ||mean(g) - mean(r)||^2 per batch equals the paper's Gram-matrix formula (see the tests).
        diff = g[gi].mean(1) - r[ri].mean(1)
        values.append(float(diff.pow(2).sum(1).mean()))
    v = np.array(values)
    voxels = r.shape[1]
    return MMDResult(
        float(v.mean()), float(v.std()), float(v.mean() / voxels), float(v.std() / voxels), batch, repetitions
    )


def median_bandwidth(x: Tensor, y: Tensor) -> float:
    """The median heuristic: the median distance between distinct points of the pooled sample."""
    pooled = torch.cat([x, y])
    d = torch.cdist(pooled, pooled)
    return float(d[~torch.eye(len(pooled), dtype=torch.bool)].median())


def mmd_gaussian(real, fake, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 with the kernel exp(-|a - b|^2 / (2 sigma^2)), sigma by the median heuristic.

    Returns (MMD^2, sigma). Unbiased: the diagonal terms k(x_i, x_i) are left out of the within-sample means.
    """
    x, y = _flat(real), _flat(fake)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD needs at least two volumes on each side")
    sigma = bandwidth or median_bandwidth(x, y)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    value = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(value - 2 * kxy.mean()), sigma


# ------------------------------------------------------------------------------------------------ SSIM
@dataclass(frozen=True)
class SSIMSettings:
    """Window, scales and constants of (MS-)SSIM. `data_range` is 2 for volumes in [-1, 1]."""

    win_size: int = 11
    sigma: float = 1.5
    scales: int = 5
    data_range: float = 2.0
    k1: float = 0.01
    k2: float = 0.03

    @property
    def weights(self) -> tuple[float, ...]:
        w = MS_SSIM_WEIGHTS[: self.scales]
        return tuple(x / sum(w) for x in w)


def ms_ssim_settings(size: int, data_range: float = 2.0) -> SSIMSettings:
    """The settings we use for size^3 volumes: five scales and the standard sigma 1.5, with the largest odd
    window (at most 11) that still fits the coarsest scale without padding. 64^3: window 3; 128^3: window 7.
    Below 64^3 five scales leave no room, so 32^3 uses four scales (window 3) with the weights renormalised."""
    scales = 5
    while scales > 1 and size // 2 ** (scales - 1) < 3:
        scales -= 1
    coarsest = size // 2 ** (scales - 1)
    win = min(11, coarsest if coarsest % 2 else coarsest - 1)
    return SSIMSettings(win_size=win, sigma=1.5, scales=scales, data_range=data_range)


def _gaussian_window(win_size: int, sigma: float) -> Tensor:
    t = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filtering of (N, 1, X, Y, Z): no padding, the borders are dropped."""
    w = window.to(x)
    n = len(w)
    out = F.conv3d(x, w.view(1, 1, n, 1, 1))
    out = F.conv3d(out, w.view(1, 1, 1, n, 1))
    return F.conv3d(out, w.view(1, 1, 1, 1, n))


def _ssim_and_cs(x: Tensor, y: Tensor, s: SSIMSettings) -> tuple[Tensor, Tensor]:
    """Mean SSIM and mean contrast-structure term per volume (population covariances, like scikit-image's
    `use_sample_covariance=False`)."""
    window = _gaussian_window(s.win_size, s.sigma)
    c1, c2 = (s.k1 * s.data_range) ** 2, (s.k2 * s.data_range) ** 2
    mx, my = _filter(x, window), _filter(y, window)
    vx = _filter(x * x, window) - mx**2
    vy = _filter(y * y, window) - my**2
    cxy = _filter(x * y, window) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    ssim = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim3d(x, y, settings: SSIMSettings | None = None) -> Tensor:
    """Single-scale 3D SSIM per pair of volumes, Gaussian window, 'valid' filtering."""
    x, y = _as5d(x).double(), _as5d(y).double()
    settings = settings or SSIMSettings()
    return _ssim_and_cs(x, y, settings)[0].float()


def ms_ssim3d(x, y, settings: SSIMSettings | None = None) -> Tensor:
    """3D MS-SSIM per pair: prod_{j<M} cs_j^{w_j} * ssim_M^{w_M}, each weight applied once (the authors' code
    applied the coarsest weight four times). Negative terms are clipped at 0 before the power, as in
    pytorch-msssim; volumes are halved between scales by 2^3 average pooling."""
    x, y = _as5d(x).double(), _as5d(y).double()
    s = settings or ms_ssim_settings(x.shape[-1])
    need = (s.win_size - 1) * 2 ** (s.scales - 1) + 1
    if min(x.shape[2:]) < need:
        raise ValueError(
            f"volumes of {tuple(x.shape[2:])} are too small for {s.scales} scales with window "
            f"{s.win_size}: use ms_ssim_settings(size) or fewer scales"
        )
    weights = torch.tensor(s.weights, dtype=torch.float64)
    terms = []
    for scale in range(s.scales):
        ssim, cs = _ssim_and_cs(x, y, s)
        if scale < s.scales - 1:
            terms.append(cs.clamp(min=0))
            pad = [d % 2 for d in x.shape[2:]]
            x, y = F.avg_pool3d(x, 2, padding=pad), F.avg_pool3d(y, 2, padding=pad)
        else:
            terms.append(ssim.clamp(min=0))
    return torch.prod(torch.stack(terms, 1) ** weights, dim=1).float()


def diversity(
    volumes, pairs: int = 1000, seed: int = 0, settings: SSIMSettings | None = None, batch: int = 16
) -> tuple[float, float]:
    """Mean and standard deviation of MS-SSIM over `pairs` random pairs of distinct volumes (lower: more diverse)."""
    v = _as5d(volumes)
    n = len(v)
    if n < 2:
        raise ValueError("diversity needs at least two volumes")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never i itself
    scores = torch.cat([ms_ssim3d(v[i[k : k + batch]], v[j[k : k + batch]], settings) for k in range(0, pairs, batch)])
    return float(scores.mean()), float(scores.std())


# ------------------------------------------------------------------------------------------------ PCA
def pca_projection(real, generated: dict[str, np.ndarray], components: int = 2, seed: int = 0):
    """Fit PCA on the real volumes and project every set on it: (real_2d, {name: 2d}, explained variance)."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, random_state=seed).fit(_flat(real).numpy())
    projected = {name: pca.transform(_flat(v).numpy()) for name, v in generated.items()}
    return pca.transform(_flat(real).numpy()), projected, pca.explained_variance_ratio_


# ------------------------------------------------------------------------------------------------ anatomy
TISSUES = ("csf", "gm", "wm")
VENTRICLE_BOX_MM = ((-30, 30), (-45, 25), (-5, 35))  # x, y, z in the course's MNI-centred space


def segment(volume: np.ndarray, contrast: str = "t1", threshold: float = -0.9, seed: int = 0) -> dict[str, np.ndarray]:
    """Soft CSF / GM / WM maps inside the brain from a three-class Gaussian mixture on intensities.

    The brain is every voxel above `threshold` (background is -1 in prepared and generated volumes). Classes
    are named by their mean intensity in the contrast's order (T1w: CSF < GM < WM; T2w: WM < GM < CSF).
    """
    from sklearn.mixture import GaussianMixture

    volume = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    brain = volume > threshold
    values = volume[brain].reshape(-1, 1)
    if len(values) < 30:
        raise ValueError("fewer than 30 brain voxels: nothing to segment")
    # CSF is the smallest class inside a brain mask: start the darkest component low (T1w; for T2w the order of
    # the components is reversed below, the starting points serve both).
    init = np.percentile(values, [5, 40, 85]).reshape(-1, 1)
    gmm = GaussianMixture(3, means_init=init, random_state=seed).fit(values)
    posterior = gmm.predict_proba(values)
    order = np.argsort(gmm.means_.ravel())  # dark to bright
    names = {"t1": TISSUES, "flair": TISSUES, "t2": ("wm", "gm", "csf")}[contrast]
    maps = {}
    for name, component in zip(names, order):
        m = np.zeros(volume.shape)
        m[brain] = posterior[:, component]
        maps[name] = m
    maps["brain"] = brain.astype(np.float64)
    return maps


def tissue_volumes(volume: np.ndarray, affine: np.ndarray, contrast: str = "t1") -> dict[str, float]:
    """Brain, GM, WM, CSF and ventricle volumes in mL. Ventricles: CSF inside a box around the brain's centre."""
    maps = segment(volume, contrast)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    out = {f"{k}_ml": float(maps[k].sum() * voxel_ml) for k in ("brain", "gm", "wm", "csf")}
    ijk = np.indices(maps["csf"].shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *maps["csf"].shape)
    box = np.ones(maps["csf"].shape, dtype=bool)
    for axis, (lo, hi) in enumerate(VENTRICLE_BOX_MM):
        box &= (xyz[axis] > lo) & (xyz[axis] < hi)
    out["ventricle_ml"] = float((maps["csf"] * box * (maps["csf"] > 0.5)).sum() * voxel_ml)
    return out


def wasserstein_1d(a: Sequence[float], b: Sequence[float]) -> float:
    """Earth mover's distance between two samples of one quantity (scipy's, in the quantity's units)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(np.asarray(a, float), np.asarray(b, float)))


# ------------------------------------------------------------------------------------------------ memorisation
@dataclass
class Memorisation:
    generated_nn: np.ndarray  # distance of each generated volume to its nearest training volume
    generated_index: np.ndarray  # which training volume that is
    heldout_nn: np.ndarray  # the same for held-out real volumes
    ratio: float | None  # median generated / median held-out NN distance (< 1: closer than new real data); None
    # when the held-out volumes are themselves in the training set (distance 0)
    closer_than_heldout: float  # share of generated volumes nearer to a training volume than 95 % of held-out ones


def nearest_neighbours(queries, reference, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the root-mean-square voxel distance to its nearest reference volume, and that volume's index."""
    q, r = _flat(queries).float(), _flat(reference).float()
    dists, idx = [], []
    for i in range(0, len(q), batch):
        d = torch.cdist(q[i : i + batch], r) / math.sqrt(r.shape[1])
        best = d.min(1)
        dists.append(best.values)
        idx.append(best.indices)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def memorisation(generated, training, heldout) -> Memorisation:
    g, gi = nearest_neighbours(generated, training)
    h, _ = nearest_neighbours(heldout, training)
    ratio = float(np.median(g) / np.median(h)) if np.median(h) > 0 else None
    return Memorisation(g, gi, h, ratio, float(np.mean(g < np.percentile(h, 5))))


# ------------------------------------------------------------------------------------------------ Fréchet
def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the Fréchet distance between two Gaussians."""
    from scipy import linalg

    with warnings.catch_warnings():  # a singular product is detected and handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all() or np.abs(covmean.imag).max() > 1e-3 * np.abs(covmean.real).max():
        # Fewer samples than features make the covariances singular: regularise, as FID implementations do.
        eps = np.eye(len(cov1)) * 1e-6 * max(np.trace(cov1), np.trace(cov2)) / len(cov1)
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet3D(nn.Module):
    """The 3D ResNet-10/18 of MedicalNet (Chen et al., 2019) up to its pooled 512-d features.

    Layer names follow MedicalNet's checkpoints (conv1, bn1, layer1..layer4), so their `resnet_10.pth` or
    `resnet_18.pth` load by path; their segmentation head is ignored.
    """

    def __init__(self, depth: int = 10):
        super().__init__()
        blocks = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}[depth]
        self.conv1 = nn.Conv3d(1, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, 2, 1)
        specs = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))  # channels, stride, dilation
        c_in = 64
        for i, ((c_out, stride, dilation), n) in enumerate(zip(specs, blocks), 1):
            layers = [_BasicBlock(c_in, c_out, stride, dilation)] + [
                _BasicBlock(c_out, c_out, 1, dilation) for _ in range(n - 1)
            ]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            c_in = c_out

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def load_feature_network(path: str, depth: int = 10) -> ResNet3D:
    """A ResNet3D with weights from `path` (a MedicalNet checkpoint or a plain state dict), read with
    weights_only=True. Keys of MedicalNet's DataParallel checkpoints ('module.' prefix) are accepted."""
    net = ResNet3D(depth)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, _ = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a 3D ResNet-{depth} checkpoint ({str(exc).splitlines()[-1].strip()})") from None
    if missing:
        raise ValueError(f"{path}: not a 3D ResNet-{depth} checkpoint; missing {missing[:5]}")
    return net.eval()


@torch.no_grad()
def features(net: nn.Module, volumes, batch: int = 8) -> np.ndarray:
    """Pooled features of each volume (MedicalNet expects z-scored intensities: we standardise per volume)."""
    v = _as5d(volumes)
    v = (v - v.mean(dim=(2, 3, 4), keepdim=True)) / v.std(dim=(2, 3, 4), keepdim=True).clamp(min=1e-6)
    device = next(net.parameters()).device
    return torch.cat([net(v[i : i + batch].to(device)).cpu() for i in range(0, len(v), batch)]).double().numpy()


def frechet_feature_distance(net: nn.Module, real, fake) -> float:
    """Fréchet distance between Gaussians fitted to the network's features of real and generated volumes."""
    a, b = features(net, real), features(net, fake)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# ------------------------------------------------------------------------------------------------ lesions
def lesion_mask(volume: np.ndarray, kind: str, contrast: str, threshold: float = -0.9) -> np.ndarray:
    """The largest connected lesion-like region of a volume in [-1, 1] (RAS: left-right is the first axis).

    Lesions here are one-sided and the healthy brain nearly symmetric, so a lesion voxel differs from its
    left-right mirror: brighter by more than 0.3 for tumours in FLAIR and T2w; darker by more than 0.4 and darker
    than the brain's median for strokes and tumours in T1w (dark lesions compete with the sulci's CSF, whose
    natural asymmetries need the stricter rule: on 12 synthetic strokes it raised the correlation of measured
    with true stroke volumes from 0.13 to 0.63; tumours: 0.89 in FLAIR, 0.86 in T2w).
    """
    from scipy import ndimage

    if kind not in ("tumor", "stroke"):
        raise ValueError(f"kind must be tumor or stroke, got {kind!r}")
    volume = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    mirror = volume[::-1]
    brain = (volume > threshold) & (mirror > threshold)
    if kind == "tumor" and contrast in ("flair", "t2"):
        candidate = brain & (volume - mirror > 0.3)
    else:
        candidate = brain & (mirror - volume > 0.4) & (volume < np.median(volume[brain]))
    labels, n = ndimage.label(ndimage.binary_opening(candidate))
    if n == 0:
        return np.zeros(volume.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones_like(volume), labels, index=np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def lesion_stats(volume: np.ndarray, affine: np.ndarray, kind: str, contrast: str) -> dict[str, float]:
    """Volume (mL) and centre (mm, world coordinates) of the largest lesion-like region; NaN centre if none."""
    mask = lesion_mask(volume, kind, contrast)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    if not mask.any():
        return {"lesion_ml": 0.0, "lesion_x_mm": np.nan, "lesion_y_mm": np.nan, "lesion_z_mm": np.nan}
    centre = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
    return {
        "lesion_ml": float(mask.sum() * voxel_ml),
        "lesion_x_mm": float(centre[0]),
        "lesion_y_mm": float(centre[1]),
        "lesion_z_mm": float(centre[2]),
    }
