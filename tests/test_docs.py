"""Every Python example of the README and of docs/ runs, so the docs cannot rot: the blocks of one file
run in order, in one namespace, in a fresh folder (the examples write their files there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import python_blocks, run_examples

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
