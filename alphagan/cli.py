"""`python -m alphagan COMMAND ...`: synth, prepare, train, sample, evaluate, course, results.

Each command imports its module when it runs, so that `--help` and a wrong flag answer without loading PyTorch.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alphagan.config import (
    CONTRASTS,
    EVALUATE_DEFAULTS,
    EVALUATE_LEAST,
    KINDS,
    LAYOUTS,
    MODELS,
    PRECISIONS,
    PROFILES,
    SIZES,
    Config,
    SettingError,
    check,
    make_config,
)

# The `train` options that set a Config field of the same name, with their help texts.
TRAIN_SETTINGS = {
    "size": "edge of the cubic volumes; a cache's own size when --data is a cache",
    "width": "channels of the first convolution block",
    "latent": "size of the latent code",
    "batch": "volumes per batch",
    "iters": "iterations in all (with --resume: the new total)",
    "seed": "seed of the weights, batches and noise",
    "lr": "Adam's learning rate, all networks",
    "lambda_rec": "weight of the reconstruction term (the paper: 10)",
    "critic_norm": "normalisation in the image critic: batch (the paper's), layer or none",
    "g_steps": "encoder+generator updates per iteration",
    "d_steps": "critic updates per iteration",
    "n_subjects": "size of the synthetic cohort (--data synth...)",
    "log_every": "iterations between lines of metrics.jsonl",
    "sample_every": "iterations between progress pictures",
    "ckpt_every": "iterations between checkpoints",
}


def _size(text: str) -> int:
    """`64` or `1mm` (the template's native grid, 0 internally): a cube edge from 8 to 256."""
    if text.lower() in ("1mm", "native", "0"):
        return 0
    size = _number(text)
    if not 8 <= size <= 256:
        # A subject is made at this size in float32 several times over: 256³ is already ~0.3 GB per array.
        raise argparse.ArgumentTypeError(f"must be from 8 to 256 (or 1mm), got {size}")
    return size


def cmd_synth(args: argparse.Namespace) -> int:
    from alphagan.data.synth import make_cohort

    out = make_cohort(
        args.out, args.n, size=args.size, kind=args.kind, contrast=args.contrast, seed=args.seed,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {args.n} subjects and participants.tsv to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from alphagan.data.prepare import prepare

    result = prepare(
        args.src,
        args.out,
        size=args.size,
        layout=args.layout,
        modality=args.modality,
        stretch=args.stretch,
        workers=args.workers,
        overwrite=args.overwrite,
        allow_generated=args.allow_generated,
    )
    rejected = f" (reasons in {result.out / 'rejected.tsv'})" if result.rejected else ""
    print(
        f"{result.out}: {result.written} volumes written, {result.reused} unchanged, "
        f"{len(result.rejected)} rejected{rejected}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from alphagan.data.cache import read_settings
    from alphagan.data.dataset import Source
    from alphagan.device import choose_profile
    from alphagan.runs import run_settings, stopped_note
    from alphagan.steps import TrainingDiverged
    from alphagan.train import train

    if args.resume and (args.overwrite or args.init):
        other = "--overwrite" if args.overwrite else "--init"
        raise ValueError(f"--resume continues the run in {args.out} as it was, {other} starts another; give one")
    overrides = {name: getattr(args, name) for name in (*TRAIN_SETTINGS, "precision", "device")}
    overrides.update(channels_last=args.channels_last or None, compile=args.compile or None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # --resume without --profile continues with the run's own settings and data; a flag given changes them.
    run = run_settings(args.out) if args.resume and args.profile is None else None
    data = args.data or (run[1] if run else None)
    if data is None:
        if run is not None:
            raise ValueError(f"{args.out}: its config.json is gone, so what the run trained on is unknown; give --data")
        if args.resume:
            raise FileNotFoundError(f"{args.out}: no run to resume here (no checkpoint); leave out --resume")
        raise ValueError("--data is needed: a prepared cache folder, or synth[:kind[:contrast]]")
    source = Source.parse(data)
    if args.n_subjects is not None and not source.synthetic:  # it would be recorded, and do nothing
        raise ValueError(
            f"--n-subjects sizes a synthetic cohort; the cache {source.cache} trains on all its own subjects"
        )
    if run is None and "size" not in overrides and not source.synthetic and (source.cache / "settings.json").exists():
        overrides["size"] = read_settings(source.cache)["size"]
        print(f"alphagan train: {source.cache} holds {overrides['size']}³ volumes; training at that size",
              file=sys.stderr)  # fmt: skip
    try:
        if run is not None:
            cfg = run[0].replace(**overrides, **({"model": args.model} if args.model else {})).validate()
        else:
            cfg = make_config(choose_profile(args.profile)[0], args.model or "alpha-wgan-gp", **overrides)
    except SettingError as exc:  # named as the user typed it
        raise ValueError(f"--{exc.name.replace('_', '-')} {exc.rule}") from None
    if args.lambda_rec is not None and cfg.model == "wgan-gp":  # it would be recorded, and do nothing
        raise ValueError(
            "--lambda-rec weighs a reconstruction, and a wgan-gp has no encoder to reconstruct with; leave it out"
        )
    try:
        result = train(cfg, data, args.out, resume=args.resume, overwrite=args.overwrite, init=args.init)
    except TrainingDiverged as exc:
        print(f"alphagan train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # said by `main`, in its one line
        raise KeyboardInterrupt(stopped_note(args.out)) from None
    print(f"run folder: {result.out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from alphagan.sampling import write_samples

    out, cfg, state = write_samples(args.checkpoint, args.out, args.n, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.n} NIfTI volumes of {cfg.model} (iteration {state['iter']}) and samples.png to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from alphagan.evaluate import evaluate

    results = evaluate(
        args.real,
        args.checkpoint,
        args.out,
        n=args.n,
        pairs=args.pairs,
        n_anatomy=args.n_anatomy,
        contrast=args.contrast,
        feature_weights=args.features,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    out = Path(args.out)
    print((out / "table.md").read_text())
    print(f"real side: {results['real']['data']}")
    print(f"wrote results.json, table.md, pca.png, volumes.png and nearest.png to {out}")
    return 0


def cmd_course(args: argparse.Namespace) -> int:
    from alphagan.course.runner import run_course

    return run_course(
        profile=args.profile, only=args.only, out=args.out, minutes=args.minutes, overwrite=args.overwrite
    )


def cmd_results(args: argparse.Namespace) -> int:
    from alphagan.course.runner import publish

    print(f"wrote {publish(args.run, args.out)} from {args.run}")
    return 0


def _number(text: str, kind: type = int) -> Any:
    """`text` as an int (or `kind`); where it is not one, an argparse error in words rather than a function's name."""
    try:
        return kind(text)
    except ValueError:
        what = {int: "a whole number", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _at_least(low: int):
    """An argparse type: a whole number of at least `low`, refused when the arguments are parsed."""

    def parse(text: str) -> int:
        value = _number(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _workers(text: str) -> int:
    """An argparse type: processes, from 1 to this machine's cores (each holds its own libraries and volumes)."""
    value, cores = _number(text), os.cpu_count() or 1
    if not 1 <= value <= cores:
        raise argparse.ArgumentTypeError(f"must be from 1 to {cores} (this machine's cores), got {value}")
    return value


_positive = _at_least(1)


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _setting(name: str):
    """An argparse type for the Config field `name`: its type, then its rule (`config.check`)."""
    kind = type(getattr(Config(), name))

    def parse(text: str):
        try:
            return check(name, _number(text, kind))
        except SettingError as exc:
            raise argparse.ArgumentTypeError(exc.rule) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alphagan", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic cohort of brain volumes (NIfTI + participants.tsv)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=_positive, required=True)
    p.add_argument("--size", type=_size, default=64, help="edge of the cube, or 1mm for the template's grid")
    p.add_argument("--kind", choices=KINDS, default="normal")
    p.add_argument("--contrast", choices=CONTRASTS, default="t1")
    p.add_argument("--seed", type=_setting("seed"), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synth's cohort in --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="preprocess NIfTI/MGH volumes into a training cache")
    p.add_argument("--src", required=True, help="a folder or a glob pattern")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--size", type=_setting("size"), default=64, help=f"edge of the training cube: {', '.join(map(str, SIZES))}"
    )
    p.add_argument("--layout", default="auto", choices=LAYOUTS)
    p.add_argument("--modality", default=None, help="e.g. t1, t2, flair (layout-dependent)")
    p.add_argument("--stretch", action="store_true", help="resize each axis to the cube (the authors' way)")
    p.add_argument("--workers", type=_workers, default=None, help="processes; default: one per core")
    p.add_argument("--overwrite", action="store_true", help="replace a cache prepared with other settings")
    p.add_argument(
        "--allow-generated", action="store_true", help="take volumes a model generated (refused: not training data)"
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    p.add_argument(
        "--data", default=None, help="a prepared cache folder, or synth[:kind[:contrast]]; with --resume: the run's"
    )
    p.add_argument("--out", required=True, help="the run folder: config.json, metrics.jsonl, checkpoints, samples")
    p.add_argument("--model", choices=MODELS, default=None, help="default: alpha-wgan-gp (with --resume: the run's)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: gpu on a CUDA GPU, else cpu")
    for name, text in TRAIN_SETTINGS.items():  # each typed like its Config field and checked by its rule
        p.add_argument(
            f"--{name.replace('_', '-')}", type=_setting(name), default=None, help=f"{text}; default: the profile's"
        )
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out, with the run's own settings unless --profile or flags",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run already in --out (its own files only) and start again"
    )
    p.add_argument(
        "--init",
        default=None,
        help="start the networks from this checkpoint's weights (a ckpt_*.pt file or a run folder)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate volumes from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt file, or a run folder: its newest checkpoint")
    p.add_argument("--n", type=_positive, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_setting("seed"), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace earlier samples in --out")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="the paper's Table 1 and Fig. 3 (and more) for trained models")
    p.add_argument("--real", required=True, help="a held-out prepared cache, or synth[:kind[:contrast]]")
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a ckpt_*.pt file or a run folder; repeat for several models",
    )
    p.add_argument("--out", required=True)
    for key, what in (
        ("n", "real and generated volumes per model"),
        ("pairs", "random pairs for MS-SSIM"),
        ("n_anatomy", "volumes segmented per model"),
    ):
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=_at_least(EVALUATE_LEAST[key]), default=EVALUATE_DEFAULTS[key], help=what)
    p.add_argument(
        "--contrast",
        choices=CONTRASTS,
        default=None,
        help="of the real side; default: a synthetic --real's own, else t1",
    )
    p.add_argument("--features", default=None, help="MedicalNet-style 3D ResNet-10 weights for a Fréchet distance")
    p.add_argument("--seed", type=_setting("seed"), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("course", help="run the notebooks in order into a run folder")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: gpu on a CUDA GPU, else cpu")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,03")
    p.add_argument("--out", default=None, help="default: runs/course-<profile>-<time>")
    p.add_argument(
        "--minutes", type=_positive_float, default=None,
        help="scale the training iterations of notebooks 03-06 to this many minutes on this machine",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an earlier course run with other settings")
    p.set_defaults(func=cmd_course)

    p = sub.add_parser("results", help="write a course run's summary.md as a docs page (e.g. docs/results.md)")
    p.add_argument("run", help="the folder of a finished course run")
    p.add_argument("--out", default="docs/results.md")
    p.set_defaults(func=cmd_results)
    return parser


class Stop:
    """While a command runs, a SIGTERM (Slurm's preemption, `timeout`, a closed session) stops it as Ctrl-C does,
    with the same one line; `by` and `status` (the shell's, 128 + the signal) say which stopped it."""

    def __init__(self) -> None:
        self.by, self.status, self._before = "Ctrl-C", 128 + signal.SIGINT, None

    def _terminated(self, signum: int, frame: object) -> None:
        self.by, self.status = "SIGTERM", 128 + signal.SIGTERM
        raise KeyboardInterrupt

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():  # only there may a handler be set
            self._before = signal.signal(signal.SIGTERM, self._terminated)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            signal.signal(signal.SIGTERM, self._before)


# What a command leaves when stopped, unless it says more (`train`, `course`): its outputs are written out of sight
# and moved into place whole (`alphagan.folders`), and the next run cleans what a stopped one left.
STOPPED = "what it had finished before is kept and nothing half-written is left; run the same command again"


def _one_line(command: str):
    """A `warnings.showwarning` that says a warning as the commands say everything, `alphagan <command>: ...`, on
    its own line above any progress bar."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        tqdm.write(f"alphagan {command}: {message}", file=sys.stderr)

    return show


def _unrecognized(argv: list[str], extra: list[str]) -> str:
    """argparse's words for arguments that no option takes; for paths after an option, what most often put them
    there: a pattern the shell expanded, or several values for an option given once per value."""
    from alphagan.folders import shown_names

    text = f"unrecognized arguments: {shown_names(extra)}"
    start = argv.index(extra[0])
    option = next((a for a in reversed(argv[:start]) if a.startswith("-")), None)
    if option is not None and any(Path(e).exists() for e in extra if not e.startswith("-")):
        if option == "--checkpoint":  # evaluate's repeats
            text += "; give --checkpoint once for each model (--checkpoint A --checkpoint B)"
        else:
            text += f"; {option} takes one path: quote a pattern so the shell passes it whole ({option} 'x/*.nii')"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run one command. An ordinary failure (a missing or damaged file, a bad setting, a full disk) is one line,
    `alphagan <command>: <what and where>: <how to fix>`, and exit status 1; `--debug` shows the traceback. An
    error no check foresaw is one line too, naming itself a bug."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(_unrecognized(argv, extra))
    stop = Stop()
    try:
        with warnings.catch_warnings(), stop:
            if not args.debug:
                warnings.showwarning = _one_line(args.command)
            return args.func(args)
    except KeyboardInterrupt as exc:  # a command that knows more of what it leaves says it in the exception
        print(f"alphagan {args.command}: stopped ({stop.by}); {exc.args[0] if exc.args else STOPPED}", file=sys.stderr)
        return stop.status
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        if args.debug:
            raise
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            text = f"{exc.strerror} ({exc.filename})"
        else:
            text = str(exc)
        print(f"alphagan {args.command}: {text}", file=sys.stderr)
        return 1
    except Exception as exc:  # what no check foresaw: still one line, and the way to the traceback
        if args.debug:
            raise
        print(
            f"alphagan {args.command}: unexpected {type(exc).__name__} ({exc}), a bug of alphagan; run the same "
            f"command with --debug (python -m alphagan --debug {args.command} ...) for the traceback, and report it",
            file=sys.stderr,
        )
        return 1
