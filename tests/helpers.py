"""Shared test helpers: the CLI in-process (no subprocess: each would spend seconds importing torch and
OpenVINO), folder listings, real prose."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import re
from pathlib import Path
from typing import NamedTuple

from engram_export.cli import main
from engram_export.core.fileio import STAGING_PREFIX

TINY_LAYER = 3  # the second layer of the tiny preset: its primes depend on layer 1's

__all__ = [
    "run_cli",
    "cli",
    "refused",
    "listing",
    "hf_snapshot",
    "package_prose",
    "Done",
    "STAGING_PREFIX",
    "python_blocks",
    "run_examples",
]


class Done(NamedTuple):
    """What a command did (the fields of ``subprocess.CompletedProcess`` that tests read)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> Done:
    """``engram-export -q ARGS`` as (exit code, stdout, stderr); argparse's exits become codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["-q", *map(str, args)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return Done(code, out.getvalue(), err.getvalue())


def cli(*args, check: bool = True) -> Done:
    """``run_cli``, failing the test on a non-zero exit unless ``check`` is False."""
    done = run_cli(*args)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def refused(result: tuple[int, str, str], message: str) -> None:
    """Exit 2 with exactly one line ``engram-export: error: ...message...`` and no trace."""
    code, out, err = result
    assert "Traceback" not in out + err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram-export: error: "), err
    assert message in lines[0], lines[0]


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (hidden ones included), to compare before and after a command."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def hf_snapshot(plain: Path, cache: Path) -> Path:
    """``plain``'s files as ``huggingface-cli download`` leaves them: blobs named by their SHA-256 (the
    LFS object id), and a snapshot folder of relative links to them."""
    blobs, snapshot = cache / "blobs", cache / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in plain.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        os.link(file, blobs / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / file.name)
    return snapshot


def package_prose() -> str:
    """The long descriptions of the distributions this project pins (``constraints.txt``), in its order:
    the same text wherever the tests run, whatever else is installed."""
    constraints = (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines()
    pinned = [line.split("==")[0] for line in constraints if "==" in line]
    texts = []
    for name in pinned:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            metadata = importlib.metadata.distribution(name).metadata
            texts.append(metadata.get_payload() or metadata.get("Description") or "")
    return "\n\n".join(text for text in texts if text)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


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
