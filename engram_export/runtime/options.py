"""How a runtime loads and runs its layers: one frozen record, checked in one place.

``EngramRuntime(path, **options)`` builds it from its keyword arguments (or takes one ready made,
``EngramRuntime(path, options=RuntimeOptions(...))``); the backends and the table store read their
settings from it, so a setting passes by name from the caller to where it is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from engram_export.contract.model_info import PRECISIONS
from engram_export.core.errors import EngramError
from engram_export.core.integrity import FileChecks, check_level
from engram_export.core.resources import parse_size
from engram_export.openvino.table_store import TABLE_STORES
from engram_export.openvino.tiered import HOT_SET_MEMORY, MISS_READS
from engram_export.sharding.names import check_name

__all__ = ["RuntimeOptions", "RUNTIMES"]

RUNTIMES = ("ov", "ort")
TABLES_SCHEME = "ray://"


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """The options of ``EngramRuntime`` (its docstring says what each does)."""

    runtime: str = "ov"
    precision: str | None = None
    device: str = "CPU"
    threads: int | None = None
    check_hashes: bool | str = True
    ov_config: Mapping | None = None
    table_memory: str = "mmap"
    cache_budget: int | str = 0  # bytes of rows read lately kept by a tiered table (a size: "2GiB")
    miss_reads: str = "auto"  # how a tiered table reads its misses (openvino/tiered.py)
    hot_set_memory: str = "private"  # a tiered table's hot rows: a private copy, or the files' shared pages
    lookup_kernel: bool = True
    tables: str | None = None  # "ray://NAME": the tables served by shards (engram-export serve-tables)
    shard_deadline: float = 10.0  # seconds a call waits for a shard (its replicas, its restart) before it fails
    ray_address: str | None = None  # the Ray cluster (default: RAY_ADDRESS, else the one running here)

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise EngramError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise EngramError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.device, str) or not self.device:
            raise EngramError(f"device must be an OpenVINO device name such as 'CPU', got {self.device!r}")
        threads = self.threads
        if threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 4096
        ):
            raise EngramError(f"threads must be a positive integer or None, got {threads!r}")
        if self.ov_config is not None:
            if not isinstance(self.ov_config, Mapping) or not all(isinstance(k, str) for k in self.ov_config):
                raise EngramError(f"ov_config must be a dict of OpenVINO property names, got {self.ov_config!r}")
            object.__setattr__(self, "ov_config", MappingProxyType(dict(self.ov_config)))  # a copy, read-only
        if self.table_memory not in TABLE_STORES:
            raise EngramError(f"table_memory must be one of {', '.join(TABLE_STORES)}, got {self.table_memory!r}")
        object.__setattr__(self, "cache_budget", parse_size(self.cache_budget, "cache_budget"))
        if self.cache_budget and self.table_memory != "tiered":
            raise EngramError("cache_budget is the cache of table_memory='tiered'; other table_memory modes take none")
        if self.miss_reads not in MISS_READS:
            raise EngramError(f"miss_reads must be one of {', '.join(MISS_READS)}, got {self.miss_reads!r}")
        if self.hot_set_memory not in HOT_SET_MEMORY:
            raise EngramError(f"hot_set_memory must be one of {', '.join(HOT_SET_MEMORY)}, got {self.hot_set_memory!r}")
        if self.table_memory == "tiered" and (self.runtime != "ov" or self.lookup_kernel is not True):
            raise EngramError("table_memory='tiered' needs the OpenVINO runtime with its row kernel (runtime='ov')")
        self._check_tables()
        if not isinstance(self.lookup_kernel, bool):
            raise EngramError(f"lookup_kernel must be True or False, got {self.lookup_kernel!r}")
        check_level(self.check_hashes)  # refuses a check_hashes it does not know

    def _check_tables(self) -> None:
        if self.tables is None:
            return
        if not isinstance(self.tables, str) or not self.tables.startswith(TABLES_SCHEME):
            raise EngramError(f"tables must be {TABLES_SCHEME}NAME (engram-export serve-tables), got {self.tables!r}")
        check_name(self.tables[len(TABLES_SCHEME) :])
        if self.runtime != "ov" or self.lookup_kernel is not True:
            raise EngramError("tables served by shards need the OpenVINO runtime with its row kernel (runtime='ov')")
        if self.table_memory != "mmap" or self.cache_budget:
            raise EngramError(
                "table_memory and cache_budget place a local table; the shards place theirs "
                "(engram-export serve-tables --table-memory)"
            )
        deadline = self.shard_deadline
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline <= 3600:
            raise EngramError(f"shard_deadline must be seconds in (0, 3600], got {deadline!r}")

    @property
    def table_name(self) -> str | None:
        """NAME of ``tables="ray://NAME"``."""
        return None if self.tables is None else self.tables[len(TABLES_SCHEME) :]

    def file_checks(self) -> FileChecks:
        """The ``FileChecks`` of one load: ``check_hashes``' level, table files not needed here when the
        shards serve the tables (it records the files the load leaves unhashed)."""
        return FileChecks(check_level(self.check_hashes), tables_elsewhere=self.tables is not None)

    @property
    def background_verification(self) -> bool:
        return self.check_hashes == "background"
