"""The course fits the machine: the runner's plan, `--minutes` scaling, the floor, and what reaches the notebooks."""

from pathlib import Path

import pytest

from alphagan.cli import main
from alphagan.config import make_config
from alphagan.course import plan as course_plan
from alphagan.course.settings import Profile, course_settings


def test_the_plan_lists_every_training_run_the_notebooks_make():
    profile = Profile.of("cpu")
    runs, cfg, settings = profile.runs(), profile.config, profile.course
    assert cfg == make_config("cpu") and settings == course_settings("cpu")
    assert [len(runs[nb]) for nb in ("03", "04", "05", "06")] == [2, 5, 3, 2]  # 04: 3 baselines + z100, z2048
    assert {(r.model, r.latent) for r in runs["04"]} == {
        ("alpha-gan", 1000), ("wgan-gp", 1000), ("vae-gan", 1000), ("alpha-wgan-gp", 100), ("alpha-wgan-gp", 2048)
    }  # fmt: skip
    assert runs["03"][0].iters == runs["04"][0].iters == cfg.iters
    assert [r.as_written for r in runs["03"]] == [False, True]  # the paper as written: lambda_rec 10
    assert runs["05"][0].iters == settings.diseased_iters and not runs["05"][0].from_scratch  # fine-tuned


@pytest.fixture
def half_a_second(monkeypatch):
    """Every iteration costs 0.5 s: the plan's arithmetic without timing anything."""
    monkeypatch.setattr(course_plan, "seconds_per_iteration", lambda profile, model, latent, as_written=False: 0.5)
    monkeypatch.setattr(course_plan, "probe_seconds", lambda: 2.0)


def test_minutes_scale_every_notebooks_iterations(half_a_second):
    plan = course_plan.plan_course("cpu")
    iterations = 2 * 1000 + 5 * 1000 + 3 * 200 + 2 * 200
    assert sum(plan.minutes(nb) for nb in plan.runs) == pytest.approx(iterations * 0.5 / 60)
    scaled = course_plan.plan_course("cpu", minutes=100)
    factor = 100 / (iterations * 0.5 / 60)
    assert scaled.iters("03") == scaled.iters("04") == int(1000 * factor)  # 04 still reuses 03's run
    assert scaled.iters("05") == int(200 * factor)
    assert sum(scaled.minutes(nb) for nb in scaled.runs) == pytest.approx(100, rel=0.01)
    assert scaled.parameters("03") == {"iters": int(1000 * factor), "compare_iters": int(1000 * factor)}


def test_the_plan_predicts_whole_notebooks_where_their_other_work_was_measured(half_a_second, monkeypatch):
    monkeypatch.setitem(course_plan.OTHER_WORK, "cpu", {"01": 3.0, "03": 10.0})
    plan = course_plan.plan_course("cpu", only=["01", "02", "03"])
    assert plan.predicted("01") == pytest.approx(3.0 * 2.0 / 60)  # no training: the probe's units only
    assert plan.predicted("03") == pytest.approx(2 * 1000 * 0.5 / 60 + 10.0 * 2.0 / 60)
    assert plan.predicted("02") is None  # never measured: training only, and the table says so
    table = plan.table()
    assert "| 02 | 0 |  | 0.0 | not measured at this profile |" in table
    assert table.splitlines()[-1] == "| all | 2 | | 16.7 | not measured at this profile |"


def test_below_the_floor_the_runner_refuses_and_says_how_many_minutes_would_do(half_a_second, capsys):
    assert main(["course", "--profile", "cpu", "--minutes", "10", "--only", "03,04"]) == 1
    err = capsys.readouterr().err
    # 03 and 04: 7 runs of 1000 iterations at 0.5 s = 58.3 minutes; the floor of 800 needs 0.8 of them.
    assert "below the cpu profile's floor of 800" in err and "give --minutes 47 or more" in err
    with pytest.raises(SystemExit):
        main(["course", "--minutes", "0"])


def test_the_scaled_iterations_reach_the_notebooks_and_the_summary(half_a_second, monkeypatch, tmp_path):
    import papermill

    seen = {}
    monkeypatch.setattr(
        papermill, "execute_notebook", lambda src, dst, **kw: seen.update({Path(src).name[:2]: kw["parameters"]})
    )
    assert main(["course", "--profile", "cpu", "--minutes", "100", "--only", "02,03,04", "--out", str(tmp_path)]) == 0
    iters = course_plan.plan_course("cpu", minutes=100, only=["02", "03", "04"]).iters("03")
    assert seen["03"]["iters"] == seen["03"]["compare_iters"] == seen["04"]["iters"] == iters
    assert "iters" not in seen["02"]  # trains nothing
    summary = (tmp_path / "summary.md").read_text()
    assert f"| 03_training.ipynb | 0.0 | {iters} |" in summary


def test_timing_runs_the_models_real_updates():
    # No speed is asserted (no timed tests): the timing runs the model's updates and returns a positive number.
    for model, as_written in (("wgan-gp", False), ("alpha-wgan-gp", True)):
        assert 0 < course_plan.seconds_per_iteration("smoke", model, 16, as_written) < float("inf")


def test_results_page_is_written_from_a_runs_summary_with_its_figures(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "03_training").mkdir(parents=True)
    (run / "03_training" / "samples.png").write_bytes(b"\x89PNG figure")
    summary = "# Course run\n\n| 03 | 9.2 |\n\n![03_training/samples.png](03_training/samples.png)\n"
    (run / "summary.md").write_text(summary)
    out = tmp_path / "docs" / "results.md"
    assert main(["results", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "| 03 | 9.2 |" in page and "![03_training/samples.png](results_files/03_training/samples.png)" in page
    assert (tmp_path / "docs" / "results_files" / "03_training" / "samples.png").read_bytes() == b"\x89PNG figure"
    assert page.startswith("<!-- written by `python -m alphagan results")
    assert main(["results", str(tmp_path / "nothing"), "--out", str(out)]) == 1  # no summary: one line
    assert f"{tmp_path / 'nothing'}: no such folder; give the folder of a finished" in capsys.readouterr().err
    assert main(["results", str(tmp_path / "docs"), "--out", str(out)]) == 1
    assert f"{tmp_path / 'docs' / 'summary.md'}: no summary" in capsys.readouterr().err
