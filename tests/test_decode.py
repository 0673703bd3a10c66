"""Incremental decode: prefill T tokens then k steps equals the full-sequence forward at every position.

f32: max |diff| / max |ref| <= 1e-4 against the one-shot OpenVINO call over T+k tokens and against
PyTorch (the same tolerance as every f32 path); bf16: mean row cosine >= 0.999 against PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_export.core.errors import EngramError
from engram_export.measure.verify import compare, random_inputs
from engram_export.runtime import EngramRuntime


def decode(session, ids, hidden_by_layer, prompt):
    outputs = [session.prefill(ids[:, :prompt], {k: h[:, :prompt] for k, h in hidden_by_layer.items()})]
    for t in range(prompt, ids.shape[1]):
        outputs.append(session.step(ids[:, t : t + 1], {k: h[:, t : t + 1] for k, h in hidden_by_layer.items()}))
    return {layer: np.concatenate([o[layer] for o in outputs], axis=1) for layer in hidden_by_layer}


@pytest.mark.parametrize("batch,prompt,steps", [(3, 1, 1), (3, 1, 12), (3, 5, 7), (3, 16, 3), (50, 10, 4)])
def test_prefill_then_steps_equals_the_full_forward(folders, layers, batch, prompt, steps):
    runtime = EngramRuntime(folders["f32"])
    config = layers[1].config
    ids, _ = random_inputs(config, 5000, batch, prompt + steps, seed=prompt * 100 + steps)
    hidden = {layer: random_inputs(config, 5000, batch, prompt + steps, seed=layer)[1] for layer in layers}
    session = runtime.session(batch)
    got = decode(session, ids, hidden, prompt)
    for layer, model in layers.items():
        full = runtime.layer(layer)(ids, hidden[layer])
        assert np.abs(got[layer] - full).max() <= 1e-4 * np.abs(full).max()
        with torch.inference_mode():
            reference = model(torch.from_numpy(ids), torch.from_numpy(hidden[layer])).double().numpy()
        assert compare("decode", reference, got[layer]).passed


def test_bf16_decode_and_reset(folders, layers):
    runtime = EngramRuntime(folders["bf16"])
    config = layers[1].config
    ids, hidden = random_inputs(config, 5000, 2, 10, seed=4)
    session = runtime.session(2)
    first = decode(session, ids, {1: hidden, 3: hidden}, 4)
    again = decode(session, ids, {1: hidden, 3: hidden}, 4)  # prefill resets every sequence
    for layer, model in layers.items():
        np.testing.assert_array_equal(first[layer], again[layer])
        with torch.inference_mode():
            reference = model(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
        assert compare("bf16 decode", reference, first[layer], "bf16").passed


def test_sessions_are_independent(folders, layers):
    runtime = EngramRuntime(folders["f32"]).layer(3)
    config = layers[3].config
    ids, hidden = random_inputs(config, 5000, 1, 6, seed=8)
    a, b = runtime.session(1), runtime.session(1)
    a.prefill(ids[:, :3], hidden[:, :3])
    b.prefill(ids[:, 3:5], hidden[:, 3:5])  # another conversation in between
    step = a.step(ids[:, 3:4], hidden[:, 3:4])[3]
    np.testing.assert_allclose(step, runtime(ids[:, :4], hidden[:, :4])[:, 3:4], rtol=1e-5, atol=1e-6)


def test_refused_calls_leave_the_session_usable(folders, layers, tiny_raw_files):
    runtime = EngramRuntime(folders["f32"])
    config = layers[1].config
    ids, hidden = random_inputs(config, 5000, 2, 6, seed=9)
    session = runtime.session(2)
    session.prefill(ids[:, :4], {1: hidden[:, :4], 3: hidden[:, :4]})
    with pytest.raises(EngramError, match="decodes 2 sequences, got a batch of 3"):
        session.step(
            np.zeros((3, 1), np.int64), {1: np.zeros((3, 1, 4, 48), np.float32), 3: np.zeros((3, 1, 4, 48), np.float32)}
        )
    with pytest.raises(EngramError, match="one token per sequence"):
        session.step(ids[:, 4:6], {1: hidden[:, 4:6], 3: hidden[:, 4:6]})
    with pytest.raises(EngramError, match=r"hidden states are for layers \[1, 2\]"):
        session.step(ids[:, 4:5], {1: hidden[:, 4:5], 2: hidden[:, 4:5]})
    with pytest.raises(EngramError, match="out of range"):
        session.step(ids[:, 4:5] + 5000, {1: hidden[:, 4:5], 3: hidden[:, 4:5]})
    step = session.step(ids[:, 4:5], {1: hidden[:, 4:5], 3: hidden[:, 4:5]})
    np.testing.assert_allclose(step[1], runtime.layer(1)(ids[:, :5], hidden[:, :5])[:, 4:5], rtol=1e-5, atol=1e-6)
    with pytest.raises(EngramError, match="batch size must be a positive integer"):
        runtime.session(0)
    with pytest.raises(EngramError, match="decode needs an optimized export"):
        EngramRuntime(tiny_raw_files["f32"]).session(1)


def test_each_layer_steps_at_its_depth(folders, layers):
    """A backbone steps each Engram layer when it reaches it: layer 1 of a token, then layer 3, with or
    without the token's lookups prefetched, gives what stepping both at once gives, bit for bit."""
    runtime = EngramRuntime(folders["f32"])
    ids, hidden = random_inputs(layers[1].config, 5000, 2, 8, seed=12)
    whole, split = runtime.session(2), runtime.session(2)
    expected = decode(whole, ids, {1: hidden, 3: hidden}, 3)
    got = [split.prefill(ids[:, :3], {1: hidden[:, :3], 3: hidden[:, :3]})]
    for t in range(3, 8):
        token, h = ids[:, t : t + 1], hidden[:, t : t + 1]
        if t % 2:
            split.prefetch(token)
        first = split.step(token, {1: h})
        assert split.position == t  # the token is not done until every layer stepped it
        with pytest.raises(EngramError, match=r"layers \[3\] have not stepped this token yet"):
            split.prefetch(ids[:, t + 1 : t + 2] if t < 7 else token)
        with pytest.raises(EngramError, match=r"layers \[1\] already stepped this token; layers \[3\] have not"):
            split.step(token, {1: h})
        with pytest.raises(EngramError, match=r"layers \[3\] have not stepped the last token yet"):
            split.step(ids[:, t + 1 : t + 2] if t < 7 else token + 1, {3: h})
        got.append({**first, **split.step(token, {3: h})})
        assert split.position == t + 1
    for layer in (1, 3):
        np.testing.assert_array_equal(np.concatenate([g[layer] for g in got], axis=1), expected[layer])
    with pytest.raises(EngramError, match="a prefill takes hidden states for every layer"):
        split.prefill(ids[:, :3], {1: hidden[:, :3]})
