"""One runtime shared by many threads: each caller gets its own right answer.

Every threaded result must equal, bit for bit, the single-threaded output for the same inputs: each
call runs on infer requests of its own, and a request gives the same numbers whichever thread uses it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.measure.verify import random_inputs
from engram_export.runtime import EngramRuntime

THREADS, CALLS = 8, 240
SHAPES = [(1, 1), (2, 5), (3, 9), (4, 2), (1, 17), (5, 3), (2, 1), (3, 14)]


def _inputs(config):
    return [random_inputs(config, 5000, batch, tokens, seed=i) for i, (batch, tokens) in enumerate(SHAPES)]


@pytest.mark.parametrize("kind,backend", [("f32", "ov"), ("bf16", "ov"), ("onnx", "ov"), ("onnx", "ort")])
def test_threads_get_their_own_answers(folders, tiny_config, kind, backend):
    runtime = EngramRuntime(folders[kind], runtime=backend)
    inputs = _inputs(tiny_config)
    expected = {(layer, i): runtime.layer(layer)(*inputs[i]) for layer in runtime.layer_ids for i in range(len(inputs))}

    def call(k: int):
        i, layer = k % len(inputs), runtime.layer_ids[k // len(inputs) % 2]
        ids, hidden = inputs[i]
        if backend == "ov" and k % 3 == 0:  # a prefetch in flight per call, fused from this thread
            handle = runtime.prefetch(ids)
            got = runtime.layer(layer).fuse(handle, hidden)
        else:
            got = runtime.layer(layer)(ids, hidden)
        return (layer, i), got

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(call, range(CALLS)))
    wrong = [key for key, got in results if not np.array_equal(got, expected[key])]
    assert not wrong, f"{len(wrong)} of {CALLS} threaded calls differ from the single-threaded output"


def test_many_prefetch_handles_in_flight(folders, tiny_config):
    """Handles made before any is fused (micro-batches in flight) each give their own answer."""
    runtime = EngramRuntime(folders["f32"])
    inputs = _inputs(tiny_config)
    handles = [runtime.prefetch(ids) for ids, _ in inputs]
    for handle, (ids, hidden) in zip(reversed(handles), reversed(inputs), strict=True):
        for layer in (3, 1):
            np.testing.assert_array_equal(runtime.layer(layer).fuse(handle, hidden), runtime.layer(layer)(ids, hidden))


def test_sessions_in_threads(folders, tiny_config):
    """Four sessions decoding at once, one per thread, each equal to the full forward."""
    runtime = EngramRuntime(folders["f32"])
    sequences = [random_inputs(tiny_config, 5000, 2, 8, seed=40 + i) for i in range(4)]

    def decode(i: int):
        ids, hidden = sequences[i]
        session = runtime.session(2)
        outs = [session.prefill(ids[:, :3], {1: hidden[:, :3], 3: hidden[:, :3]})[3]]
        for t in range(3, 8):
            outs.append(session.step(ids[:, t : t + 1], {1: hidden[:, t : t + 1], 3: hidden[:, t : t + 1]})[3])
        return np.concatenate(outs, axis=1)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(decode, range(4)))
    for (ids, hidden), decoded in zip(sequences, got, strict=True):
        full = runtime.layer(3)(ids, hidden)
        assert np.abs(decoded - full).max() <= 1e-4 * np.abs(full).max()


@pytest.mark.parametrize("threads", [None, 1])
def test_a_failing_inference_raises_whatever_the_thread_count(threads):
    """``stages.infer``, which the decode session and ``profile`` run their requests with, raises the
    error of a failing inference (as one line) with one OpenVINO thread too (OpenVINO 2026.4's CPU plugin drops that
    error from a synchronous ``infer`` with ``INFERENCE_NUM_THREADS`` 1 and hands back an empty output)."""
    import openvino
    from openvino import opset13 as ops

    from engram_export.openvino.stages import infer

    x, y = ops.parameter([-1], np.float32, name="x"), ops.parameter([-1], np.float32, name="y")
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    compiled = openvino.Core().compile_model(openvino.Model([ops.add(x, y)], [x, y]), "CPU", config)
    request = compiled.create_infer_request()
    with pytest.raises(
        EngramError, match="the Engram call failed: Eltwise shape infer input shapes dim index: 0 mismatch"
    ):
        infer(request, {"x": np.zeros(6, np.float32), "y": np.zeros(5, np.float32)})
    infer(request, {"x": np.ones(3, np.float32), "y": np.ones(3, np.float32)})
    np.testing.assert_array_equal(request.get_output_tensor(0).data, [2, 2, 2])


def test_one_thread_decodes_as_the_default(folders, tiny_config):
    ids, hidden = random_inputs(tiny_config, 5000, 2, 4, seed=7)
    results = []
    for threads in (None, 1):
        session = EngramRuntime(folders["f32"], threads=threads).layer(3).session(2)
        steps = [session.prefill(ids[:, :2], hidden[:, :2])[3]]
        steps += [session.step(ids[:, t : t + 1], hidden[:, t : t + 1])[3] for t in (2, 3)]
        results.append(np.concatenate(steps, axis=1))
    np.testing.assert_array_equal(results[1], results[0])
