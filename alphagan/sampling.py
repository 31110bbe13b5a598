"""Drawing volumes from a trained generator, with BatchNorm statistics that belong to random codes.

During alpha-GAN training the generator's BatchNorm running statistics average batches of encoder codes with
batches of N(0, I) codes. Early in training the encoder's codes are far from N(0, I) (we measured a standard
deviation of about 4.3; docs/method.md, section 6), so sampling in eval mode with those statistics can give a
constant volume. The authors sampled in train mode (batch statistics), which makes a sample depend on the others
in its batch. We do neither: before sampling, the generator's running statistics are recomputed on N(0, I) codes
only (`calibrated_generator`), then the generator runs in eval mode, one volume independent of the next.
Taught in notebook 03.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from alphagan.checkpoint import open_checkpoint
from alphagan.config import Config
from alphagan.data.space import DEFAULT_FOV_MM, GENERATED_MARK, cube_affine, write_nifti
from alphagan.device import pick_device
from alphagan.folders import check_space, claim, reserved_array, staged
from alphagan.models import Generator
from alphagan.progress import tqdm
from alphagan.viz import cuts_grid, save_figure, use_headless_backend

NIFTI_HEADER, SAMPLES_PNG = 352, 2**20


@torch.no_grad()
def recalibrate_batchnorm(
    generator: nn.Module, latent: int, batch: int = 8, batches: int = 32, seed: int = 0, progress: bool = False
) -> nn.Module:
    """Replace every BatchNorm's running mean and variance by their average over N(0, I) code batches
    (`torch.optim.swa_utils.update_bn`: statistics reset, then a cumulative average over the batches). `progress`:
    a bar (the paper's generator takes 18-22 s on a 2-core CPU)."""
    device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randn(batch, latent, generator=gen) for _ in range(batches)]
    update_bn(tqdm(codes, desc="BatchNorm statistics on N(0, I) codes", unit="batch", disable=not progress),
              generator, device=device)  # fmt: skip
    return generator.eval()


def calibrated_generator(
    generator: nn.Module, latent: int, batch: int = 8, batches: int = 32, seed: int = 0, progress: bool = False
) -> nn.Module:
    """A copy of `generator` in eval mode with recalibrated statistics; the original is left untouched."""
    return recalibrate_batchnorm(copy.deepcopy(generator), latent, batch, batches, seed, progress)


