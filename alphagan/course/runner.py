"""The course runner: plan the run on this machine (`plan.plan_course`), execute the notebooks in order with
papermill into one run folder, then summarise.

Each notebook gets `profile`, `run_dir` and its iterations through its `parameters` cell and writes what it
makes (figures, NIfTI files, metrics) under `run_dir`; the executed notebooks land there too. A failing notebook
stops the run with the notebook's name and the cell that failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from functools import partial
from pathlib import Path

from alphagan.checkpoint import list_checkpoints
from alphagan.course.plan import plan_course
from alphagan.course.settings import course_settings, notebook_03_run
from alphagan.device import choose_profile, machine
from alphagan.evaluate import plain
from alphagan.folders import atomic, atomic_folder, check_claim, check_writable, claim, followed
from alphagan.progress import SAVED_RUN
from alphagan.runs import checkpoints_of

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebooks(only: str | None = None, directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course's notebooks in order, or those whose number is in the comma-separated `only`."""
    found = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks in {directory}: run the course from a clone of the repository")
    if only is not None:
        given = {w.strip(): w.strip().zfill(2) for w in only.split(",") if w.strip()}
        numbers = [p.name[:2] for p in found]
        unknown = sorted(w for w, number in given.items() if number not in numbers)
        if unknown:
            raise ValueError(f"--only: no notebook numbered {', '.join(unknown)}; there are {', '.join(numbers)}")
        wanted = set(given.values())
        found = [p for p in found if p.name[:2] in wanted]
        if not found:
            raise ValueError(f"--only {only!r} names no notebook; give numbers such as 01,03")
    return found


WARM_STARTED = ("05", "06")  # the notebooks that start from notebook 03's model (`Course.warm_start`)


def check_needs(selected: list[Path], run_dir: Path, profile: str) -> None:
    """Refuse, before anything runs, a selection whose warm-started notebooks would find no model of notebook 03:
    not selected, and not in `run_dir` from an earlier call."""
    numbers = [nb.name[:2] for nb in selected]
    needing = [nb for nb in selected if nb.name[:2] in WARM_STARTED]
    if not needing or "03" in numbers or not course_settings(profile).warm_start:
        return
    if not list_checkpoints(checkpoints_of(notebook_03_run(run_dir / needing[0].stem))):
        needing = [nb.name[:2] for nb in needing]
        wanted = ",".join(sorted({"03", *numbers}))
        raise ValueError(
            f"--only {','.join(numbers)}: {_counted(needing)} from notebook 03's model, which {run_dir} does not "
            f"hold yet; add 03 (--only {wanted})"
        )


def _counted(numbers: list[str]) -> str:
    """'notebook 05 starts' or 'notebooks 05 and 06 start'."""
    return f"notebook {numbers[0]} starts" if len(numbers) == 1 else f"notebooks {' and '.join(numbers)} start"


def _failed_cell(exc: Exception, notebook: Path) -> str:
    """Where a notebook stopped, from papermill's error: the cell numbered as in `notebook` (from 1, without the
    cells papermill adds), its first line, and the error; a kernel that died names no cell."""
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(exc, PapermillExecutionError):
        return f"no cell: the kernel stopped ({type(exc).__name__}: {exc})"
    sources = ["".join(c.get("source", "")) for c in json.loads(notebook.read_text())["cells"]]
    number = next((i for i, text in enumerate(sources, 1) if text.strip() == exc.source.strip()), "?")
    first = exc.source.strip().splitlines()[:1]
    return f"cell {number} ({first[0][:60] if first else 'empty'}): {exc.ename}: {exc.evalue}"


