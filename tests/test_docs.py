"""Every Python example of the README and of docs/ runs, so the docs cannot rot: the blocks of one file
run in order, in one namespace, in a fresh folder (the examples write their files there)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_every_page_is_collected_and_linked():
    readme = (ROOT / "README.md").read_text()
    assert len(PAGES) >= 6
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"the README does not link {page.name}"
    assert len(readme.splitlines()) <= 150


IN_THEIR_OWN_TESTS = {"sharding.md": "tests/test_sharding.py runs it in its Ray cluster"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p) and p.name not in IN_THEIR_OWN_TESTS], ids=lambda p: p.name
)
def test_the_examples_run(page, tmp_path):
    run_examples(page, tmp_path)


def run_examples(page: Path, folder: Path) -> None:
    """The Python blocks of ``page``, in order, in one namespace, in ``folder``."""
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    here = os.getcwd()
    os.chdir(folder)
    try:
        for index, block in enumerate(python_blocks(page)):
            exec(compile(block, f"{page.name}, python block {index + 1}", "exec"), namespace)
    finally:
        os.chdir(here)
