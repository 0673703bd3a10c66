"""Validate, then act: a seeded fuzz pass over the Python API.

Each hostile call must either give the right answer or raise ``EngramError`` (never another exception),
and leave the runtime and every session as they were: after each refused call, the next decode step
must equal the full forward over every token accepted so far.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

from engram_export.core.errors import EngramError
from engram_export.measure.verify import random_inputs
from engram_export.runtime import EngramRuntime

LAYERS = (1, 3)


def _bad_ids(rng: random.Random, good: np.ndarray, alone: bool = False):
    """Ids refused with or (``alone``: for prefetch, which takes no hidden states) without them."""
    batch = good.shape[0]
    bad = [
        good.astype(np.float32),
        good[:, :, None],
        good[0],
        good[:0],
        good + 5000,
        good - 2**40,
        [[1, 2], [3]] * batch,
        "ids",
        None,
        np.array([[object()]] * batch),
        good.astype(bool),
        good.astype(np.complex64),
    ]
    return rng.choice(bad if alone else [*bad, np.zeros((batch + 1, 1), np.int64)])


def _bad_hidden(rng: random.Random, good: np.ndarray):
    return rng.choice(
        [
            good.astype(np.float64),
            good.astype(np.float16),
            good[..., :-1],
            good[:, :, :1],
            good[0],
            None,
            "hidden",
            [[1.0]],
            good[:1] if good.shape[0] > 1 else np.concatenate([good, good]),
            np.zeros((*good.shape[:2], 4, 48), np.int32),
        ]
    )


def test_refused_session_calls_change_nothing(folders, tiny_config):
    runtime = EngramRuntime(folders["f32"])
    rng = random.Random(0)
    batch, total = 2, 24
    ids, _ = random_inputs(tiny_config, 5000, batch, total, seed=1)
    hidden = {layer: random_inputs(tiny_config, 5000, batch, total, seed=10 + layer)[1] for layer in LAYERS}
    full = {layer: runtime.layer(layer)(ids, hidden[layer]) for layer in LAYERS}
    session = runtime.session(batch)
    session.prefill(ids[:, :3], {layer: hidden[layer][:, :3] for layer in LAYERS})
    refusals = 0
    for t in range(3, total):
        good_ids, good_hidden = ids[:, t : t + 1], {layer: hidden[layer][:, t : t + 1] for layer in LAYERS}
        for _ in range(4):
            call = rng.choice([session.step, session.prefill])
            which = rng.randrange(4)
            bad_hidden = dict(good_hidden)
            if which == 0:
                args = (_bad_ids(rng, good_ids), good_hidden)
            elif which == 1:
                bad_hidden[rng.choice(LAYERS)] = _bad_hidden(rng, good_hidden[1])
                args = (good_ids, bad_hidden)
            elif which == 2:
                args = (
                    good_ids,
                    rng.choice(
                        [
                            {},  # (layer 1 alone is a step at its depth, not a mistake)
                            {1: good_hidden[1], 2: good_hidden[3]},
                            good_hidden[1],
                            {"1": good_hidden[1], 3: good_hidden[3]},
                            None,
                        ]
                    ),
                )
            else:  # two tokens: a fine prompt for prefill, refused by step
                call, args = session.step, (ids[:, t - 1 : t + 1], {k: hidden[k][:, t - 1 : t + 1] for k in LAYERS})
            with pytest.raises(EngramError):
                call(*args)
            refusals += 1
        step = session.step(good_ids, good_hidden)
        for layer in LAYERS:
            np.testing.assert_allclose(step[layer], full[layer][:, t : t + 1], rtol=1e-5, atol=1e-5)
    assert refusals == 4 * (total - 3)


def test_refused_runtime_calls_change_nothing(folders, tiny_config):
    runtime = EngramRuntime(folders["f32"])
    rng = random.Random(1)
    ids, hidden = random_inputs(tiny_config, 5000, 3, 7, seed=2)
    expected = runtime.layer(3)(ids, hidden)
    handle = runtime.prefetch(ids)
    for _ in range(60):
        which = rng.randrange(5)
        with pytest.raises(EngramError):
            if which == 0:
                runtime.layer(3)(_bad_ids(rng, ids), hidden)
            elif which == 1:
                runtime.layer(3)(ids, _bad_hidden(rng, hidden))
            elif which == 2:
                runtime.prefetch(_bad_ids(rng, ids, alone=True))
            elif which == 3:
                runtime.layer(3).fuse(handle, _bad_hidden(rng, hidden))
            else:
                runtime.layer(rng.choice([0, 2, -1, "3", None]))
    np.testing.assert_array_equal(runtime.layer(3).fuse(handle, hidden), expected)
    np.testing.assert_array_equal(runtime.layer(3)(ids, hidden), expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(device=""), "device must be an OpenVINO device name"),
        (dict(device=3), "device must be an OpenVINO device name"),
        (dict(device="NPU9"), "OpenVINO cannot compile"),
        (dict(threads=0), "threads must be a positive integer"),
        (dict(threads=True), "threads must be a positive integer"),
        (dict(threads="2"), "threads must be a positive integer"),
        (dict(runtime="tvm"), "runtime must be one of"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(check_hashes="sometimes"), "check_hashes must be"),
    ],
)
def test_bad_runtime_arguments(folders, kwargs, message):
    with pytest.raises(EngramError, match=message):
        EngramRuntime(folders["f32"], **kwargs)


def _with_metadata(source, target, key, value):
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    "key,edit,message",
    [
        ("engram.config", lambda v: v[:-5], "malformed Engram metadata"),
        ("engram.layer_id", lambda v: "three", "malformed Engram metadata"),
        ("engram.layer_id", lambda v: "2", "metadata says layer 2"),
        ("engram.num_ids", lambda v: "-4", "malformed Engram metadata"),
        ("engram.config", lambda v: v.replace('"hidden_size": 48', '"hidden_size": 64'), "file and metadata disagree"),
        ("engram.config", lambda v: v.replace('"hc_mult": 4', '"hc_mult": 2'), "file and metadata disagree"),
    ],
)
@pytest.mark.parametrize("backend", ["ort", "ov"])
def test_bad_metadata(tiny_files, tmp_path, key, edit, message, backend):
    model = onnx.load(str(tiny_files["onnx"]))
    value = next(p.value for p in model.metadata_props if p.key == key)
    path = _with_metadata(tiny_files["onnx"], tmp_path / "m.onnx", key, edit(value))
    with pytest.raises(EngramError, match=message):
        EngramRuntime(path, runtime=backend)


def test_library_errors_give_their_reason():
    from engram_export.core.errors import one_line

    openvino = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:84:\nCheck 'false' failed at "
        "src/frontends/common/src/frontend.cpp:47:\nPort for tensor name i was not found.\n"
    )
    assert one_line(openvino) == "Port for tensor name i was not found."
    assert (
        one_line(RuntimeError("Exception from src/core/src/runtime/allocator.cpp:79:\nstd::bad_alloc"))
        == "std::bad_alloc"
    )
    assert one_line(ValueError("kaput\nsecond line")) == "kaput"
    assert one_line(KeyError()) == "KeyError"