# What a figure shows, by file name (stem, or its start for one figure per cohort).
# Keyed by the figure's path in a notebook's folder, without ".png"; "views-KIND-CONTRAST" and the like match
# their prefix, and the rest is added in brackets.
CAPTIONS = {
    "01_data/cohort_factors": "the synthetic cohort's ages, and brain, ventricle and grey-matter volumes against age",
    "01_data/young_old": "the three youngest and the three oldest subjects",
    "01_data/lesion": "a synthetic lesion, cut through its centre",
    "01_data/preprocessing_steps": "one subject through the preprocessing: RAS, trimmed, padded and resized, stretched",
    "01_data/augmentation": "one training volume and five augmented draws of it (flip, intensity)",
    "01_data/prepared": "prepared training volumes in three planes",
    "02_architecture/checkerboard": "transposed convolution against resize-convolution on the same input",
    "02_architecture/codes": "codes of an untrained encoder against N(0, I)",
    "02_architecture/untrained_sample": "an untrained generator's output",
    "03_training/loss_curves": "every loss term through training",
    "03_training/samples": "samples from random codes, generator with recalibrated statistics",
    "03_training/as_written": "spread of samples and reconstructions: the paper as written against this run",
    "pca": "real and generated volumes on the first two principal components of the real set",
    "volumes": "tissue volumes, real against generated",
    "nearest": "generated volumes beside their nearest training volumes",
    "05_diseased/views": "a real volume and generated ones, colour-mapped like the paper's Fig. 4",
    "05_diseased/lesions": "lesion sizes and centres, real against generated",
    "06_augmentation/classes": "real and generated volumes of each class",
    "06_augmentation/augmentation": "held-out accuracy, real subjects only against real plus generated",
}


def _caption(figure: Path, notebook: str) -> str:
    """The caption of `figure`, saved by `notebook` (its folder's name); evaluate's figures by their own name."""
    for key in (f"{notebook}/{figure.stem}", figure.stem):
        for known, caption in CAPTIONS.items():
            if key == known or key.startswith(f"{known}-") or key.startswith(f"{known}_"):
                detail = key[len(known) + 1 :].replace("_", " ").replace("-", " ")
                return caption + (f" ({detail})" if detail else "")
    return figure.stem.replace("_", " ")


def _number(value) -> str:
    return plain(value) if isinstance(value, float) else str(value)


def _numbers(path: Path) -> list[str]:
    """A JSON file of numbers as a two- or three-column table (one level of nesting flattened)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return [f"`{path.name}`: {data}", ""]
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += [f"| {key} | {k} | {_number(v)} |" for k, v in value.items()]
        elif isinstance(value, list):
            rows.append(f"| {key} | | {', '.join(_number(v) for v in value)} |")
        else:
            rows.append(f"| {key} | | {_number(value)} |")
    return [f"Numbers (`{path.name}`):", "", "| quantity | | value |", "|---|---|---|", *rows, ""]


def _copy_figure(run_dir: Path, staging: Path, files: Path, page_dir: Path, match: re.Match) -> str:
    """A figure link of a summary, its file copied under `staging` (what becomes `files`), the link rewritten
    relative to the page."""
    (staging / match.group(2)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / match.group(2), staging / match.group(2))
    return f"![{match.group(1)}]({(files / match.group(2)).relative_to(page_dir).as_posix()})"


RESULTS_MARK = "<!-- written by"  # the first words of a page `results` wrote, and may write again


def publish(run_dir: str | Path, out: str | Path) -> Path:
    """`python -m alphagan results`: a course run's summary.md as a page of the docs (`out`, e.g. docs/results.md),
    its figures copied beside it into `<out stem>_files/`, the command and run named at the top. Written from the
    run, so its numbers are the run's, never retyped."""
    run_dir, out = Path(run_dir), Path(out)
    out = followed(out)  # the figures go beside the page a link points to
    summary = run_dir / "summary.md"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such folder; give the folder of a finished `alphagan course` run")
    if not summary.exists():
        raise FileNotFoundError(f"{summary}: no summary; give the folder of a finished `alphagan course` run")
    if out.is_dir():
        raise ValueError(f"{out}: a folder; give the page's file name, e.g. --out {out / 'results.md'}")
    check_writable(out.parent)
    files = out.with_name(f"{out.stem}_files")
    text = summary.read_text()

    if out.exists() and not out.read_text(errors="replace").startswith(RESULTS_MARK):
        raise FileExistsError(
            f"{out}: a file that `alphagan results` did not write; it is kept: give another --out, or move it away"
        )
    if files.exists() and not out.exists():
        raise FileExistsError(
            f"{files}: there already, though {out.name} is not: another page's figures or files of your own; it is "
            f"kept: give another --out, or move it away"
        )
    with atomic_folder(files) as staging:  # the figures of this run only: those of an earlier one go with it
        body = re.sub(
            r"!\[([^\]]*)\]\(([^)]+\.png)\)", partial(_copy_figure, run_dir, staging, files, out.parent), text
        )
    head = f"{RESULTS_MARK} `python -m alphagan results {run_dir} --out {out}`; edit the run, not this page -->\n\n"
    with atomic(out) as tmp:
        tmp.write_text(head + body)
    return out


