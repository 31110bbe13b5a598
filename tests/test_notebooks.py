"""The notebooks: their anatomy, and every one of them run end to end by the course runner (smoke profile)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from alphagan.course.runner import notebooks, run_course
from alphagan.course.settings import Profile

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = notebooks()
BADGE = "https://colab.research.google.com/github/alphagan-course/alphagan/blob/main/notebooks/{name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_anatomy(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = nb.cells
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c.cell_type == "code"), (
        "commit notebooks without outputs"
    )
    first = cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]} · ")
    assert BADGE.format(name=path.name) in first.source
    assert "What you will learn" in first.source
    assert "google.colab" in cells[1].source and "pip" in cells[1].source  # Colab-only install
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "profile = " in tagged[0].source and "run_dir = " in tagged[0].source
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert "device_banner(" in code  # says what it will do on this device
    # The hardware chooses the profile unless the user (or the course runner) names one, and the banner says why.
    assert re.search(r"^profile = None\b", tagged[0].source, re.M) and "profile, why = choose_profile(profile)" in code
    last = cells[-1].source
    assert "What you learned" in last
    later = [p for p in NOTEBOOKS if p.name > path.name]
    if later:
        assert f"({later[0].name})" in last, "ends with a link to the next notebook"


def _prose_words(markdown: str) -> int:
    """Words of prose: formulas, the Colab badge and link targets left out."""
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$", " ", markdown, flags=re.S)
    text = re.sub(r"\[!\[.*?\]\(.*?\)\]\(.*?\)|\]\([^)]*\)", " ", text)
    return len(re.findall(r"[A-Za-z0-9α-ωΑ-Ω][\w'’-]*", text))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_keep_to_five_words_of_prose_per_line_of_code(path):
    cells = nbformat.read(path, as_version=4).cells
    words = sum(_prose_words(c.source) for c in cells if c.cell_type == "markdown")
    code = [line for c in cells if c.cell_type == "code" for line in c.source.splitlines()]
    lines = [line for line in code if line.strip() and not line.strip().startswith("#")]
    assert words <= 5 * len(lines), f"{words} words for {len(lines)} lines of code"


@pytest.mark.notebook
def test_course_runs_every_notebook_in_the_smoke_profile(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "alphagan", "course", "--profile", "smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    for path in NOTEBOOKS:
        executed = nbformat.read(tmp_path / path.name, as_version=4)
        assert executed.metadata["papermill"]["parameters"]["profile"] == "smoke"
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert (tmp_path / path.stem).is_dir()
        assert f"{path.name} done in" in run.stdout and f"{path.stem} cells: 100%" in run.stderr
    # Progress bars are saved as text in their final state, not as widgets frozen at 0 %.
    training = nbformat.read(tmp_path / "03_training.ipynb", as_version=4)
    outputs = [o for c in training.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("alpha-wgan-gp: 100%|" in o.get("text", "") for o in outputs)
    summary = (tmp_path / "summary.md").read_text()
    assert all(p.stem in summary for p in NOTEBOOKS) and "![" in summary
    assert "| real (held out) |" in summary  # notebook 04's Table 1
    assert "augmentation.json" in summary and "lesions.json" in summary  # the numbers of 05 and 06
    assert summary.count("The paper's Table 1") == 1 and summary.index("**Table 1**") < summary.index("latent/table")
    assert "e+" not in summary and "0.48750001" not in summary
    for image in re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", summary):  # each image named by its own path, captioned
        assert image[0] == image[1] and (tmp_path / image[1]).exists()
    captions = [line for line in summary.splitlines() if line.startswith("*") and line.endswith("`)")]
    assert len(captions) == summary.count("![")
    assert not list(ROOT.glob("notebooks/runs")), "notebooks must write under run_dir only"
    # The runs the notebooks trained are the ones the course's plan times (`Profile.runs`): one list, not two.
    trained = []
    for config in tmp_path.glob("0[3-6]_*/**/config.json"):
        if config.parent.name != "resumed":  # 03's resume demonstration continues its run
            c = json.loads(config.read_text())
            trained.append((c["model"], c["latent"], c["iters"], "init" not in c))
    runs = [r for rs in Profile.of("smoke").runs().values() for r in rs]
    assert sorted(trained) == sorted((r.model, r.latent, r.iters, r.from_scratch) for r in runs)
    # No widget is saved (progress bars are text, see above); 01's slice viewer shows its three-plane figure.
    data = nbformat.read(tmp_path / "01_data.ipynb", as_version=4)
    viewer = next(c for c in data.cells if "slice_viewer(" in c.source)
    assert [o for o in viewer.outputs if "image/png" in o.get("data", {})]
    assert not [o for o in viewer.outputs if "VBox(" in o.get("data", {}).get("text/plain", "")]
    for path in NOTEBOOKS:
        executed = nbformat.read(tmp_path / path.name, as_version=4)
        code = [c for c in executed.cells if c.cell_type == "code"]
        widget = "application/vnd.jupyter.widget-view+json"
        assert not [o for c in code for o in c.outputs if widget in o.get("data", {})], path.name
        outputs = "\n".join(_output_text(c) for c in code)
        for cell in executed.cells:
            if cell.cell_type == "markdown":
                for number in stated_numbers(cell.source):
                    assert number in CONSTANTS or number in outputs, f"{path.name} states {number}; no output shows it"


# Numbers a notebook's text may state without an output showing them: settings of the method, not results.
CONSTANTS = {"99.5", "0.7", "0.2", "1.0"}  # the normalisation percentile, U(0.7, 1), LeakyReLU(0.2), MS-SSIM's 1.0


def stated_numbers(markdown: str) -> list[str]:
    """The numbers a text states as results: decimals and percentages outside formulas, code and links."""
    prose = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|```.*?```|`[^`]*`|\]\([^)]*\)", " ", markdown, flags=re.S)
    return re.findall(r"(?<![\w.])\d+\.\d+|\d+(?:\.\d+)?(?=\s?%)", prose)


def _output_text(cell) -> str:
    return "\n".join(
        str(o.get("text", "")) + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
        for o in cell.get("outputs", [])
    )


def test_stated_numbers_are_found_where_a_text_states_a_result():
    text = "Scores 0.925 against 0.865 ($\\lambda = 0.5$, `lr 2e-4`), 12 % too large; see [a](b_0.3.md); 64³, eq. 1–3."
    assert stated_numbers(text) == ["0.925", "0.865", "12"]


def test_a_failing_notebook_is_named_with_its_cell(tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'x'\nrun_dir = 'y'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('the data folder is empty')"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_broken.ipynb")
    assert run_course(profile="smoke", out=tmp_path / "run", notebook_dir=folder) == 1
    err = capsys.readouterr().err
    # Numbered as in the source notebook (from 1), not counting the cell papermill injects after the parameters.
    assert "01_broken.ipynb failed at cell 3 (raise ValueError" in err
    assert "ValueError: the data folder is empty" in err


def test_only_selects_notebooks():
    assert [p.name[:2] for p in notebooks("01,3")] == ["01", "03"]
    with pytest.raises(ValueError, match="no notebook numbered 99, a; there are 01, 02, 03, 04, 05, 06"):
        notebooks("99,3,a")  # named as given


def test_notebook_json_is_stable():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        ids = [c.get("id") for c in nb["cells"]]
        assert all(ids) and len(set(ids)) == len(ids), path  # nbformat 4.5: every cell has its own id


def test_figures_are_captioned_by_the_notebook_that_saved_them():
    from alphagan.course.runner import _caption

    assert _caption(Path("augmentation.png"), "01_data").startswith("one training volume and five augmented")
    assert _caption(Path("augmentation.png"), "06_augmentation").startswith("held-out accuracy")
    assert _caption(Path("views-tumor-flair.png"), "05_diseased").endswith("Fig. 4 (tumor flair)")
    assert _caption(Path("lesion_stroke_t1.png"), "01_data") == "a synthetic lesion, cut through its centre (stroke t1)"
    assert _caption(Path("pca.png"), "04_evaluation").startswith("real and generated volumes on the first two")
