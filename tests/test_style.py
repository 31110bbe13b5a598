"""The code base stays ruff clean (lint rules in pyproject.toml), notebooks included."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    run = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:]


def _tracked_text_files():
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    return [ROOT / f for f in listed if f.endswith((".py", ".md", ".ipynb", ".toml", ".yml"))]


def test_the_project_explains_itself_and_cites_no_file_outside_it():
    import re

    files = _tracked_text_files()
    assert files, "git ls-files listed nothing"
    for path in files:
        text = path.read_text()
        assert "SPEC" + ".md" not in text, path  # a reference spec kept outside the repository
        if path.suffix not in (".md", ".ipynb"):
            continue
        # Relative Markdown links point at files that exist.
        for target in re.findall(r"\]\(((?!https?:|#)[^)\s]+?)(?:#[^)]*)?\)", text):
            assert (path.parent / target).exists(), (path, target)
