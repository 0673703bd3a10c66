"""The precision a runtime reports is the one it runs, asked of OpenVINO's ``OPTIMIZATION_CAPABILITIES``
(``openvino/precision.py``), never assumed from the instruction set.

Both sides are tested on every machine: a CPU without BF16 (AVX2 only) is stood in for by capabilities
that lack it, where the runtime must compile f32 throughout, report it, and say so once; the bf16
kernels themselves are checked where the CPU has them (``test_runtimes.py``). The unpatched test holds
on any CPU: what the layer reports is what OpenVINO compiled.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engram_export.measure.verify import checked_as, compare, random_inputs
from engram_export.openvino import precision
from engram_export.runtime import EngramRuntime
from tests.helpers import cli

LOGGER = "engram_export.openvino.precision"
NO_BF16 = ("FP32", "INT8", "BIN", "EXPORT_IMPORT")  # what OpenVINO 2026.4 lists on an AVX2-only EPYC


def _runtime_precisions(runtime) -> set[str]:
    """The runtime precisions of the compiled fuse stage's nodes."""
    nodes = runtime[runtime.layer_id]._backend.fuses.compiled.get_runtime_model().get_ordered_ops()
    return {node.get_rt_info()["runtimePrecision"].astype(str) for node in nodes}


@pytest.fixture
def without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "capabilities", lambda device="CPU": NO_BF16)
    monkeypatch.setattr(precision, "_said", set())


def test_a_layer_reports_what_openvino_compiled(tiny_files):
    runtime = EngramRuntime(tiny_files["bf16"])
    has_bf16 = "BF16" in precision.capabilities()
    assert runtime.requested_precision == "bf16"
    assert runtime.precision == precision.runs_as("bf16") == ("bf16" if has_bf16 else "f32")
    assert runtime.settings["precision"] == runtime.precision
    assert ("bf16" in _runtime_precisions(runtime)) == has_bf16


def test_without_bf16_kernels_a_bf16_layer_runs_f32_and_says_so_once(tiny_files, tiny_layer, without_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        runtimes = [EngramRuntime(tiny_files["bf16"]), EngramRuntime(tiny_files["f32"], precision="bf16")]
    said = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    assert said == [
        "engram_bf16.xml: this CPU has no bf16 kernels (OpenVINO OPTIMIZATION_CAPABILITIES: FP32, INT8, BIN, "
        "EXPORT_IMPORT): bf16 runs as f32 here"
    ]
    for runtime in runtimes:
        assert (runtime.precision, runtime.requested_precision) == ("f32", "bf16")
        assert runtime.settings["precision"] == "f32"
        assert "bf16" not in _runtime_precisions(runtime)
    assert "precision='f32'" in repr(runtimes[0])
    # the numbers: a bf16 IR keeps its weights in f16, so its f32 run is held to bf16's criterion
    ids, hidden = random_inputs(tiny_layer.config, len(tiny_layer.hashing.lut), 50, 14)
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    assert checked_as(runtimes[0]) == "bf16" and checked_as(runtimes[1]) == "f32"
    for runtime in runtimes:
        result = compare("f32 run", reference, runtime(ids, hidden), checked_as(runtime))
        assert result.passed, result


def test_compile_says_where_bf16_will_run_as_f32(tiny_files, without_bf16, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cli("compile", tiny_files["onnx"], "--precision", "bf16", "-o", tmp_path / "a.xml")
        cli("compile", tiny_files["onnx"], "--precision", "f32", "-o", tmp_path / "b.xml")
    said = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    assert len(said) == 1 and said[0].startswith("a.xml is written for bf16: this CPU has no bf16 kernels"), said


def test_nothing_is_said_where_the_precision_runs(tiny_files, monkeypatch, caplog):
    monkeypatch.setattr(precision, "capabilities", lambda device="CPU": ("FP32", "BF16", "INT8"))
    monkeypatch.setattr(precision, "_said", set())
    assert precision.runs_as("bf16") == "bf16" and precision.emulation_line("bf16") is None
    assert precision.runs_as("f32") == "f32"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        precision.say_emulated("bf16")
    assert not [record for record in caplog.records if record.name == LOGGER]


def test_a_device_that_does_not_say_runs_what_is_asked(monkeypatch):
    monkeypatch.setattr(precision, "capabilities", lambda device="CPU": None)
    assert precision.runs_as("bf16", "AUTO") == "bf16"
    assert precision.emulation_line("bf16", "AUTO") is None
