"""``engram_export.runtime.torch``: OpenVINO Engram layers as PyTorch modules, swapped into a model in one call,
their lookups prefetched from the model's input ids.

Outputs are compared with the PyTorch layers at the f32 tolerance of ``verify`` (max |err| / max |ref|
<= 1e-4: float32 rounding of the projections and the conv, summed in another order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engram_export.core.errors import EngramError
from engram_export.measure.verify import random_inputs
from engram_export.runtime import EngramRuntime
from engram_export.runtime.torch import OpenVINOEngram, _numpy, swap_engram_modules


class TwoEngramModel(nn.Module):
    """A stand-in backbone: a linear layer between two Engram layers (demo family, hc_mult 4)."""

    def __init__(self, layers):
        super().__init__()
        self.engrams = nn.ModuleList([layers[1], layers[3]])
        self.mix = nn.Linear(layers[1].config.hidden_size, layers[1].config.hidden_size)

    def forward(self, input_ids, hidden_states):
        first = self.engrams[0](input_ids, hidden_states)
        return self.engrams[1](input_ids, self.mix(hidden_states + first))


def _relative_error(got, expected) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_swapped_model_matches_pytorch_and_fuses_prefetched_lookups(folders, layers, tiny_config, monkeypatch):
    torch.manual_seed(0)
    model = TwoEngramModel(layers).eval()
    ids, hidden = random_inputs(tiny_config, 5000, 3, 9, seed=2)
    ids_t, hidden_t = torch.from_numpy(ids), torch.from_numpy(hidden)
    with torch.inference_mode():
        expected = model(ids_t, hidden_t)
    runtime = EngramRuntime(folders["f32"])
    assert swap_engram_modules(model, runtime) == ["engrams.0", "engrams.1"]
    assert all(isinstance(m, OpenVINOEngram) for m in model.engrams)
    fused = []
    for layer in runtime.layer_ids:
        served = runtime.layer(layer)
        monkeypatch.setattr(served, "fuse", lambda *a, _f=served.fuse, _l=layer, **k: fused.append(_l) or _f(*a, **k))
    with torch.inference_mode():
        got = model(ids_t, hidden_t)
    assert fused == [1, 3]  # both layers finished from the lookups the pre-hook started
    assert got.dtype == expected.dtype and _relative_error(got, expected) <= 1e-4
    with torch.inference_mode():  # ids passed positionally: the same
        again = model(input_ids=ids_t, hidden_states=hidden_t)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_module_alone_reads_cpu_tensors_in_place_and_returns_the_callers_dtype(folders, layers, tiny_config):
    module = EngramRuntime(folders["f32"]).as_torch()[3]
    ids, hidden = random_inputs(tiny_config, 5000, 2, 5, seed=4)
    hidden_t = torch.from_numpy(hidden)
    assert np.shares_memory(_numpy(hidden_t, torch.float32), hidden)  # no copy of a float32 CPU tensor
    with torch.inference_mode():
        expected = layers[3](torch.from_numpy(ids), hidden_t)
        got = module(torch.from_numpy(ids), hidden_t)
        as_bf16 = module(torch.from_numpy(ids), hidden_t.to(torch.bfloat16))
    assert _relative_error(got, expected) <= 1e-4
    assert as_bf16.dtype == torch.bfloat16


def test_refusals_change_nothing(folders, layers, tiny_config):
    runtime = EngramRuntime(folders["f32"])
    with pytest.raises(EngramError, match="holds no Engram layer"):
        swap_engram_modules(nn.Linear(2, 2), runtime)
    with pytest.raises(EngramError, match="is itself an Engram layer"):
        swap_engram_modules(layers[1], runtime)
    model = TwoEngramModel(layers)
    with pytest.raises(EngramError, match="the runtime serves \\[3\\]"):
        swap_engram_modules(model, runtime.layer(3))
    assert not any(isinstance(m, OpenVINOEngram) for m in model.modules())  # nothing swapped
    with pytest.raises(EngramError, match="serves one layer"):
        OpenVINOEngram(runtime)
    module = runtime.as_torch()[1]
    with pytest.raises(EngramError, match="input_ids are needed"):
        module(None, torch.zeros(1, 1, tiny_config.hc_mult, tiny_config.hidden_size))