TIMINGS = "timings.json"  # each notebook's minutes and iterations, over every call into one run folder


def _record(run_dir: Path, done: dict[str, dict]) -> dict[str, dict]:
    """The notebooks run into `run_dir` so far, this call's added: a later call with other notebooks keeps the
    earlier ones in its summary."""
    path = run_dir / TIMINGS
    try:
        earlier = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # cut short by a stop: those notebooks are listed again when they run again
        earlier = {}
    merged = dict(sorted({**earlier, **done}.items()))
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=2))
    return merged


def _summary(run_dir: Path, timings: dict[str, dict], profile: str) -> Path:
    """A page a learner can read after a run: each notebook's time, the training iterations it used, then per
    notebook its numbers, its tables (Table 1 before the latent-size table; the paper's table once) and its
    figures with captions."""
    lines = [f"# Course run, profile `{profile}`", "", f"Machine: {machine()}.", ""]
    lines.append("| notebook | minutes | training iterations per model | minutes the plan predicted |")
    lines.append("|---|---|---|---|")
    for name, done in timings.items():
        iters, predicted = done["iters"], done.get("predicted_minutes")
        shown = "" if predicted is None else f"{predicted:.1f}"
        lines.append(f"| {name} | {done['seconds'] / 60:.1f} | {'' if iters is None else iters} | {shown} |")
    paper_shown = False
    for name in timings:
        stem = Path(name).stem
        folder = run_dir / stem
        lines += ["", f"## {stem}", ""]
        for key_file in sorted(folder.glob("*.json")):
            lines += _numbers(key_file)
        tables = sorted([*folder.glob("*.md"), *folder.glob("*/table.md")], key=lambda t: t.parent.name != "table1")
        for table in tables:
            text = table.read_text().strip()
            mark = "The paper's Table 1"
            if mark in text:
                text = text if not paper_shown else text[: text.index(mark)].strip()
                paper_shown = True
            title = "Table 1" if table.parent.name == "table1" else f"`{table.relative_to(run_dir)}`"
            lines += [f"**{title}**", "", text, ""]
        evaluated = [*sorted(folder.glob("table1/*.png")), *sorted(folder.glob("latent/*.png"))]
        for figure in [*sorted(folder.glob("*.png")), *evaluated]:
            where = figure.relative_to(run_dir)
            lines += [f"![{where}]({where})", "", f"*{_caption(figure, folder.name)}* (`{where}`)", ""]
    path = run_dir / "summary.md"
    with atomic(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _execute(notebook: Path, executed: Path, parameters: dict) -> None:
    """Run one notebook with papermill, its parameters injected, into `executed`."""
    import papermill

    papermill.execute_notebook(
        str(notebook),
        str(executed),
        cwd=str(notebook.parent),
        # Cell i/N, elapsed time and an estimate, so that a long notebook does not look hung.
        progress_bar={"desc": f"{notebook.stem} cells", "unit": "cell", "file": sys.stderr},
        parameters=parameters,
        # The kernel talks to us on 127.0.0.1 only; its start-up warning about unencrypted TCP is noise here, and
        # errors still reach the executed notebook and this runner.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
        # Ended at once when the notebook is done or stopped: a kernel asked to shut down while Ctrl-C stops a cell
        # prints its own traceback (a closed socket) into our output.
        shutdown_kernel="immediate",
    )


def run_course(
    profile: str | None = None,
    only: str | None = None,
    out: str | Path | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    minutes: float | None = None,
    overwrite: bool = False,
) -> int:
    """Plan, then run the notebooks; 0 when all ran, 1 with a message naming the notebook and cell otherwise.
    `minutes`: the training budget the notebooks' iterations are scaled to (see `plan_course`). The run folder
    is claimed (`alphagan.folders.claim`): a later call with the same profile and budget adds or reruns
    notebooks there; other settings need `overwrite`."""
    profile, why = choose_profile(profile)
    selected = notebooks(only, notebook_dir)  # checked before anything is created
    run_dir = Path(out) if out else Path("runs") / f"course-{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    writes = [name for nb in selected for name in (nb.name, nb.stem)] + ["summary.md", TIMINGS]
    settings = {"profile": profile, "minutes": minutes}
    check_claim(run_dir, "course", settings, overwrite=overwrite)  # before minutes of timing
    check_writable(run_dir)
    check_needs(selected, followed(run_dir), profile)
    print(f"course: profile {profile} ({why}); timing a few iterations of each model on this machine", flush=True)
    plan = plan_course(profile, minutes, only=[nb.name[:2] for nb in selected])  # refused before anything is made
    budget = f" scaled to {minutes:g} training minutes" if minutes else ""
    print(f"course plan{budget}:\n{plan.table()}", flush=True)
    with claim(run_dir, "course", settings, writes, overwrite=overwrite) as owned:
        run_dir = owned.folder.resolve()
        os.environ[SAVED_RUN] = "1"  # the kernels inherit it: text progress bars and static figures, saved at the end
        print(f"course: profile {profile}, {len(selected)} notebooks, run folder {run_dir}", flush=True)
        for i, notebook in enumerate(selected, 1):
            print(f"[{i}/{len(selected)}] {notebook.name}", flush=True)
            start = time.perf_counter()
            parameters = {"profile": profile, "run_dir": str(run_dir / notebook.stem)}
            parameters.update(plan.parameters(notebook.name[:2]) if minutes else {})
            try:
                _execute(notebook, run_dir / notebook.name, parameters)
            except KeyboardInterrupt:  # said by the command line, in its one line
                rest = ",".join(nb.name[:2] for nb in selected[i - 1 :])
                raise KeyboardInterrupt(
                    f"{notebook.name} was running (its partial output: {run_dir / notebook.name}), the notebooks "
                    f"before it are done; go on with the same command and --only {rest}"
                ) from None
            except Exception as exc:  # papermill raises PapermillExecutionError; a kernel may also die
                print(f"[{i}/{len(selected)}] {notebook.name} FAILED", flush=True)
                where = _failed_cell(exc, notebook)
                print(f"course: {notebook.name} failed at {where}\n  executed notebook: {run_dir / notebook.name}",
                      file=sys.stderr)  # fmt: skip
                return 1
            seconds = time.perf_counter() - start
            number = notebook.name[:2]
            done = {"seconds": seconds, "iters": plan.iters(number), "training_minutes": plan.minutes(number)}
            done["predicted_minutes"] = plan.predicted(number)
            timings = _record(run_dir, {notebook.name: done})
            print(f"[{i}/{len(selected)}] {notebook.name} done in {seconds / 60:.1f} min", flush=True)
        summary = _summary(run_dir, timings, profile)
    print(f"course: all {len(selected)} notebooks ran; summary: {summary}")
    return 0
