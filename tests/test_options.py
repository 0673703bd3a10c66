"""Runtime options: one frozen record, checked in one place, passed by name."""

from __future__ import annotations

import dataclasses

import pytest

from engram_export.core.errors import EngramError
from engram_export.openvino.table_store import TABLE_STORES, HugePagesStore, MappedStore, PopulatedStore, table_store
from engram_export.runtime import EngramRuntime, RuntimeOptions


def test_options_are_frozen_and_copy_the_ov_config():
    config = {"PERFORMANCE_HINT": "THROUGHPUT"}
    options = RuntimeOptions(ov_config=config, table_memory="populate")
    config["PERFORMANCE_HINT"] = "LATENCY"  # the caller's dict changes later: the options do not
    assert options.ov_config["PERFORMANCE_HINT"] == "THROUGHPUT"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threads = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.ov_config["X"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(runtime="tvm"), "runtime must be one of ov, ort"),
        (dict(precision="fp16"), "precision must be one of"),
        (dict(threads=0), "threads must be a positive integer"),
        (dict(threads=True), "threads must be a positive integer"),
        (dict(ov_config=[("A", 1)]), "ov_config must be a dict"),
        (dict(table_memory="disk"), "table_memory must be one of mmap, populate, hugepages"),
        (dict(lookup_kernel="yes"), "lookup_kernel must be True or False"),
        (dict(check_hashes="later"), "check_hashes must be"),
    ],
)
def test_every_option_is_checked_in_one_place(settings, message):
    with pytest.raises(EngramError, match=message):
        RuntimeOptions(**settings)


def test_the_runtime_takes_options_or_keywords(tiny_files):
    options = RuntimeOptions(threads=1, table_memory="populate")
    by_record, by_name = (
        EngramRuntime(tiny_files["f32"], options),
        EngramRuntime(tiny_files["f32"], threads=1, table_memory="populate"),
    )
    assert by_record.options == by_name.options == options
    assert by_record.settings["lookup"] == "row kernel, table populate"
    with pytest.raises(EngramError, match="give options or keyword settings, not both"):
        EngramRuntime(tiny_files["f32"], options, threads=2)
    with pytest.raises(EngramError, match="unexpected keyword argument 'table'"):
        EngramRuntime(tiny_files["f32"], table="mmap")
    with pytest.raises(EngramError, match="options must be a RuntimeOptions"):
        EngramRuntime(tiny_files["f32"], {"threads": 1})


def test_a_table_store_per_name():
    assert {name: type(table_store(name)) for name in TABLE_STORES if name != "tiered"} == {
        "mmap": MappedStore,
        "populate": PopulatedStore,
        "hugepages": HugePagesStore,
    }
    with pytest.raises(EngramError, match="serves the hot set of a calibrated folder"):
        table_store("tiered")  # a store per layer, made by the runtime from the folder's manifest
    store = PopulatedStore()
    assert table_store(store) is store
    with pytest.raises(EngramError, match="table_memory must be one of"):
        table_store("disk")
