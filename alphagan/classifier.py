"""Does synthetic data help? A small 3D classifier trained on few real volumes, with or without generated ones.

Taught in notebook 06.

The paper's stated future work: use generated volumes to train a diagnostic model. The experiment here is the
smallest honest version of it: a binary classifier (e.g. tumour against normal) trained on a few real subjects,
then on the same subjects plus generated volumes of each class, both evaluated on the same held-out real
subjects, repeated over seeds so that the difference comes with its spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Classifier3D(nn.Module):
    """Three strided conv blocks and a linear head: enough for lesions at 16^3-64^3, small enough for a CPU."""

    def __init__(self, width: int = 8):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv3d(channels, out, 3, 2, 1), nn.BatchNorm3d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4))).squeeze(1)  # logits


def train_classifier(
    x: np.ndarray, y: np.ndarray, steps: int = 150, batch: int = 8, lr: float = 1e-3, seed: int = 0, width: int = 8
) -> Classifier3D:
    """Fit a Classifier3D on volumes x (N, S, S, S) with labels y in {0, 1}, with random left-right flips.

    A fixed number of steps, whatever the size of the training set, so that adding generated volumes changes
    what the classifier sees, not how long it trains.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Classifier3D(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xt = torch.from_numpy(np.asarray(x, np.float32)).unsqueeze(1)
    yt = torch.from_numpy(np.asarray(y, np.float32))
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(xt), (min(batch, len(xt)),), generator=g)
        xb = torch.where(torch.rand(len(idx), 1, 1, 1, 1, generator=g) < 0.5, xt[idx].flip(2), xt[idx])
        loss = F.binary_cross_entropy_with_logits(net(xb), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = net(torch.from_numpy(np.asarray(x, np.float32)).unsqueeze(1))
    return float(((logits > 0).float() == torch.from_numpy(np.asarray(y, np.float32))).float().mean())


@dataclass
class AugmentationResult:
    real_only: list[float]  # held-out accuracy per seed
    with_generated: list[float]

    @property
    def difference(self) -> tuple[float, float]:
        """Mean and standard deviation over seeds of (with generated - real only)."""
        d = np.array(self.with_generated) - np.array(self.real_only)
        return float(d.mean()), float(d.std())

    def conclusion(self) -> str:
        """What this run shows, in words derived from its numbers: above chance when the mean accuracy minus two
        standard deviations over seeds exceeds 0.5; an effect when the difference exceeds twice its spread."""
        real = np.array(self.real_only)
        above = real.mean() - 2 * real.std() > 0.5
        mean, sd = self.difference
        if abs(mean) <= 2 * sd or mean == 0:
            effect = "within twice its spread: no effect shown"
        else:
            effect = "a gain beyond twice its spread" if mean > 0 else "a loss beyond twice its spread"
        return (
            f"Real subjects alone: held-out accuracy {real.mean():.3f} ± {real.std():.3f} over {len(real)} seeds, "
            f"{'above' if above else 'not clearly above'} chance (0.5). Adding generated volumes changed it by "
            f"{mean:+.3f} ± {sd:.3f}: {effect}."
        )


def augmentation_experiment(
    real_x: np.ndarray,
    real_y: np.ndarray,
    generated_x: np.ndarray,
    generated_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seeds: int = 3,
    steps: int = 150,
) -> AugmentationResult:
    """Held-out accuracy of classifiers trained on real data alone and on real plus generated, seed by seed."""
    real_only, with_generated = [], []
    both_x = np.concatenate([real_x, generated_x])
    both_y = np.concatenate([real_y, generated_y])
    for seed in range(seeds):
        real_only.append(accuracy(train_classifier(real_x, real_y, steps=steps, seed=seed), test_x, test_y))
        with_generated.append(accuracy(train_classifier(both_x, both_y, steps=steps, seed=seed), test_x, test_y))
    return AugmentationResult(real_only, with_generated)
