"""What the course's notebooks do at each profile besides one training run's `Config` (`COURSE`), a profile
whole (`Profile`: its `Config`, its `Course` and the training runs the notebooks make), the banner each notebook
opens with, where a later notebook finds notebook 03's run, and the reuse of finished runs that lets
notebooks 04-06 skip training what an earlier notebook (or an earlier course run) already trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alphagan.checkpoint import list_checkpoints
from alphagan.config import MODELS, Config, make_config
from alphagan.device import describe, pick_device, pick_dtype
from alphagan.runs import TrainResult, checkpoints_of, finished_run, stopped_run
from alphagan.train import train


@dataclass(frozen=True)
class Course:
    """What the notebooks do at a profile besides one training run's `Config`: cohort and evaluation sizes, which
    models notebooks 04-06 train and for how long, whether they start from notebook 03's weights, and the fewest
    iterations from random weights that the course runner's `--minutes` may scale a run down to."""

    data_subjects: int  # 01: subjects written as NIfTI and prepared
    eval_models: tuple[str, ...]  # 04: the models of Table 1 (the alpha-WGAN-GP is notebook 03's)
    latents: tuple[int, ...]  # 04: the latent sizes compared (empty: no comparison)
    n_eval: int  # 04: real and generated volumes per model
    pairs: int  # 04: random pairs for MS-SSIM
    diseased_cohorts: tuple[str, ...]  # 05: kind:contrast
    diseased_iters: int | None  # 05 (None: the profile's)
    diseased_subjects: int | None  # 05
    diseased_eval: int  # 05: real and generated volumes compared per cohort
    aug_real: int  # 06: real training subjects per class
    aug_generated: int  # 06: generated volumes per class
    aug_test: int  # 06: held-out real test subjects per class
    aug_iters: int | None  # 06: generator training
    aug_seeds: int  # 06: classifier seeds
    # 05 and 06 start from notebook 03's weights (fine-tuning) instead of at random: on a CPU a generator needs
    # about 1 000 iterations to make brain-shaped volumes from scratch, a few hundred from 03's.
    warm_start: bool
    min_iters: int  # from random weights, fewer do not make brain-shaped volumes (anatomy.brain_shape)
    # 04: generated volumes whose tissue volumes are measured (a segmentation each: the slow part of `evaluate`)
    anatomy_table1: int = 16
    anatomy_latents: int = 8
    decoy_repetitions: int = 20  # 04: the paper's MMD on the decoys, a fifth of Table 1's 100 repetitions

    def resume_iters(self, iters: int) -> int:
        """Notebook 03's resume demonstration: a fiftieth of the run it continues, at least one iteration."""
        return max(1, iters // 50)


COHORTS = ("tumor:flair", "tumor:t2", "stroke:t1")
COURSE: dict[str, dict[str, Any]] = {
    "smoke": dict(
        data_subjects=12, eval_models=MODELS, latents=(8, 16), n_eval=16, pairs=40, diseased_cohorts=COHORTS,
        diseased_iters=4, diseased_subjects=12, diseased_eval=8, aug_real=4, aug_generated=8, aug_test=8, aug_iters=4,
        aug_seeds=2, warm_start=True, min_iters=1,
    ),
    # Table 1's four models and Fig. 3c's three latent sizes, each trained 1 000 iterations from random weights
    # (800 at least: brain-shaped from there, docs/method.md section 5); 05 and 06 fine-tune 03's model.
    "cpu": dict(
        data_subjects=128, eval_models=MODELS, latents=(100, 1000, 2048), n_eval=48, pairs=200,
        diseased_cohorts=COHORTS, diseased_iters=200, diseased_subjects=64, diseased_eval=24, aug_real=8,
        aug_generated=32, aug_test=40, aug_iters=200, aug_seeds=3, warm_start=True,
        min_iters=800,
    ),
    # Sized for one short GPU lease (`course --minutes 8` within 10 minutes): every comparison of the course, 05 and
    # 06 fine-tuning 03's model as at `cpu`, and cohorts a 16-core machine synthesises in seconds.
    "gpu": dict(
        data_subjects=64, eval_models=MODELS, latents=(100, 1000, 2048), n_eval=128, pairs=500,
        diseased_cohorts=COHORTS, diseased_iters=200, diseased_subjects=128, diseased_eval=64, aug_real=32,
        aug_generated=128, aug_test=64, aug_iters=200, aug_seeds=5, warm_start=True, min_iters=1000,
    ),
    "paper": dict(
        data_subjects=64, eval_models=MODELS, latents=(100, 1000, 2048), n_eval=512, pairs=1000,
        diseased_cohorts=COHORTS, diseased_iters=None, diseased_subjects=None, diseased_eval=256, aug_real=32,
        aug_generated=128, aug_test=200, aug_iters=None, aug_seeds=5, warm_start=False, min_iters=1000,
    ),
}  # fmt: skip


def course_settings(profile: str, **overrides: Any) -> Course:
    """The course's settings at `profile`; `overrides` that are None keep the profile's value."""
    if profile not in COURSE:
        raise ValueError(f"profile must be one of {sorted(COURSE)}, got {profile!r}")
    return Course(**{**COURSE[profile], **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class TrainingRun:
    """One training run a notebook makes: the model, latent size and whether it is the paper as written (what an
    iteration costs), its iterations, and whether it starts from random weights (then the profile's floor
    applies) or fine-tunes notebook 03's."""

    model: str
    latent: int
    iters: int
    from_scratch: bool = True
    as_written: bool = False  # `config.as_written`: notebook 03's comparison run, without LEARNS

    @property
    def kind(self) -> tuple[str, int, bool]:
        """What decides the cost of one of its iterations."""
        return self.model, self.latent, self.as_written

    @property
    def label(self) -> str:
        """How the plan's table names it."""
        latent = f" z{self.latent}" if self.latent != 1000 else ""
        return self.model + latent + (" as written" if self.as_written else "")


@dataclass(frozen=True)
class Profile:
    """A profile whole, under one name: one training run's settings (`config`, from `config.PROFILES`), what the
    course's notebooks do besides (`course`, from `COURSE`), and the training runs they make (`runs`)."""

    name: str
    config: Config
    course: Course

    @classmethod
    def of(cls, name: str, **course_overrides: Any) -> Profile:
        """The profile `name`; `course_overrides` that are None keep its course settings (`course_settings`)."""
        return cls(name, make_config(name), course_settings(name, **course_overrides))

    def runs(self, iters: dict[str, int] | None = None) -> dict[str, list[TrainingRun]]:
        """The training runs of notebooks 03-06, as the notebooks make them (`iters`: a notebook's iterations
        instead of the profile's)."""
        course, cfg, own = self.course, self.config, iters or {}
        it = {nb: own.get(nb, default) for nb, default in (("03", cfg.iters), ("04", cfg.iters),
              ("05", course.diseased_iters or cfg.iters), ("06", course.aug_iters or cfg.iters))}  # fmt: skip
        scratch = not course.warm_start
        runs = {"03": [TrainingRun("alpha-wgan-gp", cfg.latent, it["03"], as_written=w) for w in (False, True)]}
        others = [TrainingRun(m, cfg.latent, it["04"]) for m in course.eval_models if m != "alpha-wgan-gp"]
        latents = [TrainingRun("alpha-wgan-gp", z, it["04"]) for z in course.latents if z != cfg.latent]
        if others or latents:
            runs["04"] = others + latents
        runs["05"] = [TrainingRun("alpha-wgan-gp", cfg.latent, it["05"], scratch)] * len(course.diseased_cohorts)
        runs["06"] = [TrainingRun("alpha-wgan-gp", cfg.latent, it["06"], scratch)] * 2  # one generator per class
        return runs


def class_config(profile: str, n_real: int, iters: int | None, seed: int) -> Config:
    """Notebook 06's generator of one class: the profile's run on its `n_real` subjects, in batches no larger
    than that."""
    batch = min(make_config(profile).batch, n_real)
    return make_config(profile, iters=iters, n_subjects=n_real, batch=batch, seed=seed)


def device_banner(profile: str, cfg: Config, why: str = "as asked") -> str:
    """One line saying where this runs, with which profile and why (`device.choose_profile`), and its settings,
    for the top of a notebook."""
    device = pick_device(cfg.device)
    return (
        f"{describe(device)}: profile {profile} ({why}), {cfg.model}, {cfg.size}³ volumes, width {cfg.width}, "
        f"latent {cfg.latent}, batch {cfg.batch}, {cfg.iters} iterations, "
        f"{str(pick_dtype(cfg.precision, device)).removeprefix('torch.')}"
    )


def notebook_03_run(run_dir: str | Path) -> Path:
    """Notebook 03's training run, seen from the `run_dir` of a later notebook of the same course run (the course
    runner gives every notebook a folder of one run folder; run alone, the notebooks default to runs/NN_name)."""
    return Path(run_dir).parent / "03_training" / "run"


def notebook_03_model(run_dir: str | Path) -> Path:
    """The checkpoint folder of notebook 03's model, which notebooks 05 and 06 start from (`Course.warm_start`)."""
    folder = checkpoints_of(notebook_03_run(run_dir))
    if not list_checkpoints(folder):
        raise FileNotFoundError(
            f"{folder}: no checkpoint of notebook 03; run notebook 03 first, or set warm_start = False (then raise "
            f"iters: from random weights a model needs about 1000 iterations to make brain-shaped volumes at 32³)"
        )
    return folder


def train_or_reuse(
    cfg: Config, data: str, out: str | Path, reuse: tuple[str | Path, ...] = (), init: str | Path | None = None
) -> TrainResult:
    """The run `cfg` on `data` (from the weights of `init`, if given), trained only when no finished one exists
    (`runs.finished_run`) in `out` or one of `reuse` (e.g. notebook 03's run). A run in `out` that stopped
    earlier is resumed; otherwise `out` is trained from the start."""
    for folder in (Path(out), *map(Path, reuse)):
        found = finished_run(folder, cfg, data, init)
        if found is not None:
            print(f"{cfg.model}: reusing the finished run in {folder} (iteration {cfg.iters})")
            return found
    resume = stopped_run(out, init)
    return train(cfg, data, out, resume=resume, overwrite=not resume, init=init)
