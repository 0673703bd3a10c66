"""The PyTorch layer: the demo's parameter names, both forwards, and checkpoint loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram_export.core.errors import EngramError
from engram_export.models.weights import build_layer, read_checkpoint
from tests.helpers import TINY_LAYER

SPEC_NAMES = (  # spec section 6, hc_mult = 4
    [
        "multi_head_embedding.offsets",
        "multi_head_embedding.embedding.weight",
        "value_proj.weight",
        "value_proj.bias",
        "short_conv.conv.weight",
    ]
    + [f"key_projs.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    + [f"{n}.{i}.weight" for n in ("norm1", "norm2", "short_conv.norms") for i in range(4)]
)


def test_state_dict_has_the_demo_names_and_shapes(tiny_layer, tiny_config):
    state = tiny_layer.state_dict()
    assert sorted(state) == sorted(SPEC_NAMES)
    d, width = tiny_config.hidden_size, tiny_config.engram_hidden_size
    assert state["multi_head_embedding.embedding.weight"].shape == (sum(tiny_layer.primes), tiny_config.head_dim)
    assert state["key_projs.3.weight"].shape == (d, width)
    assert state["short_conv.conv.weight"].shape == (4 * d, 1, tiny_config.kernel_size)
    assert state["multi_head_embedding.offsets"].tolist() == [
        sum(tiny_layer.primes[:h]) for h in range(len(tiny_layer.primes))
    ]


@pytest.mark.parametrize("batch,tokens", [(1, 1), (2, 17), (50, 14)])
def test_vectorized_forward_equals_demo_layout(tiny_layer, tiny_config, batch, tokens):
    torch.manual_seed(0)
    ids = torch.randint(-1, tiny_config.vocab_size, (batch, tokens))
    hidden = torch.randn(batch, tokens, tiny_config.hc_mult, tiny_config.hidden_size)
    a = tiny_layer.forward_reference(ids, hidden)
    b = tiny_layer.forward_vectorized(ids, hidden)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_output_is_causal(tiny_layer, tiny_config):
    """Changing token t changes no output before t (conv and n-grams look only left)."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 20))
    hidden = torch.randn(1, 20, tiny_config.hc_mult, tiny_config.hidden_size)
    base = tiny_layer(ids, hidden)
    ids2, hidden2 = ids.clone(), hidden.clone()
    ids2[0, 12] = (ids[0, 12] + 1) % tiny_config.vocab_size
    hidden2[0, 12] += 1
    changed = tiny_layer(ids2, hidden2)
    torch.testing.assert_close(changed[:, :12], base[:, :12], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 12], base[:, 12])


def _reload(tiny_config, path, **kwargs):
    return build_layer(tiny_config, TINY_LAYER, weights=path, **kwargs)


def _same(a, b):
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("with_offsets", [True, False])
def test_checkpoint_round_trip(tiny_layer, tiny_config, tmp_path, fmt, with_offsets):
    state = {k: v.clone() for k, v in tiny_layer.state_dict().items()}
    if not with_offsets:
        del state["multi_head_embedding.offsets"]
    path = tmp_path / f"w.{fmt}"
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    _same(tiny_layer, _reload(tiny_config, path))


def test_full_model_checkpoint_with_prefix_and_bf16(tiny_layer, tiny_config, tmp_path):
    prefix = f"model.layers.{TINY_LAYER}.engram."
    state = {
        prefix + k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_layer.state_dict().items()
    }
    state["model.embed_tokens.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    loaded = _reload(tiny_config, tmp_path / "model.safetensors", prefix=prefix)
    weight = loaded.state_dict()["value_proj.weight"]
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, tiny_layer.value_proj.weight.to(torch.bfloat16).float())


def test_shape_mismatch_names_tensor_and_shapes(tiny_layer, tiny_config, tmp_path):
    state = dict(tiny_layer.state_dict())
    state["key_projs.2.weight"] = torch.zeros(48, 63)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(
        EngramError,
        match=r"key_projs\.2\.weight has shape \[48, 63\], the config "
        r"expects \[48, 64\]",
    ):
        _reload(tiny_config, tmp_path / "w.safetensors")


def test_checkpoint_from_another_config_is_refused(tiny_layer, tiny_config, tmp_path):
    torch.save(dict(tiny_layer.state_dict()), tmp_path / "w.pt")
    with pytest.raises(EngramError, match="multi_head_embedding.embedding.weight has shape"):
        build_layer(tiny_config.replace(engram_vocab_size=(1009, 1499)), TINY_LAYER, weights=tmp_path / "w.pt")
    with pytest.raises(EngramError, match="unexpected tensor.*key_projs.3"):
        build_layer(tiny_config.replace(hc_mult=3), TINY_LAYER, weights=tmp_path / "w.pt")
    state = dict(tiny_layer.state_dict())
    state["multi_head_embedding.offsets"] = state["multi_head_embedding.offsets"] + 1
    torch.save(state, tmp_path / "w2.pt")
    with pytest.raises(EngramError, match="offsets disagrees"):
        _reload(tiny_config, tmp_path / "w2.pt")


def test_missing_tensor_or_wrong_prefix(tiny_layer, tiny_config, tmp_path):
    state = dict(tiny_layer.state_dict())
    del state["norm2.1.weight"]
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(EngramError, match=r"missing tensor\(s\) norm2\.1\.weight"):
        _reload(tiny_config, tmp_path / "w.safetensors")
    with pytest.raises(EngramError, match="no tensor .* starts with prefix 'layers.9.'"):
        _reload(tiny_config, tmp_path / "w.safetensors", prefix="layers.9.")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_corrupt_and_truncated_files(tiny_layer, tmp_path, fmt):
    path = tmp_path / f"w.{fmt}"
    state = dict(tiny_layer.state_dict())
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngramError, match="not a readable"):
        read_checkpoint(path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EngramError, match="not a readable"):
        read_checkpoint(path)
    with pytest.raises(EngramError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_random_init_is_seeded(tiny_config):
    a = build_layer(tiny_config, 1, seed=7)
    b = build_layer(tiny_config, 1, seed=7)
    c = build_layer(tiny_config, 1, seed=8)
    _same(a, b)
    assert not torch.equal(a.value_proj.weight, c.value_proj.weight)
    assert not np.allclose(a.norm1[0].weight.numpy(), 1.0)