@torch.no_grad()
def reconstruct(encoder: nn.Module, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G(E(x)) for a batch of real volumes x, (B, 1, S, S, S) on any device, as float32 on the CPU (like
    `generate`): E in eval mode (the VAE-GAN's posterior mean), G as a throw-away copy in train mode. The
    encoder's codes are not N(0, I) early in training, so the statistics calibrated for samples do not fit them;
    G's batch statistics do. Neither network is changed."""
    was_training = encoder.training
    code = encoder.eval()(x.to(next(encoder.parameters()).device))
    encoder.train(was_training)
    code = code[0] if isinstance(code, tuple) else code
    return copy.deepcopy(generator).train()(code).float().cpu()


def sample_names(n: int) -> list[str]:
    """The file names of `n` NIfTI samples, as `sample` writes them and a finished run leaves them."""
    return [f"sample_{i:04d}.nii.gz" for i in range(n)]


def generator_of(
    state: dict, device: str = "cpu", seed: int | None = None, progress: bool = False
) -> tuple[nn.Module, Config, dict]:
    """The generator of a checkpoint's state (`checkpoint.open_checkpoint`), calibrated and ready for sampling,
    with the run's settings and the state. `seed` draws the calibration codes (default: the run's)."""
    cfg = Config.from_dict(state["config"])
    G = Generator(cfg.size, cfg.width, cfg.latent)
    G.load_state_dict(state["nets"]["G"])
    seed = cfg.seed if seed is None else seed
    G = calibrated_generator(G.to(device), cfg.latent, batch=cfg.batch, seed=seed, progress=progress)
    return G, cfg, state


@torch.no_grad()
def generate_batches(
    generator: nn.Module, n: int, latent: int, seed: int = 0, batch: int = 8
) -> Iterator[torch.Tensor]:
    """n volumes, `batch` at a time (b, 1, S, S, S) on the CPU, from codes z ~ N(0, I) drawn with `seed`: only the
    codes (4 kB each at latent 1000) are held for all n, so memory stays flat in n."""
    device = next(generator.parameters()).device
    z = torch.randn(n, latent, generator=torch.Generator().manual_seed(seed))
    for i in range(0, n, batch):
        yield generator(z[i : i + batch].to(device)).float().cpu()


def generate(generator: nn.Module, n: int, latent: int, seed: int = 0, batch: int = 8) -> torch.Tensor:
    """n volumes (n, 1, S, S, S) on the CPU from codes z ~ N(0, I) drawn with `seed`."""
    return torch.cat(list(generate_batches(generator, n, latent, seed, batch)))


def generate_to(generator: nn.Module, n: int, latent: int, path: Path, seed: int = 0, batch: int = 8) -> np.ndarray:
    """`generate`'s n volumes as (n, S, S, S), written into a new .npy file at `path` as they come and returned
    memory-mapped, read-only: memory stays flat in n (`evaluate` holds its generated sets so)."""
    volumes, written = None, 0
    for part in generate_batches(generator, n, latent, seed, batch):
        if volumes is None:
            volumes = reserved_array(path, (n, *part.shape[2:]))
        volumes[written : written + len(part)] = part[:, 0].numpy()
        written += len(part)
    volumes.flush()
    del volumes
    return np.load(path, mmap_mode="r")


def write_samples(
    checkpoint: str | Path, out: str | Path, n: int, seed: int = 0, overwrite: bool = False, device: str = "auto"
) -> tuple[Path, Config, dict]:
    """`python -m alphagan sample`: n volumes of a checkpoint's generator as NIfTI files in `out` (claimed as
    `alphagan.folders.claim` says), written as they are generated, and samples.png of the first 32."""
    use_headless_backend()
    path, state = open_checkpoint(checkpoint)
    path = path.resolve()
    # Before the generator is calibrated (seconds on a CPU): float32 voxels, about what gzip leaves of a generated
    # volume's (noisy) mantissas, and the picture.
    size = Config.from_dict(state["config"]).size
    needed = n * (size**3 * 4 + NIFTI_HEADER) + SAMPLES_PNG
    check_space(Path(out), needed, f"{n} samples of {size}³", "give a smaller --n or another --out")
    G, cfg, state = generator_of(state, str(pick_device(device)), seed=seed, progress=True)
    names = sample_names(n)
    settings = {"checkpoint": str(path), "iteration": state["iter"], "n": n, "seed": seed}
    shown: list[torch.Tensor] = []
    files = [*names, "samples.png"]
    with (
        claim(out, "sample", settings, files, overwrite=overwrite, keep={"--checkpoint": path}) as owned,
        staged(owned.folder, files) as staging,  # a stopped run leaves no partial set that looks finished
    ):
        batch = 8
        batches = generate_batches(G, n, cfg.latent, seed=seed, batch=batch)
        written = 0
        for volumes in tqdm(batches, total=-(-n // batch), desc="sample", unit="batch"):
            for volume in volumes:
                save_nifti(volume, staging / names[written], state["fov_mm"])
                written += 1
            shown += list(volumes[: 32 - len(shown)])
        save_figure(cuts_grid(shown, title=f"{cfg.model}, iteration {state['iter']}"), staging / "samples.png")
    return owned.folder, cfg, state


def save_nifti(volume, path: str | Path, fov_mm: float = DEFAULT_FOV_MM) -> Path:
    """Save one (S, S, S) or (1, S, S, S) volume as NIfTI in the course's MNI-centred RAS space, atomically, its
    header marked as generated (`GENERATED_MARK`)."""
    array = volume.detach().float().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume, np.float32)
    array = array.reshape(array.shape[-3:]).astype(np.float32)
    return write_nifti(array, cube_affine(array.shape[0], fov_mm), path, GENERATED_MARK)
