"""`python -m alphagan evaluate`: the paper's Table 1 and Fig. 3 for one or more trained models, and more.

Taught in notebook 04.

The real side is a held-out set: a prepared cache the models did not train on, or, for runs trained on the
synthetic cohort, subjects of another seed (never the augmented training set, which is what the paper's
numbers were computed against). Generators sample in eval mode with BatchNorm statistics recomputed on N(0, I)
codes. Everything is written to one folder: `results.json`, `table.md`, `pca.png`, `volumes.png`,
`nearest.png`. The volumes stay on disk, memory-mapped (a cache, and each generated set, written into the folder's
staging area as it is made), and the metrics read them a block at a time: memory does not grow with `--n` but
for the pairwise terms (`memory_needed`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from alphagan import anatomy, features, metrics
from alphagan.checkpoint import open_checkpoint
from alphagan.config import CONTRASTS, EVALUATE_DEFAULTS, EVALUATE_LEAST, Config
from alphagan.data.cache import Settings, load_cache, read_manifest, read_settings
from alphagan.data.dataset import Source, load_training_volumes, same_data
from alphagan.data.prepare import SameImages, cache_contrasts, mixed_contrasts, same_image_text
from alphagan.data.space import SYNTHETIC_MARK, cube_affine, synthetic_origin
from alphagan.device import free_memory, pick_device
from alphagan.folders import amount, check_space, claim, staged
from alphagan.progress import tqdm
from alphagan.runs import run_of, saved_config
from alphagan.sampling import generate_to, generator_of
from alphagan.viz import nearest_pairs, pca_scatter, save_figure, use_headless_backend, volume_histograms

HELD_OUT_SEED_OFFSET = 10_000  # synthetic held-out subjects: a cohort seed no training run uses by default
QUANTITIES = ("brain_ml", "gm_ml", "wm_ml", "csf_ml")


def _run_data(checkpoint: str | Path, saved: dict) -> str | None:
    """The `data` a checkpoint's run trained on, from its run's config.json (`saved`); None when unknown, or when
    that cache has since moved or been deleted (the memorisation check, which alone needs it, is then skipped)."""
    data = saved.get("data")
    if data is None:
        warnings.warn(
            f"{checkpoint}: no config.json of its run beside it, so what it trained on is unknown; the held-out and "
            f"memorisation checks are skipped for it (give the run folder to have them)",
            stacklevel=2,
        )
    elif not Source.parse(data).synthetic and not Path(data).is_dir():
        warnings.warn(
            f"{checkpoint}: its training cache {data} is no longer there; the memorisation check is skipped for it "
            f"(everything else compares with --real)",
            stacklevel=2,
        )
        return None
    elif saved.get("data_digest") is not None and not same_data(saved["data_digest"], data):
        warnings.warn(
            f"{checkpoint}: its training cache {data} was prepared again since (other subjects or settings); the "
            f"memorisation check is skipped for it (everything else compares with --real)",
            stacklevel=2,
        )
        return None
    return data


def held_out_seed(training_seed: int) -> int:
    """The seed of the synthetic held-out cohort of runs trained with `training_seed`."""
    return training_seed + HELD_OUT_SEED_OFFSET


def real_volumes(
    real: str, size: int, n: int, training_seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, float, str]:
    """Held-out real volumes, their cube edge in mm, and a sentence saying what they are (`progress`: a bar while
    a synthetic held-out cohort is made)."""
    if Source.parse(real).synthetic:
        seed = held_out_seed(training_seed)
        volumes, fov = load_training_volumes(real, size, n, seed=seed, progress=progress)
        return volumes, fov, f"{n} synthetic subjects of cohort seed {seed} ({real}), never seen in training"
    volumes, fov = load_training_volumes(real, size, n, progress=False)
    return np.asarray(volumes[:n]), fov, f"the first {min(n, len(volumes))} volumes of the cache {real}"


BLUR_SIGMA = 1.5  # voxels: notebook 04's blurred copies


def decoys(real: np.ndarray) -> dict[str, np.ndarray]:
    """What notebook 04 puts in a generator's place to test the metrics: other real subjects, blurred copies of
    them (`BLUR_SIGMA`), and their average repeated (a generator that collapsed to one volume)."""
    blurred = np.stack([ndimage.gaussian_filter(v, BLUR_SIGMA) for v in real])
    return {
        "other real subjects": real,
        "blurred copies": blurred,
        "the average, repeated": np.repeat(real.mean(0, keepdims=True), len(real), axis=0),
    }


def decoy_scores(real: np.ndarray, decoy: np.ndarray, pairs: int, repetitions: int, seed: int) -> dict[str, float]:
    """The paper's MMD (in `evaluate`'s batches of 8), the Gaussian-kernel MMD² and the MS-SSIM of `decoy`'s
    pairs, against held-out `real` volumes."""
    batch = min(EVALUATE_DEFAULTS["mmd_batch"], len(real))
    paper = metrics.mmd_batchwise(real, decoy, batch=batch, repetitions=repetitions, seed=seed)
    kernel, _ = metrics.mmd_gaussian(real, decoy)
    diversity, _ = metrics.diversity(decoy, pairs=pairs, seed=seed)
    return {"paper_mmd": paper.mean, "kernel_mmd2": kernel, "ms_ssim": diversity}


# What the metrics hold at their peak (`bench/evaluate_memory.py` measures it); the volumes themselves stay on disk,
# memory-mapped (a cache, and each generated set written there as it is made), and are read a block at a time.
# The libraries' own working memory, then either four float64 blocks (the paper's MMD: a slice of each set and its
# batches; the distances of two blocks of volumes), each no larger than `metrics.BLOCK_BYTES` or a float64 copy of
# a set, or two blocks and what grows with the square of n: the Gaussian MMD's pairwise distances, 8 bytes a pair
# for about 2 n² pairs with the median's copy of them, or the PCA's Gram matrix, its eigenvectors and one product
# with the real set per model.
WORKSPACE = 2**28
PAIRWISE_BYTES = 32


def memory_needed(n: int, size: int, models: int) -> int:
    """Bytes `evaluate`'s metrics hold at once for `n` real and generated volumes of `size`³ and `models` models:
    flat in n but for the pairwise terms, which grow with the square of n (0.5 GiB at n = 4096)."""
    block = min(metrics.BLOCK_BYTES, 8 * n * size**3)
    pairwise = max(PAIRWISE_BYTES, 8 * (2 + models)) * n**2
    return WORKSPACE + max(4 * block, 2 * block + pairwise)


def _check_memory(n: int, size: int, models: int = 1) -> None:
    """Refuse an `n` whose pairwise matrices cannot fit in the memory available now, before any work."""
    needed, available = memory_needed(n, size, models), free_memory()
    if needed > available:
        raise MemoryError(
            f"--n {n}: the metrics' {n}² pairwise distances and their working memory need {amount(needed)}, "
            f"{amount(available)} are available; give a smaller --n"
        )


def _check_disk(out: Path, n: int, size: int, models: int) -> None:
    """Refuse work whose generated sets, kept on disk while `evaluate` runs, do not fit there."""
    sets = models * n * size**3 * 4
    what = f"the generated volumes ({models} set{'s' * (models > 1)} of {n} at {size}³, on disk while evaluate runs)"
    check_space(out, sets + FIGURES_BYTES, what, "give a smaller --n, or an --out on a disk with more room")


def _name(cfg: Config, taken: set[str]) -> str:
    name = cfg.model if cfg.model != "alpha-wgan-gp" else f"alpha-wgan-gp z{cfg.latent}"
    while name in taken:
        name += "'"
    return name


@dataclass(frozen=True)
class Evaluation:
    """What one `evaluate` call compares, and how: the settings its folder's manifest records."""

    real: str  # a held-out cache, or synth[:kind[:contrast]]
    checkpoints: tuple[str, ...]  # checkpoint files, resolved
    n: int  # real and generated volumes
    pairs: int  # random pairs for MS-SSIM
    mmd_batch: int  # the paper's B
    mmd_repetitions: int
    n_anatomy: int  # volumes whose tissue volumes are measured
    contrast: str
    features: str | None  # feature network weights (Fréchet distance), if any
    seed: int


