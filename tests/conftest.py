import os
import shutil
import tempfile

import matplotlib
import pytest

matplotlib.use("Agg")
# Two cores: keep torch from oversubscribing when tests run beside notebook kernels.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Synthetic cohorts are cached once per test session (and shared with the notebooks' kernels), never in ~/.cache.
os.environ["ALPHAGAN_CACHE"] = SESSION_CACHE = tempfile.mkdtemp(prefix="alphagan-cache-")


def pytest_unconfigure(config):
    """Remove the session's cache: each test run used to leave 8 MB in the temporary folder."""
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory):
    """A small synthetic cohort at 32^3, written once for the whole session."""
    from alphagan.data.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), 6, size=32, seed=3, progress=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Make each phase's report available to fixtures as item.rep_setup / rep_call / rep_teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
