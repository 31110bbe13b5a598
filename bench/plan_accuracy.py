"""How well the course's plan predicts each notebook's minutes: run the course, then compare, notebook by notebook.

    python bench/plan_accuracy.py --profile smoke
    python bench/plan_accuracy.py --profile cpu --only 01,02

Prints per notebook: the minutes it took, the training minutes the plan predicted, the rest (what it took minus
that training) in units of the plan's probe (`course.plan.probe_seconds`, measured here before the run: what
`course.plan.OTHER_WORK` holds), and the plan's prediction in all with its error. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from alphagan.course.plan import probe_seconds
from alphagan.course.runner import TIMINGS, run_course
from alphagan.device import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers")
    args = parser.parse_args()
    probe = probe_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        if run_course(args.profile, args.only, out=Path(tmp) / "run") != 0:
            raise SystemExit("the course failed; see above")
        timings = json.loads((Path(tmp) / "run" / TIMINGS).read_text())
    print(f"\n{machine()}; profile {args.profile}; probe {probe:.2f} s\n")
    print("| notebook | minutes | predicted | error | rest in probe units |")
    print("|---|---:|---:|---:|---:|")
    for name, done in timings.items():
        measured, predicted = done["seconds"] / 60, done["predicted_minutes"]
        error = "" if predicted is None else f"{(predicted - measured) / measured:+.0%}"
        shown = "" if predicted is None else f"{predicted:.2f}"
        training = done.get("training_minutes", 0.0)
        print(f"| {name} | {measured:.2f} | {shown} | {error} | {(measured - training) * 60 / probe:.2f} |")
    total = sum(d["seconds"] for d in timings.values()) / 60
    predicted = [d["predicted_minutes"] for d in timings.values()]
    if None not in predicted:
        print(f"| all | {total:.2f} | {sum(predicted):.2f} | {(sum(predicted) - total) / total:+.0%} | |")


if __name__ == "__main__":
    main()