@dataclass
class RealSide:
    """The held-out volumes, their affine, and their row of the results."""

    volumes: np.ndarray
    fov_mm: float
    affine: np.ndarray
    anatomy: list[dict[str, float]]
    row: dict


def evaluate(
    real: str,
    checkpoints: list[str],
    out: str | Path,
    n: int = EVALUATE_DEFAULTS["n"],
    pairs: int = EVALUATE_DEFAULTS["pairs"],
    mmd_batch: int = EVALUATE_DEFAULTS["mmd_batch"],
    mmd_repetitions: int = EVALUATE_DEFAULTS["mmd_repetitions"],
    n_anatomy: int = EVALUATE_DEFAULTS["n_anatomy"],
    contrast: str | None = None,
    feature_weights: str | None = None,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Evaluate each checkpoint against held-out real data; write the figures and tables into `out` (a folder
    claimed as `alphagan.folders.claim` says: new, empty, or an earlier evaluation); return the results.

    `contrast` (of the real side, for the tissue volumes): by default its own (`named_contrast`), else t1. A real
    side that is not held out, or not the kind of data a model learned, is refused (`_wrong_real_side`)."""
    for name, value in {"n": n, "pairs": pairs, "n_anatomy": n_anatomy}.items():
        if value < EVALUATE_LEAST[name]:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {EVALUATE_LEAST[name]}")
    use_headless_backend()
    source = Source.parse(real)  # a bad --real is named before any model is loaded
    cache = None if source.synthetic else load_cache(source.cache)
    held = None if cache is None else cache[2]["size"]
    opened = [open_checkpoint(c) for c in checkpoints]  # loaded once; a folder's damaged newest is passed over
    contrast = contrast or named_contrast(source) or "t1"
    files, trained_on = _checked_inputs(source, held, opened, contrast)
    if cache is not None and n > len(cache[0]):  # fewer real volumes than asked for: every number would mean less
        raise ValueError(
            f"--n {n}: --real {source.cache} holds {len(cache[0])} volumes; give --n {len(cache[0])} or fewer, or a "
            f"larger held-out cache"
        )
    feature_net = features.load_feature_network(feature_weights) if feature_weights else None
    ev = Evaluation(
        str(source), files, n, pairs, mmd_batch, mmd_repetitions, n_anatomy, contrast, feature_weights, seed
    )
    keep = {"--real": source.cache, "--features": feature_weights, **{f"--checkpoint {c}": c for c in files}}
    with claim(out, "evaluate", asdict(ev), list(EVALUATE_FILES), overwrite=overwrite, keep=keep) as owned:
        states = [state for _, state in opened]
        chosen = str(pick_device(device or "auto"))
        return _evaluate(ev, states, trained_on, feature_net, owned.folder, chosen)


def _checked_inputs(
    source: Source, held: int | None, opened: list[tuple[Path, dict]], contrast: str
) -> tuple[tuple[str, ...], dict[str, str | None]]:
    """The checkpoints' files and the data each trained on, once the inputs are known to fit together: each model
    once, one size for all and for a cache on the real side (`held`: its size), and a real side that is held out
    and the data the models learned (`_wrong_real_side`)."""
    files = tuple(str(path.resolve()) for path, _ in opened)
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:  # two rows of one model would read as two models that agree
        raise ValueError(f"--checkpoint: {twice[0]} is given twice (a folder names its newest); give each model once")
    configs = [Config.from_dict(state["config"]) for _, state in opened]
    sizes = sorted({cfg.size for cfg in configs})
    if len(sizes) != 1:
        raise ValueError(f"--checkpoint: the models generate different sizes {sizes}; evaluate them separately")
    if held not in (None, sizes[0]):
        raise ValueError(
            f"--real {source.cache}: holds {held}³ volumes and the models generate {sizes[0]}³; prepare a held-out "
            f"cache at that size (`python -m alphagan prepare ... --size {sizes[0]}`)"
        )
    saved = [saved_config(run_of(f)) for f in files]
    trained_on = {f: _run_data(f, run) for f, run in zip(files, saved)}
    wrong = _wrong_real_side(source, contrast, trained_on, configs, {run.get("data_digest") for run in saved})
    if wrong is not None:
        raise ValueError(wrong)
    return files, trained_on


EVALUATE_FILES = ("results.json", "table.md", "pca.png", "volumes.png", "nearest.png")
FIGURES_BYTES = 2**24  # the figures and tables: a few hundred kB, counted generously


def _evaluate(
    ev: Evaluation,
    states: list[dict],
    trained_on: dict[str, str | None],
    feature_net: features.ResNet3D | None,
    out: Path,
    device: str,
) -> dict:
    """`evaluate` once its folder is claimed, with the checkpoints' `states`, the data each trained on and the
    feature network of the Fréchet distance (None: none)."""
    models = [generator_of(state, device, progress=True) for state in states]
    size = models[0][1].size  # one size for all (`evaluate`)
    _check_memory(ev.n, size, len(models))
    _check_disk(out, ev.n, size, len(models))
    # A stopped evaluation leaves no partial set of results, and its generated sets go with the staging folder.
    # One bar from the first second: the real side (a synthetic one is made here) is often the longest step.
    with (
        staged(out, list(EVALUATE_FILES)) as staging,
        tqdm(total=len(models) + 1, desc="evaluate: the real side", unit="set") as bar,
    ):
        real = _real_side(ev, size, training_seed=models[0][1].seed)
        m = len(real.volumes)  # the paper's B = 8 unless fewer real volumes are at hand, and no more pairs than exist
        ev = replace(ev, mmd_batch=min(ev.mmd_batch, m), pairs=min(ev.pairs, m * (m - 1) // 2))
        if note := _batch_note({"mmd_batch": ev.mmd_batch}):
            warnings.warn(f"--n {m}:{note}", stacklevel=2)
        real.row["ms_ssim"], real.row["ms_ssim_std"] = metrics.diversity(real.volumes, ev.pairs, seed=ev.seed)
        bar.update()
        results: dict = {
            "real": real.row,
            "models": {},
            "sampling": "generators in eval mode, BatchNorm statistics recomputed on N(0, I) codes",
            "settings": {
                "n": ev.n,
                "pairs": ev.pairs,
                "mmd_batch": ev.mmd_batch,
                "mmd_repetitions": ev.mmd_repetitions,
                "ms_ssim": asdict(metrics.ms_ssim_settings(size)),
                "contrast": ev.contrast,
            },
        }
        feature_net = feature_net.to(device) if feature_net is not None else None

        generated, tissues, nearest = {}, {}, {}
        for checkpoint, (G, cfg, state) in zip(ev.checkpoints, models):
            name = _name(cfg, set(generated))
            bar.set_description(f"evaluate: {name}")
            generated[name] = generate_to(G, m, cfg.latent, staging / f"generated-{len(generated)}.npy", ev.seed + 1)
            fake_affine = cube_affine(size, state.get("fov_mm", real.fov_mm))
            shown = generated[name][: ev.n_anatomy]
            tissues[name] = [anatomy.tissue_volumes(v, fake_affine, ev.contrast) for v in shown]
            row = {"checkpoint": checkpoint, "iteration": state["iter"], "model": cfg.model, "latent": cfg.latent}
            row |= _compared(generated[name], tissues[name], real, ev)
            training = trained_on[checkpoint]
            if training is not None:
                row["memorisation"], nearest[name] = _memorisation(training, cfg, generated[name], real.volumes)
            if feature_net is not None:
                row["frechet"] = features.frechet_feature_distance(feature_net, real.volumes, generated[name])
            results["models"][name] = row
            bar.update()
        _figures(staging, real, generated, tissues, nearest, results)
        (staging / "results.json").write_text(json.dumps(results, indent=2))
        (staging / "table.md").write_text(markdown_table(results))
    return results


def _cohorts(source: Source, seed: int) -> set[str]:
    """The synthetic cohorts (`space.synthetic_origin`: kind and seed) a source's subjects belong to: a synthetic
    source's own, with `seed`, or those a cache's manifest records; none for a cache of scans."""
    if source.synthetic:
        return {synthetic_origin(source.kind, seed)}
    return {origin for row in read_manifest(source.cache) if (origin := row.get("origin"))}


def _kinds(cohorts: set[str]) -> set[str]:
    return {cohort.removeprefix(SYNTHETIC_MARK + " ").split(" seed ")[0] for cohort in cohorts}


def _wrong_real_side(
    source: Source, contrast: str, trained_on: dict[str, str | None], configs: list[Config], digests: set[str | None]
) -> str | None:
    """Why `source` cannot be the real side of these models, with the fix, or None. It is not held out (a model's
    training cache, or subjects of a synthetic cohort a model trained on: the same kind and seed give the same
    anatomy at any size), or it is another kind of data than a model learned (synthetic kind, contrast), or
    `contrast` is not the real side's own (`named_contrast`). `digests`: the runs' records of their training caches,
    which know a training cache that has since moved."""
    if not source.synthetic and (mixed := mixed_contrasts(cache_contrasts(source.cache))):
        return f"--real {source}: holds {mixed}; prepare a held-out cache of one contrast (prepare --modality)"
    named = named_contrast(source)
    if named is not None and contrast != named:
        how = "" if source.synthetic else " by its file names"
        return f"--contrast {contrast}: the real side {source} is {named}{how}; give --contrast {named}"
    training_set = (
        f"--real {source.cache}: the training set of a model, not held out; give a cache prepared from other "
        f"subjects, or --real synth for runs trained on the synthetic cohort"
    )
    if not source.synthetic and any(same_data(digest, str(source.cache)) for digest in digests):
        return training_set  # wherever it lies now: the run recorded its manifest's checksum
    real = _cohorts(source, held_out_seed(configs[0].seed))  # the cohort `real_volumes` draws
    real_kinds = _kinds(real)
    for data, cfg in zip(trained_on.values(), configs):
        if data is None:
            continue
        other = Source.parse(data)
        if not source.synthetic and other == source:
            return training_set
        if source.synthetic and other.synthetic and (other.kind, other.contrast) != (source.kind, source.contrast):
            return f"--real {source}: the {cfg.model} run learned {other}; compare it with --real {other}"
        if (ours := _preparation(source)) != (theirs := _preparation(other)):
            said = ", ".join(f"{k} {ours[k]}" for k in ours if ours[k] != theirs[k])
            learned = ", ".join(f"{k} {theirs[k]}" for k in ours if ours[k] != theirs[k])
            return (
                f"--real {source}: prepared with {said}, and the data the {cfg.model} run learned ({other}) with "
                f"{learned}; prepare the held-out cache as that data was{' (--stretch)' * bool(theirs['stretch'])}"
            )
        if named is not None and (learned_contrast := named_contrast(other)) not in (None, named):
            return (
                f"--real {source}: holds {named} scans, and the {cfg.model} run learned {learned_contrast} ones "
                f"({other}); compare it with scans of the contrast it learned"
            )
        learned = _cohorts(other, cfg.seed)
        learned_kinds = _kinds(learned)
        if shared := sorted(real & learned):
            return (
                f"--real {source}: holds subjects of the synthetic cohort the {cfg.model} run trained on "
                f"({shared[0].removeprefix(SYNTHETIC_MARK + ' ')}), not held out; give --real synth, or a cache of a "
                f"cohort made with another --seed"
            )
        if shared := _shared_subjects(source, other):
            return (
                f"--real {source}: {len(shared)} of its subjects {'is' if len(shared) == 1 else 'are'} in {other}, "
                f"which the {cfg.model} run trained on ({shared[0]}), not held out; prepare the held-out cache from "
                f"other subjects"
            )
        if real_kinds and learned_kinds and not real_kinds & learned_kinds:
            return (
                f"--real {source}: holds synthetic {'/'.join(sorted(real_kinds))} subjects, and the {cfg.model} run "
                f"learned {'/'.join(sorted(learned_kinds))} ones ({other}); compare it with data of its own kind"
            )
    return None


PREPARATION = ("stretch", "percentile")  # the `Settings` that change what a prepared volume looks like, but size


def _preparation(source: Source) -> dict:
    """How a source's volumes were prepared (`PREPARATION`): a cache's settings.json, or for the synthetic cohort
    the defaults it is made with."""
    settings = asdict(Settings()) if source.synthetic else read_settings(source.cache)
    return {k: settings.get(k) for k in PREPARATION}


def named_contrast(source: Source) -> str | None:
    """The contrast of a source's scans, if it is one `evaluate` segments (`CONTRASTS`): a synthetic cohort's own,
    or the one that the file names of a cache's inputs all say (`prepare.contrast_of`); None where they say none
    or several (a cache records no contrast of its own)."""
    if source.synthetic:
        return source.contrast
    if not (source.cache / "manifest.tsv").exists():
        return None
    said = set(cache_contrasts(source.cache))
    return said.pop() if len(said) == 1 and said <= set(CONTRASTS) else None


def _shared_subjects(real: Source, training: Source) -> list[str]:
    """The subjects of the cache `real` that the cache `training` holds too, each said with how it was told: the same
    file (by checksum), or the same image in another file (`SameImages`: saved again, with another header, scaled),
    when both are caches on this disk."""
    if real.synthetic or training.synthetic or not (training.cache / "manifest.tsv").exists():
        return []
    trained_volumes, trained_rows, _ = load_cache(training.cache)
    real_volumes, real_rows, _ = load_cache(real.cache)
    files = {row["sha256"]: row["source"] for row in trained_rows if row.get("sha256")}
    index = SameImages(trained_volumes)
    if trained_volumes.shape[1:] == real_volumes.shape[1:]:
        what = f"looking for its subjects in {training.cache}"
        for row in tqdm(range(len(trained_volumes)), desc=what, unit="volume", delay=1.0, leave=False):
            index.add(row)
    shared = []
    for row, volume in zip(real_rows, real_volumes):
        if row.get("sha256") in files:
            shared.append(f"{row['source']} is the same file as {files[row['sha256']]}")
        elif index.rows and (found := index.find(volume)) is not None:
            other, gap = found
            how = same_image_text(gap)
            shared.append(f"{row['source']} is the same image as {trained_rows[other]['source']} ({how})")
    return shared


def _memorisation(training: str, cfg: Config, generated: np.ndarray, heldout: np.ndarray) -> tuple[dict, tuple]:
    """How much closer a model's volumes lie to its own training set than held-out subjects do, as a row of the
    results, and the training set with the measurement (for the nearest-neighbour figure)."""
    train_set, _ = load_training_volumes(training, cfg.size, cfg.n_subjects, seed=cfg.seed, progress=False)
    memo = metrics.memorisation(generated, np.asarray(train_set), heldout)
    row = {
        "training_data": training,
        "nn_ratio": memo.ratio,
        "closer_than_heldout": memo.closer_than_heldout,
        "median_nn_generated": float(np.median(memo.generated_nn)),
        "median_nn_heldout": float(np.median(memo.heldout_nn)),
    }
    return row, (np.asarray(train_set), memo)


def _mean_tissue(tissue: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each tissue volume (mL) over volumes."""
    return {q: float(np.mean([a[q] for a in tissue])) for q in QUANTITIES}


def _real_side(ev: Evaluation, size: int, training_seed: int) -> RealSide:
    """The held-out volumes and what is measured on them alone (MS-SSIM comes once the pairs are known)."""
    volumes, fov_mm, text = real_volumes(ev.real, size, ev.n, training_seed)
    affine = cube_affine(size, fov_mm)
    shape = anatomy.brain_shape(volumes, volumes)
    tissue = [anatomy.tissue_volumes(v, affine, ev.contrast) for v in volumes[: ev.n_anatomy]]
    row = {
        "data": text,
        "n": len(volumes),
        "brain_overlap": shape.real_median,
        "brain_overlap_lowest": shape.real_lowest,
        "anatomy": _mean_tissue(tissue),
    }
    return RealSide(volumes, fov_mm, affine, tissue, row)


def _compared(fake: np.ndarray, tissue: list[dict[str, float]], real: RealSide, ev: Evaluation) -> dict:
    """One model's generated volumes against the real side: the paper's MMD and MS-SSIM, and what we add."""
    mmd = metrics.mmd_batchwise(real.volumes, fake, ev.mmd_batch, ev.mmd_repetitions, seed=ev.seed)
    gauss, sigma = metrics.mmd_gaussian(real.volumes, fake)
    diversity, diversity_std = metrics.diversity(fake, ev.pairs, seed=ev.seed)
    shape = anatomy.brain_shape(fake, real.volumes)
    return {
        "mmd": mmd.mean,
        "mmd_std": mmd.std,
        "mmd_per_voxel": mmd.per_voxel_mean,
        "mmd_gaussian": gauss,
        "mmd_gaussian_sigma": sigma,
        "ms_ssim": diversity,
        "ms_ssim_std": diversity_std,
        "brain_overlap": shape.generated_median,
        "brain_shaped": shape.shaped,
        "anatomy": _mean_tissue(tissue),
        "anatomy_wasserstein_ml": {
            q: metrics.wasserstein_1d([a[q] for a in tissue], [a[q] for a in real.anatomy]) for q in QUANTITIES
        },
    }


def _figures(
    out: Path,
    real: RealSide,
    generated: dict[str, np.ndarray],
    tissues: dict[str, list[dict[str, float]]],
    nearest: dict[str, tuple[np.ndarray, metrics.Memorisation]],
    results: dict,
) -> None:
    """pca.png, volumes.png and nearest.png (the first model with a training set). Saved, not shown: a notebook
    shows the files where its text introduces them."""
    real_2d, projected, variance = metrics.pca_projection(real.volumes, generated)
    results["pca_explained_variance"] = [float(v) for v in variance]
    save_figure(pca_scatter(real_2d, projected, variance), out / "pca.png")
    real_tissue = {q: [a[q] for a in real.anatomy] for q in QUANTITIES}
    fake_tissue = {m: {q: [a[q] for a in rows] for q in QUANTITIES} for m, rows in tissues.items()}
    save_figure(volume_histograms(real_tissue, fake_tissue), out / "volumes.png")
    if nearest:
        name, (train_set, memo) = next(iter(nearest.items()))
        figure = nearest_pairs(generated[name], train_set, memo.generated_index, memo.generated_nn, title=name)
        save_figure(figure, out / "nearest.png")


# The paper's Table 1, for comparison (MMD as printed there, x 10^-4 on their data; MS-SSIM over 1000 pairs).
PAPER_TABLE = {
    "WGAN-GP": (0.327, 0.996),
    "VAE-GAN": (0.075, 0.972),
    "alpha-GAN": (0.131, 0.843),
    "ours z100": (0.211, 0.927),
    "ours z1000": (0.072, 0.829),
    "ours z2048": (0.108, 0.867),
    "real": (None, 0.846),
}


def conclusions(results: dict) -> list[str]:
    """Sentences derived from the numbers of one `evaluate` run (notebook 04 prints them under its table): which
    models are not brain-shaped yet (named, not ranked), which is closest to the real data by each MMD, which have
    collapsed (pairs more alike than real pairs), memorisation, and how the latent sizes compare."""
    real_overlap = results["real"]["brain_overlap_lowest"]
    lines = [
        anatomy.not_judged(name, row["brain_overlap"], real_overlap)
        for name, row in results["models"].items()
        if not row["brain_shaped"]
    ]
    models = {name: row for name, row in results["models"].items() if row["brain_shaped"]}
    if len(models) > 1:  # a ranking needs two
        kernel, paper = (min(models, key=lambda m: models[m][key]) for key in ("mmd_gaussian", "mmd"))
        lines.append(
            f"Closest to the real data by the Gaussian-kernel MMD²: {kernel}; by the paper's MMD: {paper}"
            + (" (among the brain-shaped models)." if len(models) < len(results["models"]) else ".")
        )
    real = results["real"]["ms_ssim"]
    for name, row in models.items():
        if row["ms_ssim"] > real + 0.02:
            diversity = (
                f"collapsed: its volumes are more alike than real pairs (MS-SSIM {row['ms_ssim']:.3f} > {real:.3f})"
            )
        elif row["ms_ssim"] < real - 0.02:
            diversity = f"its volumes vary more than real pairs (MS-SSIM {row['ms_ssim']:.3f} < {real:.3f})"
        else:
            diversity = f"its volumes are about as diverse as real pairs (MS-SSIM {row['ms_ssim']:.3f})"
        ratio = row.get("memorisation", {}).get("nn_ratio")
        if ratio is not None:
            closer = "closer to" if ratio < 1 else "no closer to"
            diversity += f"; it is {closer} its training volumes than new real subjects are (ratio {ratio:.2f})"
        lines.append(f"{name}: {diversity}.")
    lines += _latent_conclusions(models)
    return lines


def _latent_conclusions(models: dict[str, dict]) -> list[str]:
    """The paper's Fig. 3c question, for the brain-shaped alpha-WGAN-GPs among `models`: is a smaller code less
    diverse (higher MS-SSIM) than the paper's 1000?"""
    sizes = {int(name.split(" z")[1]): row for name, row in models.items() if name.startswith("alpha-wgan-gp z")}
    if 1000 not in sizes:
        return []
    lines = []
    for z in sorted(k for k in sizes if k != 1000):
        a, b = sizes[z]["ms_ssim"], sizes[1000]["ms_ssim"]
        verdict = "less diverse than" if a > b else "at least as diverse as"
        lines.append(f"latent {z}: {verdict} latent 1000 (MS-SSIM {a:.3f} against {b:.3f}).")
    return lines


def plain(value: float) -> str:
    """Plain digits, never scientific notation: whole numbers from 100 up, three significant digits below."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _mean_sd(mean: float, sd: float) -> str:
    return f"{plain(mean)} ± {sd:.0f}" if abs(mean) >= 100 else f"{plain(mean)} ± {sd:.2g}"


def _batch_note(settings: dict) -> str:
    """What the table says when its MMD was not computed over the paper's batches (`EVALUATE_DEFAULTS`)."""
    batch = settings["mmd_batch"]
    if batch == EVALUATE_DEFAULTS["mmd_batch"]:
        return ""
    return (
        f" MMD over batches of {batch} volumes, as few as --n gave, not the paper's {EVALUATE_DEFAULTS['mmd_batch']}: "
        f"not comparable with its Table 1."
    )


def markdown_table(results: dict) -> str:
    """Table 1 in the paper's form: one row per model and the real data, MMD and MS-SSIM, plus what we add; then
    the conclusions drawn from it, and the paper's own table."""
    lines = [
        f"Real side: {results['real']['data']}. Sampling: {results['sampling']}. Tissue volumes (volumes.png): "
        f"segmented as {results['settings']['contrast']} images (--contrast).{_batch_note(results['settings'])}",
        "",
        "| model | MMD (mean ± sd) | MMD per voxel | Gaussian MMD² | MS-SSIM | brain overlap | NN ratio | Fréchet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        memo = r.get("memorisation", {}).get("nn_ratio")
        memo_text = "" if memo is None else f"{memo:.2f}"
        frechet = f"{r['frechet']:.4g}" if "frechet" in r else ""
        lines.append(
            f"| {name} | {_mean_sd(r['mmd'], r['mmd_std'])} | {r['mmd_per_voxel']:.3g} | "
            f"{r['mmd_gaussian']:.3g} | {r['ms_ssim']:.3f} | {r['brain_overlap']:.3f} | {memo_text} | {frechet} |"
        )
    real = results["real"]
    lines.append(
        f"| real (held out) | | | | {real['ms_ssim']:.3f} | {real['brain_overlap']:.3f} (lowest "
        f"{real['brain_overlap_lowest']:.3f}) | | |"
    )
    lines += ["", "What these numbers say:", "", *(f"- {line}" for line in conclusions(results))]
    lines += [
        "",
        "The paper's Table 1 (ADNI, 64³, its own MMD scale):",
        "",
        "| model | MMD ×10⁻⁴ | MS-SSIM |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {'' if m is None else m} | {s} |" for k, (m, s) in PAPER_TABLE.items()]
    return "\n".join(lines) + "\n"
