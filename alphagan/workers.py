"""The worker processes of the work that runs on all cores (`prepare`, the synthetic cohorts), made one way: a
worker ignores Ctrl-C, which its parent alone handles, and ends when its parent does; a parent that stops (Ctrl-C,
a SIGTERM, an error) cancels the work not yet started instead of waiting for all of it. A terminal's Ctrl-C reaches
every process of a command at once: a worker that died of it would leave its parent waiting forever."""

from __future__ import annotations

import contextlib
import ctypes
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing.context import BaseContext


def end_with_parent() -> None:
    """Make this (worker) process end when its parent does, killed or not, instead of waiting forever on a
    queue nobody reads (Linux; elsewhere the pool's own shutdown is all there is)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _start(initializer: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's way of stopping (`cli.Stop`): a worker ends
    end_with_parent()
    if initializer is not None:
        initializer()


@contextlib.contextmanager
def worker_pool(
    workers: int, initializer: Callable[[], None] | None = None, context: BaseContext | None = None
) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool of `workers` (None for one: the caller then works in its own process), shut down when the
    block ends: after the work is done, or at once, its queued work cancelled, when the block is left by an
    exception (Ctrl-C included)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, context, initializer=partial(_start, initializer))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
