"""A Fréchet distance on features of a 3D network whose weights the user supplies (MedicalNet-style ResNet).

Nothing is downloaded: `evaluate --features PATH` reads the weights from a file (notebook 04 explains it).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphagan.metrics import as_batch


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


MEDICALNET = "give MedicalNet's resnet_10.pth (Tencent/MedicalNet), or leave out --features"


def load_feature_network(path: str, depth: int = 10) -> ResNet3D:
    """A ResNet3D with weights from `path` (a MedicalNet checkpoint or a plain state dict), read with
    weights_only=True. Keys of MedicalNet's DataParallel checkpoints ('module.' prefix) are accepted."""
    net = ResNet3D(depth)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--features {path}: no such file; {MEDICALNET}") from None
    except Exception as exc:  # not a torch file, or one that needs unpickling code (which is never run here)
        raise ValueError(
            f"{path}: not a file of PyTorch weights that loads safely ({type(exc).__name__}); {MEDICALNET}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of weights; {MEDICALNET}")
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, _ = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[-1].strip()
        raise ValueError(f"{path}: not a 3D ResNet-{depth} checkpoint ({detail}); {MEDICALNET}") from None
    if missing:
        raise ValueError(f"{path}: not a 3D ResNet-{depth} checkpoint (missing {missing[:5]}); {MEDICALNET}")
    return net.eval()


@torch.no_grad()
def features(net: nn.Module, volumes, batch: int = 8) -> np.ndarray:
    """Pooled features of each volume (MedicalNet expects z-scored intensities: we standardise per volume)."""
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(volumes), batch):  # a batch at a time: a memory-mapped set stays on disk
        v = as_batch(volumes[i : i + batch])
        v = (v - v.mean(dim=(2, 3, 4), keepdim=True)) / v.std(dim=(2, 3, 4), keepdim=True).clamp(min=1e-6)
        out.append(net(v.to(device)).cpu())
    return torch.cat(out).double().numpy()


def frechet_feature_distance(net: nn.Module, real, fake) -> float:
    """Fréchet distance between Gaussians fitted to the network's features of real and generated volumes."""
    a, b = features(net, real), features(net, fake)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
