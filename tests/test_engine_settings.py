"""What the engines' plug-ins serve, from the environment or a file (``engines/settings.py``), and the
cheap check every engine process runs (``EngramRows.check``); the plug-ins themselves are tested against
the engines' released code in ``tests/engines`` (their own environment)."""

from __future__ import annotations

import json

import pytest

from engram_export.core.errors import EngramError
from engram_export.engines import settings
from engram_export.runtime.rows import EngramRows


@pytest.fixture
def environment(monkeypatch):
    for key in settings.KEYS + ("config",):
        monkeypatch.delenv(settings.PREFIX + key.upper(), raising=False)
    settings._opened.clear()
    yield monkeypatch
    settings._opened.clear()


def test_inert_until_a_folder_is_named(environment, tmp_path):
    assert not settings.configured()
    environment.setenv("ENGRAM_EXPORT_TABLE_MEMORY", "tiered")  # a setting alone names nothing
    assert not settings.configured()
    with pytest.raises(EngramError, match="set ENGRAM_EXPORT_ROWS to the folder"):
        settings.settings()


def test_a_file_then_the_environment_over_it(environment, tmp_path, text_folders):
    config = tmp_path / "engram.json"
    config.write_text(json.dumps({"rows": str(text_folders["v41 f32"]), "table_memory": "populate"}))
    environment.setenv("ENGRAM_EXPORT_CONFIG", str(config))
    assert settings.configured()
    assert settings.settings() == {"rows": str(text_folders["v41 f32"]), "table_memory": "populate"}
    environment.setenv("ENGRAM_EXPORT_TABLE_MEMORY", "mmap")
    environment.setenv("ENGRAM_EXPORT_SHARD_DEADLINE", "2.5")
    assert settings.settings()["table_memory"] == "mmap" and settings.settings()["shard_deadline"] == 2.5
    settings.check()
    rows = settings.open_rows()
    assert rows is settings.open_rows() and rows.options.table_memory == "mmap"  # one per process
    environment.setenv("ENGRAM_EXPORT_TABLE_MEMORY", "tiered")  # a tiered table's hot set: shared by default
    assert settings.settings()["hot_set_memory"] == "shared"


def test_bad_settings_are_one_line_at_the_check(environment, tmp_path, text_folders):
    environment.setenv("ENGRAM_EXPORT_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(EngramError, match="cannot read ENGRAM_EXPORT_CONFIG="):
        settings.settings()
    (tmp_path / "bad.json").write_text(json.dumps({"rows": "x", "precision": "bf16"}))
    environment.setenv("ENGRAM_EXPORT_CONFIG", str(tmp_path / "bad.json"))
    with pytest.raises(EngramError, match="must be a JSON object of rows, tables, table_memory"):
        settings.settings()
    environment.delenv("ENGRAM_EXPORT_CONFIG")
    folder = text_folders["v41 f32"]
    cases = [
        ({"ROWS": str(tmp_path / "nothing")}, r"ENGRAM_EXPORT_ROWS=.*nothing\): .* is not a folder"),
        ({"ROWS": str(folder), "TABLE_MEMORY": "ssd"}, "table_memory must be one of"),
        ({"ROWS": str(folder), "TABLE_MEMORY": "tiered"}, "calibrate"),  # a folder never calibrated
        ({"ROWS": str(folder), "TABLES": "v41"}, "tables must be ray://NAME"),
    ]
    for values, message in cases:
        for key in ("ROWS", "TABLE_MEMORY", "TABLES"):
            environment.delenv("ENGRAM_EXPORT_" + key, raising=False)
        for key, value in values.items():
            environment.setenv("ENGRAM_EXPORT_" + key, value)
        with pytest.raises(EngramError, match=message):
            settings.check()
        assert not settings._opened  # the check opens nothing


def test_the_check_opens_nothing_and_refuses_what_opening_would(text_folders):
    EngramRows.check(text_folders["v41 onnx"], table_memory="populate")  # no table read, no model loaded
    with pytest.raises(EngramError, match="EngramRows takes table_memory, .*; not device"):
        EngramRows.check(text_folders["v41 onnx"], device="GPU")
