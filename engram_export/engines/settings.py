"""What the engines' plug-ins serve, from the environment: inert unless ``ENGRAM_EXPORT_ROWS`` (or a
file ``ENGRAM_EXPORT_CONFIG`` names) says which folder.

Environment (each also a key of the JSON file, in lower case without the prefix):
``ENGRAM_EXPORT_ROWS`` the folder (exported, compiled or calibrated); ``ENGRAM_EXPORT_TABLES``
``ray://NAME`` when shards serve its tables; ``ENGRAM_EXPORT_TABLE_MEMORY``, ``_CACHE_BUDGET``,
``_MISS_READS``, ``_HOT_SET_MEMORY``, ``_SHARD_DEADLINE``, ``_RAY_ADDRESS``, ``_CHECK_HASHES`` as
``EngramRows`` takes them, except that a tiered table's hot set defaults to ``shared``: the files' pages,
one copy for every process of the engine on the host, not one per rank.
Every engine process loads the plug-in; ``check`` refuses a bad setting there, in one line, without
opening the tables (a front end never reads a row). The tables are opened once per process, when the
process builds the model (``layer_rows``), still at the engine's start.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engram_export.core.errors import EngramError

if TYPE_CHECKING:
    from engram_export.runtime.rows import EngramRows, LayerRows

__all__ = ["configured", "settings", "check", "open_rows", "layer_rows", "check_signature"]

PREFIX = "ENGRAM_EXPORT_"
KEYS = (
    "rows",
    "tables",
    "table_memory",
    "cache_budget",
    "miss_reads",
    "hot_set_memory",
    "shard_deadline",
    "ray_address",
    "check_hashes",
)
_NUMBERS = {"shard_deadline": float}
_opened: dict[str, EngramRows] = {}
_lock = threading.Lock()


def configured() -> bool:
    """Whether the plug-ins have anything to serve (else they leave the engine as it is)."""
    return bool(os.environ.get(PREFIX + "ROWS") or os.environ.get(PREFIX + "CONFIG"))


def settings() -> dict:
    """The settings, from ``ENGRAM_EXPORT_CONFIG``'s file, then the environment over it."""
    found: dict = {}
    path = os.environ.get(PREFIX + "CONFIG")
    if path:
        try:
            found = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise EngramError(f"engram-export plug-in: cannot read {PREFIX}CONFIG={path} ({exc})") from exc
        if not isinstance(found, dict) or set(found) - set(KEYS):
            raise EngramError(f"engram-export plug-in: {path} must be a JSON object of {', '.join(KEYS)}")
    for key in KEYS:
        value = os.environ.get(PREFIX + key.upper())
        if value:
            found[key] = _NUMBERS.get(key, str)(value)
    if "check_hashes" in found and found["check_hashes"] in ("true", "True", "1"):
        found["check_hashes"] = True
    if found.get("table_memory") == "tiered":  # an engine's processes (its ranks) share one hot set
        found.setdefault("hot_set_memory", "shared")
    if not found.get("rows"):
        raise EngramError(f"engram-export plug-in: set {PREFIX}ROWS to the folder whose rows it serves")
    return found


def check() -> None:
    """Refuse, in one line, what opening the tables would refuse first (``EngramRows.check``)."""
    from engram_export.runtime.rows import EngramRows

    options = settings()
    folder = options.pop("rows")
    try:
        EngramRows.check(folder, **options)
    except EngramError as exc:
        raise EngramError(f"engram-export plug-in ({PREFIX}ROWS={folder}): {exc}") from None


def open_rows() -> EngramRows:
    """This process's ``EngramRows`` of the configured folder, opened on first use (every check of the
    folder, its files and its shards runs then)."""
    from engram_export.runtime.rows import EngramRows

    options = settings()
    key = json.dumps(options, sort_keys=True)
    with _lock:
        if key not in _opened:
            folder = options.pop("rows")
            try:
                _opened[key] = EngramRows(folder, **options)
            except EngramError as exc:
                raise EngramError(f"engram-export plug-in ({PREFIX}ROWS={folder}): {exc}") from None
        return _opened[key]


def layer_rows(layer_id: int, table_rows: int, row_size: int, primes: tuple[int, ...] | None = None) -> LayerRows:
    """The rows of the engine's Engram layer ``layer_id``, after refusing a folder whose table is not the
    one the engine's model would hold there (its rows, width, FP8 form, and the layer's primes)."""
    rows = open_rows()
    if layer_id not in rows:
        raise EngramError(
            f"engram-export plug-in: the engine's model has an Engram layer {layer_id}; {rows.path} has "
            f"layers {rows.layer_ids} (a folder of another model?)"
        )
    layer = rows[layer_id]
    stored = (layer.stored["element"], layer.stored["scale"], layer.stored["group_size"])
    found = (layer.table_rows, layer.row_size)
    if found != (table_rows, row_size) or stored != ("e4m3", "e8m0", 32):
        raise EngramError(
            f"engram-export plug-in: layer {layer_id} of {rows.path} is {found[0]} rows of {found[1]} "
            f"{'/'.join(map(str, stored))}; the engine's model wants {table_rows} rows of {row_size} "
            f"e4m3/e8m0/32 (a folder of another model?)"
        )
    if primes is not None:
        from engram_export.models.table_rows import hashing_of

        ours = tuple(hashing_of(rows.config).primes(layer_id))
        if ours != tuple(primes):
            raise EngramError(
                f"engram-export plug-in: layer {layer_id} of {rows.path} hashes into other head sizes than "
                f"the engine's model (another engram_vocab_size or layer list?)"
            )
    return layer


def check_signature(function, expected: tuple[str, ...], name: str, engine: str) -> None:
    """Refuse, naming the method, an engine release whose ``function`` takes other parameters than the
    plug-in replaces (it was written for one release; a silent mismatch would serve wrong rows)."""
    import inspect

    found = tuple(inspect.signature(function).parameters)
    if found != expected:
        raise EngramError(
            f"engram-export plug-in: {engine}'s {name}{expected} is now {name}{found}: this plug-in was "
            f"written for another {engine} release; refusing to replace it"
        )
