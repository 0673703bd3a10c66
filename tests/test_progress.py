"""Progress: reported through logging by the library, drawn as a bar by the command line on a terminal."""

import io
import logging
import time

import pytest

from engram_export.core import progress


@pytest.fixture
def records(caplog, monkeypatch):
    """The progress records of the test (an in-process command line may have stopped their propagation)."""
    monkeypatch.setattr(logging.getLogger(progress.LOGGER), "propagate", True)
    caplog.set_level(logging.INFO, logger=progress.LOGGER)
    return caplog


def test_steps_report_how_far_they_got(records):
    with progress.steps("timing", 4, "rounds", every=0) as done:
        for _ in range(4):
            done.advance()
    shown = [r.progress for r in records.records if hasattr(r, "progress")]
    assert shown[:4] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert records.records[0].getMessage() == "timing ..." and records.records[-1].getMessage().startswith(
        "timing: done in"
    )


def test_bytes_written_follows_a_writer_that_reports_nothing(tmp_path, records):
    """The bytes a writer puts into the folder, polled while it writes (here: 4 chunks, 50 ms apart)."""
    chunk = b"x" * 1000
    with progress.bytes_written(tmp_path, 4000, "t.data", every=0.01):
        with open(tmp_path / "t.data", "wb") as file:
            for _ in range(4):
                file.write(chunk)
                file.flush()
                time.sleep(0.05)
    seen = [r.progress[0] for r in records.records if hasattr(r, "progress")]
    assert seen[-1] == 4000 and any(0 < s < 4000 for s in seen), seen
    assert seen == sorted(seen)


def test_an_export_with_external_data_reports_its_bytes(tiny_files, tmp_path, records):
    from engram_export.onnx.files import load_onnx, save_onnx

    save_onnx(load_onnx(tiny_files["onnx"]), tmp_path / "m.onnx", external_data_threshold=1000)
    size = (tmp_path / "m.onnx.data").stat().st_size
    assert [r.progress for r in records.records if hasattr(r, "progress")][-1] == (size, size)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_the_command_line_draws_a_bar_on_a_terminal_only(terminal):
    stream = _Terminal() if terminal else io.StringIO()
    handler = progress.TerminalHandler(stream)
    log = logging.getLogger("engram_export.test_progress")
    log.addHandler(handler)
    log.propagate, log.level = False, logging.INFO
    try:
        log.info("writing t.data: 50.0%", extra={"progress": (1, 2)})
        log.info("writing t.data: 100.0%", extra={"progress": (2, 2)})
        log.info("writing t.data: done")
    finally:
        log.removeHandler(handler)
    if terminal:
        assert stream.getvalue() == (
            f"\r[{'#' * 12}{'.' * 12}] [engram-export] writing t.data: 50.0%\033[K"
            f"\r[{'#' * 24}] [engram-export] writing t.data: 100.0%\033[K"
            "\n[engram-export] writing t.data: done\n"
        )
    else:
        assert stream.getvalue() == (
            "[engram-export] writing t.data: 50.0%\n"
            "[engram-export] writing t.data: 100.0%\n"
            "[engram-export] writing t.data: done\n"
        )
