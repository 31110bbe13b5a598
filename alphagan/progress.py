"""Output that survives being saved: widgets in a live notebook, text and figures under the course runner.

A widget saved by papermill keeps only its first state (a progress bar at 0 %, a slice viewer's text repr), so
`python -m alphagan course` sets ALPHAGAN_SAVED_RUN for its kernels: every progress bar of the package is then
text, whose last line is saved, and the slice viewer draws static figures.
"""

from __future__ import annotations

import os
from typing import Any

SAVED_RUN = "ALPHAGAN_SAVED_RUN"


def saved_run() -> bool:
    """True where the output is saved to be read later (the course runner), not watched live."""
    return bool(os.environ.get(SAVED_RUN))


def tqdm(*args: Any, **kwargs: Any):
    """tqdm.auto's bar, or tqdm's text bar in a saved run, redrawn every 10 s at most: each redraw is one more
    output saved in the notebook."""
    if saved_run():
        from tqdm.std import tqdm as bar

        kwargs.setdefault("mininterval", 10.0)
    else:
        from tqdm.auto import tqdm as bar
    return bar(*args, **kwargs)
