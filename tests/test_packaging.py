"""The repository's promises: pip and conda install the same things, README's two commands, CI runs the tests."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # conda-forge spells these differently


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for items in project["optional-dependencies"].values():
        reqs += [r for r in items if not r.startswith("alphagan")]
    return {CONDA_NAMES.get(_name(r), _name(r)): r[len(_name(r)) :].strip() for r in reqs}


def test_environment_yml_installs_what_pyproject_does():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    pip = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            conda[_name(dep)] = dep[len(_name(dep)) :].strip()
    conda.pop("python")
    conda.pop("pip")
    assert conda == _pyproject_requirements()  # same packages, same version bounds
    assert pip == ["-e ."]  # and the course itself from this checkout


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    course, tests = blocks[0].strip(), blocks[1].strip()
    assert "python -m alphagan course" in course
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the CI script must run exactly the README's test command"
    assert readme.index(course) < readme.index("## ")  # before any other section
