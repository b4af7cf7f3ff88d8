"""The repository's address lives in one place, _config.yml's ``repository.url`` (the launch buttons read
it); every other mention (the chapters' Colab/Binder set-up cell, CONTRIBUTING.md) must agree with it."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
MENTION = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+")


def _setup_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_every_chapter_installs_bnlib_from_the_configured_repository():
    for notebook in sorted((ROOT / "book").glob("*.ipynb")):
        found = set(MENTION.findall(_setup_cell(notebook)))
        assert found == {URL}, f"{notebook.name}: setup cell names {found or 'no repository'}, not {URL}"


def test_no_other_address_of_the_repository_is_written_down():
    for path in [ROOT / "CONTRIBUTING.md", ROOT / "README.md", *sorted((ROOT / ".github").rglob("*.yml"))]:
        others = {u for u in MENTION.findall(path.read_text()) if "bnlib" in u and u != URL}
        assert not others, f"{path.name} names {others}, not {URL}"
