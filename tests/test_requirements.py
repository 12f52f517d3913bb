"""requirements.txt's floors are versions the suite runs on: every requirement is met by
what is installed here, so a floor above the tested versions fails this run, and CI (which
installs the newest releases the ranges allow) checks the ranges are installable.

    pytest tests/test_requirements.py
"""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def requirements(name: str) -> list[Requirement]:
    lines = (REPO / name).read_text().splitlines()
    return [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_installed_versions_meet_the_requirements(name):
    unmet = []
    for req in requirements(name):
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            unmet.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{req.name} {installed} does not meet {req.specifier}")
    assert not unmet, f"{name}: " + "; ".join(unmet)


def test_the_readme_names_the_tested_versions_and_they_meet_the_floors():
    """The README's table of tested versions is what the floors are: each floor at most the
    tested version, and the libraries training needs listed."""
    section = re.search(r"^### Tested versions\n(.*?)(?=^#|^\*\*|\Z)", (REPO / "README.md").read_text(), re.S | re.M)
    assert section, "README.md has no '### Tested versions' section"
    tested = dict(re.findall(r"^\| (\S+) \| (\d[\w.+]*) \|$", section.group(1), re.M))
    floors = {r.name: r for r in requirements("requirements.txt")}
    for name in ["torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "jsonargparse"]:
        assert name in tested, f"README's tested versions do not name {name}"
        assert floors[name].specifier.contains(tested[name], prereleases=True), (name, tested[name])
