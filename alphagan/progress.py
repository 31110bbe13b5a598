"""Progress bars that survive being saved: widgets in a live notebook, plain text under the course runner.

A widget bar saved by papermill keeps only its first state (0 %), so `python -m alphagan course` sets
ALPHAGAN_TEXT_PROGRESS for its kernels and every bar of the package is then text, whose last line is saved.
"""

from __future__ import annotations

import os
from typing import Any

TEXT_PROGRESS = "ALPHAGAN_TEXT_PROGRESS"


def tqdm(*args: Any, **kwargs: Any):
    """tqdm.auto's bar, or tqdm's text bar where TEXT_PROGRESS is set."""
    if os.environ.get(TEXT_PROGRESS):
        from tqdm.std import tqdm as bar
    else:
        from tqdm.auto import tqdm as bar
    return bar(*args, **kwargs)
