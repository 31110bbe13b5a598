"""The evidence about a generative model: the paper's metrics with correct definitions, and what it lacked.

- MMD as the paper computed it (batch-wise, linear kernel), and an unbiased Gaussian-kernel MMD^2.
- 3D SSIM and MS-SSIM (Gaussian windows, the correct product over scales, a stated data range), and the
  diversity score of the paper's Table 1: mean MS-SSIM over random pairs of volumes.
- PCA of real and generated volumes on one projection fitted on the real set (the paper's Fig. 3).
- Memorisation: each generated volume's nearest training volume, against held-out real volumes' nearest.
- The earth mover's distance between two samples of one quantity (tissue or lesion volumes).

Anatomy (tissue and lesion volumes) lives in `alphagan.anatomy`, the feature network and the Fréchet distance in
`alphagan.features`. Definitions: docs/method.md, section 5. Taught in notebook 04.

Volumes are arrays or tensors of shape (N, S, S, S) or (N, 1, S, S, S) in [-1, 1] unless said otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in the paper's code


BLOCK_BYTES = 2**27  # float64 working memory per block (128 MiB): the metrics widen blocks, never whole sets, so
# their memory does not grow with the number of volumes (only the pairwise distances of the Gaussian MMD and the
# PCA's n x n Gram matrix do)


def _matrix(volumes) -> np.ndarray | Tensor:
    """Volumes as rows (n, voxels), a view of `volumes` (array, memory map or tensor) without a copy: the metrics
    read it a block at a time (`_double`), so that a memory-mapped set is never held in memory whole."""
    if isinstance(volumes, Tensor):
        return volumes.reshape(volumes.shape[0], -1)
    array = np.asarray(volumes)
    return array.reshape(array.shape[0], -1)


def _double(block: np.ndarray | Tensor) -> Tensor:
    """A block of `_matrix` rows or columns as a float64 tensor of its own."""
    if isinstance(block, Tensor):
        return block.to(torch.float64, copy=True)  # callers may work in place
    return torch.from_numpy(np.array(block, dtype=np.float64))


def _per_block(width: int) -> int:
    """How many float64 vectors of `width` values one block holds (at least one)."""
    return max(1, BLOCK_BYTES // (8 * width))


def as_batch(volumes) -> Tensor:
    """Volumes (n, S, S, S) or (n, 1, S, S, S), array or tensor, as a float tensor (n, 1, S, S, S)."""
    t = volumes if isinstance(volumes, Tensor) else torch.tensor(np.asarray(volumes))
    t = t.float()
    return t.unsqueeze(1) if t.dim() == 4 else t


# ------------------------------------------------------------------------------------------------ MMD
def mmd_linear(real, fake) -> float:
    """One batch of the paper's MMD: (sum g g^T + sum r r^T - 2 sum g r^T) / B^2 on flattened volumes."""
    r, g = _double(_matrix(real)), _double(_matrix(fake))  # one batch: small
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
    r, g = _matrix(real), _matrix(fake)
    n = min(len(r), len(g)) // batch * batch
    if n == 0:
        raise ValueError(f"need at least {batch} real and {batch} generated volumes, got {len(r)} and {len(g)}")
    rng = torch.Generator().manual_seed(seed)
    shuffles = [
        (
            torch.randperm(len(r), generator=rng)[:n].view(-1, batch),
            torch.randperm(len(g), generator=rng)[:n].view(-1, batch),
        )
        for _ in range(repetitions)
    ]
    # ||mean(g) - mean(r)||^2 per batch equals the paper's Gram-matrix formula (see the tests); summed over voxels
    # a slice at a time, in float64, so that no float64 copy of a whole set is ever made.
    sums = torch.zeros(repetitions, n // batch, dtype=torch.float64)
    step = _per_block(max(len(r), len(g)))  # voxels per slice: a float64 block of each set
    for start in range(0, r.shape[1], step):
        r_part, g_part = _double(r[:, start : start + step]), _double(g[:, start : start + step])
        for k, (ri, gi) in enumerate(shuffles):
            sums[k] += (g_part[gi].mean(1) - r_part[ri].mean(1)).pow(2).sum(1)
    v = sums.mean(1).numpy()
    voxels = r.shape[1]
    return MMDResult(
        float(v.mean()), float(v.std()), float(v.mean() / voxels), float(v.std() / voxels), batch, repetitions
    )


def _distance_blocks(a, b, within: bool) -> Iterator[tuple[int, int, Tensor]]:
    """Euclidean distances in float64 between rows of the `_matrix` views `a` and `b`, two blocks of rows at a time
    (`BLOCK_BYTES`): (first row of a, first row of b, distances). `within` (b is a): only blocks on or above the
    diagonal."""
    step = _per_block(a.shape[1])  # rows per block
    for i in range(0, len(a), step):
        a_block = _double(a[i : i + step])
        for j in range(i if within else 0, len(b), step):
            yield i, j, torch.cdist(a_block, a_block if within and i == j else _double(b[j : j + step]))


def pair_distances(a, b=None) -> np.ndarray:
    """Euclidean distances, in float64, between every volume of `a` and every volume of `b`, or (`b` None) between
    the distinct volumes of `a`, each pair once."""
    within = b is None
    a = _matrix(a)
    b = a if within else _matrix(b)
    out = np.empty(len(a) * (len(a) - 1) // 2 if within else len(a) * len(b))
    filled = 0
    for i, j, d in _distance_blocks(a, b, within):
        if within and i == j:  # a block with itself: the pairs (p, q) with p < q, above its diagonal
            d = d[torch.ones(d.shape, dtype=torch.bool).triu(1)]
        values = d.flatten().numpy()
        out[filled : filled + len(values)] = values
        filled += len(values)
    return out


def median_bandwidth(x, y) -> float:
    """The median heuristic: the median distance between distinct points of the pooled sample (numpy's median,
    the mean of the two middle values for an even count; torch.median would take the lower one)."""
    return _median_of_pairs(pair_distances(x), pair_distances(y), pair_distances(x, y))


def _median_of_pairs(*distances: np.ndarray) -> float:
    # Each distinct pooled pair once: the median of the full matrix's off-diagonal, where each appears twice.
    return float(np.median(np.concatenate(distances), overwrite_input=True))


def mmd_gaussian(real, fake, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 with the kernel exp(-|a - b|^2 / (2 sigma^2)), sigma by the median heuristic.

    Returns (MMD^2, sigma). Unbiased: the diagonal terms k(x_i, x_i) are left out of the within-sample means. The
    pairwise distances are computed once (`pair_distances`), 8 bytes a pair.
    """
    x, y = _matrix(real), _matrix(fake)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD needs at least two volumes on each side")
    dxx, dyy, dxy = pair_distances(x), pair_distances(y), pair_distances(x, y)
    sigma = bandwidth or _median_of_pairs(dxx, dyy, dxy)

    def k(d: np.ndarray) -> np.ndarray:
        return np.exp(-(d**2) / (2 * sigma**2))

    # Within a sample each distinct pair stands for two off-diagonal terms.
    value = 2 * k(dxx).sum() / (m * (m - 1)) + 2 * k(dyy).sum() / (n * (n - 1)) - 2 * k(dxy).mean()
    return float(value), sigma


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
        """Wang et al.'s five weights as published (they sum to 1.0001); fewer scales renormalise the first ones."""
        if self.scales == len(MS_SSIM_WEIGHTS):
            return MS_SSIM_WEIGHTS
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
    x, y = as_batch(x).double(), as_batch(y).double()
    settings = settings or SSIMSettings()
    return _ssim_and_cs(x, y, settings)[0].float()


def ms_ssim3d(x, y, settings: SSIMSettings | None = None) -> Tensor:
    """3D MS-SSIM per pair: prod_{j<M} cs_j^{w_j} * ssim_M^{w_M}, each weight applied once (the authors' code
    applied the coarsest weight four times). Negative terms are clipped at 0 before the power, as in
    pytorch-msssim, so one negative coarse-scale term makes the whole score 0 (at 64^3 the coarsest scale has
    only 2^3 window positions, and independent noise volumes score exactly 0). Volumes are halved between scales
    by 2^3 average pooling. Definitions: docs/method.md, section 5.

    Written here, not taken from pytorch-msssim: that library assumes five scales whatever its weights (it refuses
    32^3 with "Image size should be larger than 32 due to the 4 downsamplings"), and the `cpu` profile's 32^3 needs
    four. Where both run, at 64^3 and 128^3, they agree to 1e-5 (tests/test_metrics.py)."""
    x, y = as_batch(x).double(), as_batch(y).double()
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
    n = len(volumes)
    if n < 2:
        raise ValueError("diversity needs at least two volumes")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never i itself
    # Only each batch's volumes are read: a memory-mapped set stays on disk.
    scores = torch.cat(
        [ms_ssim3d(volumes[i[k : k + batch]], volumes[j[k : k + batch]], settings) for k in range(0, pairs, batch)]
    )
    return float(scores.mean()), float(scores.std())


def spread(volumes) -> float:
    """How much volumes differ from each other: the standard deviation across them at each voxel, averaged over
    voxels. Divided by the same for real volumes it tells collapse apart from diversity: near 0, the generator
    makes one volume (or, for reconstructions, one volume whatever the input)."""
    v = _matrix(volumes)
    step = _per_block(len(v))  # voxels per slice
    total = sum(float(_double(v[:, k : k + step]).std(0, unbiased=False).sum()) for k in range(0, v.shape[1], step))
    return total / v.shape[1]


# ------------------------------------------------------------------------------------------------ PCA
def pca_projection(real, generated: dict, components: int = 2) -> tuple[np.ndarray, dict, np.ndarray]:
    """Fit PCA on the real volumes and project every set on it: (real_2d, {name: 2d}, explained variance ratio).

    The PCA of n volumes of V voxels (n < V), exactly, from the n x n Gram matrix of the centred real set and the
    generated sets' products with it, summed a slice of voxels at a time: scikit-learn's PCA would hold the whole
    real set and a centred copy in memory. The same projections as scikit-learn's up to each axis's sign (the
    tests); here the sign makes each axis's largest real coordinate positive."""
    x, ys = _matrix(real), {name: _matrix(v) for name, v in generated.items()}
    gram = torch.zeros(len(x), len(x), dtype=torch.float64)
    cross = {name: torch.zeros(len(y), len(x), dtype=torch.float64) for name, y in ys.items()}
    step = _per_block(len(x) + sum(len(y) for y in ys.values()))  # voxels per slice of every set at once
    for k in range(0, x.shape[1], step):
        part = _double(x[:, k : k + step])
        mean = part.mean(0)
        part -= mean
        gram += part @ part.T
        for name, y in ys.items():
            cross[name] += (_double(y[:, k : k + step]) - mean) @ part.T
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    top, u = eigenvalues.flip(0)[:components].clamp(min=0), vectors.flip(1)[:, :components]
    u = u * torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    scale = torch.where(top > 0, top.rsqrt(), torch.zeros_like(top))  # no axis where the real set has no spread
    projected = {name: (c @ u * scale).numpy() for name, c in cross.items()}
    return (u * top.sqrt()).numpy(), projected, (top / gram.trace()).numpy()


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


def nearest_neighbours(queries, reference) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the root-mean-square voxel distance to its nearest reference volume, and that volume's index."""
    q, r = _matrix(queries), _matrix(reference)
    best = torch.full((len(q),), math.inf, dtype=torch.float64)
    index = torch.zeros(len(q), dtype=torch.long)
    for i, j, d in _distance_blocks(q, r, within=False):
        near = d.min(1)
        better = near.values < best[i : i + len(d)]
        best[i : i + len(d)] = torch.where(better, near.values, best[i : i + len(d)])
        index[i : i + len(d)] = torch.where(better, near.indices + j, index[i : i + len(d)])
    return (best / math.sqrt(r.shape[1])).numpy(), index.numpy()


def memorisation(generated, training, heldout) -> Memorisation:
    g, gi = nearest_neighbours(generated, training)
    h, _ = nearest_neighbours(heldout, training)
    ratio = float(np.median(g) / np.median(h)) if np.median(h) > 0 else None
    return Memorisation(g, gi, h, ratio, float(np.mean(g < np.percentile(h, 5))))
